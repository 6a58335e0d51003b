"""Teacher gateway throughput against the fake teacher: wall time over the physical limit.

    python -m bench.teacher_throughput [--n 2000] [--latency-ms 200] [--cap 64]

Starts the fake teacher (latency L, cap C concurrent, 429 + Retry-After above it) as a process
and sends N generations with a small json_schema through each client. The ratio is wall time
over N x L / C (1.00 is the physical limit; for faults (N + extra requests) x L / C, since a
retried request occupies the server again). Scenarios: clean, jitter +-L/2, faults (5% 500s
and 2% malformed JSON, first attempt only), over-cap (client configured for 2 x C), two worker
processes sharing one teacher through RedisLimiter, a hand-written aiohttp + semaphore baseline
in the same run, and the SDK's default httpx transport (smaller N). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import redis
import structlog

from service.domain.teacher import (
    ChatMessage,
    GenerationParams,
    TeacherCallStatus,
    TeacherEndpoint,
    TeacherLimits,
    TeacherRequest,
    TeacherResult,
)
from tests.fake_teacher.client import FakeTeacherProcess
from workers.teacher import Limiter, LocalLimiter, OpenAITeacher, RedisLimiter

REPO = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("DISTILL_BENCH_REDIS", "redis://127.0.0.1:6379/0")
MODEL = "fake-teacher"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative"]},
        "text": {"type": "string"},
    },
    "required": ["label", "text"],
    "additionalProperties": False,
}
SERVER_DEFAULTS: dict[str, Any] = {
    "jitter_ms": 0.0,
    "error_rate": 0.0,
    "malformed_rate": 0.0,
    "faults_first_attempt_only": False,
    "retry_after_s": 1.0,
}


@dataclass(frozen=True)
class Scenario:
    name: str
    client: str  # gateway | baseline | httpx | two-processes
    limiter: str = "redis"  # redis | local
    server: dict[str, Any] = field(default_factory=dict)
    concurrency_factor: int = 1  # client max_concurrency = factor x server cap
    n_divisor: int = 1  # run N / divisor requests (the slow httpx transport)
    faults: bool = False


@dataclass
class Row:
    scenario: str
    client: str
    n: int
    wall_s: float
    ideal_s: float
    max_in_flight: int
    lost: int
    duplicated: int
    retries: int
    refused_429: int
    redis_calls_per_request: tuple[float, float] | None = None  # (scripts, publishes)
    cpu_ms_per_call: float | None = None  # this process's CPU (user + system) per request

    @property
    def ratio(self) -> float:
        return self.wall_s / self.ideal_s


def build_requests(n: int, tag: str) -> list[TeacherRequest]:
    return [
        TeacherRequest(
            template_id="bench",
            template_version="1",
            messages=[
                ChatMessage(role="system", content="You write short movie reviews."),
                ChatMessage(role="user", content=f"Write review {i} ({tag}) of a film you liked."),
            ],
            params=GenerationParams(max_tokens=256),
            response_schema=SCHEMA,
            sample_index=i,
        )
        for i in range(n)
    ]


def make_endpoint(base_url: str, concurrency: int, limiter_key: str) -> TeacherEndpoint:
    return TeacherEndpoint(
        base_url=base_url,
        model=MODEL,
        limits=TeacherLimits(max_concurrency=concurrency),
        timeout_s=30.0,
        max_attempts=10,
        limiter_key=limiter_key,
    )


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner() as runner:
        return runner.run(coro)


# --------------------------------------------------------------------------- clients


async def run_gateway(
    base_url: str,
    requests: Sequence[TeacherRequest],
    concurrency: int,
    limiter: Limiter,
    limiter_key: str,
    http_client: Any = None,
) -> tuple[float, list[TeacherResult]]:
    teacher = OpenAITeacher(
        make_endpoint(base_url, concurrency, limiter_key), limiter=limiter, http_client=http_client
    )
    try:
        started = time.perf_counter()
        results = await teacher.generate(requests)
        return time.perf_counter() - started, results
    finally:
        await teacher.aclose()
        await limiter.aclose()


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def run_baseline(base_url: str, n: int, tag: str, concurrency: int) -> tuple[float, int, int]:
    """The hand-written reference: aiohttp + a semaphore, Retry-After honoured, JSON checked.

    Returns (wall seconds, succeeded, retries).
    """
    semaphore = asyncio.Semaphore(concurrency)
    fmt = {"type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA}}
    retries = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int) -> bool:
            nonlocal retries
            body = {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": "You write short movie reviews."},
                    {"role": "user", "content": f"Write review {i} ({tag}) of a film you liked."},
                ],
                "max_tokens": 256,
                "temperature": 0.7,
                "seed": i,
                "response_format": fmt,
            }
            for _ in range(20):
                async with (
                    semaphore,
                    session.post(f"{base_url}/chat/completions", json=body) as resp,
                ):
                    status = resp.status
                    wait = float(resp.headers.get("retry-after", "0") or 0)
                    data = await resp.json() if status == 200 else None
                if data is not None and _is_json(data["choices"][0]["message"]["content"]):
                    return True
                retries += 1
                await asyncio.sleep(wait)
            return False

        started = time.perf_counter()
        done = await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - started, sum(done), retries


# --------------------------------------------------------------------------- two processes


def worker_main(args: argparse.Namespace) -> int:
    """One of the worker processes of the shared-teacher scenario: prints one JSON line."""
    configure_logging()

    async def work() -> dict[str, Any]:
        limiter = RedisLimiter(REDIS_URL, args.prefix)
        requests = build_requests(args.n, args.tag)
        teacher = OpenAITeacher(
            make_endpoint(args.base_url, args.concurrency, args.limiter_key), limiter=limiter
        )
        try:
            await asyncio.sleep(max(0.0, args.start_at - time.time()))
            started = time.time()
            results = await teacher.generate(requests)
            return {
                "started": started,
                "ended": time.time(),
                "succeeded": sum(r.status is TeacherCallStatus.succeeded for r in results),
                "retries": sum(sum(r.retry_causes.values()) for r in results),
            }
        finally:
            await teacher.aclose()
            await limiter.aclose()

    print(json.dumps(run(work())), flush=True)
    return 0


def run_two_processes(
    base_url: str, n: int, concurrency: int, prefix: str, limiter_key: str
) -> tuple[float, int, int]:
    start_at = time.time() + 6.0  # both processes are imported and waiting by then
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.teacher_throughput",
                "--worker",
                "--base-url",
                base_url,
                "--n",
                str(n // 2),
                "--tag",
                f"proc{index}",
                "--concurrency",
                str(concurrency),
                "--prefix",
                prefix,
                "--limiter-key",
                limiter_key,
                "--start-at",
                repr(start_at),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        reports.append(json.loads(out.strip().splitlines()[-1]))
    wall = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    return wall, sum(r["succeeded"] for r in reports), sum(r["retries"] for r in reports)


# --------------------------------------------------------------------------- driver


def redis_calls() -> tuple[int, int]:
    """Script calls (one round trip each) and publishes so far, from Redis's own counters."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        stats = client.info("commandstats")
        return (
            int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
            + int(stats.get("cmdstat_eval", {}).get("calls", 0)),
            int(stats.get("cmdstat_publish", {}).get("calls", 0)),
        )
    finally:
        client.close()


def delete_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def run_scenario(
    fake: FakeTeacherProcess, scenario: Scenario, n_total: int, latency_s: float, cap: int
) -> Row:
    fake.configure(**{**SERVER_DEFAULTS, **scenario.server})
    fake.reset()
    n = n_total // scenario.n_divisor
    concurrency = cap * scenario.concurrency_factor
    tag = f"{scenario.name}-{uuid.uuid4().hex[:6]}"
    prefix = f"distill-bench:{uuid.uuid4().hex}:"
    limiter_key = f"bench-{uuid.uuid4().hex[:6]}"
    calls_before = redis_calls()
    retries = 0
    cpu_before = time.process_time()
    try:
        if scenario.client == "baseline":
            wall, succeeded, retries = run(run_baseline(fake.base_url, n, tag, concurrency))
        elif scenario.client == "two-processes":
            wall, succeeded, retries = run_two_processes(
                fake.base_url, n, concurrency, prefix, limiter_key
            )
        else:
            requests = build_requests(n, tag)
            limiter: Limiter = (
                RedisLimiter(REDIS_URL, prefix) if scenario.limiter == "redis" else LocalLimiter()
            )
            http_client = openai.DefaultAsyncHttpxClient() if scenario.client == "httpx" else None
            wall, results = run(
                run_gateway(fake.base_url, requests, concurrency, limiter, limiter_key, http_client)
            )
            succeeded = sum(r.status is TeacherCallStatus.succeeded for r in results)
            retries = sum(sum(r.retry_causes.values()) for r in results)
    finally:
        delete_prefix(prefix)
    cpu = time.process_time() - cpu_before
    calls_after = redis_calls()
    stats = fake.stats()
    refused = int(stats["by_status"].get("429", 0))
    # Requests that held a server slot for a whole latency beyond the N first ones.
    extra = int(stats["requests_total"]) - refused - n
    ideal = (n + (extra if scenario.faults else 0)) * latency_s / cap
    uses_redis = scenario.client == "two-processes" or (
        scenario.client in ("gateway", "httpx") and scenario.limiter == "redis"
    )
    return Row(
        scenario=scenario.name,
        client=scenario.client if scenario.client != "gateway" else f"gateway/{scenario.limiter}",
        n=n,
        wall_s=wall,
        ideal_s=ideal,
        max_in_flight=int(stats["max_in_flight"]),
        lost=n - succeeded,
        duplicated=int(stats["duplicate_successes"]),
        retries=retries,
        refused_429=refused,
        redis_calls_per_request=(
            (
                (calls_after[0] - calls_before[0]) / n,
                (calls_after[1] - calls_before[1]) / n,
            )
            if uses_redis
            else None
        ),
        # The two-process scenario's work happens in its children.
        cpu_ms_per_call=None if scenario.client == "two-processes" else cpu * 1000 / n,
    )


SCENARIOS: Sequence[Scenario] = (
    Scenario("clean", "baseline"),
    Scenario("clean", "gateway", "redis"),
    Scenario("clean", "gateway", "local"),
    Scenario("jitter", "baseline", server={"jitter_ms": 100.0}),
    Scenario("jitter", "gateway", "redis", server={"jitter_ms": 100.0}),
    Scenario(
        "faults",
        "baseline",
        server={"error_rate": 0.05, "malformed_rate": 0.02, "faults_first_attempt_only": True},
        faults=True,
    ),
    Scenario(
        "faults",
        "gateway",
        "redis",
        server={"error_rate": 0.05, "malformed_rate": 0.02, "faults_first_attempt_only": True},
        faults=True,
    ),
    Scenario("over-cap", "baseline", concurrency_factor=2),
    Scenario("over-cap", "gateway", "redis", concurrency_factor=2),
    Scenario("two-processes", "two-processes"),
    Scenario("clean", "httpx", "redis", n_divisor=4),
)


def print_table(rows: Sequence[Row]) -> None:
    header = (
        f"{'scenario':<14}{'client':<16}{'N':>6}{'wall s':>9}{'ideal s':>9}{'ratio':>8}"
        f"{'max in-flight':>15}{'lost':>6}{'dup':>5}{'retries':>9}{'429s':>7}"
        f"{'scripts/req':>13}{'pub/req':>9}{'CPU ms/call':>13}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        calls = row.redis_calls_per_request
        scripts_text = "-" if calls is None else f"{calls[0]:.2f}"
        publish_text = "-" if calls is None else f"{calls[1]:.2f}"
        cpu_text = "-" if row.cpu_ms_per_call is None else f"{row.cpu_ms_per_call:.2f}"
        print(
            f"{row.scenario:<14}{row.client:<16}{row.n:>6}{row.wall_s:>9.2f}{row.ideal_s:>9.2f}"
            f"{row.ratio:>8.3f}{row.max_in_flight:>15}{row.lost:>6}{row.duplicated:>5}"
            f"{row.retries:>9}{row.refused_429:>7}{scripts_text:>13}{publish_text:>9}"
            f"{cpu_text:>13}"
        )


def configure_logging() -> None:
    # Retries are expected here by design; only failures are worth printing.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument(
        "--only", action="append", help="run only these scenario names (repeatable)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="w", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--limiter-key", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    configure_logging()
    latency_s = args.latency_ms / 1000.0
    scenarios = [s for s in SCENARIOS if not args.only or s.name in args.only]
    print(
        f"N={args.n} latency={args.latency_ms:g} ms cap={args.cap}; ideal = N x L / C = "
        f"{args.n * latency_s / args.cap:.2f} s; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows: list[Row] = []
    with FakeTeacherProcess(latency_ms=args.latency_ms, max_concurrency=args.cap) as fake:
        for scenario in scenarios:
            row = run_scenario(fake, scenario, args.n, latency_s, args.cap)
            rows.append(row)
            print(f"  {row.scenario}/{row.client}: ratio {row.ratio:.3f}", flush=True)
            time.sleep(0.5)  # let the server settle between scenarios
    print()
    print_table(rows)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
