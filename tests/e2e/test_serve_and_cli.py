"""The real processes: `distill serve` against Postgres and Redis, and the operator CLI."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.data_factory import question_rows, to_jsonl
from tests.e2e.conftest import DISTILL, Stack, wait_for

pytestmark = pytest.mark.e2e


def _cli(stack: Stack, *args: str) -> str:
    result = subprocess.run(
        [DISTILL, *args], env=stack.env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(stack: Stack, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [DISTILL, "serve", "--port", str(port)], env=stack.env, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "distill serve to answer")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_against_postgres_and_redis(stack: Stack, server: str) -> None:
    key_a = _cli(stack, "keys", "create", "--tenant", "a").strip().splitlines()[-1]
    key_b = _cli(stack, "keys", "create", "--tenant", "b").strip().splitlines()[-1]
    assert key_a.startswith("dst_") and key_a != key_b
    a = {"Authorization": f"Bearer {key_a}"}
    with httpx.Client(base_url=server, timeout=60) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}

        data = to_jsonl(question_rows(909))
        up = http.post(
            "/v1/datasets", content=data, headers={**a, "Content-Type": "application/x-ndjson"}
        )
        assert up.status_code == 201 and up.json()["row_count"] == 5454

        broken = b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{oops\n'
        bad = http.post(
            "/v1/datasets", content=broken, headers={**a, "Content-Type": "application/x-ndjson"}
        )
        assert bad.status_code == 422 and bad.json()["error"]["details"][0]["line"] == 3
        assert len(http.get("/v1/datasets", headers=a).json()["items"]) == 1

        assert http.get("/v1/datasets").status_code == 401
        other = http.get(
            f"/v1/datasets/{up.json()['id']}", headers={"Authorization": f"Bearer {key_b}"}
        )
        assert other.status_code == 404


def test_cli_uploads_creates_and_controls_jobs(stack: Stack, tmp_path: Path) -> None:
    seed = tmp_path / "seed.jsonl"
    seed.write_text(
        "".join(
            f'{{"text": "question {i} about {lab}", "label": "{lab}"}}\n'
            for i in range(5)
            for lab in ("HUM", "LOC")
        )
    )
    dataset_id = _cli(stack, "datasets", "upload", str(seed), "--tenant", "ops").strip()
    dataset_id = dataset_id.splitlines()[-1]
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: cli-job\nstrategy: llm2llm\n"
        "task: {instructions: Classify.}\n"
        f"datasets: {{train: {dataset_id}}}\n"
        f"teacher: {{base_url: '{stack.teacher.base_url}', model: fake-teacher}}\n"
        "student: {type: builtin, model: tfidf}\n"
    )
    job_id = _cli(stack, "jobs", "create", str(spec), "--tenant", "ops").strip().splitlines()[-1]
    assert job_id in _cli(stack, "jobs", "list", "--tenant", "ops")
    assert "paused" in _cli(stack, "jobs", "pause", job_id, "--tenant", "ops")
    assert "queued" in _cli(stack, "jobs", "resume", job_id, "--tenant", "ops")
    assert "cancelled" in _cli(stack, "jobs", "cancel", job_id, "--tenant", "ops")
    assert "cli-job" in _cli(stack, "jobs", "show", job_id, "--tenant", "ops")
    failed = subprocess.run(
        [DISTILL, "jobs", "resume", job_id, "--tenant", "ops"],
        env=stack.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 2 and "conflict" in failed.stderr
