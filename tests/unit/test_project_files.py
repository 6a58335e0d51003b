"""Project files that deployments depend on: compose services, .env.example, import rules."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _env_example_names() -> set[str]:
    names = set()
    for line in (REPO / ".env.example").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            names.add(line.split("=", 1)[0].strip())
    return names


def test_compose_has_the_services_and_every_variable_is_in_env_example() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    expected = {
        "postgres",
        "redis",
        "migrate",
        "api",
        "beat",
        "flower",
        "vllm",
        "worker-control",
        "worker-generation",
        "worker-evaluation",
        "worker-export",
    }
    assert expected <= set(services)
    assert services["vllm"]["profiles"] == ["gpu"]
    assert services["vllm"]["image"].startswith("vllm/vllm-openai")
    assert services["migrate"]["command"] == ["distill", "db", "upgrade"]
    text = (REPO / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    missing = used - _env_example_names()
    assert not missing, f"variables used by docker-compose.yml but not in .env.example: {missing}"


def test_every_setting_is_listed_in_env_example() -> None:
    names = _env_example_names()
    expected = {"DATABASE_URL", "REDIS_URL"}
    for field, info in Settings.model_fields.items():
        if field.endswith("_env"):
            continue
        annotation = info.annotation
        nested = getattr(annotation, "model_fields", None)
        if nested:
            expected |= {f"DISTILL_{field.upper()}__{sub.upper()}" for sub in nested}
        else:
            expected.add(f"DISTILL_{field.upper()}")
    assert expected <= names, expected - names


def test_service_never_imports_workers() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "service never imports workers KEPT" in result.stdout
