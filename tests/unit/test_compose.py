"""docker-compose.yml deploys what .env says: `docker-compose config` accepts it, every distill
service reads .env whole, every setting is listed in .env.example, and the services are safe to
leave running (healthchecks, Flower behind a password, Redis persisted on a volume)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings
from tests.unit.test_operations_doc import setting_fields

REPO = Path(__file__).resolve().parents[2]
DISTILL_IMAGE = "distill:latest"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return loaded


def _distill_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image") == DISTILL_IMAGE
    }


def _env_example() -> dict[str, str]:
    values = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            values[name.strip()] = value
    return values


def setting_variables() -> set[str]:
    """Every environment variable the settings read (nested groups joined with `__`, and the
    conventional DATABASE_URL and REDIS_URL)."""
    return set(setting_fields())


def test_the_walk_finds_nested_settings() -> None:
    names = setting_variables()
    assert {"DATABASE_URL", "REDIS_URL", "DISTILL_SECRET_KEY"} <= names
    assert {"DISTILL_API__TEACHER_HOST_ALLOWLIST", "DISTILL_WORKER__LEASE_S"} <= names
    assert "DISTILL_DATABASE_URL_ENV" not in names


def test_every_setting_is_in_env_example() -> None:
    missing = setting_variables() - set(_env_example())
    assert not missing, f"settings not listed in .env.example: {sorted(missing)}"


def test_env_example_is_a_valid_configuration() -> None:
    """Copied as is, .env.example gives the embedded defaults (empty values are unset)."""
    settings = Settings(_env_file=REPO / ".env.example")  # type: ignore[call-arg]
    assert settings.embedded and settings.single_user
    assert settings.worker.cache_dir is None and settings.api.metrics_token is None
    assert settings.api.teacher_host_allowlist == ["vllm"]


def test_every_distill_service_reads_env_and_has_a_healthcheck() -> None:
    compose = _compose()
    services = _distill_services(compose)
    assert {"migrate", "api", "beat", "worker-control", "worker-generation"} <= set(services)
    for name, service in services.items():
        assert service.get("env_file") in (".env", [".env"]), name
    for name, service in compose["services"].items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        if name == "migrate":  # one-shot: the others wait for it to exit 0
            assert check == {"disable": True}
            continue
        assert check.get("test"), name
    tests = {name: str(s["healthcheck"].get("test")) for name, s in compose["services"].items()}
    assert "/healthz" in tests["api"]
    assert "inspect ping" in tests["worker-generation"]
    assert "pg_isready" in tests["postgres"] and "redis-cli" in tests["redis"]


def test_the_bundled_vllm_is_allowed_by_the_default_env() -> None:
    from service.teachers import TeacherUrlPolicy

    compose = _compose()
    assert compose["services"]["vllm"]["profiles"] == ["gpu"]  # `up` without it: CPU only
    allowlist = _env_example()["DISTILL_API__TEACHER_HOST_ALLOWLIST"].split(",")
    assert TeacherUrlPolicy.from_entries(allowlist).allows("http://vllm:8000/v1")


def test_flower_needs_a_password_and_redis_persists_on_a_volume() -> None:
    services = _compose()["services"]
    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert all(str(port).startswith("127.0.0.1:") for port in flower.get("ports", []))
    redis = services["redis"]
    assert "--appendonly" in redis["command"]
    data_dir = redis["command"][redis["command"].index("--dir") + 1]
    volumes = {v.split(":")[0]: v.split(":")[1] for v in redis["volumes"]}
    assert data_dir in volumes.values()
    assert set(volumes) <= set(_compose()["volumes"])


def _docker_compose(tmp_path: Path, env: str, *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    shutil.copy(REPO / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(REPO / "Dockerfile", tmp_path / "Dockerfile")
    (tmp_path / ".env").write_text(env)
    return subprocess.run(
        [binary, *args, "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_docker_compose_config_accepts_the_file_and_passes_every_setting(
    tmp_path: Path,
) -> None:
    """Every variable in .env reaches every distill container: a value set only in .env (not
    named in docker-compose.yml) shows up in each one's environment."""
    example = _env_example()
    marked = {name: f"marker-{i}" for i, name in enumerate(sorted(example))}
    marked["FLOWER_BASIC_AUTH"] = "admin:s3cret"
    env = "".join(f"{name}={value}\n" for name, value in marked.items())
    result = _docker_compose(tmp_path, env, "--profile", "gpu")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    overridden = {"DATABASE_URL", "REDIS_URL", "DISTILL_HOME"}  # the bundled services' addresses
    for name, service in _distill_services(config).items():
        environment = service["environment"]
        for variable, value in marked.items():
            if variable not in overridden:
                assert environment.get(variable) == value, (name, variable)
        assert environment["DATABASE_URL"].startswith("postgresql+psycopg://distill:")
        assert environment["REDIS_URL"] == "redis://redis:6379/0"
    assert config["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "admin:s3cret"
    assert "vllm" in config["services"]


def test_docker_compose_refuses_to_run_flower_without_a_password(tmp_path: Path) -> None:
    env = "".join(
        f"{name}={value}\n" for name, value in _env_example().items() if name != "FLOWER_BASIC_AUTH"
    )
    result = _docker_compose(tmp_path, env)
    assert result.returncode != 0
    assert "FLOWER_BASIC_AUTH" in result.stderr
