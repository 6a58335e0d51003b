"""The CLI's answers to plausible user mistakes, run as the real `distill` process in embedded
mode: clean one-line errors with exit code 2 (never a traceback) for bad spec and dataset
files, exit code 1 and no export when the job of `distill run` does not succeed."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import REPO
from tests.fake_teacher.client import FakeTeacherProcess

DISTILL = str(Path(sys.executable).parent / "distill")
SEED = REPO / "examples" / "data" / "banking-seed.jsonl"
VALIDATION = REPO / "examples" / "data" / "banking-validation.jsonl"


def _env(home: Path, **extra: str) -> dict[str, str]:
    """Embedded mode: no DATABASE_URL/REDIS_URL (nor any other distill setting) inherited."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("DISTILL_")
    }
    env.update(
        DISTILL_HOME=str(home), DISTILL_LOG_LEVEL="WARNING", HF_HUB_OFFLINE="1", COLUMNS="200"
    )
    env.update(extra)
    return env


def _distill(
    tmp_path: Path, *args: str, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DISTILL, *args],
        env=_env(tmp_path / "home", **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _spec(
    teacher_url: str = "http://127.0.0.1:9/v1",
    train: str = str(SEED),
    name: str = "cli-errors",
    teacher_extra: str = "",
) -> str:
    return (
        f"name: '{name}'\n"
        "strategy: pgkd\n"
        "task: {kind: classification, instructions: Classify a bank customer's message.}\n"
        f"datasets: {{train: '{train}', validation: '{VALIDATION}'}}\n"
        f"teacher: {{base_url: '{teacher_url}', model: fake-teacher, timeout_s: 10, "
        f"max_attempts: 2{teacher_extra}}}\n"
        "student: {type: builtin, model: tfidf}\n"
        "budget: {max_iterations: 1}\n"
    )


def _assert_clean(result: subprocess.CompletedProcess[str], code: int) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output and "Usage:" not in output, output


# -- spec files


BAD_SPECS: dict[str, tuple[bytes, list[str]]] = {
    "yaml-syntax": (
        b"name: x\nstrategy: pgkd\n  task: [\n",
        ["invalid YAML at line 3, column 7", "mapping values are not allowed here"],
    ),
    "empty": (b"", ["the job spec is empty"]),
    "only-comments": (b"# nothing here\n", ["the job spec is empty"]),
    "a-list": (b"- name: x\n- strategy: pgkd\n", ["must be a YAML mapping", "not a list"]),
    "a-scalar": (b"job.yaml\n", ["must be a YAML mapping", "not a single value"]),
    "latin-1": ("name: d\u00e9mo\n".encode("latin-1"), ["not UTF-8", "0xe9 on line 1"]),
    "control-char": (b"name: x\nstrategy: \x07\n", ["invalid YAML at line 2, column 11"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_run_rejects_a_bad_spec_file_cleanly(tmp_path: Path, case: str) -> None:
    content, expected = BAD_SPECS[case]
    spec = tmp_path / "job.yaml"
    spec.write_bytes(content)
    result = _distill(tmp_path, "run", str(spec))
    _assert_clean(result, 2)
    assert f"{spec}:" in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    # The spec is read before anything is created.
    assert not (tmp_path / "home" / "distill.db").exists()


@pytest.mark.parametrize("command", ["run", "jobs create"])
def test_a_missing_spec_file_or_a_directory_is_a_clean_error(tmp_path: Path, command: str) -> None:
    missing = _distill(tmp_path, *command.split(), "nonexistent.yaml")
    _assert_clean(missing, 2)
    assert "job spec nonexistent.yaml: no such file" in missing.stderr
    (tmp_path / "specs").mkdir()
    directory = _distill(tmp_path, *command.split(), "specs")
    _assert_clean(directory, 2)
    assert "job spec specs: is a directory" in directory.stderr


def test_jobs_create_reports_the_yaml_line_and_column(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\nstrategy: pgkd\n  task: [\n")
    result = _distill(tmp_path, "jobs", "create", str(spec))
    _assert_clean(result, 2)
    assert f"{spec}: invalid YAML at line 3, column 7" in result.stderr


def test_datasets_upload_of_a_missing_file_or_a_directory_is_a_clean_error(
    tmp_path: Path,
) -> None:
    missing = _distill(tmp_path, "datasets", "upload", "nope.jsonl")
    _assert_clean(missing, 2)
    assert "dataset nope.jsonl: no such file" in missing.stderr
    directory = _distill(tmp_path, "datasets", "upload", str(tmp_path))
    _assert_clean(directory, 2)
    assert "is a directory" in directory.stderr


# -- dataset paths inside the spec


def test_a_missing_absolute_dataset_path_is_not_called_relative(tmp_path: Path) -> None:
    absent = tmp_path / "elsewhere" / "seed.jsonl"
    spec = tmp_path / "job.yaml"
    spec.write_text(_spec(train=str(absent)))
    result = _distill(tmp_path, "run", str(spec))
    _assert_clean(result, 2)
    assert f"datasets.train: dataset {absent}: no such file" in result.stderr
    assert "relative to" not in result.stderr


def test_a_missing_relative_dataset_path_names_the_spec_directory(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "job.yaml").write_text(_spec(train="data/seed.jsonl"))
    result = _distill(tmp_path, "run", str(specs / "job.yaml"))
    _assert_clean(result, 2)
    assert "dataset data/seed.jsonl: no such file" in result.stderr
    assert f"relative to the spec's directory {specs}" in result.stderr


def test_a_dataset_path_that_is_a_directory_is_a_clean_error(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    spec = tmp_path / "job.yaml"
    spec.write_text(_spec(train="data"))
    result = _distill(tmp_path, "run", str(spec))
    _assert_clean(result, 2)
    assert f"datasets.train: dataset {tmp_path / 'data'}: is a directory" in result.stderr


# -- the job's outcome decides the exit code


@pytest.fixture(scope="module")
def keyed_teacher() -> Iterator[FakeTeacherProcess]:
    with FakeTeacherProcess(api_key="right") as teacher:
        yield teacher


def _exports(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "home" / "exports").rglob("*.jsonl"))


def test_run_exits_1_without_an_export_when_the_teacher_refuses_the_key(
    tmp_path: Path, keyed_teacher: FakeTeacherProcess
) -> None:
    spec = tmp_path / "job.yaml"
    # A name with rich markup in it: the final table prints it as text.
    spec.write_text(
        _spec(keyed_teacher.base_url, name="unauth [/INST]", teacher_extra=", api_key_env: KEY")
    )
    result = _distill(tmp_path, "run", str(spec), KEY="wrong")
    _assert_clean(result, 1)
    assert "error job_failed: job " in result.stderr, result.stderr
    assert "http_401" in result.stderr, result.stderr
    assert "no export written" in result.stderr
    assert "unauth [/INST]: failed" in result.stdout, result.stdout
    assert "export:" not in result.stdout
    assert _exports(tmp_path) == []


def test_run_exits_0_with_an_export_when_the_job_succeeds(
    tmp_path: Path, keyed_teacher: FakeTeacherProcess
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(_spec(keyed_teacher.base_url, teacher_extra=", api_key_env: KEY"))
    result = _distill(tmp_path, "run", str(spec), KEY="right")
    _assert_clean(result, 0)
    assert "cli-errors: succeeded" in result.stdout, result.stdout
    [export] = _exports(tmp_path)
    assert f"export: {export} (" in result.stdout, result.stdout


def test_run_exits_1_when_the_export_cannot_be_written(
    tmp_path: Path, keyed_teacher: FakeTeacherProcess
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(_spec(keyed_teacher.base_url, teacher_extra=", api_key_env: KEY"))
    (tmp_path / "taken").write_text("a file where the export directory should be")
    result = _distill(tmp_path, "run", str(spec), "--export-dir", "taken", KEY="right")
    _assert_clean(result, 1)
    assert "error export_failed: job " in result.stderr, result.stderr
    assert "export:" not in result.stdout


def test_run_exits_1_when_the_job_is_cancelled(tmp_path: Path) -> None:
    # Every teacher call hangs past its timeout, so the job cannot finish before the cancel.
    with FakeTeacherProcess(hang_rate=1.0, hang_s=60) as teacher:
        spec = tmp_path / "job.yaml"
        spec.write_text(_spec(teacher.base_url).replace("timeout_s: 10", "timeout_s: 1"))
        env = _env(tmp_path / "home")
        with subprocess.Popen(
            [DISTILL, "run", str(spec)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            try:
                job_id = _wait_for_running_job(tmp_path / "home" / "distill.db", proc)
                cancel = _distill(tmp_path, "jobs", "cancel", job_id)
                assert cancel.returncode == 0, cancel.stdout + cancel.stderr
                stdout, stderr = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    output = stdout + stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    assert f"error job_cancelled: job {job_id} was cancelled" in stderr, stderr
    assert "export:" not in stdout
    assert _exports(tmp_path) == []


def _wait_for_running_job(db: Path, proc: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "distill run ended before the job could be cancelled"
        row = None
        if db.exists():
            with (
                contextlib.closing(sqlite3.connect(db)) as conn,
                contextlib.suppress(sqlite3.OperationalError),  # not migrated yet
            ):
                row = conn.execute("SELECT id FROM jobs WHERE status = 'running'").fetchone()
        if row is not None:
            return str(uuid.UUID(str(row[0])))
        time.sleep(0.2)
    raise AssertionError("no running job within 60 s")


# -- the database


def test_operator_commands_before_any_migration_say_how_to_fix_it(tmp_path: Path) -> None:
    result = _distill(tmp_path, "jobs", "list")
    _assert_clean(result, 1)
    assert "error database_unavailable:" in result.stderr
    assert "distill db upgrade" in result.stderr


def test_a_mistyped_tenant_is_named_and_not_created(tmp_path: Path) -> None:
    assert _distill(tmp_path, "db", "upgrade").returncode == 0
    for args in (["jobs", "list"], ["jobs", "show", "00000000-0000-0000-0000-000000000001"]):
        result = _distill(tmp_path, *args, "--tenant", "acme-typo")
        _assert_clean(result, 2)
        assert "no tenant named 'acme-typo'" in result.stderr
    result = _distill(tmp_path, "jobs", "list", "--tenant", "acme-typo")
    assert "no tenant named 'acme-typo'" in result.stderr  # still not created


def test_an_unreachable_database_is_a_clean_error(tmp_path: Path) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:9/distill"
    result = _distill(tmp_path, "keys", "create", DATABASE_URL=url)
    _assert_clean(result, 1)
    assert f"error database_unavailable: database {url}:" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DATABASE_URL": "foo"}, "DATABASE_URL (DISTILL_DATABASE__URL) is not a database URL"),
        ({"DISTILL_WORKER__STUCK_AFTER_S": "soon"}, "DISTILL_WORKER__STUCK_AFTER_S:"),
    ],
    ids=["database-url", "number"],
)
def test_an_unusable_setting_is_named(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    result = _distill(tmp_path, "jobs", "list", **env)
    _assert_clean(result, 2)
    assert "error settings_invalid:" in result.stderr and expected in result.stderr


# -- help


def test_every_command_has_help() -> None:
    import typer.main

    from workers.cli import app

    commands: list[list[str]] = [[]]

    def walk(group: Any, prefix: list[str]) -> None:
        for name, sub in getattr(group, "commands", {}).items():
            commands.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    assert {("run",), ("jobs", "create"), ("datasets", "upload"), ("teacher", "local")} <= {
        tuple(c) for c in commands
    }
    runner = CliRunner()
    for command in commands:
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage:" in result.output, (command, result.output)
