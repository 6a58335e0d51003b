"""A whole job's generation against the teacher's physical limit, beside the gateway alone.

    python -m bench.job_throughput [--n 2000] [--latency-ms 200] [--cap 64] [--only clean]

Starts the fake teacher (latency L, at most C requests in flight, 429 above) and a fresh
Postgres database, measures the gateway alone in process (the reference of the same run),
then runs one job per scenario through Redis and a real `distill worker` process (the
production path): clean, jitter (+-100 ms), faults (6% HTTP 500), over the cap (the job's
limit 2 x C, so the teacher refuses with 429 + Retry-After), a request budget of 256 a
second (each request over it answered with OpenAI's RPM 429; its ratio is against N / 256 s,
the budget's limit), two worker processes sharing
the teacher, four replicas of the teacher (each L and C) with four worker processes and
4 x N calls (at most 5,000), whose call rate is compared with the clean scenario's, and
teacher verification of every accepted example (about N more calls, each asked once its
batch closes; the ratio is over every call the job made), and the replicas again where the
cores allow them: one replica, then four replicas with four workers, at 4 x L (four replicas
at L ask for 4 x C / L calls/s, which two cores cannot serve beside the fake teachers and
Postgres; at 4 x L they ask for what one replica does at L). For each four-replica run it
prints the speedup over one replica at the same latency and the cores the workers' CPU per
call needs at the replicas' limit ("the cores allow it" when that is at most half of the
machine's: the other half runs the fake teachers, Postgres and Redis). Each job
uses the `random` strategy with one example per prompt, so its
generation is exactly N teacher calls; the window is read from the rows (first batch start to
last stored call). Prints the ratio window / (N x L / C) (1.00 is the physical limit), the
targets of issue 14, the teacher's max in flight and 429s, answers paid twice, the worker
processes' CPU per teacher call (the student trains on a worker of its own), and where each
window went: the teacher's occupancy over time from its own timeline (head, tail, idle gaps).
Beside each ratio, the *floor*: the ratio a client with no cost of its own would get against
the same teacher (`perfect_client_window`; whole requests, so 2,000 calls at 64 wide are 32
waves: 1.024 clean, about 1.11 with 6% failures that each cost a full latency).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
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


def _window(sessions: Any, job_id: uuid.UUID) -> tuple[float, int, float]:
    """(seconds from the first batch's start to the last call stored, calls, the start as a
    Unix time)."""
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
    return (end - start).total_seconds(), int(count), start.timestamp()


def _batch_spans(sessions: Any, job_id: uuid.UUID, start: float) -> str:
    """Each batch's claim and close, in seconds from the window's start ("index:from-to"),
    with the last stored call of each: which batch held the window's tail."""
    from service.models import GenerationBatch, TeacherCall

    with sessions() as session:
        rows = session.execute(
            select(
                GenerationBatch.index,
                GenerationBatch.started_at,
                GenerationBatch.finished_at,
                func.max(TeacherCall.created_at),
            )
            .outerjoin(TeacherCall, TeacherCall.batch_id == GenerationBatch.id)
            .where(GenerationBatch.job_id == job_id)
            .group_by(GenerationBatch.id)
            .order_by(GenerationBatch.index)
        ).all()

    def at(moment: Any) -> str:
        return "?" if moment is None else f"{moment.timestamp() - start:.1f}"

    return " ".join(f"{i}:{at(a)}-{at(c)}/{at(b)}" for i, a, b, c in rows)


@dataclass(frozen=True)
class Occupancy:
    """How full the teacher was over a job's window (all its servers together)."""

    mean: float  # requests in flight over the window / the cap (1.0 = always full)
    full: float  # share of the window at 90% of the cap or more
    head_s: float  # from the window's start until the teacher is first 90% full
    tail_s: float  # from the last moment it was 90% full to the window's end
    gaps: int  # stretches below half the cap, 20 ms or longer, between head and tail
    gap_s: float  # their total length
    longest_gap: str  # the longest one: its length and where it started
    by_tenth: list[float]  # the mean occupancy in each tenth of the window

    def strip(self) -> str:
        return " ".join(f"{round(100 * x):>3}" for x in self.by_tenth)


def _occupancy(
    timelines: list[list[tuple[float, int]]], start: float, wall: float, cap: int
) -> Occupancy | None:
    """The teacher servers' in-flight timelines (see FakeTeacherProcess.timeline) over the
    window [start, start + wall], summed across servers, against their summed cap."""
    deltas: list[tuple[float, int]] = []
    for events in timelines:
        previous = 0
        for t, n in events:
            deltas.append((t, n - previous))
            previous = n
    if not deltas or wall <= 0:
        return None
    deltas.sort()
    end = start + wall
    level, t_prev = 0, start
    area = full_s = 0.0
    tenths = [0.0] * 10
    first_full: float | None = None
    last_full: float | None = None
    low_since: float | None = None
    gaps: list[tuple[float, float]] = []

    def span(a: float, b: float, n: int) -> None:
        nonlocal area, full_s, first_full, last_full, low_since
        if b <= a:
            return
        area += n * (b - a)
        tenth = wall / 10
        for i in range(int((a - start) // tenth), min(10, int((b - start) // tenth) + 1)):
            lo, hi = max(a, start + i * tenth), min(b, start + (i + 1) * tenth)
            if hi > lo:
                tenths[i] += n * (hi - lo)
        if n >= 0.9 * cap:
            full_s += b - a
            first_full = a if first_full is None else first_full
            last_full = b
            if low_since is not None:
                gaps.append((low_since, a))
                low_since = None
        elif n < 0.5 * cap and low_since is None and first_full is not None:
            low_since = a
        elif n >= 0.5 * cap and low_since is not None:
            gaps.append((low_since, a))
            low_since = None

    for t, delta in deltas:
        if t > end:
            break
        if t > start:
            span(t_prev, t, level)
            t_prev = t
        level += delta
    span(t_prev, end, level)
    # A low stretch still open at the end belongs to the tail, not to the gaps.
    inner = [(a, b) for a, b in gaps if b - a >= 0.02 and (last_full is None or b <= last_full)]
    longest = max(inner, key=lambda g: g[1] - g[0], default=None)
    return Occupancy(
        mean=area / (wall * cap),
        full=full_s / wall,
        head_s=(first_full if first_full is not None else end) - start,
        tail_s=end - (last_full if last_full is not None else start),
        gaps=len(inner),
        gap_s=sum(b - a for a, b in inner),
        longest_gap="-"
        if longest is None
        else f"{longest[1] - longest[0]:.2f}s@{longest[0] - start:.1f}",
        by_tenth=[x / (wall / 10 * cap) for x in tenths],
    )


def _gateway_alone(base_url: str, n: int, cap: int) -> tuple[float, float]:
    """Wall and CPU seconds of the gateway alone, in this process, with the local limiter."""
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

    cpu = time.process_time()
    wall = float(run_sync(go()))
    return wall, time.process_time() - cpu


def _group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of every live process in a process group (a Celery worker:
    its parent and pool children), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def _start_profiler(output: str, pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the worker and its pool children until it gets SIGINT."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        print("  --profile: py-spy is not on PATH (pip install py-spy); not profiling")
        return None
    proc = subprocess.Popen(
        [
            py_spy,
            "record",
            "--subprocesses",
            "--rate",
            "200",
            # A flame graph for an .svg, else collapsed stacks (one line per stack) to sum up.
            "--format",
            "flamegraph" if output.endswith(".svg") else "raw",
            "-o",
            output,
            "--pid",
            str(pid),
        ],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached before the job starts
    return proc


@dataclass(frozen=True)
class Scenario:
    name: str
    server: dict[str, Any] = field(default_factory=dict)
    job_cap_factor: int = 1  # the job's max_concurrency = factor x the teacher's cap
    workers: int = 1
    replicas: int = 1  # servers of the teacher (each latency L, cap C); N x replicas calls
    # The spec's filters: with teacher verification a batch's accepted examples are asked
    # again (about N more calls; the ratio is over every call the job made).
    filters: dict[str, Any] = field(default_factory=dict)
    # The teacher's latency as a multiple of --latency-ms: four replicas at 4 x L ask for the
    # call rate one replica does at L, which two cores can serve (at L they cannot: the workers
    # alone would need more CPU than the machine has beside the fake teachers and Postgres).
    latency_factor: int = 1
    # A hosted API's request budget: at most this many requests admitted per second, each
    # one over it answered with OpenAI's RPM 429 (0: none). Its ideal is then N / budget
    # when that is longer than N x L / C.
    budget_per_s: int = 0

    def latency_ms(self, base_ms: float) -> float:
        return base_ms * self.latency_factor

    def ideal_s(self, n: int, base_ms: float, cap: int) -> float:
        concurrency = n * self.latency_ms(base_ms) / 1000 / (cap * self.replicas)
        return max(concurrency, n / self.budget_per_s) if self.budget_per_s else concurrency


# Calls are one per seed row, and a spec picks at most 5,000 rows per iteration.
MAX_CALLS = 5000


SCENARIOS = (
    Scenario("clean"),
    Scenario("jitter", server={"jitter_ms": 100.0}),
    Scenario("faults", server={"error_rate": 0.06}),
    Scenario("over-cap", job_cap_factor=2),
    # A request budget of 256 a second, under the 320 that 64 slots of 200 ms allow.
    Scenario(
        "rate-limited",
        server={"rate_limit_requests": 256, "rate_limit_window_s": 1.0},
        budget_per_s=256,
    ),
    Scenario("two-workers", workers=2),
    Scenario("four-replicas", workers=4, replicas=4),
    Scenario("verify", filters={"teacher_verification": True}),
    # Scaling where the cores allow it: one replica and four replicas, both at 4 x L.
    Scenario("clean-4L", latency_factor=4),
    Scenario("four-replicas-4L", workers=4, replicas=4, latency_factor=4),
)
# A scenario compared with another runs that one too.
NEEDS = {"four-replicas": "clean", "four-replicas-4L": "clean-4L"}
SERVER_DEFAULTS: dict[str, Any] = {
    "jitter_ms": 0.0,
    "error_rate": 0.0,
    "retry_after_s": 1.0,
    "rate_limit_requests": 0,
    "rate_limit_window_s": 60.0,
}
TARGETS = {"clean": 1.10, "jitter": 1.08, "faults": 1.15, "over-cap": 1.30}


def perfect_client_window(
    n: int,
    cap: int,
    latency_s: float,
    *,
    jitter_s: float = 0.0,
    error_rate: float = 0.0,
    runs: int = 200,
    seed: int = 0,
) -> float:
    """The mean window of a client with no cost of its own against the fake teacher's model: `cap`
    requests always in flight while any is left, each answered after `latency_s` (+- `jitter_s`,
    uniform), failing with `error_rate` after its whole latency and sent again at once.

    N x L / C assumes the work is fluid; requests are whole, so even this client pays for the
    last wave (2,000 calls at 64 wide are 32 waves, not 31.25: 1.024 clean) and, with faults,
    for every failed attempt's full latency and the retries left at the end. Its window over
    N x L / C is the floor a target can be held against. A discrete-event simulation, averaged
    over `runs` seeded runs.
    """
    import heapq
    import random as random_module

    rng = random_module.Random(seed)
    total = 0.0
    for _ in range(runs):
        pending = n
        running: list[float] = []
        now = 0.0
        while pending or running:
            while pending and len(running) < cap:
                pending -= 1
                heapq.heappush(running, now + latency_s + rng.uniform(-jitter_s, jitter_s))
            now = heapq.heappop(running)
            if rng.random() < error_rate:
                pending += 1
        total += now
    return total / runs


def _floor(n: int, cap: int, latency_ms: float, scenario: Scenario) -> float:
    """A perfect client's window over N x L / C for this scenario's teacher (over the cap and
    with two workers the teacher is the clean one: a perfect client never exceeds its cap)."""
    server = {**SERVER_DEFAULTS, **scenario.server}
    window = perfect_client_window(
        n,
        cap,
        latency_ms / 1000,
        jitter_s=float(server["jitter_ms"]) / 1000,
        error_rate=float(server["error_rate"]),
    )
    return window / (n * latency_ms / 1000 / cap)


def _floor_spread(
    n: int, cap: int, latency_ms: float, error_rate: float, target: float, runs: int = 400
) -> str:
    """How a perfect client's single runs spread against a teacher that fails at random: each
    run is whole waves of one latency (no jitter), and how many requests fail, and where, decides
    how many (2,000 calls at 64 wide with 6% failures: 34 or 35 waves, sometimes 36)."""
    ideal = n * latency_ms / 1000 / cap
    ratios = sorted(
        perfect_client_window(n, cap, latency_ms / 1000, error_rate=error_rate, runs=1, seed=s)
        / ideal
        for s in range(runs)
    )
    above = sum(r > target for r in ratios) / runs
    return (
        f"median {ratios[runs // 2]:.3f}, 90th percentile {ratios[int(0.9 * runs)]:.3f}, "
        f"above the target {target:.2f} in {above:.0%} of runs"
    )


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _busy_since(before: tuple[int, int]) -> float:
    busy, total = _machine_ticks()
    return (busy - before[0]) / max(total - before[1], 1)


@dataclass
class Row:
    label: str
    wall: float
    calls: int
    refused: int = 0
    max_in_flight: int = 0
    cpu_ms: float | None = None
    duplicates: int = 0
    load: float | None = None  # 1-minute load average when the scenario ended
    busy: float | None = None  # share of the machine's CPUs busy during the scenario
    status: str = "-"
    ideal: float | None = None  # N x L / (C x replicas), when not the run's own
    floor: float | None = None  # a perfect client's ratio in the same model (perfect_client_window)
    latency_factor: int = 1  # the scenario's (vs gateway compares only rows at the same latency)
    occupancy: Occupancy | None = None
    batches: str = ""

    @property
    def rate(self) -> float:
        """Stored calls per second of the window."""
        return self.calls / self.wall if self.wall else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=512, help="the job spec default")
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=2,
        help="pool processes of each generation worker (`distill worker --concurrency`, whose "
        "default is 2)",
    )
    parser.add_argument("--only", action="append", help="run only these scenarios (repeatable)")
    parser.add_argument("--embedded", action="store_true", help="also run the embedded executor")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record the generation worker (parent and pool children) with py-spy during the "
        "--profile-scenario: a flame graph into FILE.svg, else collapsed stacks (needs "
        "`pip install py-spy` and ptrace rights)",
    )
    parser.add_argument(
        "--profile-scenario",
        default="clean",
        metavar="NAME",
        help="the scenario --profile records (its first worker process): default clean",
    )
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
    rows: list[Row] = []
    workers: list[subprocess.Popen[bytes]] = []
    load_before = os.getloadavg()[0]
    try:
        upgrade_database(url)
        engine = make_engine(url)
        sessions = session_factory(engine)
        chosen = set(args.only or ())
        chosen |= {NEEDS[name] for name in chosen if name in NEEDS}
        wanted = [s for s in SCENARIOS if not args.only or s.name in chosen or s.name == "clean"]
        most = max(min(args.n * s.replicas, MAX_CALLS) for s in wanted)
        train, val = _rows(max(args.n, most))
        with (
            FakeTeacherProcess(latency_ms=args.latency_ms, max_concurrency=args.cap) as fake,
            contextlib.ExitStack() as replicas,
        ):
            fakes = [fake]

            def stats() -> dict[str, Any]:
                """The teacher's counters, summed over its servers (the max in flight is the
                busiest server's: each has its own cap)."""
                found: dict[str, Any] = {
                    "max_in_flight": 0,
                    "duplicate_successes": 0,
                    "by_status": {},
                }
                for server in fakes:
                    one = server.stats()
                    server.reset()
                    found["max_in_flight"] = max(found["max_in_flight"], one["max_in_flight"])
                    found["duplicate_successes"] += one["duplicate_successes"]
                    for code, count in one["by_status"].items():
                        found["by_status"][code] = found["by_status"].get(code, 0) + count
                return found

            alone, alone_cpu = _gateway_alone(fake.base_url, args.n, args.cap)
            found = stats()
            rows.append(
                Row(
                    "gateway alone, in process",
                    alone,
                    args.n,
                    max_in_flight=found["max_in_flight"],
                    cpu_ms=alone_cpu * 1000 / args.n,
                    load=os.getloadavg()[0],
                )
            )

            def job(
                sender: Any,
                tag: str,
                cap: int,
                n: int = args.n,
                servers: int = 1,
                filters: dict[str, Any] | None = None,
            ) -> uuid.UUID:
                with sessions() as session:
                    session.info[SENDER] = sender
                    tenant = get_or_create_tenant(session, tag)
                    ids = [
                        str(create_dataset(session, tenant.id, part, rows_, 1).id)
                        for part, rows_ in (("train", train[:n]), ("val", val))
                    ]
                    spec = {
                        "name": tag,
                        "strategy": "random",
                        "task": {"instructions": "Classify the question."},
                        "datasets": {"train": ids[0], "validation": ids[1]},
                        "teacher": {
                            "base_url": fake.base_url,
                            "replica_urls": [f.base_url for f in fakes[1:servers]],
                            "model": "fake-teacher",
                            "limits": {"max_concurrency": cap},
                            "max_attempts": 10,
                        },
                        "student": {"type": "builtin", "model": "tfidf"},
                        # Without an example budget a classification iteration asks for a
                        # few per label; this one asks for exactly n.
                        "budget": {"max_iterations": 1, "max_examples_per_iteration": n},
                        "params": {"rows_per_iteration": n, "examples_per_row": 1},
                        "batch_size": args.batch_size,
                        "seed": len(rows) + 100,  # a fresh seed: nothing comes from the cache
                        "filters": filters or {},
                    }
                    created, _ = create_job(
                        session, tenant.id, parse_spec(spec), allow_private_teacher=True
                    )
                    session.commit()
                    return created.id

            if args.embedded:
                inline = InlineTaskSender()
                runtime.configure(sessions=sessions, sender=inline)
                job_id = job(inline, "inline", args.cap)
                inline.run_until_idle()
                wall, calls, _ = _window(sessions, job_id)
                found = stats()
                rows.append(
                    Row(
                        "job, embedded executor",
                        wall,
                        calls,
                        found["by_status"].get("429", 0),
                        found["max_in_flight"],
                        duplicates=found["duplicate_successes"],
                    )
                )

            env = {
                **os.environ,
                "DATABASE_URL": url,
                "REDIS_URL": REDIS_URL,
                "DISTILL_BROKER__KEY_PREFIX": prefix,
                "DISTILL_LOG_LEVEL": "WARNING",
            }

            def start_worker(queues: str = "generation") -> subprocess.Popen[bytes]:
                proc = subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "distill"),
                        "worker",
                        "--queues",
                        queues,
                        "--concurrency",
                        str(args.worker_concurrency if queues == "generation" else 1),
                        "--loglevel",
                        "WARNING",
                    ],
                    env=env,
                    start_new_session=True,
                )
                return proc

            # The student's training and evaluation run on a worker of their own, so the
            # generation workers' CPU is generation's alone (store, filter, insert included).
            control = start_worker("control,evaluation,export")
            workers.append(start_worker())
            time.sleep(5.0)  # the worker is up and its pool forked
            celery = CeleryTaskSender(REDIS_URL, key_prefix=prefix)
            # A small job first, unmeasured: the pool child's imports and first connections
            # are not part of what a teacher call costs.
            warm = job(celery, "warm-up", args.cap, n=128)
            while True:
                with sessions() as session:
                    if session.get(Job, warm).status.value in ("succeeded", "failed"):  # type: ignore[union-attr]
                        break
                time.sleep(0.5)
            stats()
            for scenario in SCENARIOS:
                if args.only and scenario.name not in chosen:
                    continue
                while len(workers) < scenario.workers:
                    workers.append(start_worker())
                    time.sleep(5.0)
                while len(fakes) < scenario.replicas:
                    fakes.append(
                        replicas.enter_context(
                            FakeTeacherProcess(latency_ms=args.latency_ms, max_concurrency=args.cap)
                        )
                    )
                for server in fakes:
                    server.configure(
                        **{
                            **SERVER_DEFAULTS,
                            "latency_ms": scenario.latency_ms(args.latency_ms),
                            **scenario.server,
                        }
                    )
                    server.reset()
                n = min(args.n * scenario.replicas, MAX_CALLS)
                cpu_before = sum(_group_cpu_s(w.pid) for w in workers)
                machine_before = _machine_ticks()
                profiler = (
                    _start_profiler(args.profile, workers[0].pid)
                    if args.profile and scenario.name == args.profile_scenario
                    else None
                )
                job_id = job(
                    celery,
                    scenario.name,
                    args.cap * scenario.job_cap_factor,
                    n=n,
                    servers=scenario.replicas,
                    filters=scenario.filters,
                )
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    with sessions() as session:
                        status = session.get(Job, job_id).status.value  # type: ignore[union-attr]
                    if status in ("succeeded", "failed", "cancelled"):
                        break
                    time.sleep(0.5)
                cpu = sum(_group_cpu_s(w.pid) for w in workers) - cpu_before
                busy = _busy_since(machine_before)
                if profiler is not None:
                    profiler.send_signal(signal.SIGINT)  # py-spy writes its report on SIGINT
                    profiler.wait(timeout=120)
                wall, calls, started = _window(sessions, job_id)
                occupancy = _occupancy(
                    [server.timeline() for server in fakes[: scenario.replicas]],
                    started,
                    wall,
                    args.cap * scenario.replicas,
                )
                found = stats()
                if scenario.filters:
                    n = calls  # verification calls too: the ratio is over every call made
                rows.append(
                    Row(
                        f"job, Celery: {scenario.name}"
                        + (f" ({scenario.workers} workers)" if scenario.workers > 1 else ""),
                        wall,
                        calls,
                        found["by_status"].get("429", 0),
                        found["max_in_flight"],
                        cpu * 1000 / max(calls, 1),
                        found["duplicate_successes"],
                        load=os.getloadavg()[0],
                        busy=busy,
                        status=status,
                        ideal=scenario.ideal_s(n, args.latency_ms, args.cap),
                        occupancy=occupancy,
                        batches=_batch_spans(sessions, job_id, started),
                        latency_factor=scenario.latency_factor,
                        floor=None
                        if scenario.budget_per_s
                        else _floor(
                            n,
                            args.cap * scenario.replicas,
                            scenario.latency_ms(args.latency_ms),
                            scenario,
                        ),
                    )
                )
                print(
                    f"  {rows[-1].label}: ratio {wall / (rows[-1].ideal or ideal):.3f}, "
                    f"{calls} calls, "
                    f"CPU {rows[-1].cpu_ms:.2f} ms/call, load {rows[-1].load:.2f}",
                    flush=True,
                )
        engine.dispose()
    finally:
        for worker in [*workers, *([control] if "control" in locals() else [])]:
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
        f"ideal N*L/C={ideal:.2f}s batch_size={args.batch_size} "
        f"worker concurrency={args.worker_concurrency}; load average before "
        f"{load_before:.2f}, after {os.getloadavg()[0]:.2f} (2 cores: above ~1.5 the machine "
        "is shared and the figures are noisy)"
    )
    print(
        f"{'path':<44} {'status':>9} {'calls':>6} {'429s':>6} {'max in':>7} {'dup':>4} "
        f"{'wall s':>8} {'ratio':>7} {'target':>7} {'floor':>6} {'vs gateway':>11} "
        f"{'CPU ms/call':>12} {'busy':>5} {'load':>5}"
    )
    for row in rows:
        kind = row.label.split(": ")[-1].split(" (")[0]
        target = TARGETS.get(kind) if row.label.startswith("job, Celery") else None
        print(
            f"{row.label:<44} {row.status:>9} {row.calls:>6} {row.refused:>6} "
            f"{row.max_in_flight:>7} {row.duplicates:>4} {row.wall:>8.2f} "
            f"{row.wall / (row.ideal or ideal):>7.3f} "
            f"{'-' if target is None else f'{target:.2f}':>7} "
            f"{'-' if row.floor is None else f'{row.floor:.3f}':>6} "
            f"{'-' if row.latency_factor != 1 else f'{row.wall / rows[0].wall:.3f}x':>11} "
            f"{'-' if row.cpu_ms is None else f'{row.cpu_ms:.2f}':>12} "
            f"{'-' if row.busy is None else f'{row.busy:.0%}':>5} "
            f"{'-' if row.load is None else f'{row.load:.2f}':>5}"
        )
    print(
        "CPU ms/call: user + system time of the generation worker processes (Celery's parent "
        "and its pool children) over the scenario, per stored call; busy: the whole machine's "
        "CPU use meanwhile (the fake teacher and Postgres run on it too); load: the 1-minute "
        "load average at the scenario's end."
    )
    print(
        "floor: the ratio of a client with no cost of its own against the same teacher model "
        "(whole requests: the last wave is paid in full; a failed attempt costs its whole "
        "latency and is sent again at once), from a discrete-event simulation; the ratio "
        "above it is what the product costs."
    )
    faults = next((sc for sc in SCENARIOS if sc.server.get("error_rate")), None)
    if faults is not None and any(row.label.endswith(f": {faults.name}") for row in rows):
        print(
            f"{faults.name}: a perfect client's single runs against the same teacher: "
            + _floor_spread(
                args.n,
                args.cap,
                args.latency_ms,
                float(faults.server["error_rate"]),
                TARGETS[faults.name],
            )
            + " (the floor above is their mean)"
        )
    print(
        "two workers: the teacher's max in flight must not exceed the cap "
        f"({args.cap}); 429s are the teacher refusing requests over its cap."
    )
    print(
        "\nWhere the window went (the teacher's requests in flight over the job's window, "
        "from its own timeline; 'full' is 90% of the cap or more):"
    )
    print(
        f"{'path':<44} {'mean':>5} {'full':>5} {'head s':>7} {'tail s':>7} {'gaps':>5} "
        f"{'gap s':>6} {'longest':>10}  occupancy % by tenth of the window"
    )
    for row in rows:
        occ = row.occupancy
        if occ is not None:
            print(
                f"{row.label:<44} {occ.mean:>5.0%} {occ.full:>5.0%} {occ.head_s:>7.2f} "
                f"{occ.tail_s:>7.2f} {occ.gaps:>5} {occ.gap_s:>6.2f} {occ.longest_gap:>10}  "
                f"{occ.strip()}"
            )
    print("Batches (index:claimed-last call stored/closed, seconds into the window):")
    for row in rows:
        if row.batches:
            print(f"  {row.label}: {row.batches}")
    print(
        "head: until the teacher is first full (claiming, loading, the limiter's ramp); tail: "
        "after it was last full (the last answers, retries, the last store); gaps: stretches "
        "below half the cap in between (the feed waiting on the database)."
    )
    by_name = {row.label.split(": ")[-1].split(" (")[0]: row for row in rows}
    scenarios = {scenario.name: scenario for scenario in SCENARIOS}
    cores = os.cpu_count() or 1
    for name in ("four-replicas", "four-replicas-4L"):
        four, one = by_name.get(name), by_name.get(NEEDS[name])
        if four is None or one is None or not one.rate:
            continue
        scenario = scenarios[name]
        latency_ms = scenario.latency_ms(args.latency_ms)
        limit = scenario.replicas * args.cap * 1000 / latency_ms  # calls/s at the limit
        print(
            f"{scenario.replicas} replicas, {scenario.workers} workers, latency "
            f"{latency_ms:.0f} ms: {four.rate:.0f} calls/s against {one.rate:.0f} for one "
            f"replica and one worker at the same latency, {four.rate / one.rate:.2f}x (target "
            f">= 3.6x where the cores allow; max in is the busiest replica's)"
        )
        if four.cpu_ms:
            needed = four.cpu_ms * limit / 1000
            print(
                f"  the workers' {four.cpu_ms:.2f} ms of CPU per call at the replicas' limit "
                f"({limit:.0f} calls/s) need {needed:.1f} of this machine's {cores} cores "
                f"(busy {four.busy or 0:.0%} in the run, the fake teachers and Postgres "
                "included): " + ("the cores allow it" if needed <= cores / 2 else "CPU-bound here")
            )
    for row in rows:
        if row.label.startswith("job, Celery") and row.cpu_ms:
            print(
                f"  {row.label}: {row.cpu_ms:.2f} ms of worker CPU per call; {cores} cores "
                f"would sustain {cores * 1000 / row.cpu_ms:.0f} calls/s of it"
            )


if __name__ == "__main__":
    main()
