"""The CI step for real: `distill refresh --wait` in a subprocess, with only a URL and a
job-scoped key from the environment, against `distill serve` and a `distill worker` (with
beat) on Postgres and Redis; its exit codes, its export, and the webhooks it causes."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.refresh_cli import (
    EXIT_GATE_FAILED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from tests.conftest import REPO
from tests.data_factory import question_slice
from tests.e2e.conftest import DISTILL, Stack, wait_for
from tests.integration.test_webhooks import Receiver, _recipe

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def service(stack: Stack, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`distill serve` and one `distill worker --beat` (deliveries every second)."""
    env = {
        **stack.env,
        "DISTILL_API__ALLOW_PRIVATE_TEACHER_URLS": "true",
        "DISTILL_API__ALLOW_PRIVATE_WEBHOOK_URLS": "true",
        "DISTILL_WEBHOOKS__INTERVAL_S": "1",
    }
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    procs = []
    for name, args in (
        ("serve", ["serve", "--port", str(port)]),
        ("worker", ["worker", "--concurrency", "2", "--beat", "--loglevel", "WARNING"]),
    ):
        log = (tmp_path / f"{name}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [DISTILL, *args],
                env=env,
                cwd=tmp_path,  # beat keeps its schedule file in the working directory
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()
        stack.workers.append(procs[-1])  # stopped (the whole process group) by the stack

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, "distill serve to answer")
    yield base, env


def _cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [DISTILL, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_distill_refresh_wait_exit_codes_export_and_webhooks(
    stack: Stack, service: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    base, env = service
    tenant_key = _cli(env, "keys", "create", "--tenant", "ci")
    admin = httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {tenant_key}"}, timeout=30
    )
    train, val = question_slice(per_class=5, val_per_class=5)
    ids = [
        admin.post(
            "/v1/datasets", content=data, headers={"Content-Type": "application/x-ndjson"}
        ).json()["id"]
        for data in (train, val)
    ]
    job = admin.post(
        "/v1/jobs",
        json={
            "name": "ci-job",
            "strategy": "pgkd",
            "task": {"instructions": "Classify the question."},
            "datasets": {"train": ids[0], "validation": ids[1]},
            "teacher": {"base_url": stack.teacher.base_url, "model": "fake-teacher"},
            "student": {"type": "builtin", "model": "tfidf"},
            "budget": {"max_iterations": 1},
        },
    ).json()
    job_id = job["id"]

    def status() -> str:
        return str(admin.get(f"/v1/jobs/{job_id}").json()["status"])

    wait_for(lambda: status() == "succeeded", 120, "the job's first run")
    receiver = Receiver()
    receiver.start()
    hook = admin.post(
        "/v1/webhooks",
        json={
            "url": receiver.url,
            "events": ["iteration.completed", "job.completed", "job.failed"],
            "job_id": job_id,
        },
    ).json()
    ci_key = _cli(env, "keys", "create", "--tenant", "ci", "--job", job_id, "--expires-in", "1d")

    # The CI runner knows the URL and the key, nothing of the database or the broker.
    ci_env = {
        k: v
        for k, v in env.items()
        if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("DISTILL_")
    }
    ci_env.update(DISTILL_URL=base, DISTILL_API_KEY=ci_key)

    def refresh(*args: str, **extra: str) -> tuple[int, dict[str, Any], str]:
        result = subprocess.run(
            [DISTILL, "refresh", job_id, "--json", "--poll-interval", "0.5", *args],
            env={**ci_env, **extra},
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        try:
            summary = json.loads(result.stdout) if result.stdout.strip() else {}
        except json.JSONDecodeError:
            pytest.fail(f"stdout is not the JSON summary: {result.stdout!r} {result.stderr}")
        return result.returncode, summary, result.stderr

    try:
        # 0: done, gate passed, the new dataset downloaded as the artifact.
        out = tmp_path / "artifact" / "dataset.jsonl"
        code, summary, stderr = refresh(
            "--wait",
            "--note",
            "commit 1111111",
            "--fail-if-metric-below",
            "0",
            "--export",
            "jsonl",
            "--out",
            str(out),
            "--idempotency-key",
            "run-1",
        )
        assert code == EXIT_OK, stderr
        assert summary["outcome"] == "succeeded" and summary["iteration"] == 2
        assert summary["gates"] == [
            {
                "gate": "metric_at_least",
                "threshold": 0.0,
                "metric": summary["metric"],
                "passed": True,
            }
        ]
        assert "refresh" in stderr and "iteration 2" in stderr  # progress goes to stderr
        lines = out.read_text().splitlines()
        assert len(lines) == summary["export"]["rows"] >= 30
        iterations = admin.get(f"/v1/jobs/{job_id}/iterations").json()
        assert iterations[2]["note"] == "commit 1111111"

        # 4: the quality gate fails (and says so); the job itself is fine.
        code, summary, _ = refresh(
            "--wait", "--fail-if-metric-below", "0.999", "--idempotency-key", "run-2"
        )
        assert code == EXIT_GATE_FAILED
        assert summary["result"] == "gate_failed" and summary["gates"][0]["passed"] is False
        assert summary["outcome"] == "succeeded" and summary["iteration"] == 3

        # The curl-and-jq recipe does the same step.
        recipe_out = tmp_path / "recipe.jsonl"
        recipe = subprocess.run(
            ["sh", str(REPO / "examples" / "ci" / "refresh.sh"), job_id, "0", str(recipe_out)],
            env={**ci_env, "DISTILL_POLL_S": "0.5", "DISTILL_NOTE": "curl recipe"},
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert recipe.returncode == 0, recipe.stdout + recipe.stderr
        assert "gate passed" in recipe.stdout and len(recipe_out.read_text().splitlines()) >= 30
        assert admin.get(f"/v1/jobs/{job_id}/iterations").json()[4]["note"] == "curl recipe"

        # 3: the refresh outlasts --timeout (a slow teacher).
        stack.teacher.configure(latency_ms=1500)
        code, summary, stderr = refresh("--wait", "--timeout", "2", "--idempotency-key", "run-3")
        assert code == EXIT_TIMEOUT, stderr
        timed_out = summary["refresh_id"]
        stack.teacher.configure(latency_ms=20)
        # Re-running the same CI step waits for the same refresh instead of starting another.
        code, summary, _ = refresh("--wait", "--idempotency-key", "run-3")
        assert code == EXIT_OK and summary["refresh_id"] == timed_out

        # 1: the job fails (the teacher now refuses every request).
        stack.teacher.configure(api_key="a-key-the-job-does-not-have")
        code, summary, stderr = refresh("--wait", "--idempotency-key", "run-4")
        assert code == EXIT_JOB_FAILED, stderr
        assert summary["outcome"] == "failed" and "failed" in stderr

        # 2: usage errors and refusals; 5: no server.
        assert refresh("--wait", "--idempotency-key", "run-5")[0] == EXIT_USAGE  # job failed
        assert refresh(DISTILL_API_KEY="")[0] == EXIT_USAGE
        assert refresh("--fail-if-worse")[0] == EXIT_USAGE  # a gate needs --wait
        wrong = subprocess.run(
            [DISTILL, "refresh", "00000000-0000-0000-0000-000000000000", "--wait"],
            env=ci_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert wrong.returncode == EXIT_USAGE and "404" in wrong.stderr
        started = time.monotonic()
        down = refresh("--timeout", "3", DISTILL_URL=f"http://127.0.0.1:{_free_port()}")
        assert down[0] == EXIT_UNAVAILABLE and time.monotonic() - started < 30

        # The webhooks of all this reached the receiver, signed.
        def events() -> list[str]:
            return [json.loads(body)["type"] for _, body in receiver.received]

        wait_for(lambda: "job.failed" in events(), 60, "the job.failed webhook")
        assert events().count("job.completed") >= 3
        assert events().count("iteration.completed") >= 3
        recipe = _recipe()
        for headers, body in receiver.received:
            assert recipe.verify(
                hook["secret"], headers["X-Distill-Timestamp"], headers["X-Distill-Signature"], body
            )
    finally:
        receiver.stop()
        admin.close()


def test_embedded_serve_runs_refreshes_and_delivers_webhooks(stack: Stack, tmp_path: Path) -> None:
    """The laptop default: no broker, `distill serve` runs the steps and the deliveries."""
    env = {k: v for k, v in stack.env.items() if k not in ("REDIS_URL",)}
    env.update(
        DISTILL_API__ALLOW_PRIVATE_TEACHER_URLS="true",
        DISTILL_API__ALLOW_PRIVATE_WEBHOOK_URLS="true",
        DISTILL_WEBHOOKS__INTERVAL_S="0.5",
    )
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [DISTILL, "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    stack.workers.append(server)
    receiver = Receiver()
    receiver.start()
    try:
        wait_for(lambda: _answers(base), 60, "distill serve to answer")
        key = _cli(env, "keys", "create", "--tenant", "laptop")
        http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        hook = http.post(
            "/v1/webhooks", json={"url": receiver.url, "events": ["job.completed"]}
        ).json()
        train, val = question_slice(per_class=5, val_per_class=5)
        ids = [
            http.post(
                "/v1/datasets", content=data, headers={"Content-Type": "application/x-ndjson"}
            ).json()["id"]
            for data in (train, val)
        ]
        job_id = http.post(
            "/v1/jobs",
            json={
                "name": "laptop",
                "strategy": "pgkd",
                "task": {"instructions": "Classify the question."},
                "datasets": {"train": ids[0], "validation": ids[1]},
                "teacher": {"base_url": stack.teacher.base_url, "model": "fake-teacher"},
                "student": {"type": "builtin", "model": "tfidf"},
                "budget": {"max_iterations": 1},
            },
        ).json()["id"]
        wait_for(
            lambda: http.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", 120, "the job"
        )
        result = subprocess.run(
            [DISTILL, "refresh", job_id, "--wait", "--url", base, "--poll-interval", "0.5"],
            env={"PATH": env["PATH"], "DISTILL_API_KEY": key},
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert result.returncode == EXIT_OK, result.stdout + result.stderr
        assert "succeeded" in result.stdout

        def completions() -> int:
            return sum(json.loads(body)["type"] == "job.completed" for _, body in receiver.received)

        wait_for(lambda: completions() == 2, 30, "both job.completed webhooks")
        http.close()
        assert hook["secret"]
    finally:
        receiver.stop()


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
