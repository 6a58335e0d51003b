"""A PGKD job through REST → Redis → a real Celery worker → the fake teacher → Postgres."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.domain.statuses import BatchStatus, IterationStatus, JobStatus
from service.models import Example, GenerationBatch, Iteration, Job, TeacherCall
from service.settings import WorkerSettings
from service.tasks import SENDER, CeleryTaskSender, RecordingTaskSender
from tests.conftest import REDIS_URL
from tests.data_factory import question_slice
from tests.e2e.conftest import DISTILL, Stack, wait_for
from workers.runtime import process_ports
from workers.steps.generate import generate_batch

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spec(train_id: str, val_id: str, teacher: str | dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "trec-pgkd-e2e",
        "strategy": "pgkd",
        "task": {
            "kind": "classification",
            "instructions": "Classify the question by the type of its answer.",
        },
        "datasets": {"train": train_id, "validation": val_id},
        "teacher": teacher,
        "student": {"type": "builtin", "model": "tfidf"},
        "budget": {"max_iterations": 3},
        "stopping": {"patience": 3},
        "batch_size": 4,
        "seed": 7,
    }


def _upload(client: TestClient, auth: dict[str, str], data: bytes, name: str) -> str:
    resp = client.post(
        "/v1/datasets",
        params={"name": name},
        content=data,
        headers={**auth, "Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _create_job(api: Any, stack: Stack) -> tuple[str, dict[str, Any]]:
    client, auth, _ = api
    train, val = question_slice(per_class=8, val_per_class=15)
    teacher = client.post(
        "/v1/teachers",
        json={
            "name": "fake",
            "base_url": stack.teacher.base_url,
            "model": "fake-teacher",
            "prices": {"input_per_million": 1.0, "output_per_million": 2.0},
        },
        headers=auth,
    ).json()
    spec = _spec(
        _upload(client, auth, train, "seed"), _upload(client, auth, val, "val"), teacher["id"]
    )
    resp = client.post("/v1/jobs", json=spec, headers=auth)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"]), spec


def _job(api: Any, job_id: str) -> dict[str, Any]:
    client, auth, _ = api
    body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    return body


def test_pgkd_job_runs_three_iterations_on_a_real_worker(
    stack: Stack, api: Any, tmp_path: Path
) -> None:
    client, auth, sessions = api
    metrics_port = _free_port()
    stack.start_worker("--metrics-port", str(metrics_port))
    job_id, _ = _create_job(api, stack)
    job = wait_for(
        lambda: (j := _job(api, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
        180,
        "the job to finish",
    )
    assert job["status"] == "succeeded", job
    iterations = client.get(f"/v1/jobs/{job_id}/iterations", headers=auth).json()
    assert [it["number"] for it in iterations] == [0, 1, 2, 3]
    for it in iterations:
        assert it["status"] == "completed"
        assert it["metrics"]["per_class"] and 0 <= it["metric"] <= 1
    for it in iterations[1:]:
        assert it["examples_accepted"] > 0
        assert it["tokens_in"] > 0 and it["tokens_out"] > 0 and it["cost_usd"] > 0
        assert it["teacher_calls"] == it["targets_count"]
    assert job["tokens_in"] == sum(it["tokens_in"] for it in iterations)
    assert job["best_iteration"] is not None

    examples = client.get(
        f"/v1/jobs/{job_id}/examples", params={"limit": 500}, headers=auth
    ).json()["items"]
    accepted = [e for e in examples if e["status"] == "accepted"]
    assert accepted and len(accepted) == job["examples_accepted"]
    for ex in accepted:  # lineage: error row → prompt fingerprint → teacher call → example
        assert ex["prompt_fingerprint"] and ex["teacher_call_id"] and ex["target_id"]
        assert ex["iteration_id"] is not None
    assert any(ex["source_row_id"] for ex in accepted)

    # The worker pool's Prometheus metrics count the teacher calls made in its children.
    import httpx

    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    ok_calls = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("distill_teacher_requests_total{") and 'outcome="succeeded"' in line
    ]
    assert sum(ok_calls) == sum(it["teacher_calls"] for it in iterations)

    # Export over REST: the worker writes the best dataset; the API serves the file.
    export = client.post(f"/v1/jobs/{job_id}/exports", json={"format": "lineage"}, headers=auth)
    assert export.status_code == 202, export.text
    done = wait_for(
        lambda: (
            (e := client.get(f"/v1/exports/{export.json()['id']}", headers=auth).json())["status"]
            == "succeeded"
            and e
        ),
        60,
        "the export",
    )
    download = client.get(f"/v1/exports/{done['id']}/download", headers=auth)
    lines = [json.loads(line) for line in download.text.splitlines()]
    assert len(lines) == done["row_count"] == done["manifest"]["rows"]
    assert {row["kind"] for row in lines} >= {"seed"}
    assert sum(row["kind"] != "seed" for row in lines) > 0

    # Redelivery: running a finished batch again, or a reset one, creates nothing twice and
    # pays for nothing twice (the teacher calls are cached by fingerprint).
    served = stack.teacher.stats()["completions_ok"]
    with sessions() as session:
        session.info[SENDER] = RecordingTaskSender()
        batch = session.scalars(
            select(GenerationBatch)
            .where(GenerationBatch.job_id == job_id)
            .order_by(GenerationBatch.created_at)
        ).first()
        assert batch is not None
        n_examples = session.scalar(select(func.count()).select_from(Example))
        n_calls = session.scalar(select(func.count()).select_from(TeacherCall))
        generate_batch(session, batch.id, process_ports())
        batch.status = BatchStatus.running  # another worker holds it: a redelivery is a no-op
        job_row = session.get(Job, uuid.UUID(job_id))
        assert job_row is not None
        job_row.status = JobStatus.running
        session.commit()
        attempts = batch.attempts
        generate_batch(session, batch.id, process_ports())
        session.refresh(batch)
        assert (batch.status, batch.attempts) == (BatchStatus.running, attempts)
        batch.status = BatchStatus.pending  # as if the worker died before marking it done
        job_row = session.get(Job, uuid.UUID(job_id))
        assert job_row is not None
        job_row.status = JobStatus.running  # a finished job would cancel the batch
        session.commit()
        generate_batch(session, batch.id, process_ports())
        session.commit()
        assert session.scalar(select(func.count()).select_from(Example)) == n_examples
        assert session.scalar(select(func.count()).select_from(TeacherCall)) == n_calls
        # Evaluating a finished iteration again, or one another worker is evaluating: no-ops.
        from service.models import Prediction
        from workers.steps.evaluate import evaluate_iteration

        last = session.scalar(
            select(Iteration).where(Iteration.job_id == uuid.UUID(job_id), Iteration.number == 3)
        )
        assert last is not None
        n_predictions = session.scalar(select(func.count()).select_from(Prediction))
        evaluate_iteration(session, last.id, process_ports())
        last.status = IterationStatus.evaluating
        session.commit()
        evaluate_iteration(session, last.id, process_ports())
        assert session.scalar(select(func.count()).select_from(Prediction)) == n_predictions
    assert stack.teacher.stats()["completions_ok"] == served

    # The same spec on the embedded default (SQLite, in-process) gives the same results.
    train, val = question_slice(per_class=8, val_per_class=15)
    (tmp_path / "seed.jsonl").write_bytes(train)
    (tmp_path / "val.jsonl").write_bytes(val)
    embedded = _spec(
        "seed.jsonl",
        "val.jsonl",
        {
            "base_url": stack.teacher.base_url,
            "model": "fake-teacher",
            "prices": {"input_per_million": 1.0, "output_per_million": 2.0},
        },
    )
    (tmp_path / "job.json").write_text(json.dumps(embedded))
    env = {
        k: v
        for k, v in stack.env.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "DISTILL_BROKER__KEY_PREFIX")
    }
    env["DISTILL_HOME"] = str(tmp_path / "embedded")
    run = subprocess.run(
        [DISTILL, "run", str(tmp_path / "job.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "export:" in run.stdout
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'embedded' / 'distill.db'}")
    with engine.connect() as conn:
        rows = conn.execute(
            select(Iteration.number, Iteration.metric, Iteration.examples_accepted).order_by(
                Iteration.number
            )
        ).all()
    engine.dispose()
    # The seed-only student and the first plan are the same on both executors. After that the
    # accepted sets may differ slightly: batches finish in a different order on a worker pool
    # than in process, and the near-duplicate filter keeps whichever of two near-duplicates
    # from different batches it sees first.
    assert [n for n, _, _ in rows] == [it["number"] for it in iterations]
    assert round(rows[0][1], 6) == round(iterations[0]["metric"], 6)
    with engine.connect() as conn:
        first_plan = conn.execute(
            select(Iteration.targets_count).where(Iteration.number == 1)
        ).scalar_one()
    engine.dispose()
    assert first_plan == iterations[1]["targets_count"]


def _teacher_with_limit(api: Any, stack: Stack, concurrency: int) -> str:
    client, auth, _ = api
    return str(
        client.post(
            "/v1/teachers",
            json={
                "name": f"slow-{concurrency}",
                "base_url": stack.teacher.base_url,
                "model": "fake-teacher",
                "limits": {"max_concurrency": concurrency},
            },
            headers=auth,
        ).json()["id"]
    )


def _slow_job(api: Any, stack: Stack, concurrency: int) -> str:
    client, auth, _ = api
    train, val = question_slice(per_class=8, val_per_class=10)
    spec = _spec(
        _upload(client, auth, train, "seed"),
        _upload(client, auth, val, "val"),
        _teacher_with_limit(api, stack, concurrency),
    )
    spec["batch_size"] = 2
    resp = client.post("/v1/jobs", json=spec, headers=auth)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _calls(sessions: Any, job_id: str) -> int:
    with sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(TeacherCall)
                .where(TeacherCall.job_id == uuid.UUID(job_id))
            )
        )


def test_cancel_mid_iteration_stops_within_one_batch(stack: Stack, api: Any) -> None:
    client, auth, sessions = api
    stack.teacher.configure(latency_ms=300)
    stack.start_worker()
    job_id = _slow_job(api, stack, concurrency=1)
    wait_for(lambda: _calls(sessions, job_id) >= 1, 60, "the first teacher call")
    resp = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert resp.status_code == 202 and resp.json()["status"] == "cancelled"
    at_cancel = _calls(sessions, job_id)

    def settled() -> bool:
        with sessions() as session:
            running = session.scalar(
                select(func.count())
                .select_from(GenerationBatch)
                .where(
                    GenerationBatch.job_id == uuid.UUID(job_id),
                    GenerationBatch.status == BatchStatus.running,
                )
            )
        return running == 0

    wait_for(settled, 30, "the running batch to stop")
    import time

    time.sleep(1.5)
    # In flight at the cancel, plus at most what one batch had already dispatched.
    assert _calls(sessions, job_id) <= at_cancel + 2
    assert _job(api, job_id)["status"] == "cancelled"


def test_worker_killed_mid_iteration_job_completes_without_duplicates(
    stack: Stack, api: Any
) -> None:
    _, _, sessions = api
    stack.teacher.configure(latency_ms=150)
    first = stack.start_worker()
    job_id = _slow_job(api, stack, concurrency=2)
    wait_for(lambda: _calls(sessions, job_id) >= 3, 90, "generation to be under way")
    stack.kill_worker(first)  # SIGKILL: no cleanup, the task stays unacknowledged
    in_flight_at_kill = 2
    stack.start_worker()
    # The periodic reconcile finds the abandoned batch and re-enqueues it.
    import time

    from workers.steps.job import reconcile

    time.sleep(2.5)
    with sessions() as session:
        sender = CeleryTaskSender(REDIS_URL, key_prefix=stack.prefix)
        session.info[SENDER] = sender
        reconcile(session, WorkerSettings(stuck_after_s=2, lease_s=2))
        session.commit()
    job = wait_for(
        lambda: (j := _job(api, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
        240,
        "the job to finish",
    )
    assert job["status"] == "succeeded", job
    with sessions() as session:
        keys = (
            session.execute(select(Example.dedup_key).where(Example.job_id == uuid.UUID(job_id)))
            .scalars()
            .all()
        )
        assert len(keys) == len(set(keys))
        per_fp = session.execute(
            select(TeacherCall.fingerprint, func.count())
            .where(TeacherCall.job_id == uuid.UUID(job_id))
            .group_by(TeacherCall.fingerprint)
        ).all()
        assert all(n == 1 for _, n in per_fp)
    # Paid twice only for what was in flight when the worker died.
    assert stack.teacher.stats()["duplicate_successes"] <= in_flight_at_kill
