"""The operator CLI's commands end to end on the test database (typer's CliRunner, each test
inside the rolled-back transaction): teachers, datasets, jobs and exports from create to
delete, and the --tenant hint for a row that is in another tenant."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from service import cli as service_cli
from service.models import Dataset, DatasetRow, Export, Job, Teacher
from tests.conftest import REPO
from workers.cli import app

SEED = REPO / "examples" / "data" / "banking-seed.jsonl"
VALIDATION = REPO / "examples" / "data" / "banking-validation.jsonl"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

Cli = Callable[..., Result]


@pytest.fixture
def cli(db_session: Session, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """`distill ARGS` on the test's transaction; `input` is stdin."""
    monkeypatch.setattr(service_cli, "open_session", lambda: contextlib.nullcontext(db_session))
    runner = CliRunner(env={"COLUMNS": "200"})

    def invoke(*args: str, input: str | None = None) -> Result:
        return runner.invoke(app, list(args), input=input)

    return invoke


@pytest.fixture
def tenant() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def last_line(result: Result) -> str:
    return ok(result).strip().splitlines()[-1]


def refused(result: Result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def _upload(cli: Cli, tenant: str, path: Path) -> str:
    return last_line(cli("datasets", "upload", str(path), "--tenant", tenant))


def _job(cli: Cli, tenant: str, tmp_path: Path, teacher: str | None = None) -> str:
    train, validation = _upload(cli, tenant, SEED), _upload(cli, tenant, VALIDATION)
    spec = {
        "name": "cli-job",
        "strategy": "pgkd",
        "task": {"instructions": "Classify a bank customer's message."},
        "datasets": {"train": train, "validation": validation},
        "teacher": teacher or {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
        "student": {"type": "builtin", "model": "tfidf"},
        "budget": {"max_iterations": 1},
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return last_line(cli("jobs", "create", str(path), "--tenant", tenant))


# -- teachers


def test_teachers_create_list_show_delete(
    cli: Cli, tenant: str, db_session: Session, tmp_path: Path
) -> None:
    secret = f"sk-{uuid.uuid4().hex}"
    config = tmp_path / "teacher.yaml"
    config.write_text("limits: {max_concurrency: 3}\nprices: {input_per_million: 0.5}\n")
    created = cli(
        "teachers", "create", "--name", "vllm", "--base-url", "http://127.0.0.1:8000/v1",
        "--model", "qwen", "--api-key-stdin", "--from-file", str(config), "--timeout-s", "30",
        "--tenant", tenant, input=secret + "\n",
    )  # fmt: skip
    teacher_id = last_line(created)
    stored = db_session.get(Teacher, uuid.UUID(teacher_id))
    assert stored is not None and stored.name == "vllm" and stored.timeout_s == 30
    assert stored.limits["max_concurrency"] == 3 and stored.prices["input_per_million"] == 0.5
    assert stored.api_key_encrypted and secret not in stored.api_key_encrypted
    assert stored.allow_private_network  # the CLI is the operator

    listed = ok(cli("teachers", "list", "--tenant", tenant))
    assert teacher_id in listed and "vllm" in listed and "stored (encrypted)" in listed
    by_name = ok(cli("teachers", "show", "vllm", "--tenant", tenant))
    by_id = ok(cli("teachers", "show", teacher_id, "--tenant", tenant))
    assert by_name == by_id and "http://127.0.0.1:8000/v1" in by_id and "qwen" in by_id
    assert '"max_concurrency": 3' in by_id
    for output in (created.output, listed, by_id):
        assert secret not in output

    taken = refused(cli("teachers", "create", "--name", "vllm", "--base-url", "http://x/v1",
                        "--model", "m", "--tenant", tenant))  # fmt: skip
    assert "a teacher named 'vllm' already exists" in taken

    assert "deleted" in ok(cli("teachers", "delete", "vllm", "--tenant", tenant))
    assert db_session.get(Teacher, uuid.UUID(teacher_id)) is None
    gone = refused(cli("teachers", "show", teacher_id, "--tenant", tenant))
    assert f"no teacher {teacher_id} in tenant '{tenant}', nor in any other" in gone


def test_teachers_create_names_the_bad_option_and_reads_the_key_env(
    cli: Cli, tenant: str, db_session: Session
) -> None:
    missing = refused(cli("teachers", "create", "--base-url", "http://x/v1", "--model", "m"))
    assert "error validation_failed: --name: Field required" in missing
    bad_url = refused(
        cli("teachers", "create", "--name", "t", "--base-url", "ftp://x", "--model", "m")
    )
    assert "error validation_failed: --base-url" in bad_url
    no_key = refused(cli("teachers", "create", "--name", "t", "--base-url", "http://x/v1",
                         "--model", "m", "--api-key-stdin", input=""))  # fmt: skip
    assert "--api-key-stdin: no key on stdin" in no_key
    teacher_id = last_line(cli("teachers", "create", "--name", "env", "--base-url",
                               "http://x/v1", "--model", "m", "--api-key-env", "TEACHER_KEY",
                               "--tenant", tenant))  # fmt: skip
    assert "env TEACHER_KEY" in ok(cli("teachers", "show", teacher_id, "--tenant", tenant))
    assert db_session.scalar(select(Teacher.name).where(Teacher.name == "t")) is None


def test_teachers_create_stores_replicas_from_options_and_from_the_file(
    cli: Cli, tenant: str, db_session: Session, tmp_path: Path
) -> None:
    replicas = ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
    by_option = last_line(cli(
        "teachers", "create", "--name", "pair", "--base-url", "http://127.0.0.1:8000/v1",
        "--model", "m", "--replica-url", replicas[0], "--replica-url", replicas[1],
        "--tenant", tenant,
    ))  # fmt: skip
    stored = db_session.get(Teacher, uuid.UUID(by_option))
    assert stored is not None and stored.replica_urls == replicas
    assert ", ".join(replicas) in ok(cli("teachers", "show", by_option, "--tenant", tenant))

    # The file's replicas are kept too (they used to be validated and then dropped).
    config = tmp_path / "teacher.yaml"
    config.write_text(f"replica_urls: [{replicas[1]}]\n")
    from_file = last_line(cli(
        "teachers", "create", "--name", "filed", "--base-url", "http://127.0.0.1:8000/v1",
        "--model", "m", "--from-file", str(config), "--tenant", tenant,
    ))  # fmt: skip
    stored = db_session.get(Teacher, uuid.UUID(from_file))
    assert stored is not None and stored.replica_urls == [replicas[1]]
    assert replicas[1] in ok(cli("teachers", "show", "filed", "--tenant", tenant))

    bad = refused(cli(
        "teachers", "create", "--name", "bad", "--base-url", "http://127.0.0.1:8000/v1",
        "--model", "m", "--replica-url", replicas[0], "--replica-url", "ftp://x",
        "--tenant", tenant,
    ))  # fmt: skip
    assert "replica_urls[1] must be an http(s) URL" in bad
    assert db_session.scalar(select(Teacher.name).where(Teacher.name == "bad")) is None


def test_a_teacher_a_job_uses_is_not_deleted(cli: Cli, tenant: str, tmp_path: Path) -> None:
    teacher_id = last_line(cli("teachers", "create", "--name", "used", "--base-url",
                               "http://127.0.0.1:9/v1", "--model", "m", "--tenant", tenant))  # fmt: skip
    job_id = _job(cli, tenant, tmp_path, teacher=teacher_id)
    conflict = refused(cli("teachers", "delete", "used", "--tenant", tenant))
    assert f"is used by job {job_id}" in conflict
    assert "used" in ok(cli("teachers", "list", "--tenant", tenant))


# -- datasets


def test_datasets_upload_list_show_delete(cli: Cli, tenant: str, db_session: Session) -> None:
    dataset_id = _upload(cli, tenant, SEED)
    listed = ok(cli("datasets", "list", "--tenant", tenant))
    assert dataset_id in listed and "banking-seed.jsonl" in listed
    shown = ok(cli("datasets", "show", dataset_id, "--tenant", tenant, "--rows", "2"))
    first_rows = SEED.read_text().splitlines()[:2]
    preview = [json.loads(line) for line in shown.strip().splitlines()[-2:]]
    assert preview == [json.loads(line) for line in first_rows]
    rows = len(SEED.read_text().splitlines())
    assert re.search(rf"^rows\s+{rows}\s*$", shown, flags=re.MULTILINE), shown

    assert "deleted" in ok(cli("datasets", "delete", dataset_id, "--tenant", tenant))
    assert db_session.get(Dataset, uuid.UUID(dataset_id)) is None
    left = select(DatasetRow.id).where(DatasetRow.dataset_id == uuid.UUID(dataset_id))
    assert db_session.scalar(left) is None
    assert dataset_id not in ok(cli("datasets", "list", "--tenant", tenant))


def test_a_dataset_a_job_uses_is_not_deleted(
    cli: Cli, tenant: str, db_session: Session, tmp_path: Path
) -> None:
    job_id = _job(cli, tenant, tmp_path)
    job = db_session.get(Job, uuid.UUID(job_id))
    assert job is not None
    conflict = refused(cli("datasets", "delete", str(job.train_dataset_id), "--tenant", tenant))
    assert f"is used by job(s) {job_id}: delete those jobs first" in conflict
    assert db_session.get(Dataset, job.train_dataset_id) is not None


# -- jobs and exports


def test_jobs_create_list_show_cancel_delete(
    cli: Cli, tenant: str, db_session: Session, tmp_path: Path
) -> None:
    job_id = _job(cli, tenant, tmp_path)
    assert job_id in ok(cli("jobs", "list", "--tenant", tenant, "--status", "queued"))
    assert job_id not in ok(cli("jobs", "list", "--tenant", tenant, "--status", "running"))
    assert "cli-job [pgkd] queued" in ok(cli("jobs", "show", job_id, "--tenant", tenant))

    running = refused(cli("jobs", "delete", job_id, "--tenant", tenant), code=2)
    assert "cannot delete a job that is queued: cancel it first" in running
    assert "cancelled" in ok(cli("jobs", "cancel", job_id, "--tenant", tenant))
    assert "deleted" in ok(cli("jobs", "delete", job_id, "--tenant", tenant))
    assert db_session.get(Job, uuid.UUID(job_id)) is None
    gone = refused(cli("jobs", "show", job_id, "--tenant", tenant))
    assert f"no job {job_id} in tenant '{tenant}', nor in any other" in gone


def test_exports_list_and_show(cli: Cli, tenant: str, db_session: Session, tmp_path: Path) -> None:
    from workers.steps.export import export_job

    job_id = _job(cli, tenant, tmp_path)
    export = export_job(db_session, uuid.UUID(job_id), out_dir=tmp_path / "out")
    db_session.commit()
    assert export.path
    listed = ok(cli("exports", "list", job_id, "--tenant", tenant))
    assert str(export.id) in listed and "succeeded" in listed and "jsonl" in listed
    shown = ok(cli("exports", "show", str(export.id), "--tenant", tenant))
    assert export.path in shown
    assert re.search(rf"^rows\s+{export.row_count}\s*$", shown, flags=re.MULTILINE), shown
    sha = export.manifest["files"]["train"]["sha256"][:12]
    assert f"sha256 {sha}" in shown

    elsewhere = refused(cli("exports", "show", str(export.id)))
    assert f"it is in tenant '{tenant}': add --tenant {tenant}" in elsewhere
    assert db_session.scalars(select(Export).where(Export.job_id == export.job_id)).all()


# -- the --tenant hint


def test_a_job_of_another_tenant_is_named_with_its_tenant(
    cli: Cli, tenant: str, tmp_path: Path
) -> None:
    job_id = _job(cli, tenant, tmp_path)
    hint = f"no job {job_id} in tenant 'default'; it is in tenant '{tenant}': add --tenant {tenant}"
    for command in ("show", "cancel", "pause", "resume", "delete"):
        assert hint in refused(cli("jobs", command, job_id)), command
    assert hint in refused(cli("export", job_id, "--out", str(tmp_path / "x")))
    assert hint in refused(cli("exports", "list", job_id))
    other = f"{tenant}-other"
    ok(cli("keys", "create", "--tenant", other))
    hint_other = hint.replace("'default'", f"'{other}'")
    assert hint_other in refused(cli("jobs", "show", job_id, "--tenant", other))
    # Nothing happened to the job on the way.
    assert "cli-job [pgkd] queued" in ok(cli("jobs", "show", job_id, "--tenant", tenant))


def test_a_missing_tenant_lists_the_tenants_there_are(cli: Cli, tenant: str) -> None:
    ok(cli("keys", "create", "--tenant", tenant))
    result = refused(cli("datasets", "list", "--tenant", tenant + "-typo"))
    assert f"no tenant named '{tenant}-typo'" in result
    assert re.search(rf"tenants: .*\b{re.escape(tenant)}\b", result), result


def test_teachers_and_datasets_of_another_tenant_get_the_hint(cli: Cli, tenant: str) -> None:
    dataset_id = _upload(cli, tenant, SEED)
    assert f"add --tenant {tenant}" in refused(cli("datasets", "show", dataset_id))
    assert f"add --tenant {tenant}" in refused(cli("datasets", "delete", dataset_id))
    ok(cli("teachers", "create", "--name", "mine", "--base-url", "http://x/v1", "--model", "m",
           "--tenant", tenant))  # fmt: skip
    by_name = refused(cli("teachers", "show", "mine"))
    assert f"tenant(s) with one: {tenant}: add --tenant {tenant}" in by_name
    key = ok(cli("keys", "create", "--tenant", tenant)).splitlines()[0]
    key_id = UUID.findall(key)[0]
    assert f"add --tenant {tenant}" in refused(cli("keys", "revoke", key_id))
    assert "revoked" in ok(cli("keys", "revoke", key_id, "--tenant", tenant))
