"""Generation: one batch of targets → teacher calls (cached by fingerprint) → filtered examples."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

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
from service.jobs import transition_job
from service.models import Example, GenerationBatch, Iteration, Job, TeacherCall, utcnow
from service.models import Teacher as TeacherRow
from service.secrets import resolve_api_key
from workers.ports import Ports
from workers.steps.context import JobContext, load_job_context
from workers.steps.heartbeat import heartbeat, interval_for

log = structlog.get_logger()

# How often a running batch re-reads the job (cancel/pause) and its spend (budgets).
STATUS_POLL_S = 1.0
MAX_REJECTED_TEXT = 4000


class TeacherUnavailable(Exception):
    """Some calls failed for transient reasons after all attempts; retry the batch later."""


def endpoint_for(row: TeacherRow) -> TeacherEndpoint:
    limits = TeacherLimits.model_validate(row.limits or {})
    return TeacherEndpoint(
        base_url=row.base_url,
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
    targets: Sequence[GenerationTarget], teacher: TeacherRow, ctx: JobContext
) -> list[TeacherRequest]:
    params = generation_params(teacher, ctx)
    return [t.request.model_copy(update={"params": params}) for t in targets]


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
) -> list[tuple[TeacherRequest, str]]:
    """The fingerprint cache: a finished call (valid or invalid) is reused by any worker and
    never paid twice; a transient failure is forgotten, so it is called again; a final one
    (context length exceeded, a 400 about this request) stands."""
    known = _calls_by_fingerprint(session, teacher, fingerprints)
    failed = [
        fp
        for fp, c in known.items()
        if c.status == TeacherCallStatus.failed.value and is_transient_failure(c.error_code)
    ]
    if failed:
        session.execute(
            delete(TeacherCall).where(
                TeacherCall.teacher_id == teacher.id, TeacherCall.fingerprint.in_(failed)
            )
        )
    done = set(known) - set(failed)
    return [(r, fp) for r, fp in zip(requests, fingerprints, strict=True) if fp not in done]


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


def _store_calls(
    session: Session,
    teacher_id: uuid.UUID,
    job: Job,
    batch: GenerationBatch,
    requests: dict[str, TeacherRequest],
    results: Sequence[TeacherResult],
) -> None:
    now = utcnow()
    insert_ignore(
        session,
        TeacherCall,
        [
            {
                "id": uuid.uuid4(),
                "teacher_id": teacher_id,
                "job_id": job.id,
                "batch_id": batch.id,
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
                "retry_causes": result.retry_causes,
                "created_at": now,
                "updated_at": now,
            }
            for result in results
        ],
        ["teacher_id", "fingerprint"],
    )


def generate_batch(session: Session, batch_id: uuid.UUID, ports: Ports) -> None:
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
        _close_batch(session, batch, BatchStatus.cancelled, f"job {job.status.value}")
        return
    # Compare-and-set claim: a second delivery while another worker runs this batch is a
    # no-op. A batch abandoned by a dead worker goes back to pending through the reconcile.
    claimed = session.execute(
        update(GenerationBatch)
        .where(GenerationBatch.id == batch.id, GenerationBatch.status == BatchStatus.pending)
        .values(
            status=BatchStatus.running,
            attempts=GenerationBatch.attempts + 1,
            started_at=func.coalesce(GenerationBatch.started_at, utcnow()),
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    if not getattr(claimed, "rowcount", 0):
        session.rollback()
        return
    job.heartbeat_at = utcnow()
    session.commit()
    session.refresh(batch)

    ctx = load_job_context(session, job)
    teacher_row = session.get(TeacherRow, job.teacher_id)
    assert teacher_row is not None
    targets = [GenerationTarget.model_validate(t) for t in batch.targets]
    requests = _requests(targets, teacher_row, ctx)
    fingerprints = [r.fingerprint(teacher_row.model) for r in requests]

    to_call = _uncached(session, teacher_row, requests, fingerprints)
    session.commit()
    with heartbeat(
        session.get_bind(),
        GenerationBatch,
        batch.id,
        BatchStatus.running,
        every_s=interval_for(ports.settings.worker.stuck_after_s),
    ):
        outcome = _call_teacher(session, ports, teacher_row, job, batch, ctx, to_call)
    session.expire_all()
    job = session.get(Job, batch.job_id)
    batch = session.get(GenerationBatch, batch_id)
    assert job is not None and batch is not None
    if outcome.permanent_error:
        transition_job(session, job, JobStatus.failed, reason=outcome.permanent_error)
        _close_batch(session, batch, BatchStatus.failed, outcome.permanent_error)
        log.warning("job.failed", job_id=str(job.id), reason=outcome.permanent_error)
        return

    calls = _calls_by_fingerprint(session, teacher_row, fingerprints)
    rows = _candidate_rows(session, job, batch, ctx, targets, fingerprints, calls)
    if ctx.spec.filters.teacher_verification:
        rows = _verify(session, ports, teacher_row, job, batch, ctx, rows)
    _insert_examples(session, rows)
    missing = [fp for fp in fingerprints if fp not in calls]
    failed = [
        fp
        for fp in fingerprints
        if fp in calls
        and calls[fp].status == TeacherCallStatus.failed.value
        and is_transient_failure(calls[fp].error_code)
    ]
    if (failed or missing) and not outcome.stopped:
        batch.status = BatchStatus.pending  # keep the claim off; the retry re-calls only these
        batch.error = f"{len(failed)} teacher calls failed transiently: {outcome.last_error}"
        job.status_reason = "teacher unavailable"
        job.heartbeat_at = utcnow()
        session.commit()
        raise TeacherUnavailable(batch.error)
    if job.status_reason == "teacher unavailable":
        job.status_reason = None
    if outcome.stopped and job.status is JobStatus.paused:
        batch.status = BatchStatus.pending  # resume re-enqueues it; paid calls are cached
        session.commit()
        refresh_counters_after_batch(session, batch)
        return
    status = BatchStatus.succeeded
    if missing and outcome.stopped:
        status = BatchStatus.cancelled  # budget or user stop: some targets never went out
    _close_batch(session, batch, status, outcome.stop_reason if outcome.stopped else None)


@dataclass
class _Outcome:
    permanent_error: str | None = None
    stopped: bool = False
    stop_reason: str | None = None
    last_error: str | None = None


def _call_teacher(
    session: Session,
    ports: Ports,
    teacher_row: TeacherRow,
    job: Job,
    batch: GenerationBatch,
    ctx: JobContext,
    to_call: list[tuple[TeacherRequest, str]],
) -> _Outcome:
    outcome = _Outcome()
    if not to_call:
        return outcome
    budget = ctx.spec.budget
    spend = _job_spend(session, job.id)
    state = {"checked": time.monotonic(), "go": True}
    by_fp = {fp: r for r, fp in to_call}

    def check() -> None:
        session.expire(job, ["status"])
        if job.status is not JobStatus.running:
            state["go"] = False
            outcome.stopped, outcome.stop_reason = True, f"job {job.status.value}"
        elif budget.max_tokens is not None and spend.tokens >= budget.max_tokens:
            state["go"] = False
            outcome.stopped, outcome.stop_reason = True, "token budget reached"
        elif budget.max_cost_usd is not None and spend.cost >= budget.max_cost_usd:
            state["go"] = False
            outcome.stopped, outcome.stop_reason = True, "cost budget reached"

    check()
    if not state["go"]:
        return outcome

    def persist(results: list[TeacherResult]) -> None:
        """Store finished calls and re-read the job's status; runs in a thread, one at a time,
        so the event loop keeps every other request moving while Postgres commits."""
        _store_calls(session, teacher_row.id, job, batch, by_fp, results)
        job.heartbeat_at = utcnow()
        batch.updated_at = job.heartbeat_at  # a live batch is never taken for an abandoned one
        session.commit()  # paid calls are durable within one flush of their arrival
        if time.monotonic() - float(state["checked"]) > STATUS_POLL_S:
            state["checked"] = time.monotonic()
            check()

    async def consume() -> None:
        teacher = ports.make_teacher(teacher_row)
        pending: list[TeacherResult] = []
        flushing: asyncio.Task[None] | None = None
        try:
            stream: AsyncIterator[TeacherResult] = teacher.stream(
                [r for r, _ in to_call], should_continue=lambda: bool(state["go"])
            )
            async for result in stream:
                if result.fingerprint not in by_fp:  # reported by the sent request's fingerprint
                    continue
                pending.append(result)
                spend.tokens += result.tokens_in + result.tokens_out
                spend.cost += result.cost_usd
                if result.status is TeacherCallStatus.failed:
                    outcome.last_error = f"{result.error_code}: {result.error}"
                    if result.permanent:
                        outcome.permanent_error = (
                            f"teacher error {result.error_code}: {result.error}"
                        )
                        state["go"] = False
                _check_budget_only()
                # Results that land while a flush runs are stored together by the next one.
                if flushing is None or flushing.done():
                    if flushing is not None:
                        await flushing  # surfaces a failed flush
                    flushing = asyncio.create_task(asyncio.to_thread(persist, pending))
                    pending = []
        finally:
            if flushing is not None:
                await flushing
            if pending:
                await asyncio.to_thread(persist, pending)
            await teacher.aclose()

    def _check_budget_only() -> None:
        if budget.max_tokens is not None and spend.tokens >= budget.max_tokens:
            state["go"] = False
            outcome.stopped, outcome.stop_reason = True, "token budget reached"
        if budget.max_cost_usd is not None and spend.cost >= budget.max_cost_usd:
            state["go"] = False
            outcome.stopped, outcome.stop_reason = True, "cost budget reached"

    asyncio.run(consume())
    return outcome


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
) -> list[dict[str, Any]]:
    """Example rows for a batch's finished calls, each accepted or rejected by the filters."""
    iteration = session.get(Iteration, batch.iteration_id)
    assert iteration is not None
    plan_ctx = _plan_ctx(ctx, iteration, batch.phase)
    gold_by_row = {r.row_id: r.output for r in ctx.train}
    rows: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], Candidate]] = []
    for target, fp in zip(targets, fingerprints, strict=True):
        call = calls.get(fp)
        if call is None:
            continue
        if call.status == TeacherCallStatus.failed.value:
            if not is_transient_failure(call.error_code):
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
    kinds = [row["kind"] for row, _ in pending]
    verdicts = _filter(session, job, ctx, [c for _, c in pending], golds, kinds)
    for (row, _), verdict in zip(pending, verdicts, strict=True):
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


def _insert_examples(session: Session, rows: list[dict[str, Any]]) -> None:
    now = utcnow()
    for row in rows:
        row.setdefault("rationale", None)
        row["id"] = uuid.uuid4()
        row["input_hash"] = text_hash(row["input"])
        row["created_at"] = now
    insert_ignore(session, Example, rows, ["job_id", "dedup_key"])
    session.flush()


def _verify(
    session: Session,
    ports: Ports,
    teacher_row: TeacherRow,
    job: Job,
    batch: GenerationBatch,
    ctx: JobContext,
    rows: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Optional teacher verification: the teacher answers each accepted candidate's input on
    its own; a candidate is kept only when the two agree. Calls are cached like any other."""
    from service.domain.verification import verification_agrees, verification_request

    params = generation_params(teacher_row, ctx)
    accepted = [r for r in rows if r["status"] == ExampleStatus.accepted.value and r["output"]]
    requests = [
        verification_request(ctx.spec.task, ctx.labels, r["input"]).model_copy(
            update={"params": params}
        )
        for r in accepted
    ]
    fps = [req.fingerprint(teacher_row.model) for req in requests]
    _call_teacher(
        session, ports, teacher_row, job, batch, ctx, _uncached(session, teacher_row, requests, fps)
    )
    calls = _calls_by_fingerprint(session, teacher_row, fps)
    for row, fp in zip(accepted, fps, strict=True):
        call = calls.get(fp)
        row["meta"] = {**row["meta"], "verification_call": fp}
        if call is None or call.status != TeacherCallStatus.succeeded.value:
            row["status"] = ExampleStatus.rejected.value
            row["rejection_reason"] = "unverified"
            row["rejection_detail"] = call.error if call is not None else "not verified"
        elif not verification_agrees(ctx.spec.task, call.parsed, row["output"]):
            answer = call.parsed.get("answer") if isinstance(call.parsed, dict) else None
            row["status"] = ExampleStatus.rejected.value
            row["rejection_reason"] = "verification_disagreed"
            row["rejection_detail"] = f"the teacher answered {answer!r}"
    return rows


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
        for verdict in _filter_kind(session, job, ctx, plain, golds, rationale=False):
            verdicts[verdict.key] = verdict
        combined = [
            c.model_copy(update={"input": _rationale_text(c.input, c.rationale)})
            for c, k in zip(candidates, kinds, strict=True)
            if k == "rationale"
        ]
        for verdict in _filter_kind(session, job, ctx, combined, golds, rationale=True):
            verdicts[verdict.key] = verdict
        return [verdicts[c.key] for c in candidates]
    return _filter_kind(session, job, ctx, candidates, golds, rationale=False)


def _filter_kind(
    session: Session,
    job: Job,
    ctx: JobContext,
    candidates: list[Candidate],
    golds: dict[str, str],
    *,
    rationale: bool,
) -> list[Verdict]:
    if not candidates:
        return []
    spec = ctx.spec
    config = FilterConfig(
        min_chars=spec.filters.min_chars,
        max_chars=spec.filters.max_chars,
        labels=ctx.labels if spec.task.kind is TaskKind.classification else None,
        near_duplicate_threshold=spec.filters.near_duplicate_threshold,
        contamination_threshold=spec.filters.contamination_threshold,
    )
    indexes = _indexes(session, job, ctx, config)
    checks: list[Check] = list(DEFAULT_CHECKS)
    if rationale:
        checks = [c for c in checks if c not in (check_length, check_contamination)]
    if golds:
        checks.insert(2, _answer_check(ctx, golds))  # after schema and label validity
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


@dataclass
class _JobIndexes:
    config: FilterConfig
    dedup: DedupIndex  # seed inputs and accepted generated inputs
    rationales: DedupIndex  # accepted rationale examples, as input + rationale
    guard: ContaminationGuard | None
    keys: set[str]


# Per-process cache of each job's dedup index and contamination guard. Rebuilding them for every
# batch costs O(accepted examples) MinHash work and grows with the job; instead each batch
# adds only the accepted examples this process has not seen (other workers' included).
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
    for key, text, kind, rationale in session.execute(
        select(Example.dedup_key, Example.input, Example.kind, Example.rationale).where(
            Example.job_id == job.id, Example.status == ExampleStatus.accepted
        )
    ):
        if key not in cached.keys:
            if kind == ExampleKind.rationale.value:
                cached.rationales.add(key, _rationale_text(text, rationale))
            else:
                cached.dedup.add(key, text)
            cached.keys.add(key)
    return cached


def _close_batch(
    session: Session, batch: GenerationBatch, status: BatchStatus, error: str | None
) -> None:
    batch.status = status
    batch.error = error
    batch.finished_at = utcnow()
    session.commit()
    refresh_counters_after_batch(session, batch)
    # Fan-in through the database: whoever sees no open batch left enqueues the phase's end.
    open_batches = session.scalar(
        select(func.count()).where(
            GenerationBatch.iteration_id == batch.iteration_id,
            GenerationBatch.phase == batch.phase,
            GenerationBatch.status.in_([BatchStatus.pending, BatchStatus.running]),
        )
    )
    if not open_batches:
        tasks.enqueue(session, tasks.PHASE_FINISH, str(batch.iteration_id), batch.phase)
        session.commit()


def refresh_counters_after_batch(session: Session, batch: GenerationBatch) -> None:
    """Bring the iteration's and the job's counters up to the rows after each batch, so spend
    and examples show while an iteration runs and stay right when it never finishes (a
    cancelled, paused or failed job skips the phase's end, where they were counted before).
    The iteration row is locked first: batches closing together take turns, and the last one
    counts every row the others committed."""
    iteration = session.get(Iteration, batch.iteration_id, with_for_update=True)
    job = session.get(Job, batch.job_id)
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
