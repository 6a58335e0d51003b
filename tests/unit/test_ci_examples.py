"""examples/ci: the GitHub Actions workflow uses options `distill refresh` has, the scripts
parse, and the documented exit codes are the command's."""

from __future__ import annotations

import re
import subprocess

import typer.main
import yaml

from service import refresh_cli
from service.cli import app
from tests.conftest import REPO

CI = REPO / "examples" / "ci"


def _refresh_options() -> set[str]:
    refresh = typer.main.get_command(app).commands["refresh"]  # type: ignore[attr-defined]
    return {opt for param in refresh.params for opt in (*param.opts, *param.secondary_opts)}


def test_the_workflow_calls_distill_refresh_with_real_options() -> None:
    workflow = yaml.safe_load((CI / "github-actions.yml").read_text())
    steps = workflow["jobs"]["train-and-refresh"]["steps"]
    script = next(s["run"] for s in steps if "distill refresh" in s.get("run", ""))
    used = set(re.findall(r"(--[a-z][a-z-]+)", script.split("distill refresh", 1)[1]))
    assert used and used <= _refresh_options(), used - _refresh_options()
    assert {"--wait", "--fail-if-worse", "--export", "--out", "--idempotency-key"} <= used
    assert workflow["concurrency"]["cancel-in-progress"] is False


def test_the_shell_recipes_parse() -> None:
    for script in ("refresh.sh", "verify-webhook.sh"):
        result = subprocess.run(["sh", "-n", str(CI / script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_the_documented_exit_codes_are_the_commands() -> None:
    doc = (REPO / "docs" / "ci.md").read_text()
    table = dict(re.findall(r"^\| (\d) \| (.+) \|$", doc, flags=re.MULTILINE))
    assert {int(code) for code in table} == set(refresh_cli.EXIT_CODES)
    assert "timeout" in table[str(refresh_cli.EXIT_TIMEOUT)]
    assert "gate" in table[str(refresh_cli.EXIT_GATE_FAILED)]
    assert "failed" in table[str(refresh_cli.EXIT_JOB_FAILED)]
