"""Generation: one batch of targets → teacher calls (cached by fingerprint) → filtered examples."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import random
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from sqlalchemy import Table, and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError, PendingRollbackError
from sqlalchemy.orm import Session, undefer

from service import tasks
from service.db import insert_ignore
from service.domain.filters import (
    DEFAULT_CHECKS,
    Candidate,
    Check,
    ContaminationGuard,
    DedupIndex,
    FilterConfig,
    FilterContext,
    Verdict,
    check_contamination,
    check_length,
    expected_label_check,
    filter_candidates,
    reject,
    text_hash,
)
from service.domain.spec import TaskKind
from service.domain.statuses import (
    BatchStatus,
    ExampleStatus,
    JobStatus,
)
from service.domain.strategies.base import (
    CandidateExample,
    ExampleKind,
    GenerationTarget,
    PlanContext,
    strategy_phase,
)
from service.domain.teacher import (
    GenerationParams,
    StructuredMode,
    TeacherCallStatus,
    TeacherEndpoint,
    TeacherLimits,
    TeacherPrices,
    TeacherRequest,
    TeacherResult,
    is_transient_failure,
)
from service.jobs import lock_job, next_example_seq, transition_job
from service.models import Example, GenerationBatch, Iteration, Job, TeacherCall, utcnow
from service.models import Teacher as TeacherRow
from service.secrets import resolve_api_key
from service.settings import WorkerSettings
from workers.ports import Ports
from workers.steps.context import JobContext, load_job_context
from workers.steps.heartbeat import HeldBatches, interval_for, keep_batch_leases

if TYPE_CHECKING:
    from workers.teacher.gateway import Teacher

log = structlog.get_logger()
T = TypeVar("T")

# How often a running pipeline re-reads its job (cancel/pause): a pipeline spans batches, so
# this, not the batch size, bounds what is sent after a cancel (one primary-key read).
STATUS_POLL_S = 0.25
STORE_EVERY_S = 0.05
MAX_REJECTED_TEXT = 4000


def endpoint_for(row: TeacherRow) -> TeacherEndpoint:
    limits = TeacherLimits.model_validate(row.limits or {})
    return TeacherEndpoint(
        base_url=row.base_url,
        replica_urls=list(row.replica_urls or []),
        model=row.model,
        api_key=resolve_api_key(row.api_key_encrypted, row.api_key_env),
        limits=limits,
        metrics_url=limits.load_metrics_url(row.base_url),
        prices=TeacherPrices.model_validate(row.prices or {}),
        structured_mode=StructuredMode(row.structured_mode),
        timeout_s=row.timeout_s,
        max_attempts=row.max_attempts,
        limiter_key=str(row.id),
        public_only=not row.allow_private_network,
    )


def generation_params(teacher: TeacherRow, ctx: JobContext) -> GenerationParams:
    """The teacher's sampling parameters; without a seed of its own, the job spec's seed is
    used, so it is part of every request's fingerprint: the same spec on the same teacher
    reuses earlier answers (cached, free), another seed asks afresh."""
    params = GenerationParams.model_validate(teacher.generation or {})
    if params.seed is None:
        params = params.model_copy(update={"seed": ctx.spec.seed})
    return params


def _requests(
    targets: Sequence[GenerationTarget],
    teacher: TeacherRow,
    ctx: JobContext,
    schemas: list[dict[str, Any]],
) -> list[TeacherRequest]:
    """The targets' requests with the teacher's sampling parameters, and equal response
    schemas replaced by one shared dict (from `schemas`, which collects them): a batch's
    targets are decoded from JSON each with a schema of its own, and everything derived from
    a schema (its validator, its canonical JSON in the fingerprint and the prompt) is cached
    by identity, so one dict per distinct schema makes it computed once, not per request."""
    params = generation_params(teacher, ctx)
    requests = []
    for target in targets:
        update: dict[str, Any] = {"params": params}
        schema = target.request.response_schema
        if schema is not None:
            # Dict equality is a C-level walk, far cheaper than serializing the schema.
            shared = next((known for known in schemas if known == schema), None)
            if shared is None:
                schemas.append(schema)
                shared = schema
            update["response_schema"] = shared
        requests.append(target.request.model_copy(update=update))
    return requests


def _calls_by_fingerprint(
    session: Session, teacher: TeacherRow, fingerprints: Sequence[str]
) -> dict[str, TeacherCall]:
    stmt = select(TeacherCall).where(
        TeacherCall.teacher_id == teacher.id, TeacherCall.fingerprint.in_(fingerprints)
    )
    return {c.fingerprint: c for c in session.scalars(stmt)}


def _uncached(
    session: Session,
    teacher: TeacherRow,
    requests: Sequence[TeacherRequest],
    fingerprints: Sequence[str],
) -> tuple[list[tuple[TeacherRequest, str]], dict[str, dict[str, int]]]:
    """The fingerprint cache: a finished call (valid or invalid) is reused by any worker and
    never paid twice; a transient failure is called again (its row stays and the new attempts
    are added to it, so every attempt at the teacher stays counted); a final one (context
    length exceeded, a 400 about this request) stands.

    Returns the requests to send (each fingerprint once) and, for those that failed before,
    the retry causes recorded so far."""
    known = _calls_by_fingerprint(session, teacher, fingerprints)
    previous = {
        fp: dict(c.retry_causes or {})
        for fp, c in known.items()
        if c.status == TeacherCallStatus.failed.value and is_transient_failure(c.error_code)
    }
    done = set(known) - set(previous)
    to_call: dict[str, TeacherRequest] = {}
    for request, fp in zip(requests, fingerprints, strict=True):
        if fp not in done:
            to_call.setdefault(fp, request)
    return [(r, fp) for fp, r in to_call.items()], previous


@dataclass
class _Spend:
    tokens: int
    cost: float


def _job_spend(session: Session, job_id: uuid.UUID) -> _Spend:
    tokens, cost = session.execute(
        select(
            func.coalesce(func.sum(TeacherCall.tokens_in + TeacherCall.tokens_out), 0),
            func.coalesce(func.sum(TeacherCall.cost_usd), 0.0),
        ).where(TeacherCall.job_id == job_id)
    ).one()
    return _Spend(int(tokens), float(cost))


def _merged(previous: dict[str, int] | None, new: dict[str, int]) -> dict[str, int]:
    merged = dict(previous or {})
    for cause, count in new.items():
        merged[cause] = merged.get(cause, 0) + count
    if previous is not None:
        merged["batch_retry"] = merged.get("batch_retry", 0) + 1
    return merged


def _store_calls(
    session: Session,
    teacher_id: uuid.UUID,
    job_id: uuid.UUID,
    batch_of: dict[str, uuid.UUID],
    requests: dict[str, TeacherRequest],
    results: Sequence[TeacherResult],
    previous: dict[str, dict[str, int]],
) -> None:
    """Store finished calls. A call that failed transiently before is updated in place, its
    attempts, tokens and cost added to the earlier ones; a call another worker already
    finished is left as it is (its answer was first)."""
    if not results:
        return
    now = utcnow()
    rows = [
        {
            "id": uuid.uuid4(),
            "teacher_id": teacher_id,
            "job_id": job_id,
            "batch_id": batch_of[result.fingerprint],
            "fingerprint": result.fingerprint,
            "template_id": requests[result.fingerprint].template_id,
            "template_version": requests[result.fingerprint].template_version,
            "status": result.status.value,
            "text": result.text,
            "parsed": result.parsed,
            "error_code": result.error_code,
            "error": result.error,
            "finish_reason": result.finish_reason,
            "tokens_in": result.tokens_in,
            "tokens_out": result.tokens_out,
            "latency_s": result.latency_s,
            "attempts": result.attempts,
            "reasks": result.reasks,
            "cost_usd": result.cost_usd,
            "retry_causes": _merged(previous.get(result.fingerprint), result.retry_causes),
            "created_at": now,
            "updated_at": now,
        }
        for result in {r.fingerprint: r for r in results}.values()
    ]
    session.execute(_upsert_calls(session.get_bind().dialect.name), rows)  # executemany


@functools.cache
def _upsert_calls(dialect: str) -> Any:
    """The upsert of teacher calls, built once per dialect: building it and its cache key cost
    0.7 ms, once per store (up to 20 a second per process). Compiled once by SQLAlchemy's
    cache (see service.db.insert_ignore)."""
    table = TeacherCall.__table__
    assert isinstance(table, Table)
    stmt: Any = (pg_insert if dialect == "postgresql" else sqlite_insert)(table)
    added = ("tokens_in", "tokens_out", "cost_usd", "attempts", "reasks")
    replaced = (
        "status",
        "text",
        "parsed",
        "error_code",
        "error",
        "finish_reason",
        "latency_s",
        "retry_causes",
        "job_id",
        "batch_id",
        "updated_at",
    )
    return stmt.on_conflict_do_update(
        index_elements=["teacher_id", "fingerprint"],
        set_={
            **{name: table.c[name] + stmt.excluded[name] for name in added},
            **{name: stmt.excluded[name] for name in replaced},
        },
        where=table.c.status == TeacherCallStatus.failed.value,
    )


def _claim(session: Session, batch_id: uuid.UUID, lease_s: float) -> int | None:
    """Compare-and-set claim of one batch: a pending one that is due, or a running one whose
    lease lapsed (its worker died). Returns the claim's token, or None when another worker
    holds it (a duplicate or redelivered message) or it is not due yet."""
    now = utcnow()
    claimed = session.execute(
        update(GenerationBatch)
        .where(
            GenerationBatch.id == batch_id,
            or_(
                and_(
                    GenerationBatch.status == BatchStatus.pending,
                    or_(
                        GenerationBatch.retry_at.is_(None),
                        GenerationBatch.retry_at <= now + timedelta(seconds=1),
                    ),
                ),
                and_(
                    GenerationBatch.status == BatchStatus.running,
                    GenerationBatch.updated_at < now - timedelta(seconds=lease_s),
                ),
            ),
        )
        .values(
            status=BatchStatus.running,
            attempts=GenerationBatch.attempts + 1,
            started_at=func.coalesce(GenerationBatch.started_at, now),
            retry_at=None,
            updated_at=now,
        )
        .returning(GenerationBatch.attempts)
        .execution_options(synchronize_session=False)
    ).scalar()
    if claimed is None:
        session.rollback()
        return None
    session.commit()
    return int(claimed)


def _claim_next(
    session: Session, iteration_id: uuid.UUID, phase: str
) -> tuple[uuid.UUID, int] | None:
    """Claim the next due pending batch of the same phase (the pipeline's next batch)."""
    now = utcnow()
    candidate = (
        select(GenerationBatch.id)
        .where(
            GenerationBatch.iteration_id == iteration_id,
            GenerationBatch.phase == phase,
            GenerationBatch.status == BatchStatus.pending,
            or_(GenerationBatch.retry_at.is_(None), GenerationBatch.retry_at <= now),
        )
        .order_by(GenerationBatch.index)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    row = session.execute(
        update(GenerationBatch)
        .where(GenerationBatch.id == candidate, GenerationBatch.status == BatchStatus.pending)
        .values(
            status=BatchStatus.running,
            attempts=GenerationBatch.attempts + 1,
            started_at=func.coalesce(GenerationBatch.started_at, now),
            updated_at=now,
        )
        .returning(GenerationBatch.id, GenerationBatch.attempts)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        session.rollback()
        return None
    session.commit()
    return row[0], int(row[1])


def generate_batch(session: Session, batch_id: uuid.UUID, ports: Ports) -> None:
    """Generate a batch, then the phase's other pending batches, through one pipeline.

    The batch is leased (claimed under a token, renewed by a heartbeat every lease_s / 3);
    its requests feed the teacher's window, and before they run out the pipeline claims the
    phase's next pending batch and feeds it too, so the teacher is not idle between batches.
    Every answer is stored as it arrives; a batch whose answers are all in is filtered and
    closed beside the requests that are still running. A batch size is thus the unit of
    durability and fan-out, not of concurrency.
    """
    # Its targets (hundreds of rendered prompts, a deferred column) are read only when the
    # pipeline feeds them; a redelivered message for a finished batch then costs one small row.
    batch = session.get(GenerationBatch, batch_id)
    if batch is None or batch.status in (
        BatchStatus.succeeded,
        BatchStatus.failed,
        BatchStatus.cancelled,
    ):
        return  # redelivery of finished work
    job = session.get(Job, batch.job_id)
    assert job is not None
    if job.status is JobStatus.paused or job.status is JobStatus.queued:
        return  # resume re-enqueues pending batches
    if job.status is not JobStatus.running:
        if batch.status is BatchStatus.pending:
            _close_batch(session, batch, BatchStatus.cancelled, f"job {job.status.value}")
        return
    settings = ports.settings.worker
    token = _claim(session, batch.id, settings.lease_s)
    if token is None:
        return
    job.heartbeat_at = utcnow()
    session.commit()
    teacher_row = session.get(TeacherRow, job.teacher_id)
    assert teacher_row is not None
    pipeline = _Pipeline(session, ports, job, teacher_row, load_job_context(session, job))
    pipeline.run(batch.id, token, batch.iteration_id, batch.phase)


@dataclass
class _Outcome:
    permanent_error: str | None = None
    stopped: bool = False
    stop_reason: str | None = None
    last_error: str | None = None


@dataclass
class _Work:
    """One batch the pipeline holds: its targets and the answers it still waits for."""

    batch_id: uuid.UUID
    token: int
    targets: list[GenerationTarget]
    fingerprints: list[str]
    waiting: set[str] = field(default_factory=set)
    fed: bool = False
    closed: bool = False
    # The first batch of a pipeline is loaded in two parts (`_Pipeline._load`): the targets of
    # its second part wait here, as stored, until the first wave went out.
    unloaded: list[Any] = field(default_factory=list)
    # Whether any of its requests went to the teacher's window (set on the event loop; read
    # on the DB thread only once the loop is done). A batch claimed ahead that never started
    # is given back as it was, not closed or counted as a crash.
    started: bool = False


@dataclass
class _Closing:
    """A batch's close between its filters and its writes (`_Pipeline._finish`)."""

    rows: list[dict[str, Any]]  # example rows, accepted or rejected
    failed: int  # calls that failed transiently
    missing: int  # targets never answered
    retry: bool
    give_up: bool
    now: datetime
    since: datetime  # when the teacher became unavailable to the batch (or now)


def _to_verify(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows teacher verification checks: accepted ones with an answer."""
    return [r for r in rows if r["status"] == ExampleStatus.accepted.value and r["output"]]


# How long a thread may hold the GIL while another waits for it, while a pipeline runs: 1 ms,
# not CPython's 5. Closing a batch (filters, inserts: 0.3 s of CPU for 512 answers on 2 cores)
# holds the GIL on the DB thread, and the event loop, which needs it for every answer and every
# send, got it every 5 ms at best: the teacher's occupancy fell below half the cap each time a
# batch closed. bench/job_throughput.py, four pairs of runs alternating in one hour: idle
# stretches per window 0.13-0.48 s clean and 0-0.14 s jitter with 1 ms, 0.04-0.53 s and
# 0.17-0.33 s with 5; jitter 1.101-1.155 against 1.125-1.177 (lower in every pair), clean
# 1.102-1.179 against 1.071-1.180 (lower in three). 6% faults, two pairs: 1.212 and 1.240
# against 1.205 and 1.191; its tail is retries, not the loop.
PIPELINE_SWITCH_INTERVAL_S = 0.001
_switching = threading.Lock()
_pipelines_running = 0
_usual_switch_interval = sys.getswitchinterval()


@contextlib.contextmanager
def _quick_thread_switches() -> Iterator[None]:
    """`PIPELINE_SWITCH_INTERVAL_S` while any pipeline of this process runs (an embedded
    server may run several on threads), the interpreter's usual interval after the last."""
    global _pipelines_running, _usual_switch_interval
    with _switching:
        if _pipelines_running == 0:
            _usual_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_usual_switch_interval, PIPELINE_SWITCH_INTERVAL_S))
        _pipelines_running += 1
    try:
        yield
    finally:
        with _switching:
            _pipelines_running -= 1
            if _pipelines_running == 0:
                sys.setswitchinterval(_usual_switch_interval)


class _Pipeline:
    """One worker's generation loop over a phase's batches (see `generate_batch`).

    Threads: the event loop runs the teacher calls; every database step (claim, store,
    filter, close) runs on one DB thread, one at a time, with the task's session; a third
    thread renews the leases. The loop never waits for the database except to hand it work.
    """

    def __init__(
        self, session: Session, ports: Ports, job: Job, teacher_row: TeacherRow, ctx: JobContext
    ) -> None:
        self.session = session
        self.ports = ports
        self.job_id = job.id
        self.teacher_row = teacher_row
        self.ctx = ctx
        self.settings = ports.settings.worker
        self.outcome = _Outcome()
        self.go = True
        self.works: dict[uuid.UUID, _Work] = {}
        self.by_fp: dict[str, list[_Work]] = {}
        self.requests: dict[str, TeacherRequest] = {}
        self.schemas: list[dict[str, Any]] = []  # the distinct response schemas (`_requests`)
        self.previous: dict[str, dict[str, int]] = {}
        self.held = HeldBatches()
        self.spend = _Spend(0, 0.0)
        self.checked = time.monotonic()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate-db")
        # Closes waiting on teacher verification (`_finish`), awaited before the run ends.
        self.verifying: list[concurrent.futures.Future[None]] = []
        self.verifier: Teacher | None = None  # their teacher, made at the first

    # ------------------------------------------------------------------ the event loop

    def run(self, batch_id: uuid.UUID, token: int, iteration_id: uuid.UUID, phase: str) -> None:
        self.iteration_id, self.phase = iteration_id, phase
        self.spend = _job_spend(self.session, self.job_id)
        self.session.commit()
        with keep_batch_leases(
            self.session.get_bind(),
            self.job_id,
            self.held,
            every_s=interval_for(self.settings.lease_s),
        ):
            self.held.add(batch_id, token)
            try:
                with _quick_thread_switches():
                    asyncio.run(self._run(batch_id, token))
            except Exception as exc:
                self.executor.shutdown(wait=True)
                self._put_back_after_crash(f"{type(exc).__name__}: {exc}"[:500])
                raise
            finally:
                self.executor.shutdown(wait=True)

    def _put_back_after_crash(self, error: str) -> None:
        """A step that crashed gives its batches back at once (with a backoff, and failed
        for good after `max_crashes`: a poison batch must not loop forever), instead of
        leaving them to lapse. With the database gone too, the leases lapse by themselves."""
        try:
            self.session.rollback()
            for batch_id, token in self.held.snapshot().items():
                work = self.works.get(batch_id)
                if work is not None and not work.started and not work.fed:
                    # Claimed ahead, never started: it did not crash anything.
                    give_back_unstarted_batch(self.session, batch_id, token)
                else:
                    release_crashed_batch(self.session, batch_id, token, self.settings, error)
        except Exception as exc:
            log.warning("batch.put_back_failed", job_id=str(self.job_id), error=str(exc))

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self._rolled_back_on_failure, fn, *args
        )

    def _rolled_back_on_failure(self, fn: Callable[..., T], *args: Any) -> T:
        """A DB step; when it fails, the session is rolled back before the next step runs.
        A step that failed on a dropped connection (a status read, a claim) otherwise left the
        session's transaction invalid, every later step failed with PendingRollbackError, and
        the answers in hand were lost and paid again (tests/faults, Postgres dropping every
        connection: 12 answers paid twice with 4 in flight)."""
        try:
            return fn(*args)
        except BaseException:
            with contextlib.suppress(Exception):
                self.session.rollback()
            raise

    async def _run(self, batch_id: uuid.UUID, token: int) -> None:
        self._check()
        self.loop = asyncio.get_running_loop()
        teacher = self.ports.make_teacher(self.teacher_row)
        self._pending: list[TeacherResult] = []
        self._arrived = asyncio.Event()
        self._closing = False
        self._closed = asyncio.Event()  # the stream ended: what arrived is stored at once
        storer = asyncio.create_task(self._store_arrivals())
        try:
            stream = teacher.stream(self._feed(batch_id, token), should_continue=lambda: self.go)
            async for result in stream:
                if result.fingerprint not in self.by_fp:
                    continue
                self._pending.append(result)
                self._arrived.set()
                self.spend.tokens += result.tokens_in + result.tokens_out
                self.spend.cost += result.cost_usd
                if result.status is TeacherCallStatus.failed:
                    self.outcome.last_error = f"{result.error_code}: {result.error}"
                    if result.permanent:
                        self.outcome.permanent_error = (
                            f"teacher error {result.error_code}: {result.error}"
                        )
                        self.go = False
                self._check_budget()
        except Exception as exc:  # the limiter or the feed failed: what was sent is stored
            log.warning("batch.pipeline_interrupted", job_id=str(self.job_id), error=str(exc))
            self.outcome.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            self.go = False
            self._closing = True
            self._closed.set()
            self._arrived.set()
            await storer
            await teacher.aclose()
            await self._db(self._close_all)
            try:
                while self.verifying:  # `_close_all` may have started more
                    await asyncio.wrap_future(self.verifying.pop(0))
            finally:
                if self.verifier is not None:
                    await self.verifier.aclose()

    async def _store_arrivals(self) -> None:
        """Store what arrived, every STORE_EVERY_S at most: one commit for many answers (a
        commit per answer would cost more CPU than the answer), and an answer is durable
        within STORE_EVERY_S plus one commit of its arrival. The stream's end cuts the wait
        short: the last answers are stored at once, not up to STORE_EVERY_S later (the job's
        last stored answer ends its generation window: bench/job_throughput.py)."""
        while True:
            await self._arrived.wait()
            if not self._closing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STORE_EVERY_S):
                        await self._closed.wait()
            self._arrived.clear()
            arrived, self._pending = self._pending, []
            if arrived:
                await self._db(self._store, arrived)
            if self._closing and not self._pending:
                return

    async def _feed(self, batch_id: uuid.UUID, token: int) -> AsyncIterator[TeacherRequest]:
        """The held batches' requests, one batch after another, with one batch of lookahead:
        the next batch is claimed and loaded on the DB thread while this one's second half
        goes out, so the window never waits for a claim, a load, or a store queued before them.
        A batch claimed ahead that never starts (the pipeline stopped first) is given back
        by `_close_all`."""
        work, send = await self._db(self._load, batch_id, token, self._first_wave())
        first = True
        while True:
            ahead: asyncio.Future[tuple[_Work, list[TeacherRequest]] | None] | None = None
            work.started = True
            # The batch after the first is claimed once half of the first went out: not while
            # the window fills (loading a batch holds the GIL for tens of milliseconds, which
            # slowed the first 64 sends from 0.3 to 1.8 ms each), and long before it runs out.
            # Each later one is claimed as soon as the one before it starts: the DB thread is
            # free then, where from the half on it is closing the batch before (filters and
            # inserts, 0.5-1.2 s on 2 cores), and a claim queued behind that let this batch run
            # out first, the teacher idle meanwhile.
            claim_at = (len(send) + len(work.unloaded)) // 2 if first else 0
            first = False
            sent = 0
            async for request in self._requests_of(work, send):
                if sent == claim_at:
                    ahead = self._claim_ahead()
                yield request
                sent += 1
            if ahead is None:
                ahead = self._claim_ahead()
            # Marked on the DB thread, where answers are matched to batches, but not awaited:
            # the next batch's requests go out meanwhile.
            asyncio.ensure_future(self._db(self._fed, work.batch_id)).add_done_callback(_retrieve)
            following = await ahead
            if following is None or not self.go:
                return
            work, send = following

    async def _requests_of(
        self, work: _Work, send: list[TeacherRequest]
    ) -> AsyncIterator[TeacherRequest]:
        """A batch's requests; for a first batch loaded in two parts, the second part is loaded
        once the first wave went out, when the feed would wait on the teacher's window anyway
        (loading it beside the first sends would slow them: see `_feed`)."""
        for request in send:
            yield request
        if work.unloaded:
            for request in await self._db(self._load_rest, work):
                yield request

    def _first_wave(self) -> int:
        """How many of the first batch's targets are loaded before the first request goes out:
        the teacher's whole window (its concurrency cap on every server)."""
        servers = 1 + len(self.teacher_row.replica_urls or ())
        return TeacherLimits.model_validate(self.teacher_row.limits or {}).max_concurrency * servers

    def _claim_ahead(self) -> asyncio.Future[tuple[_Work, list[TeacherRequest]] | None]:
        ahead = asyncio.ensure_future(self._db(self._claim_and_load_following))
        # Never left unretrieved when the gateway closes the feed early; what it claimed is
        # held, and `_close_all` (queued behind it) gives it back.
        ahead.add_done_callback(_retrieve)
        return ahead

    # ------------------------------------------------------------------ the DB thread

    def _load(
        self, batch_id: uuid.UUID, token: int, first: int | None = None
    ) -> tuple[_Work, list[TeacherRequest]]:
        """A claimed batch's work and the requests to send. With `first`, only that many
        targets are made into requests now and the rest wait in `unloaded` for `_load_rest`:
        the first batch of a pipeline is in the window's head, where validating, building and
        fingerprinting 512 targets delayed the first request by 0.1-0.2 s."""
        batch = self.session.get(
            GenerationBatch,
            batch_id,
            populate_existing=True,
            options=[undefer(GenerationBatch.targets)],
        )
        assert batch is not None
        stored = list(batch.targets)
        cut = len(stored) if first is None else max(1, first)
        work = _Work(batch_id, token, [], [], unloaded=stored[cut:])
        send = self._add_targets(work, stored[:cut])
        # Held only once loaded: a batch whose targets cannot be loaded is put back as a crash
        # (`_close_all`), so a poison batch is failed for good after `max_crashes`.
        self.works[batch_id] = work
        return work, send

    def _load_rest(self, work: _Work) -> list[TeacherRequest]:
        # Cleared only once loaded: a second part that cannot be loaded stops the pipeline, and
        # `_close_all` meets it again and crashes, rather than close the batch without it.
        send = self._add_targets(work, work.unloaded)
        work.unloaded = []
        return send

    def _add_targets(self, work: _Work, stored: list[Any]) -> list[TeacherRequest]:
        """Make stored targets into requests, add them to `work`, and return those to send:
        not answered before (the fingerprint cache) and not sent for another held batch."""
        targets = [GenerationTarget.model_validate(t) for t in stored]
        requests = _requests(targets, self.teacher_row, self.ctx, self.schemas)
        fingerprints = [r.fingerprint(self.teacher_row.model) for r in requests]
        to_call, previous = _uncached(self.session, self.teacher_row, requests, fingerprints)
        self.session.commit()
        registered = set(work.fingerprints)  # a second part's duplicate of the first's: once
        work.targets += targets
        work.fingerprints += fingerprints
        self.previous.update(previous)
        send: list[TeacherRequest] = []
        for request, fp in to_call:
            if fp in registered:
                continue
            self.requests[fp] = request
            work.waiting.add(fp)
            others = self.by_fp.setdefault(fp, [])
            if not any(fp in other.waiting for other in others if other is not work):
                send.append(request)  # a fingerprint another held batch waits for goes once
            others.append(work)
        return send

    def _fed(self, batch_id: uuid.UUID) -> None:
        work = self.works[batch_id]
        work.fed = True
        self._check()
        if not work.waiting and not work.closed:
            self._while_database_returns(self._finishing(work, final=False))

    def _claim_and_load_following(self) -> tuple[_Work, list[TeacherRequest]] | None:
        if not self.go:
            return None
        if self._job_status() is not JobStatus.running:
            return None
        following = _claim_next(self.session, self.iteration_id, self.phase)
        if following is None:
            return None
        self.held.add(*following)
        return self._load(*following)

    def _store(self, results: list[TeacherResult]) -> None:
        """Store finished calls (paid answers are durable within one store of their arrival),
        then filter and close every batch whose answers are all in."""
        if results:
            batch_of = {r.fingerprint: self.by_fp[r.fingerprint][0].batch_id for r in results}

            def store() -> None:
                _store_calls(
                    self.session,
                    self.teacher_row.id,
                    self.job_id,
                    batch_of,
                    self.requests,
                    results,
                    self.previous,
                )
                self.session.commit()

            self._while_database_returns(store)
        ready: list[_Work] = []
        for result in results:
            for work in self.by_fp.get(result.fingerprint, ()):
                work.waiting.discard(result.fingerprint)
                if work.fed and not work.waiting and not work.closed and work not in ready:
                    ready.append(work)
        for work in ready:
            self._while_database_returns(self._finishing(work, final=False))
        if time.monotonic() - self.checked > STATUS_POLL_S:
            self.checked = time.monotonic()
            self._check()

    def _close_all(self) -> None:
        for work in list(self.works.values()):
            if work.closed:
                continue
            if work.unloaded and not self._unstarted(work):
                # A first batch stopped before its second part was loaded: that part's
                # targets are the batch's too (unsent, so retried or closed as unsent ones are).
                self._load_rest(work)
            if self._unstarted(work):
                self._while_database_returns(self._giving_back(work))
            else:
                self._while_database_returns(self._finishing(work, final=True))
        for batch_id, token in self.held.snapshot().items():
            if batch_id not in self.works:  # claimed, but its targets could not be loaded
                error = self.outcome.last_error or "its targets could not be loaded"
                release_crashed_batch(self.session, batch_id, token, self.settings, error)
                self.held.discard(batch_id)

    def _while_database_returns(self, step: Callable[[], None]) -> None:
        """Run a database step; when Postgres goes away (a restart, a failover, a dropped
        connection), roll back and try again for up to three leases, so the answers in hand
        are stored rather than paid again by whoever takes the batch over. Both steps are
        idempotent: a call's row is upserted once (the retry finds it), a batch is closed
        under its claim token."""
        deadline = time.monotonic() + 3 * self.settings.lease_s
        delay = 0.2
        while True:
            try:
                step()
                return
            except (OperationalError, PendingRollbackError) as exc:
                # PendingRollbackError: an earlier step failed on the connection and left the
                # transaction to roll back; rolled back here, the step is tried again.
                self.session.rollback()
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("batch.database_unavailable", error=str(exc)[:200], retry_s=delay)
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    def _unstarted(self, work: _Work) -> bool:
        """A batch claimed ahead that sent nothing, when the pipeline did not stop for a
        reason that applies to it too (a cancel, a pause, the budget, a permanent error: those
        close or keep it as its first batch would be)."""
        return (
            not work.started
            and not work.fed
            and not self.outcome.stopped
            and not self.outcome.permanent_error
        )

    def _giving_back(self, work: _Work) -> Callable[[], None]:
        def give_back() -> None:
            work.closed = False
            give_back_unstarted_batch(self.session, work.batch_id, work.token)
            work.closed = True
            self.held.discard(work.batch_id)

        return give_back

    def _finishing(self, work: _Work, *, final: bool) -> Callable[[], None]:
        def finish() -> None:
            work.closed = False  # a try that failed half-way is tried again whole
            if self._finish(work, final=final):
                self.held.discard(work.batch_id)  # a crash before this puts the batch back

        return finish

    def _job_status(self) -> JobStatus | None:
        """The job's status as committed, None when the job is gone. One column: after a
        commit, reading the status off the job's object reloaded the whole row (its spec and
        metrics as JSON), and the pipeline asks after every store."""
        read: list[JobStatus | None] = []
        # Retried like a store: a dropped connection must not stop the feed.
        self._while_database_returns(
            lambda: read.append(
                self.session.scalar(select(Job.status).where(Job.id == self.job_id))
            )
        )
        return read[-1]

    def _check(self) -> None:
        status = self._job_status()
        if status is not JobStatus.running:
            self.go = False
            gone = "deleted" if status is None else status.value
            self.outcome.stopped, self.outcome.stop_reason = True, f"job {gone}"
        else:
            self._check_budget()

    def _check_budget(self) -> None:
        budget = self.ctx.spec.budget
        if budget.max_tokens is not None and self.spend.tokens >= budget.max_tokens:
            self.go = False
            self.outcome.stopped, self.outcome.stop_reason = True, "token budget reached"
        if budget.max_cost_usd is not None and self.spend.cost >= budget.max_cost_usd:
            self.go = False
            self.outcome.stopped, self.outcome.stop_reason = True, "cost budget reached"

    def _finish(self, work: _Work, *, final: bool) -> bool:
        """Examples from a batch's answers, then the batch's next status: closed, or pending
        again to retry what failed transiently (until the retry deadline), or pending for a
        resume after a pause. Returns False when the close goes on after teacher
        verification (`_verify_then_complete`), True when it is done."""
        work.closed = True
        session = self.session
        session.expire_all()
        job = session.get(Job, self.job_id)
        batch = session.get(GenerationBatch, work.batch_id)
        assert job is not None and batch is not None
        if batch.status is not BatchStatus.running or batch.attempts != work.token:
            return True  # our lease lapsed and another worker took the batch over
        outcome = self.outcome
        if outcome.permanent_error:
            if job.status is JobStatus.running:
                transition_job(session, job, JobStatus.failed, reason=outcome.permanent_error)
                log.warning("job.failed", job_id=str(job.id), reason=outcome.permanent_error)
            _close_batch(session, batch, BatchStatus.failed, outcome.permanent_error)
            return True
        calls = _calls_by_fingerprint(session, self.teacher_row, work.fingerprints)
        missing = [fp for fp in work.fingerprints if fp not in calls]
        failed = [
            fp
            for fp in work.fingerprints
            if fp in calls
            and calls[fp].status == TeacherCallStatus.failed.value
            and is_transient_failure(calls[fp].error_code)
        ]
        retry = bool(failed or missing) and not (final and outcome.stopped)
        now = utcnow()
        since = batch.unavailable_since or now
        if since.tzinfo is None:  # read back from SQLite, which drops the offset (it is UTC)
            since = since.replace(tzinfo=UTC)
        give_up = retry and (now - since).total_seconds() >= self.settings.teacher_retry_deadline_s
        rows = _candidate_rows(
            session, job, batch, self.ctx, work.targets, work.fingerprints, calls, final=give_up
        )
        closing = _Closing(rows, len(failed), len(missing), retry, give_up, now, since)
        if self.ctx.spec.filters.teacher_verification and _to_verify(rows):
            # The teacher's calls run on the event loop while this thread stores answers,
            # claims and closes other batches; the close goes on once they are in. Run here,
            # they held this thread for the whole verification (about 8 round trips for a
            # batch of 512): answers waited unstored, past the bound on what a crash re-pays.
            session.commit()
            self.verifying.append(
                asyncio.run_coroutine_threadsafe(
                    self._verify_then_complete(work, batch.index, closing), self.loop
                )
            )
            return False
        self._complete(work, closing)
        return True

    async def _verify_then_complete(self, work: _Work, index: int, closing: _Closing) -> None:
        """Teacher verification of a batch's accepted examples, then the rest of its close
        (`_complete`), on the DB thread; the batch stays held (and its lease renewed) until
        it is closed."""
        await self._verify(work.batch_id, index, closing.rows)

        def complete() -> None:
            self._complete(work, closing)
            self.held.discard(work.batch_id)

        await self._db(self._while_database_returns, complete)

    async def _verify(self, batch_id: uuid.UUID, index: int, rows: list[dict[str, Any]]) -> None:
        """Teacher verification: the teacher answers each accepted candidate's input on its
        own; a candidate is kept only when the two agree. Calls are cached like any other.
        With `teacher_verification: sample`, a seeded share of the batch first, and the rest
        only when that share, or the job's record so far, disagrees often enough
        (`service.domain.verification`). Rows are changed in place."""
        from service.domain.verification import sample_for_verification, verify_the_rest

        accepted = _to_verify(rows)
        if self.ctx.spec.filters.teacher_verification != "sample":
            await self._verify_rows(batch_id, accepted)
            return
        picked = sample_for_verification(
            [f"{r['input']}\x00{r['output']}" for r in accepted], seed=str(self.job_id)
        )
        first = [r for i, r in enumerate(accepted) if i in picked]
        rest = [r for i, r in enumerate(accepted) if i not in picked]
        before = (
            await self._db(self._retried, lambda: _verification_record(self.session, self.job_id))
            if rest
            else (0, 0)
        )
        disagreed = await self._verify_rows(batch_id, first)
        widened = bool(rest) and verify_the_rest(len(first), disagreed, before=before)
        if widened:
            await self._verify_rows(batch_id, rest)
        else:
            for row in rest:
                row["meta"] = {**row["meta"], "verification": "not sampled"}
        log.info(
            "generate.verification_sampled",
            job_id=str(self.job_id),
            batch=index,
            sampled=len(first),
            disagreed=disagreed,
            job_verified=before[0],
            job_disagreed=before[1],
            widened_to=len(rest) if widened else 0,
        )

    async def _verify_rows(self, batch_id: uuid.UUID, accepted: list[dict[str, Any]]) -> int:
        """Verify `accepted` in place (rejecting what the teacher labels otherwise, or could
        not label); the number the teacher labelled otherwise. The calls go out on this loop,
        beside the batches' own; the database steps between them are queued on the DB
        thread like any other."""
        from service.domain.verification import verification_agrees, verification_request

        if not accepted:
            return 0
        params = generation_params(self.teacher_row, self.ctx)
        requests = [
            verification_request(self.ctx.spec.task, self.ctx.labels, r["input"]).model_copy(
                update={"params": params}
            )
            for r in accepted
        ]
        fps = [req.fingerprint(self.teacher_row.model) for req in requests]
        to_call, previous = await self._db(
            self._retried, lambda: _uncached(self.session, self.teacher_row, requests, fps)
        )
        if to_call:
            if self.verifier is None:
                # One for the run's verification rounds, closed at its end: its connections
                # (and TLS sessions) serve every round instead of being opened for each.
                self.verifier = self.ports.make_teacher(self.teacher_row)
            results = await self.verifier.generate([r for r, _ in to_call])
            sent = {fp: r for r, fp in to_call}

            def store() -> None:
                batch_of = dict.fromkeys(sent, batch_id)
                _store_calls(
                    self.session,
                    self.teacher_row.id,
                    self.job_id,
                    batch_of,
                    sent,
                    results,
                    previous,
                )
                self.session.commit()

            await self._db(self._while_database_returns, store)
        calls = await self._db(
            self._retried, lambda: _calls_by_fingerprint(self.session, self.teacher_row, fps)
        )
        disagreed = 0
        for row, fp in zip(accepted, fps, strict=True):
            call = calls.get(fp)
            row["meta"] = {**row["meta"], "verification_call": fp}
            if call is None or call.status != TeacherCallStatus.succeeded.value:
                row["status"] = ExampleStatus.rejected.value
                row["rejection_reason"] = "unverified"
                row["rejection_detail"] = call.error if call is not None else "not verified"
            elif not verification_agrees(self.ctx.spec.task, call.parsed, row["output"]):
                answer = call.parsed.get("answer") if isinstance(call.parsed, dict) else None
                row["status"] = ExampleStatus.rejected.value
                row["rejection_reason"] = "verification_disagreed"
                row["rejection_detail"] = f"the teacher answered {answer!r}"
                disagreed += 1
        return disagreed

    def _retried(self, read: Callable[[], T]) -> T:
        """A read on the DB thread, tried again while the database is away (as a store is)."""
        got: list[T] = []
        self._while_database_returns(lambda: got.append(read()))
        self.session.commit()
        return got[-1]

    def _complete(self, work: _Work, closing: _Closing) -> None:
        """The writes of a batch's close: its examples, then its next status."""
        session = self.session
        outcome = self.outcome
        # The writes start here: the job's row first (service.jobs.lock_job), then re-read
        # the batch and the job under it (a cancel may have committed since they were read).
        if not lock_job(session, self.job_id):
            session.rollback()
            return  # deleted
        job = session.get(Job, self.job_id, populate_existing=True)
        batch = session.get(GenerationBatch, work.batch_id, populate_existing=True)
        assert job is not None and batch is not None
        if batch.status is not BatchStatus.running or batch.attempts != work.token:
            session.rollback()
            return  # our lease lapsed and another worker took the batch over
        _reject_concurrent_duplicates(session, job, self.ctx, closing.rows)
        _insert_examples(session, job.id, closing.rows)
        now, since = closing.now, closing.since
        unanswered = closing.failed + closing.missing
        if closing.give_up:
            waited = (now - since).total_seconds()
            reason = (
                f"teacher unavailable for {waited:.0f} s (retry deadline "
                f"{self.settings.teacher_retry_deadline_s:g} s): {unanswered} "
                f"of {len(work.fingerprints)} calls failed; last error {outcome.last_error}"
            )
            log.warning("batch.failed", batch_id=str(batch.id), reason=reason)
            _close_batch(session, batch, BatchStatus.failed, reason)
            return
        if closing.retry:
            delay = _retry_delay(batch.attempts, self.settings.teacher_retry_deadline_s, since)
            batch.status = BatchStatus.pending
            batch.unavailable_since = since
            batch.retry_at = now + timedelta(seconds=delay)
            batch.error = (
                f"{closing.failed} teacher calls failed transiently, {closing.missing} not "
                f"sent: {outcome.last_error}; retried in {delay:.1f} s"
            )
            job.status_reason = "teacher unavailable"
            job.heartbeat_at = now
            tasks.enqueue(session, tasks.BATCH_GENERATE, str(batch.id), countdown=delay)
            session.commit()
            refresh_counters_after_batch(session, batch)
            log.info("batch.retry_scheduled", batch_id=str(batch.id), delay_s=round(delay, 1))
            return
        if job.status_reason == "teacher unavailable":
            job.status_reason = None
        batch.unavailable_since = None
        if outcome.stopped and job.status is JobStatus.paused:
            batch.status = BatchStatus.pending  # resume re-enqueues it; paid calls are cached
            session.commit()
            refresh_counters_after_batch(session, batch)
            return
        status = BatchStatus.succeeded
        if closing.missing and outcome.stopped:
            status = BatchStatus.cancelled  # budget or user stop: some targets never went out
        _close_batch(session, batch, status, outcome.stop_reason if outcome.stopped else None)


def _lock_batch(session: Session, batch_id: uuid.UUID) -> tuple[Job | None, GenerationBatch | None]:
    """The batch and its job, fresh from the database and locked in the order every writer
    takes them: the job's row before the batch's (service.jobs.lock_job)."""
    job_id = session.scalar(select(GenerationBatch.job_id).where(GenerationBatch.id == batch_id))
    if job_id is None:
        return None, None
    lock_job(session, job_id)
    job = session.get(Job, job_id, populate_existing=True)
    return job, session.get(GenerationBatch, batch_id, populate_existing=True)


def give_back_unstarted_batch(session: Session, batch_id: uuid.UUID, token: int) -> bool:
    """Put back, as it was before the claim, a batch a pipeline claimed ahead and never
    started (it stopped first: a crash, a lost database, the teacher's retries exhausted on
    the batch before). Pending and due at once, no crash counted, no retry clock started; a
    message is sent so that any worker takes it (a paused job's resume sends its own).
    Returns whether it was put back (False: the claim lapsed and another worker holds it)."""
    job, batch = _lock_batch(session, batch_id)
    if batch is None or batch.status is not BatchStatus.running or batch.attempts != token:
        session.rollback()
        return False
    batch.status = BatchStatus.pending
    batch.retry_at = None
    batch.updated_at = utcnow()
    if job is not None and job.status is JobStatus.running:
        tasks.enqueue(session, tasks.BATCH_GENERATE, str(batch.id))
    session.commit()
    log.info("batch.given_back", batch_id=str(batch.id), job_id=str(batch.job_id))
    return True


def release_crashed_batch(
    session: Session,
    batch_id: uuid.UUID,
    token: int | None,
    settings: WorkerSettings,
    error: str | None = None,
) -> bool:
    """Put back a batch whose worker crashed or died (token None: whoever held it), counting
    the crash, or fail it at `max_crashes` (a batch that kills its workers must not loop).
    Returns whether it was put back."""
    job, batch = _lock_batch(session, batch_id)
    if batch is None or batch.status is not BatchStatus.running:
        session.rollback()
        return False
    if token is not None and batch.attempts != token:
        session.rollback()
        return False
    batch.crashes += 1
    batch.error = error or "its worker stopped renewing the lease (killed, hung or cut off)"
    if batch.crashes >= settings.max_crashes:
        reason = (
            f"given up after {batch.crashes} crashes: its worker crashed or died each time "
            f"(last: {batch.error})"
        )
        log.error("batch.poisoned", batch_id=str(batch.id), crashes=batch.crashes)
        _close_batch(session, batch, BatchStatus.failed, reason)
        return False
    delay = min(60.0, 2.0 ** (batch.crashes - 1))
    batch.status = BatchStatus.pending
    batch.retry_at = utcnow() + timedelta(seconds=delay)
    batch.updated_at = utcnow()
    if job is not None and job.status is JobStatus.running:
        tasks.enqueue(session, tasks.BATCH_GENERATE, str(batch.id), countdown=delay)
    session.commit()
    return True


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Log the failure of a DB step nobody awaits. What it leaves undone is done at the
    pipeline's end: `_close_all` closes every batch still open and gives back those claimed
    ahead."""
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.warning("batch.pipeline_step_failed", error=f"{type(exc).__name__}: {exc}"[:300])


def _retry_delay(claims: int, deadline_s: float, since: datetime) -> float:
    """Exponential backoff with jitter between a batch's retries (2 s, 4 s, ... 5 min), never
    past the retry deadline, so the last retry comes right at it."""
    delay = min(300.0, 2.0 ** min(claims, 9)) * random.uniform(0.75, 1.0)
    left = deadline_s - (utcnow() - since).total_seconds()
    return max(0.5, min(delay, left))


def _candidate_examples(
    target: GenerationTarget, call: TeacherCall, ctx: JobContext, plan_ctx: PlanContext
) -> tuple[list[CandidateExample], str | None]:
    if call.status == TeacherCallStatus.invalid.value:
        return [], call.error_code or "schema_invalid"
    try:
        return ctx.strategy.parse(target, call.parsed, plan_ctx), None
    except ValueError as exc:
        return [], f"parse_error: {exc}"[:200]


def _plan_ctx(ctx: JobContext, iteration: Iteration, phase: str) -> PlanContext:
    return PlanContext(
        task=ctx.spec.task,
        params=ctx.params,
        iteration=iteration.number,
        phase=phase,
        seed=ctx.spec.seed,
        labels=ctx.labels,
        train_rows=ctx.train,
        evaluated=[],
        report=None,
        max_examples=None,
    )


def _candidate_rows(
    session: Session,
    job: Job,
    batch: GenerationBatch,
    ctx: JobContext,
    targets: list[GenerationTarget],
    fingerprints: list[str],
    calls: dict[str, TeacherCall],
    *,
    final: bool = False,
) -> list[dict[str, Any]]:
    """Example rows for a batch's finished calls, each accepted or rejected by the filters.
    With `final` (the batch gives up), transient failures leave rejected rows too."""
    iteration = session.get(Iteration, batch.iteration_id)
    assert iteration is not None
    plan_ctx = _plan_ctx(ctx, iteration, strategy_phase(batch.phase, ctx.strategy.phases))
    gold_by_row = {r.row_id: r.output for r in ctx.train}
    rows: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], Candidate]] = []
    for target, fp in zip(targets, fingerprints, strict=True):
        call = calls.get(fp)
        if call is None:
            continue
        if call.status == TeacherCallStatus.failed.value:
            if final or not is_transient_failure(call.error_code):
                rows.append(_failed_row(_lineage(job, batch, ctx, target, call, fp), call, target))
            continue  # a transient failure is called again by the batch's retry
        examples, problem = _candidate_examples(target, call, ctx, plan_ctx)
        base = _lineage(job, batch, ctx, target, call, fp)
        if problem is not None:
            raw = (call.text or "")[:MAX_REJECTED_TEXT]
            rows.append(
                {
                    **base,
                    "dedup_key": f"{fp}:invalid",
                    "kind": target.kind.value,
                    "status": ExampleStatus.rejected.value,
                    "rejection_reason": problem.split(":")[0],
                    "rejection_detail": (call.error or problem)[:2000],
                    "input": raw,
                    "output": None,
                    "meta": {"raw": True},
                }
            )
            continue
        for i, ex in enumerate(examples):
            row: dict[str, Any] = {
                **base,
                "dedup_key": f"{fp}:{i}",
                "kind": ex.kind.value,
                "input": ex.input,
                "output": ex.output,
                "rationale": ex.rationale,
                "meta": {**ex.meta, "expected_label": target.expected_label},
            }
            gold = gold_by_row.get(target.source_row_id or "")
            if target.kind.value == "rationale" and gold is not None:
                row["meta"]["gold"] = gold
            pending.append(
                (
                    row,
                    Candidate(
                        key=row["dedup_key"],
                        input=ex.input,
                        output=ex.output,
                        rationale=ex.rationale,
                    ),
                )
            )
    golds = {row["dedup_key"]: row["meta"]["gold"] for row, _ in pending if "gold" in row["meta"]}
    expected = {
        row["dedup_key"]: row["meta"]["expected_label"]
        for row, _ in pending
        if row["meta"].get("expected_label") is not None
    }
    kinds = [row["kind"] for row, _ in pending]
    verdicts = _filter(session, job, ctx, [c for _, c in pending], golds, kinds, expected)
    for (row, candidate), verdict in zip(pending, verdicts, strict=True):
        row["input_hash"] = candidate.fingerprinted.digest  # hashed once, by the filters
        if verdict.output is not None:
            row["output"] = verdict.output  # the filter maps e.g. "hum" to the canonical "HUM"
        row["status"] = (
            ExampleStatus.accepted.value if verdict.accepted else ExampleStatus.rejected.value
        )
        row["rejection_reason"] = verdict.reason
        row["rejection_detail"] = verdict.detail
        rows.append(row)
    return rows


def _lineage(
    job: Job,
    batch: GenerationBatch,
    ctx: JobContext,
    target: GenerationTarget,
    call: TeacherCall,
    fp: str,
) -> dict[str, Any]:
    """Where an example row comes from: its job, iteration, batch, teacher call, source row,
    target and prompt fingerprint."""
    return {
        "job_id": job.id,
        "iteration_id": batch.iteration_id,
        "batch_id": batch.id,
        "teacher_call_id": call.id,
        "source_row_id": ctx.row_uuid.get(target.source_row_id or ""),
        "target_id": target.target_id,
        "target_reason": target.reason,
        "prompt_fingerprint": fp,
    }


def _failed_row(
    lineage: dict[str, Any], call: TeacherCall, target: GenerationTarget
) -> dict[str, Any]:
    """A request that failed for good (e.g. its prompt exceeds the teacher's context) leaves a
    rejected row with the teacher's reason, so it is visible next to the examples it cost."""
    return {
        **lineage,
        "dedup_key": f"{lineage['prompt_fingerprint']}:failed",
        "kind": target.kind.value,
        "status": ExampleStatus.rejected.value,
        "rejection_reason": f"teacher_{call.error_code or 'error'}"[:64],
        "rejection_detail": (call.error or "the teacher call failed")[:2000],
        "input": "",
        "output": None,
        "meta": {"teacher_failed": True},
    }


def _insert_examples(session: Session, job_id: uuid.UUID, rows: list[dict[str, Any]]) -> None:
    """Store a batch's example rows, numbered in the job's commit order; called under the
    job's lock (`_Pipeline._complete`)."""
    now = utcnow()
    seq = next_example_seq(session, job_id)
    for row in rows:  # the ids are the column's default's (service.db.insert_ignore)
        row.setdefault("rationale", None)
        if "input_hash" not in row:
            row["input_hash"] = text_hash(row["input"])
        row["created_at"] = now
        row["seq"] = seq
    insert_ignore(session, Example, rows, ["job_id", "dedup_key"])
    session.flush()


def _reject_concurrent_duplicates(
    session: Session, job: Job, ctx: JobContext, rows: list[dict[str, Any]]
) -> None:
    """Reject, as the filter would have, an accepted row that duplicates (exactly or nearly)
    an example another batch of the job committed after this batch's filters ran.

    Each process's dedup index learns other processes' examples when it filters (`_indexes`),
    so two processes closing batches side by side (the default pool runs two) each accepted a
    text the other was accepting, and the export held it twice. Closes take the job's lock
    before they write, so here, under it, the index learns what was committed since (the
    examples numbered after the last it read: `Example.seq`) and the check is exact. A
    rationale example's input is its seed row's own text by design (its duplicates are judged
    with its rationale), so rationale rows are not checked."""
    accepted = [
        r
        for r in rows
        if r["status"] == ExampleStatus.accepted.value and r["kind"] != ExampleKind.rationale.value
    ]
    if not accepted:
        return
    config = _filter_config(ctx)
    learned = _indexes(session, job, ctx, config).learned
    own = {r["dedup_key"] for r in rows}  # a close tried again may find its own rows
    others = {key: text for key, text in learned if key not in own}
    if not others:
        return
    meanwhile = DedupIndex.build(others, config)
    for row in accepted:
        reason, detail = meanwhile.check(row["input"])
        if reason is not None:
            row["status"] = ExampleStatus.rejected.value
            row["rejection_reason"] = reason
            row["rejection_detail"] = f"{detail}, accepted by another batch while this one closed"


def _verification_record(session: Session, job_id: uuid.UUID) -> tuple[int, int]:
    """(examples verified, of which the teacher labelled otherwise) in the job's stored
    batches: the evidence `verify_the_rest` weighs beside a batch's own sample."""
    verified, disagreed = session.execute(
        select(
            func.count(),
            func.count().filter(Example.rejection_reason == "verification_disagreed"),
        ).where(
            Example.job_id == job_id,
            Example.meta["verification_call"].as_string().is_not(None),
        )
    ).one()
    return int(verified), int(disagreed)


def _answer_check(ctx: JobContext, golds: dict[str, str]) -> Check:
    """Rationale distillation keeps a rationale only when its answer matches the gold one;
    run as a filter check so a rejected candidate never enters the dedup index."""
    from service.domain.strategies.rationales import answer_matches

    def check(candidate: Candidate, _: FilterContext) -> Verdict | None:
        gold = golds.get(candidate.key)
        if gold is None or answer_matches(ctx.spec.task, candidate.output or "", gold):
            return None
        return reject(candidate, "answer_mismatch", f"teacher answered {candidate.output!r}")

    return check


def _rationale_text(text: str, rationale: str | None) -> str:
    return f"{text}\n\n{rationale or ''}"


def _filter(
    session: Session,
    job: Job,
    ctx: JobContext,
    candidates: list[Candidate],
    golds: dict[str, str],
    kinds: list[str],
    expected: dict[str, str] | None = None,
) -> list[Verdict]:
    if not candidates:
        return []
    if any(kind == ExampleKind.rationale.value for kind in kinds):
        # A rationale example's input is its seed row's own text, by design: judged on the
        # input alone it would always be a duplicate of that seed. It is a duplicate when its
        # rationale repeats one already accepted for the same text, so it is judged on
        # input + rationale against the job's other rationales (never against the seeds), and
        # the length and contamination checks, which are about generated inputs, do not apply.
        verdicts: dict[str, Verdict] = {}
        plain = [c for c, k in zip(candidates, kinds, strict=True) if k != "rationale"]
        for verdict in _filter_kind(
            session, job, ctx, plain, golds, rationale=False, expected=expected
        ):
            verdicts[verdict.key] = verdict
        combined = [
            c.model_copy(update={"input": _rationale_text(c.input, c.rationale)})
            for c, k in zip(candidates, kinds, strict=True)
            if k == "rationale"
        ]
        # A rationale's answer is checked against its row's gold (`_answer_check`), not
        # against the label its prompt asked for.
        for verdict in _filter_kind(session, job, ctx, combined, golds, rationale=True):
            verdicts[verdict.key] = verdict
        return [verdicts[c.key] for c in candidates]
    return _filter_kind(session, job, ctx, candidates, golds, rationale=False, expected=expected)


def _filter_kind(
    session: Session,
    job: Job,
    ctx: JobContext,
    candidates: list[Candidate],
    golds: dict[str, str],
    *,
    rationale: bool,
    expected: dict[str, str] | None = None,
) -> list[Verdict]:
    if not candidates:
        return []
    config = _filter_config(ctx)
    indexes = _indexes(session, job, ctx, config)
    checks: list[Check] = list(DEFAULT_CHECKS)
    if rationale:
        checks = [c for c in checks if c not in (check_length, check_contamination)]
    if golds:
        checks.insert(2, _answer_check(ctx, golds))  # after schema and label validity
    if expected and config.labels is not None:
        checks.insert(2, expected_label_check(expected))
    dedup = indexes.rationales if rationale else indexes.dedup
    verdicts = filter_candidates(
        candidates,
        config=config,
        dedup=dedup,
        guard=None if rationale else indexes.guard,
        checks=checks,
    )
    indexes.keys.update(v.key for v in verdicts if v.accepted)
    return verdicts


def _filter_config(ctx: JobContext) -> FilterConfig:
    spec = ctx.spec
    return FilterConfig(
        min_chars=spec.filters.min_chars,
        max_chars=spec.filters.max_chars,
        labels=ctx.labels if spec.task.kind is TaskKind.classification else None,
        near_duplicate_threshold=spec.filters.near_duplicate_threshold,
        contamination_threshold=spec.filters.contamination_threshold,
    )


@dataclass
class _JobIndexes:
    config: FilterConfig
    dedup: DedupIndex  # seed inputs and accepted generated inputs
    rationales: DedupIndex  # accepted rationale examples, as input + rationale
    guard: ContaminationGuard | None
    keys: set[str]
    # The highest `Example.seq` read (None: none yet): later reads ask only for examples
    # numbered above it, committed since.
    seen_seq: int | None = None
    # The plain (not rationale) examples the last read learned, as (key, input).
    learned: list[tuple[str, str]] = field(default_factory=list)


# Per-process cache of each job's dedup index and contamination guard. Rebuilding them for every
# batch costs O(accepted examples) MinHash work and grows with the job; instead each batch
# reads only the examples committed since the last read (`Example.seq`) and adds those this
# process has not seen (other workers' included).
_INDEXES: OrderedDict[uuid.UUID, _JobIndexes] = OrderedDict()
_MAX_CACHED_JOBS = 8


def _indexes(session: Session, job: Job, ctx: JobContext, config: FilterConfig) -> _JobIndexes:
    cached = _INDEXES.get(job.id)
    if cached is None or cached.config != config:
        seeds = {f"seed:{r.row_id}": r.input for r in ctx.train}
        cached = _JobIndexes(
            config=config,
            dedup=DedupIndex.build(seeds, config),
            rationales=DedupIndex.build({}, config),
            guard=ContaminationGuard.build(ctx.protected_texts, config)
            if ctx.protected_texts
            else None,
            keys=set(seeds),
        )
        _INDEXES[job.id] = cached
        while len(_INDEXES) > _MAX_CACHED_JOBS:
            _INDEXES.popitem(last=False)
    _INDEXES.move_to_end(job.id)
    plain: list[tuple[str, str]] = []
    rationales: list[tuple[str | None, str]] = []
    query = select(
        Example.dedup_key, Example.input, Example.kind, Example.rationale, Example.seq
    ).where(Example.job_id == job.id, Example.status == ExampleStatus.accepted)
    if cached.seen_seq is not None:
        # Only what was committed since the last read (`Example.seq` follows the commit
        # order): reading every accepted example at every batch's close grew with the job.
        # The last number read is read again: where writes are not locked (SQLite, which
        # ignores FOR UPDATE, under an embedded server's threads) two may share it.
        query = query.where(Example.seq >= cached.seen_seq)
    for key, text, kind, rationale, seq in session.execute(query):
        if seq is not None and (cached.seen_seq is None or seq > cached.seen_seq):
            cached.seen_seq = seq
        if key not in cached.keys:
            if kind == ExampleKind.rationale.value:
                rationales.append((key, _rationale_text(text, rationale)))
            else:
                plain.append((key, text))
            cached.keys.add(key)
    # Other workers' examples (this process indexes its own as it accepts them), sketched
    # together.
    cached.dedup.add_all(plain)
    cached.rationales.add_all(rationales)
    cached.learned = plain
    return cached


def _close_batch(
    session: Session, batch: GenerationBatch, status: BatchStatus, error: str | None
) -> None:
    lock_job(session, batch.job_id)  # the job's row before the batch's (service.jobs.lock_job)
    batch.status = status
    batch.error = error
    batch.finished_at = utcnow()
    batch.retry_at = None
    session.commit()
    refresh_counters_after_batch(session, batch)
    # Fan-in through the database: whoever sees no open batch left enqueues the phase's end.
    statuses = [
        BatchStatus(s)
        for s in session.scalars(
            select(GenerationBatch.status).where(
                GenerationBatch.iteration_id == batch.iteration_id,
                GenerationBatch.phase == batch.phase,
            )
        )
    ]
    if any(s in (BatchStatus.pending, BatchStatus.running) for s in statuses):
        return
    job = session.get(Job, batch.job_id)
    if (
        status is BatchStatus.failed
        and job is not None
        and job.status is JobStatus.running
        and all(s is BatchStatus.failed for s in statuses)
    ):
        # Not one batch of the phase got through: the teacher is gone, not a few requests.
        transition_job(session, job, JobStatus.failed, reason=error)
        session.commit()
        log.warning("job.failed", job_id=str(job.id), reason=error)
        return
    tasks.enqueue(session, tasks.PHASE_FINISH, str(batch.iteration_id), batch.phase)
    session.commit()


def refresh_counters_after_batch(session: Session, batch: GenerationBatch) -> None:
    """Bring the iteration's and the job's counters up to the rows after each batch, so spend
    and examples show while an iteration runs and stay right when it never finishes (a
    cancelled, paused or failed job skips the phase's end, where they were counted before).
    The job and iteration rows are locked: batches closing together take turns, and the last
    one counts every row the others committed. Locks are taken in the order every writer
    takes them, job first (a cancel updates the job, then its iterations; the other order
    deadlocked with a cancel), and as an UPDATE takes them (FOR NO KEY UPDATE: FOR UPDATE
    deadlocked with the foreign-key locks of a batch inserting its examples; see
    service.jobs.lock_job)."""
    lock_job(session, batch.job_id)
    job = session.get(Job, batch.job_id, populate_existing=True)
    iteration = session.get(
        Iteration, batch.iteration_id, with_for_update={"key_share": True}, populate_existing=True
    )
    if iteration is None or job is None:
        session.rollback()
        return
    refresh_iteration_counters(session, iteration)
    refresh_job_counters(session, job)
    session.commit()


def refresh_iteration_counters(session: Session, iteration: Iteration) -> None:
    """Counters are derived from rows (never incremented), so redelivery cannot skew them."""
    rejected: dict[str, int] = {}
    accepted = 0
    for status, reason, count in session.execute(
        select(Example.status, Example.rejection_reason, func.count())
        .where(Example.iteration_id == iteration.id, Example.kind != "preference_pair")
        .group_by(Example.status, Example.rejection_reason)
    ):
        if status == ExampleStatus.accepted:
            accepted += int(count)
        else:
            rejected[reason or "unknown"] = rejected.get(reason or "unknown", 0) + int(count)
    tokens_in, tokens_out, cost, n_calls = session.execute(
        select(
            func.coalesce(func.sum(TeacherCall.tokens_in), 0),
            func.coalesce(func.sum(TeacherCall.tokens_out), 0),
            func.coalesce(func.sum(TeacherCall.cost_usd), 0.0),
            func.count(TeacherCall.id),
        )
        .join(GenerationBatch, GenerationBatch.id == TeacherCall.batch_id)
        .where(GenerationBatch.iteration_id == iteration.id)
    ).one()
    iteration.examples_accepted = accepted
    iteration.examples_rejected = sum(rejected.values())
    iteration.rejected_by_reason = rejected
    iteration.tokens_in = int(tokens_in)
    iteration.tokens_out = int(tokens_out)
    iteration.cost_usd = float(cost)
    iteration.teacher_calls = int(n_calls)
    iteration.batches_done = int(
        session.scalar(
            select(func.count()).where(
                GenerationBatch.iteration_id == iteration.id,
                GenerationBatch.status.in_(
                    [BatchStatus.succeeded, BatchStatus.failed, BatchStatus.cancelled]
                ),
            )
        )
        or 0
    )


def refresh_job_counters(session: Session, job: Job) -> None:
    spend = session.execute(
        select(
            func.coalesce(func.sum(TeacherCall.tokens_in), 0),
            func.coalesce(func.sum(TeacherCall.tokens_out), 0),
            func.coalesce(func.sum(TeacherCall.cost_usd), 0.0),
        ).where(TeacherCall.job_id == job.id)
    ).one()
    counts = dict(
        session.execute(
            select(Example.status, func.count())
            .where(Example.job_id == job.id, Example.kind != "preference_pair")
            .group_by(Example.status)
        ).all()
    )
    session.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(
            tokens_in=int(spend[0]),
            tokens_out=int(spend[1]),
            cost_usd=float(spend[2]),
            examples_accepted=int(counts.get(ExampleStatus.accepted, 0)),
            examples_rejected=int(counts.get(ExampleStatus.rejected, 0)),
        )
        .execution_options(synchronize_session=False)
    )
    session.refresh(job)
