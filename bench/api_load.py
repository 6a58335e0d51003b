"""API latency under load: 50 clients polling a running job, as a dashboard or CI would.

    python -m bench.api_load [--clients 50] [--interval-s 1.0] [--duration-s 30]

Starts a fresh Postgres database, the fake teacher (slow, so the job keeps running), one
`distill worker` and the API as its own process (`distill serve`, production mode), creates a
job, then runs `--clients` clients, each polling job status, its iterations and the job list
in turn every `--interval-s` (jittered), for `--duration-s`. Prints latency percentiles and
errors per endpoint and overall, against the targets of issue 11: p50 < 20 ms, p99 < 200 ms,
0 errors. Not part of the test suite; the machine's load average is printed with it (on a
shared 2-core machine the figures are noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PG_SERVER = os.environ.get("DISTILL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("DISTILL_TEST_REDIS", "redis://127.0.0.1:6379/0")
DISTILL = str(Path(sys.executable).parent / "distill")
TARGETS = {"p50_ms": 20.0, "p99_ms": 200.0}
WARM_UP_S = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


async def _setup(base: str, key: str, teacher_url: str) -> str:
    lines = (DATA / "trec" / "train.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines[:400]]
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as http:

        async def upload(part: list[dict[str, Any]], name: str) -> str:
            async with http.post(
                f"{base}/v1/datasets",
                params={"name": name},
                data=_jsonl(part),
                headers={"Content-Type": "application/x-ndjson"},
            ) as resp:
                assert resp.status in (200, 201), await resp.text()
                return str((await resp.json())["id"])

        train = await upload(rows[:300], "train")
        val = await upload(rows[300:], "val")
        spec = {
            "name": "api-load",
            "strategy": "random",
            "task": {"instructions": "Classify the question."},
            "datasets": {"train": train, "validation": val},
            "teacher": {
                "base_url": teacher_url,
                "model": "fake-teacher",
                "limits": {"max_concurrency": 4},
            },
            "student": {"type": "builtin", "model": "tfidf"},
            "budget": {"max_iterations": 3},
            "params": {"rows_per_iteration": 300, "examples_per_row": 1},
            "batch_size": 16,
        }
        async with http.post(f"{base}/v1/jobs", json=spec) as resp:
            assert resp.status == 201, await resp.text()
            return str((await resp.json())["id"])


async def _load(
    base: str, key: str, job_id: str, clients: int, interval: float, duration: float
) -> dict[str, list[tuple[float, int]]]:
    paths = {
        "job status": f"/v1/jobs/{job_id}",
        "iterations": f"/v1/jobs/{job_id}/iterations",
        "job list": "/v1/jobs?limit=50",
    }
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in paths}
    # The first seconds open the API's database connections: measured after them.
    measure_from = time.monotonic() + WARM_UP_S
    stop_at = measure_from + duration
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {key}"}, connector=connector
    ) as http:

        async def client(index: int) -> None:
            names = list(paths)
            turn = index
            await asyncio.sleep(random.uniform(0, interval))
            while time.monotonic() < stop_at:
                name = names[turn % len(names)]
                turn += 1
                started = time.perf_counter()
                try:
                    async with http.get(base + paths[name]) as resp:
                        await resp.read()
                        status = resp.status
                except aiohttp.ClientError:
                    status = 0
                if time.monotonic() >= measure_from:
                    results[name].append((time.perf_counter() - started, status))
                await asyncio.sleep(interval * random.uniform(0.8, 1.2))

        await asyncio.gather(*(client(i) for i in range(clients)))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--interval-s", type=float, default=1.0)
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument(
        "--no-worker", action="store_true", help="no worker: the job stays queued (a baseline)"
    )
    args = parser.parse_args()

    from service.auth import create_api_key, get_or_create_tenant
    from service.cli import upgrade_database
    from service.db import make_engine, session_factory
    from tests.fake_teacher.client import FakeTeacherProcess

    name = f"distill_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{PG_SERVER}/{name}"
    prefix = f"distill-bench:{uuid.uuid4().hex[:8]}:"
    port = _free_port()
    processes: list[subprocess.Popen[bytes]] = []
    load_before = os.getloadavg()[0]
    try:
        upgrade_database(url, quiet=True)
        engine = make_engine(url)
        with session_factory(engine)() as session:
            _, key = create_api_key(session, get_or_create_tenant(session, "bench"))
            session.commit()
        engine.dispose()
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "REDIS_URL": REDIS_URL,
            "DISTILL_BROKER__KEY_PREFIX": prefix,
            "DISTILL_API__ALLOW_PRIVATE_TEACHER_URLS": "true",
            "DISTILL_LOG_LEVEL": "WARNING",
        }
        with FakeTeacherProcess(latency_ms=300) as fake:
            commands = [["serve", "--port", str(port), "--workers", str(args.api_workers)]]
            if not args.no_worker:
                commands.append(["worker", "--concurrency", "1", "--loglevel", "WARNING"])
            for command in commands:
                processes.append(
                    subprocess.Popen(
                        [DISTILL, *command],
                        env=env,
                        start_new_session=True,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    time.sleep(0.5)
            job_id = asyncio.run(_setup(base, key, fake.base_url))
            time.sleep(3.0)  # the job is generating
            results = asyncio.run(
                _load(base, key, job_id, args.clients, args.interval_s, args.duration_s)
            )
    finally:
        for proc in processes:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
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
        f"\n{args.clients} clients, one request every {args.interval_s:g} s each, "
        f"{args.duration_s:g} s, API processes {args.api_workers}, "
        f"{'no worker' if args.no_worker else 'a job running'}; load average "
        f"before {load_before:.2f}, after {os.getloadavg()[0]:.2f} (2 cores)"
    )
    print(f"{'endpoint':<14}{'requests':>9}{'errors':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
    everything: list[float] = []
    errors = 0
    for endpoint, samples in [*results.items(), ("all", [s for v in results.values() for s in v])]:
        latencies = [1000 * t for t, _ in samples]
        failed = sum(1 for _, status in samples if status != 200)
        if endpoint == "all":
            everything, errors = latencies, failed
        print(
            f"{endpoint:<14}{len(samples):>9}{failed:>8}{_percentile(latencies, 0.5):>9.1f}"
            f"{_percentile(latencies, 0.9):>9.1f}{_percentile(latencies, 0.99):>9.1f}"
        )
    p50, p99 = _percentile(everything, 0.5), _percentile(everything, 0.99)
    met = p50 < TARGETS["p50_ms"] and p99 < TARGETS["p99_ms"] and errors == 0
    print(
        f"targets: p50 < {TARGETS['p50_ms']:g} ms, p99 < {TARGETS['p99_ms']:g} ms, 0 errors: "
        f"{'met' if met else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
