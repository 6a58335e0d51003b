"""A whole job's generation throughput against the gateway alone, measured in the same run.

    python -m bench.job_throughput [--n 1024] [--latency-ms 200] [--cap 64]

Starts the fake teacher (latency L, cap C) and a fresh Postgres database, then sends N
teacher requests three ways and prints wall time over the physical limit N x L / C:
  1. the gateway alone, in process (the figure the job should match);
  2. a job on the embedded executor (steps in this process, Postgres);
  3. a job through Redis and real Celery worker processes (the production path).
The jobs use the `random` strategy with one example per prompt, so the iteration's
generation is exactly N teacher calls; the generation window is read from the rows (batch
start to last stored call), so student training is not counted. Target: the Celery job within
5% of the in-process gateway figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select, text

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PG_SERVER = os.environ.get("DISTILL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("DISTILL_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _rows(n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = [json.loads(x) for x in (DATA / "trec" / "train.jsonl").read_text().splitlines()]
    seen: set[str] = set()
    unique = []
    for r in rows:
        if r["text"] not in seen:
            seen.add(r["text"])
            unique.append({"text": r["text"], "label": r["label"]})
    return unique[:n], unique[n : n + 60]


def _window(sessions: Any, job_id: uuid.UUID) -> tuple[float, int]:
    from service.models import GenerationBatch, TeacherCall

    with sessions() as session:
        start = session.scalar(
            select(func.min(GenerationBatch.started_at)).where(GenerationBatch.job_id == job_id)
        )
        end, count = session.execute(
            select(func.max(TeacherCall.created_at), func.count()).where(
                TeacherCall.job_id == job_id
            )
        ).one()
    return (end - start).total_seconds(), int(count)


def _gateway_alone(base_url: str, n: int, cap: int) -> float:
    from bench.teacher_throughput import build_requests, make_endpoint
    from workers.teacher import LocalLimiter, OpenAITeacher, run_sync

    async def go() -> float:
        teacher = OpenAITeacher(make_endpoint(base_url, cap, "bench-alone"), limiter=LocalLimiter())
        started = time.perf_counter()
        try:
            await teacher.generate(build_requests(n, uuid.uuid4().hex))
        finally:
            await teacher.aclose()
        return time.perf_counter() - started

    return float(run_sync(go()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=512, help="the job spec default")
    parser.add_argument("--worker-concurrency", type=int, default=2)
    args = parser.parse_args()

    from service.auth import get_or_create_tenant
    from service.cli import upgrade_database
    from service.datasets import create_dataset
    from service.db import make_engine, session_factory
    from service.jobs import create_job, parse_spec
    from service.logging import configure_logging
    from service.models import Job
    from service.tasks import SENDER, CeleryTaskSender
    from tests.fake_teacher.client import FakeTeacherProcess
    from workers import runtime
    from workers.inline import InlineTaskSender

    configure_logging("WARNING")
    ideal = args.n * args.latency_ms / 1000 / args.cap
    name = f"distill_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{PG_SERVER}/{name}"
    prefix = f"distill-bench:{uuid.uuid4().hex[:8]}:"
    results: list[tuple[str, float, int]] = []
    refusals: list[int] = []
    worker: subprocess.Popen[bytes] | None = None
    try:
        upgrade_database(url)
        engine = make_engine(url)
        sessions = session_factory(engine)
        train, val = _rows(args.n)
        with FakeTeacherProcess(latency_ms=args.latency_ms, max_concurrency=args.cap) as fake:

            def refused() -> int:
                count = int(fake.stats()["by_status"].get("429", 0))
                fake.reset()
                return count

            alone = _gateway_alone(fake.base_url, args.n, args.cap)
            results.append(("gateway alone, in process", alone, args.n))
            refusals.append(refused())

            def job(sender: Any, tag: str) -> uuid.UUID:
                with sessions() as session:
                    session.info[SENDER] = sender
                    tenant = get_or_create_tenant(session, tag)
                    ids = [
                        str(create_dataset(session, tenant.id, part, rows, 1).id)
                        for part, rows in (("train", train), ("val", val))
                    ]
                    spec = {
                        "name": tag,
                        "strategy": "random",
                        "task": {"instructions": "Classify the question."},
                        "datasets": {"train": ids[0], "validation": ids[1]},
                        "teacher": {
                            "base_url": fake.base_url,
                            "model": "fake-teacher",
                            "limits": {"max_concurrency": args.cap},
                        },
                        "student": {"type": "builtin", "model": "tfidf"},
                        "budget": {"max_iterations": 1},
                        "params": {"rows_per_iteration": args.n, "examples_per_row": 1},
                        "batch_size": args.batch_size,
                        "seed": len(tag),
                    }
                    created, _ = create_job(
                        session, tenant.id, parse_spec(spec), allow_private_teacher=True
                    )
                    session.commit()
                    return created.id

            inline = InlineTaskSender()
            runtime.configure(sessions=sessions, sender=inline)
            job_id = job(inline, "inline")
            inline.run_until_idle()
            results.append(("job, embedded executor", *_window(sessions, job_id)))
            refusals.append(refused())

            env = {
                **os.environ,
                "DATABASE_URL": url,
                "REDIS_URL": REDIS_URL,
                "DISTILL_BROKER__KEY_PREFIX": prefix,
                "DISTILL_LOG_LEVEL": "WARNING",
            }
            worker = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "distill"),
                    "worker",
                    "--concurrency",
                    str(args.worker_concurrency),
                    "--loglevel",
                    "WARNING",
                ],
                env=env,
                start_new_session=True,
            )
            celery = CeleryTaskSender(REDIS_URL, key_prefix=prefix)
            job_id = job(celery, "celery")
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with sessions() as session:
                    status = session.get(Job, job_id).status.value  # type: ignore[union-attr]
                if status in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.5)
            results.append(
                (
                    f"job, Celery ({args.worker_concurrency} worker processes)",
                    *_window(sessions, job_id),
                )
            )
            refusals.append(refused())
        engine.dispose()
    finally:
        if worker is not None:
            os.killpg(worker.pid, 15)
            worker.wait(timeout=60)
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    print(
        f"\nN={args.n} latency={args.latency_ms:.0f}ms cap={args.cap} "
        f"ideal N*L/C={ideal:.2f}s batch_size={args.batch_size}"
    )
    print(f"{'path':<42} {'calls':>6} {'429s':>6} {'wall s':>8} {'ratio':>7} {'vs gateway':>11}")
    for (label, wall, calls), n429 in zip(results, refusals, strict=True):
        print(
            f"{label:<42} {calls:>6} {n429:>6} {wall:>8.2f} {wall / ideal:>7.3f} "
            f"{wall / results[0][1]:>10.3f}x"
        )


if __name__ == "__main__":
    main()
