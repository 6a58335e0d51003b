"""A large job's export, against a plain COPY of the same rows measured in the same run.

    python -m bench.export [--rows 1000000] [--batch 5000] [--format jsonl] [--json]

In a fresh Postgres database, one job (a small seed set, one kept iteration) gets `--rows`
example rows through the project's own insert path, the one generation uses
(`workers.steps.generate._insert_examples`, a batch of `--batch` rows per call and a commit
per batch, as one generation task stores its batch). Then:
  1. inserts: rows/s (target >= 20,000), beside a plain `COPY ... FROM STDIN` of the same
     rows into a copy of the table (same indexes), and the CPU time both ends spent;
  2. idempotence: the same batch inserted again stores nothing;
  3. baseline: `COPY (SELECT <the exported fields> ...) TO STDOUT` of the same rows, on the
     same server: MB/s and time to first byte;
  4. the export: `GET /v1/jobs/{id}/export?format=...` from an API process (uvicorn, its own
     process), read to the end: MB/s, time to first byte of the body, and the peak resident
     memory of the API process over its resident memory before the request (VmHWM - VmRSS,
     read from /proc; targets: growth < 100 MB, TTFB < 1 s), then the ratios to COPY.
The machine's other load makes timings noisy; compare ratios measured in the same run.
Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

REPO = Path(__file__).resolve().parents[1]
PG_SERVER = os.environ.get("DISTILL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
LABELS = ("balance", "card_lost", "transfer", "refund", "pin_change", "exchange_rate")
TARGET_INSERT_ROWS_S = 20_000
TARGET_RSS_GROWTH_MB = 100.0
TARGET_TTFB_S = 1.0


@contextmanager
def fresh_database() -> Iterator[str]:
    name = f"distill_bench_export_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def seed_rows(per_label: int = 10) -> bytes:
    lines = [
        json.dumps(
            {"text": f"customer message {i} about {label.replace('_', ' ')}", "label": label}
        )
        for label in LABELS
        for i in range(per_label)
    ]
    return ("\n".join(lines) + "\n").encode()


def seed_rows_exported(per_label: int = 10) -> int:
    """The seed rows the job trains on: it has no validation set, so it holds some out."""
    from service.splits import held_out_count

    return len(LABELS) * (per_label - held_out_count(per_label))


@dataclass
class BenchJob:
    job_id: uuid.UUID
    iteration_id: uuid.UUID
    api_key: str


def create_bench_job(sessions: sessionmaker[Session]) -> BenchJob:
    """A finished job with one kept iteration, made through the service's own functions."""
    from service.auth import create_api_key, get_or_create_tenant
    from service.datasets import create_dataset, parse_jsonl
    from service.domain.statuses import IterationStatus, JobStatus
    from service.jobs import create_job, parse_spec
    from service.models import Iteration
    from service.tasks import SENDER, RecordingTaskSender

    with sessions() as session:
        session.info[SENDER] = RecordingTaskSender()
        tenant = get_or_create_tenant(session, "bench")
        data = seed_rows()
        seed = create_dataset(session, tenant.id, "seed", parse_jsonl(data), size_bytes=len(data))
        job, _ = create_job(
            session,
            tenant.id,
            parse_spec(
                {
                    "name": "bench-export",
                    "strategy": "pgkd",
                    "task": {"instructions": "Classify a bank customer's message."},
                    "datasets": {"train": str(seed.id)},
                    "teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "bench-teacher"},
                    "student": {"type": "builtin", "model": "tfidf"},
                }
            ),
            allow_private_teacher=True,
        )
        iteration = Iteration(
            job_id=job.id, number=1, status=IterationStatus.completed, metric=0.5, included=True
        )
        session.add(Iteration(job_id=job.id, number=0, status=IterationStatus.completed))
        session.add(iteration)
        job.status = JobStatus.succeeded
        job.current_iteration = job.best_iteration = 1
        _, key = create_api_key(session, tenant)
        session.commit()
        return BenchJob(job.id, iteration.id, key)


def candidate_rows(job: BenchJob, start: int, n: int) -> list[dict[str, Any]]:
    """Example rows as generation hands them to the insert path (before it adds ids)."""
    rows = []
    for i in range(start, start + n):
        label = LABELS[i % len(LABELS)]
        fingerprint = hashlib.sha256(f"bench:{i // 10}".encode()).hexdigest()
        rows.append(
            {
                "job_id": job.job_id,
                "iteration_id": job.iteration_id,
                "batch_id": None,
                "teacher_call_id": None,
                "source_row_id": None,
                "target_id": f"weak:{label}:{i // 10}",
                "target_reason": "weak_class",
                "prompt_fingerprint": fingerprint,
                "dedup_key": f"{fingerprint}:{i % 10}",
                "kind": "augmented",
                "status": "accepted",
                "rejection_reason": None,
                "rejection_detail": None,
                "input": f"example {i}: a customer writes about their {label.replace('_', ' ')} "
                "and asks the bank what to do next, politely but firmly",
                "output": label,
                "meta": {"item_index": i % 10, "expected_label": label},
            }
        )
    return rows


def count_examples(sessions: sessionmaker[Session], job_id: uuid.UUID) -> int:
    from service.models import Example

    with sessions() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Example).where(Example.job_id == job_id)
            )
            or 0
        )


def _backend_cpu_s(pid: int) -> float | None:
    """CPU seconds a Postgres backend on this machine has used (None when it is elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class InsertTimes:
    seconds: float  # wall time in the insert path and its commits
    client_cpu_s: float  # this process's CPU time in them
    server_cpu_s: float | None  # the Postgres backends' CPU time in them


def insert(sessions: sessionmaker[Session], job: BenchJob, rows: int, batch: int) -> InsertTimes:
    """Time spent in the insert path (and its commit) for `rows` rows. The CPU times say how
    much of the wall time the machine's other load took: wall ~ client + server CPU when the
    two had the cores to themselves."""
    from workers.steps.generate import _insert_examples

    times = InsertTimes(0.0, 0.0, 0.0)
    for start in range(0, rows, batch):
        candidates = candidate_rows(job, start, min(batch, rows - start))
        with sessions() as session:
            pid = int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())
            session.commit()
            server_before = _backend_cpu_s(pid)
            began, cpu_began = time.perf_counter(), time.process_time()
            _insert_examples(session, job.job_id, candidates)
            session.commit()
            times.seconds += time.perf_counter() - began
            times.client_cpu_s += time.process_time() - cpu_began
            server_after = _backend_cpu_s(pid)
            if times.server_cpu_s is not None and server_before is not None and server_after:
                times.server_cpu_s += server_after - server_before
            else:
                times.server_cpu_s = None
    return times


def copy_in_baseline(url: str, job: BenchJob, rows: int, batch: int) -> float:
    """Seconds for a plain `COPY ... FROM STDIN` of the same rows into a copy of the examples
    table (its indexes, constraints and defaults): what Postgres ingests here, now, with no
    conflict handling and no per-row work of ours."""
    import psycopg
    from psycopg.types.json import Jsonb

    from service.domain.filters import text_hash

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    spent = 0.0
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE bench_copy_in (LIKE examples INCLUDING ALL)")
        conn.commit()
        columns: list[str] = []
        for start in range(0, rows, batch):
            candidates = candidate_rows(job, start, min(batch, rows - start))
            now = datetime.now(UTC)
            for row in candidates:
                row.update(id=uuid.uuid4(), input_hash=text_hash(row["input"]), created_at=now)
                row["meta"] = Jsonb(row["meta"])
            columns = columns or list(candidates[0])
            began = time.perf_counter()
            with conn.cursor() as cur:
                names = ", ".join(columns)
                with cur.copy(f"COPY bench_copy_in ({names}) FROM STDIN") as copy:
                    for row in candidates:
                        copy.write_row([row[c] for c in columns])
            conn.commit()
            spent += time.perf_counter() - began
        conn.execute("DROP TABLE bench_copy_in")
        conn.commit()
    return spent


def reinsert(sessions: sessionmaker[Session], job: BenchJob, batch: int) -> tuple[int, float]:
    """The first batch again, as a redelivered generation task would store it: rows added."""
    from workers.steps.generate import _insert_examples

    before = count_examples(sessions, job.job_id)
    with sessions() as session:
        began = time.perf_counter()
        _insert_examples(session, job.job_id, candidate_rows(job, 0, batch))
        session.commit()
        spent = time.perf_counter() - began
    return count_examples(sessions, job.job_id) - before, spent


@dataclass
class Transfer:
    seconds: float
    ttfb: float
    bytes: int
    lines: int

    @property
    def mb_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0


def copy_baseline(url: str, job_id: uuid.UUID) -> Transfer:
    """A plain COPY of the exported fields of the same rows, in the order the export reads."""
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    query = (
        "COPY (SELECT input, output FROM examples WHERE job_id = %s AND status = 'accepted' "
        "ORDER BY iteration_id, created_at, id) TO STDOUT"
    )
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        began = time.perf_counter()
        ttfb, size, lines = 0.0, 0, 0
        with cur.copy(query, (job_id,)) as copy:
            for block in copy:
                if not size:
                    ttfb = time.perf_counter() - began
                size += len(block)
                lines += bytes(block).count(b"\n")
        return Transfer(time.perf_counter() - began, ttfb, size, lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def _reset_peak(pid: int) -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0); the peak read
    # afterwards is then the peak of the export alone.
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@contextmanager
def api_server(url: str) -> Iterator[tuple[str, int]]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env.pop("REDIS_URL", None)
    env.update(DATABASE_URL=url, DISTILL_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "service.api.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=REPO,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.2)
        yield base, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_export(base: str, pid: int, job: BenchJob, fmt: str) -> tuple[Transfer, float]:
    """The export through HTTP, and the API process's peak RSS growth during it (MB)."""
    headers = {"Authorization": f"Bearer {job.api_key}"}
    path = f"/v1/jobs/{job.job_id}/export"
    # Warm the process up (imports, pools, first query plans) on a small request first.
    with httpx.Client(base_url=base, headers=headers, timeout=600) as client:
        client.get(path, params={"format": fmt, "kinds": "seed"}).raise_for_status()
        rss_before = _status_kb(pid, "VmRSS")
        _reset_peak(pid)
        began = time.perf_counter()
        ttfb, size, lines = 0.0, 0, 0
        with client.stream("GET", path, params={"format": fmt}) as response:
            response.raise_for_status()
            for chunk in response.iter_raw():
                if not size:
                    ttfb = time.perf_counter() - began
                size += len(chunk)
                lines += chunk.count(b"\n")
        seconds = time.perf_counter() - began
    peak = _status_kb(pid, "VmHWM")
    return Transfer(seconds, ttfb, size, lines), (peak - rss_before) / 1024


def run(rows: int, batch: int, fmt: str) -> dict[str, Any]:
    from service.cli import upgrade_database
    from service.db import make_engine, session_factory

    with fresh_database() as url:
        upgrade_database(url, quiet=True)
        engine = make_engine(url)
        sessions = session_factory(engine)
        try:
            job = create_bench_job(sessions)
            inserted = insert(sessions, job, rows, batch)
            insert_s = inserted.seconds
            stored = count_examples(sessions, job.job_id)
            added, reinsert_s = reinsert(sessions, job, min(batch, rows))
            copy_in_s = copy_in_baseline(url, job, rows, batch)
            with engine.connect() as conn:  # fresh statistics, as autovacuum would have them
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
            baseline = copy_baseline(url, job.job_id)
            with api_server(url) as (base, pid):
                export, rss_growth_mb = http_export(base, pid, job, fmt)
        finally:
            engine.dispose()
    insert_rate = rows / insert_s if insert_s else 0.0
    checks = {
        "inserts_rows_s": insert_rate >= TARGET_INSERT_ROWS_S,
        "reinsert_adds_nothing": added == 0 and stored == rows,
        "export_rows": export.lines == baseline.lines + seed_rows_exported(),
        "rss_growth_mb": rss_growth_mb < TARGET_RSS_GROWTH_MB,
        "ttfb_s": export.ttfb < TARGET_TTFB_S,
    }
    return {
        "rows": rows,
        "batch": batch,
        "format": fmt,
        "insert": {
            "seconds": insert_s,
            "rows_s": insert_rate,
            "stored": stored,
            "client_cpu_s": inserted.client_cpu_s,
            "server_cpu_s": inserted.server_cpu_s,
            "rows_per_cpu_s": rows / (inserted.client_cpu_s + inserted.server_cpu_s)
            if inserted.server_cpu_s
            else None,
            "load_average": os.getloadavg()[0],
            "copy_in_rows_s": rows / copy_in_s if copy_in_s else None,
            "over_copy_in": copy_in_s / insert_s if insert_s else None,
        },
        "reinsert": {"rows_added": added, "seconds": reinsert_s},
        "copy": baseline.__dict__ | {"mb_s": baseline.mb_s},
        "export": export.__dict__ | {"mb_s": export.mb_s, "rss_growth_mb": rss_growth_mb},
        "ratios": {
            "export_mb_s_over_copy": export.mb_s / baseline.mb_s if baseline.mb_s else None,
            "export_seconds_over_copy": export.seconds / baseline.seconds
            if baseline.seconds
            else None,
            "export_ttfb_over_copy": export.ttfb / baseline.ttfb if baseline.ttfb else None,
        },
        "targets": checks,
        "passed": all(checks.values()),
    }


def _report(result: dict[str, Any]) -> None:
    ins, rei, cp, ex, ra = (
        result["insert"],
        result["reinsert"],
        result["copy"],
        result["export"],
        result["ratios"],
    )
    ok = result["targets"]

    def mark(key: str) -> str:
        return "ok" if ok[key] else "MISSED"

    print(f"bench.export: {result['rows']:,} example rows, batches of {result['batch']:,}")
    print(
        f"  inserts      {ins['rows_s']:>12,.0f} rows/s   ({ins['seconds']:.1f} s)"
        f"   target >= {TARGET_INSERT_ROWS_S:,}: {mark('inserts_rows_s')}"
    )
    print(
        f"  COPY FROM    {ins['copy_in_rows_s']:>12,.0f} rows/s   the same rows, plain COPY into a "
        f"copy of the table: the insert path runs at {ins['over_copy_in']:.2f} x its rate"
    )
    if ins["rows_per_cpu_s"]:
        print(
            f"               CPU: this process {ins['client_cpu_s']:.1f} s + Postgres "
            f"{ins['server_cpu_s']:.1f} s = {ins['rows_per_cpu_s']:,.0f} rows per CPU-second "
            f"(load average {ins['load_average']:.1f} on {os.cpu_count()} cores)"
        )
    print(
        f"  re-insert    {rei['rows_added']:>12,} rows added ({rei['seconds']:.2f} s)"
        f"   target 0: {mark('reinsert_adds_nothing')}"
    )
    print(
        f"  COPY TO      {cp['mb_s']:>12.1f} MB/s     ttfb {cp['ttfb'] * 1000:7.1f} ms"
        f"   {cp['bytes'] / 1e6:8.1f} MB in {cp['seconds']:.2f} s"
    )
    print(
        f"  export       {ex['mb_s']:>12.1f} MB/s     ttfb {ex['ttfb'] * 1000:7.1f} ms"
        f"   {ex['bytes'] / 1e6:8.1f} MB in {ex['seconds']:.2f} s ({result['format']}, "
        f"{ex['lines']:,} lines: {mark('export_rows')})"
    )
    print(
        f"  export/COPY  {ra['export_mb_s_over_copy']:>12.2f} x MB/s   "
        f"{ra['export_seconds_over_copy']:.2f} x time   {ra['export_ttfb_over_copy']:.1f} x ttfb"
    )
    print(
        f"  API RSS growth {ex['rss_growth_mb']:>9.1f} MB   target < {TARGET_RSS_GROWTH_MB:.0f}: "
        f"{mark('rss_growth_mb')};  ttfb target < {TARGET_TTFB_S:.0f} s: {mark('ttfb_s')}"
    )
    print("PASSED" if result["passed"] else "TARGET MISSED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5000, help="rows per insert call")
    parser.add_argument("--format", default="jsonl")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.batch < 1:
        parser.error("--rows and --batch must be positive")
    result = run(args.rows, args.batch, args.format)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _report(result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
