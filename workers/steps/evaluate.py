"""Student steps: train on the current dataset, evaluate, record metrics, mark the best."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from service import tasks
from service.db import insert_ignore
from service.domain.answers import answers_match, extract_answer, gold_answer
from service.domain.evaluation import EvalRow, Prediction, TrainRow
from service.domain.filters import text_hash
from service.domain.metrics import classification_report, qa_report
from service.domain.selection import (
    LABEL_CHECK_MIN_CLASSES,
    Comparison,
    Selection,
    ValidationRoles,
    label_agreement,
    paired_bootstrap,
    paired_bootstrap_correct,
    paired_bootstrap_scores,
    select_iteration,
)
from service.domain.spec import Metric, StudentSpec, StudentType, TaskKind
from service.domain.statuses import BatchStatus, ExampleStatus, IterationStatus, JobStatus
from service.domain.strategies.base import (
    TOP_UP_ROUNDS,
    LabelledRow,
    PhaseResult,
    ScoredDraft,
    as_top_up,
    examples_for_iteration,
    top_up_phase,
    top_up_round,
)
from service.jobs import lock_job, next_example_seq, transition_job
from service.models import Example, GenerationBatch, Iteration, Job, utcnow
from service.models import Prediction as PredictionRow
from workers.ports import Ports
from workers.steps.context import (
    JobContext,
    best_iteration,
    generated_training_rows,
    iteration_by_number,
    judging_roles,
    load_job_context,
)
from workers.steps.generate import refresh_iteration_counters, refresh_job_counters
from workers.steps.heartbeat import heartbeat, interval_for
from workers.steps.job import decide_and_continue, plan_context, store_batches
from workers.students.base import StudentConfigurationError, StudentUnavailableError

log = structlog.get_logger()


def _eval_rows(rows: list[LabelledRow]) -> list[EvalRow]:
    return [EvalRow(row_id=r.row_id, input=r.input, gold=r.output) for r in rows]


def _report(ctx: JobContext, rows: list[LabelledRow], preds: list[Prediction]) -> dict[str, Any]:
    if ctx.spec.task.kind is TaskKind.classification:
        return classification_report(
            [r.output for r in rows], [p.predicted for p in preds], ctx.labels
        ).model_dump(mode="json")
    return qa_report([bool(p.correct) for p in preds]).model_dump(mode="json")


def _split_report(
    ctx: JobContext,
    split: str,
    rows: list[LabelledRow],
    preds: list[Prediction],
    roles: ValidationRoles,
) -> dict[str, Any]:
    """A split's report; for validation, on the rows that judge the iteration (`roles`; rows
    that steered it would flatter its data)."""
    if split == "validation":
        held_out = roles.held_out
        kept = [(r, p) for r, p in zip(rows, preds, strict=True) if r.row_id in held_out]
        rows, preds = [r for r, _ in kept], [p for _, p in kept]
    return _report(ctx, rows, preds)


def _metric(ctx: JobContext, report: dict[str, Any]) -> float:
    if ctx.spec.stopping.metric is Metric.macro_f1 and "macro_f1" in report:
        return float(report["macro_f1"])
    return float(report["accuracy"])


def evaluate_iteration(session: Session, iteration_id: uuid.UUID, ports: Ports) -> None:
    """Train the student on seed + included accepted data, evaluate, decide what comes next."""
    iteration = session.get(Iteration, iteration_id)
    if iteration is None:
        return
    job = session.get(Job, iteration.job_id)
    assert job is not None
    if job.status is not JobStatus.running:
        return
    previous = iteration.status
    if not _claim(session, iteration, ports.settings.worker.lease_s):
        return  # finished, waiting for feedback, or being evaluated by another worker
    ctx = load_job_context(session, job)
    if ctx.spec.student.type is StudentType.external:
        posted = _posted_reports(session, iteration, ctx)
        if posted is None:
            iteration.status = IterationStatus.awaiting_feedback
            job.status_reason = f"waiting for feedback on iteration {iteration.number}"
            session.commit()
            log.info("iteration.awaiting_feedback", job_id=str(job.id), iteration=iteration.number)
            return
        job.status_reason = None
        checker = _label_checker(ctx, ports)
        labels = (
            None
            if checker is None
            else _teacher_label_check(
                job,
                iteration,
                ctx,
                checker,
                generated_training_rows(session, job),
                judging_roles(session, ctx, job.id, iteration.number),
            )
        )
        record_metrics(session, job, iteration, ctx, posted, labels=labels)
        session.commit()
        decide_and_continue(session, job)
        session.commit()
        return
    try:
        with heartbeat(
            session.get_bind(),
            Iteration,
            iteration.id,
            IterationStatus.evaluating,
            every_s=interval_for(ports.settings.worker.lease_s),
        ):
            _train_and_evaluate(session, job, iteration, ctx, ports)
    except StudentConfigurationError as exc:
        # The student refuses every request the same way (bad key, unknown model, a failing
        # trainer command): scoring rows as wrong would poison the loop, so fail with the reason.
        session.rollback()
        job = session.get(Job, iteration.job_id)
        assert job is not None
        transition_job(session, job, JobStatus.failed, reason=f"student error: {exc}")
        session.commit()
        log.warning("job.failed", job_id=str(job.id), reason=str(exc))
        return
    except StudentUnavailableError as exc:
        session.rollback()
        iteration = session.get(Iteration, iteration_id)
        assert iteration is not None
        iteration.status = previous  # un-claim, so the retry can take it again
        session.commit()
        raise StudentUnavailable(str(exc)) from exc
    session.commit()
    decide_and_continue(session, job)
    session.commit()


def _claim(session: Session, iteration: Iteration, lease_s: float) -> bool:
    """Compare-and-set to `evaluating`: a redelivered or duplicated evaluation of an iteration
    that another worker is evaluating is a no-op; one left by a dead worker is taken over once
    its lease lapsed (the heartbeat renews it every lease_s / 3)."""
    stale = utcnow() - timedelta(seconds=lease_s)
    result = session.execute(
        update(Iteration)
        .where(
            Iteration.id == iteration.id,
            or_(
                Iteration.status.in_([IterationStatus.pending, IterationStatus.training]),
                and_(Iteration.status == IterationStatus.evaluating, Iteration.updated_at < stale),
            ),
        )
        .values(
            status=IterationStatus.evaluating,
            updated_at=utcnow(),
            # Iteration 0 (seed only) starts here; the others started when they were planned.
            started_at=func.coalesce(Iteration.started_at, utcnow()),
        )
        .execution_options(synchronize_session=False)
    )
    if not getattr(result, "rowcount", 0):
        session.rollback()
        return False
    session.commit()
    session.refresh(iteration)
    return True


class StudentUnavailable(Exception):
    """The student could not be reached; the evaluation is retried later (transient)."""


def _train_and_evaluate(
    session: Session, job: Job, iteration: Iteration, ctx: JobContext, ports: Ports
) -> None:
    try:
        student = ports.make_student(ctx.spec.task, ctx.spec.student, ctx.student_public_only)
    except ValueError as exc:  # e.g. an unknown built-in model name: no retry will fix it
        raise StudentConfigurationError(str(exc)) from exc
    try:
        _fit_and_score(
            session,
            job,
            iteration,
            ctx,
            student,
            lambda: ports.make_student(ctx.spec.task, ctx.spec.student, ctx.student_public_only),
            _label_checker(ctx, ports),
        )
    finally:
        _close(student)


def _label_checker(ctx: JobContext, ports: Ports) -> Callable[[], Any] | None:
    """What makes the students that check the teacher's labels (`_teacher_label_check`): the
    job's own student when it is built-in; for an endpoint or external student, whose every fit
    is a training run or a trainer's round trip, the default built-in student, fitted only for
    the check. The teacher's labels are the teacher's fault whatever student learns from them,
    and a built-in student is what the check's floor was measured with. None for a task that
    has no labels to check."""
    if ctx.spec.task.kind is not TaskKind.classification:
        return None
    spec = ctx.spec.student if ctx.spec.student.type is StudentType.builtin else StudentSpec()
    return lambda: ports.make_student(ctx.spec.task, spec, False)


def _close(student: Any) -> None:
    close = getattr(student, "close", None)  # an endpoint student holds HTTP connections
    if close is not None:
        close()


@contextmanager
def _fitted(make_student: Callable[[], Any], rows: list[TrainRow]) -> Iterator[Any]:
    """A new student fitted on `rows`, closed when the block ends."""
    student = make_student()
    try:
        student.fit(rows)
        yield student
    finally:
        _close(student)


def _training_rows(
    ctx: JobContext, generated: list[tuple[int, str, str]], without: Collection[int]
) -> list[TrainRow]:
    """The seed rows and the generated examples (`generated_training_rows`) of every
    iteration but those in `without`."""
    return [TrainRow(input=r.input, output=r.output) for r in ctx.train] + [
        TrainRow(input=i, output=o) for n, i, o in generated if n not in without
    ]


OUT_OF_FOLD_K = 5


def out_of_fold_predictions(
    make_student: Callable[[], Any],
    seeds: list[LabelledRow],
    extra: list[tuple[str, str]],
    k: int = OUT_OF_FOLD_K,
) -> list[Prediction]:
    """Predictions on the seed rows by students that never saw them (k-fold, plus every
    generated example), so mining the train split finds what the student cannot learn.

    A built-in student scores its own training rows almost perfectly (logistic regression
    memorises them), which would leave LLM2LLM and the rationale strategy with nothing to mine;
    a fine-tuned LLM, the student those papers had, does not memorise that way. Folds are
    assigned by position, which is content-stable: the same seeds give the same folds."""
    k = max(2, min(k, len(seeds)))
    by_id: dict[str, Prediction] = {}
    for fold in range(k):
        held = [r for i, r in enumerate(seeds) if i % k == fold]
        kept = [
            TrainRow(input=r.input, output=r.output) for i, r in enumerate(seeds) if i % k != fold
        ] + [TrainRow(input=i, output=o) for i, o in extra]
        if not held:
            continue
        if len({r.output for r in kept}) < 2:
            # One class left: no classifier can be fitted; the rows count as unlearnable.
            for r in held:
                by_id[r.row_id] = Prediction(
                    row_id=r.row_id,
                    predicted=None,
                    correct=False,
                    error="out of fold: the other rows have a single class",
                )
            continue
        student = make_student()
        student.fit(kept)
        for pred in student.predict(_eval_rows(held)):
            by_id[pred.row_id] = pred
    return [by_id[r.row_id] for r in seeds]


def _fit_and_score(
    session: Session,
    job: Job,
    iteration: Iteration,
    ctx: JobContext,
    student: Any,
    make_student: Callable[[], Any],
    make_checker: Callable[[], Any] | None = None,
) -> None:
    started = time.monotonic()
    fit = getattr(student, "fit", None)
    generated = generated_training_rows(session, job)
    rows_for_fit = [(r.input, r.output) for r in ctx.train] + [(i, o) for _, i, o in generated]
    if fit is not None:
        fit([TrainRow(input=i, output=o) for i, o in rows_for_fit])
    fitted = time.monotonic()

    splits: dict[str, list[LabelledRow]] = {"validation": ctx.validation}
    if ctx.strategy.mining_split == "train":
        splits["train"] = ctx.train
    if ctx.test:
        splits["test"] = ctx.test
    reports: dict[str, dict[str, Any]] = {}
    roles = judging_roles(session, ctx, job.id, iteration.number)
    source = ctx.spec.student.type.value
    for split, rows in splits.items():
        # Built-in students only: an endpoint student retrained by a trainer command is an LLM
        # that does not memorise, and each extra fit would be a whole training run.
        builtin = ctx.spec.student.type is StudentType.builtin
        if split == "train" and builtin and fit is not None and len(rows) >= 2:
            preds = out_of_fold_predictions(make_student, rows, rows_for_fit[len(ctx.train) :])
        else:
            preds = student.predict(_eval_rows(rows))
        if ctx.spec.task.kind is TaskKind.qa:
            preds = [_check_qa(ctx, p, r) for p, r in zip(preds, rows, strict=True)]
        insert_ignore(
            session,
            PredictionRow,
            [
                {
                    "id": uuid.uuid4(),
                    "job_id": job.id,
                    "iteration_id": iteration.id,
                    "split": split,
                    "row_id": ctx.row_uuid[p.row_id],
                    "gold": r.output,
                    "predicted": p.predicted,
                    "confidence": p.confidence,
                    "correct": p.correct,
                    "probabilities": p.probabilities,
                    "raw": p.raw,
                    "error": p.error,
                    "source": source,
                    "created_at": utcnow(),
                }
                for p, r in zip(preds, rows, strict=True)
            ],
            ["iteration_id", "split", "row_id"],
        )
        reports[split] = _split_report(ctx, split, rows, preds, roles)
    clean = None
    labels = None
    if ctx.spec.student.type is StudentType.builtin and fit is not None:
        clean = _step_without_nearby_examples(session, job, iteration, ctx, make_student, generated)
    if make_checker is not None:
        labels = _teacher_label_check(job, iteration, ctx, make_checker, generated, roles)
    record_metrics(session, job, iteration, ctx, reports, clean=clean, labels=labels)
    iteration.timings = {
        **(iteration.timings or {}),
        "fit_s": round(fitted - started, 3),
        "evaluate_s": round(time.monotonic() - fitted, 3),
    }


@dataclass(frozen=True)
class CleanStep:
    """An iteration's step judged by two students trained without `without`: the earlier
    iterations whose examples were written near the judging rows (`_step_without_nearby_examples`).
    Predictions by row id, on the judging rows only."""

    without: tuple[int, ...]
    reference: dict[uuid.UUID, PredictionRow]
    candidate: dict[uuid.UUID, PredictionRow]


def _step_without_nearby_examples(
    session: Session,
    job: Job,
    iteration: Iteration,
    ctx: JobContext,
    make_student: Callable[[], Any],
    generated: list[tuple[int, str, str]],
) -> CleanStep | None:
    """From iteration 3 on, the rows that judge an iteration's step steered an earlier one
    (`selection.validation_roles`): both the student with this iteration's examples and the one
    without hold examples written near those rows, which get them right by proximity, and new
    examples elsewhere can only blur that. Measured on HWU64, such a step read up to 6 points
    below zero for data that raised the test accuracy, and useful iterations were excluded. So a
    built-in student (cheap to fit) is fitted twice more, both times without those earlier
    iterations' examples, with and without this iteration's: the difference is this
    iteration's examples alone, on rows no example in either student was aimed at. None when no
    kept iteration steered with the judging rows."""
    if iteration.number < 2:
        return None
    judging = judging_roles(session, ctx, job.id, iteration.number).judging_step
    kept = session.scalars(
        select(Iteration.number).where(
            Iteration.job_id == job.id,
            Iteration.number > 0,
            Iteration.number < iteration.number,
            Iteration.included.is_(True),
        )
    )
    near = tuple(sorted(n for n in kept if ctx.validation_roles(n).steering & judging))
    rows = [r for r in ctx.validation if r.row_id in judging]
    if not near or not rows:
        return None
    reference = _training_rows(ctx, generated, {*near, iteration.number})
    candidate = reference + [
        TrainRow(input=i, output=o) for n, i, o in generated if n == iteration.number
    ]
    scored: list[dict[uuid.UUID, PredictionRow]] = []
    for train in (reference, candidate):
        with _fitted(make_student, train) as student:
            preds = student.predict(_eval_rows(rows))
        if ctx.spec.task.kind is TaskKind.qa:
            preds = [_check_qa(ctx, p, r) for p, r in zip(preds, rows, strict=True)]
        scored.append(
            {
                ctx.row_uuid[p.row_id]: PredictionRow(
                    row_id=ctx.row_uuid[p.row_id],
                    gold=r.output,
                    predicted=p.predicted,
                    correct=p.correct,
                    probabilities=p.probabilities,
                )
                for p, r in zip(preds, rows, strict=True)
            }
        )
    return CleanStep(without=near, reference=scored[0], candidate=scored[1])


def _teacher_label_check(
    job: Job,
    iteration: Iteration,
    ctx: JobContext,
    make_student: Callable[[], Any],
    generated: list[tuple[int, str, str]],
    roles: ValidationRoles,
) -> Comparison | None:
    """How often a student trained without this iteration's examples predicts the teacher's
    labels for them, against how often it predicts held-out rows' gold labels
    (`selection.label_agreement`; why, and why only on many classes, is told there). None
    where it is not measured: QA, fewer than `LABEL_CHECK_MIN_CLASSES` labels, iteration 0
    or no new examples."""
    if (
        iteration.number < 1
        or ctx.spec.task.kind is not TaskKind.classification
        or len(ctx.labels or ()) < LABEL_CHECK_MIN_CLASSES
    ):
        return None
    new = [(i, o) for n, i, o in generated if n == iteration.number]
    # The held-out accuracy is read where no example this student trains on was written:
    # rows that steered a kept iteration flatter it (measured: the truthful ratio fell from
    # 0.89-1.32 in iterations 1-2 to 0.73-0.99 in iteration 3, judged on such rows). From
    # iteration 4 every row has steered one; then the rows that judge the iteration.
    steered: set[str] = set()
    for number in {n for n, _, _ in generated if n != iteration.number}:
        steered |= ctx.validation_roles(number).steering
    held = [r for r in ctx.validation if r.row_id not in steered] or [
        r for r in ctx.validation if r.row_id in roles.held_out
    ]
    if not new or not held:
        return None
    with _fitted(make_student, _training_rows(ctx, generated, {iteration.number})) as student:
        on_new = student.predict(
            [EvalRow(row_id=f"new:{k}", input=i, gold=o) for k, (i, o) in enumerate(new)]
        )
        on_held = student.predict(_eval_rows(held))
    return label_agreement(
        [p.predicted == o for p, (_, o) in zip(on_new, new, strict=True)],
        [p.predicted == r.output for p, r in zip(on_held, held, strict=True)],
        reference_iteration=job.best_iteration or 0,
        seed=ctx.spec.seed * 1000 + iteration.number,
    )


def _posted_reports(
    session: Session, iteration: Iteration, ctx: JobContext
) -> dict[str, dict[str, Any]] | None:
    """Metrics from predictions posted by the user's trainer; None while none were posted."""
    posted: dict[str, dict[str, PredictionRow]] = {}
    for pred in session.scalars(
        select(PredictionRow).where(PredictionRow.iteration_id == iteration.id)
    ):
        stable = ctx.stable_id(pred.row_id)
        if stable is not None:
            posted.setdefault(pred.split, {})[stable] = pred
    if "validation" not in posted:
        return None
    roles = judging_roles(session, ctx, iteration.job_id, iteration.number)
    reports: dict[str, dict[str, Any]] = {}
    for split, by_id in posted.items():
        rows = [r for r in ctx.rows.split(split) if r.row_id in by_id]
        preds = [
            Prediction(
                row_id=r.row_id,
                predicted=by_id[r.row_id].predicted,
                confidence=by_id[r.row_id].confidence,
                correct=by_id[r.row_id].correct,
            )
            for r in rows
        ]
        reports[split] = _split_report(ctx, split, rows, preds, roles)
    return reports


def _check_qa(ctx: JobContext, pred: Prediction, row: LabelledRow) -> Prediction:
    if pred.correct is not None:
        return pred
    answer = pred.predicted or extract_answer(pred.raw or "", ctx.spec.task.answer_pattern)
    return pred.model_copy(
        update={"predicted": answer, "correct": answers_match(answer, gold_answer(row.output))}
    )


def record_metrics(
    session: Session,
    job: Job,
    iteration: Iteration,
    ctx: JobContext,
    reports: dict[str, dict[str, Any]],
    *,
    clean: CleanStep | None = None,
    labels: Comparison | None = None,
) -> None:
    """Store the metrics and decide whether the iteration's examples stay in the dataset: they
    are excluded only when they made the student measurably worse on validation than the
    previous kept iteration or the seed-only student, or when `labels` shows the teacher's labels
    wrong (`service.domain.selection`); with `clean`, the comparisons are made by its two
    students."""
    report = reports["validation"]
    metric = _metric(ctx, report)
    iteration.metrics = report
    iteration.test_metrics = reports.get("test")
    iteration.metric = metric
    if iteration.number > 0:
        refresh_iteration_counters(session, iteration)
        selection = _select(session, job, iteration, ctx, clean, labels)
        iteration.included = selection.included
        iteration.regressed = not selection.included
        iteration.selection_reason = selection.reason
        iteration.comparisons = [c.model_dump(mode="json") for c in selection.comparisons]
    else:
        iteration.included = True
        iteration.selection_reason = "the seed-only student, the reference of every comparison"
    if iteration.included:
        job.best_iteration = iteration.number
    iteration.status = IterationStatus.completed
    iteration.finished_at = utcnow()
    session.flush()
    refresh_job_counters(session, job)
    log.info(
        "iteration.completed",
        job_id=str(job.id),
        iteration=iteration.number,
        metric=round(metric, 4),
        accepted=iteration.examples_accepted,
        included=iteration.included,
    )


def _validation_predictions(
    session: Session, iteration_id: uuid.UUID
) -> dict[uuid.UUID, PredictionRow]:
    return {
        p.row_id: p
        for p in session.scalars(
            select(PredictionRow).where(
                PredictionRow.iteration_id == iteration_id, PredictionRow.split == "validation"
            )
        )
    }


def _select(
    session: Session,
    job: Job,
    iteration: Iteration,
    ctx: JobContext,
    clean: CleanStep | None,
    labels: Comparison | None = None,
) -> Selection:
    """Compare this iteration's student with the previous kept one and the seed-only one; with
    `clean`, its students stand for this iteration's and the previous kept one's."""
    session.flush()  # this iteration's predictions were just inserted
    roles = judging_roles(session, ctx, job.id, iteration.number)
    predictions = _validation_predictions(session, iteration.id)
    references = [
        it
        for number in dict.fromkeys([job.best_iteration, 0])
        if number is not None
        and number < iteration.number
        and (it := iteration_by_number(session, job.id, number)) is not None
    ]
    metric = ctx.spec.stopping.metric
    classification = ctx.spec.task.kind is TaskKind.classification
    comparisons: list[Comparison] = []
    certainty: list[Comparison] = []
    for reference in references:
        # The step from the previous kept iteration differs by this iteration's examples only:
        # judged on every row its prompts never showed. Further back, earlier iterations'
        # examples differ too: judged on the rows no iteration shows.
        judging = roles.judging_step if reference.number == job.best_iteration else roles.held_out
        before = _validation_predictions(session, reference.id)
        mine = predictions
        if clean is not None:
            mine = clean.candidate
            if reference.number == job.best_iteration:
                before = clean.reference
        candidate = {row_id: p for row_id, p in mine.items() if ctx.stable_id(row_id) in judging}
        rows = [row_id for row_id in candidate if row_id in before]
        seed = ctx.spec.seed * 1000 + iteration.number
        now, then = _gold_log_probabilities(candidate, rows), _gold_log_probabilities(before, rows)
        if classification and now is not None and then is not None:
            certainty.append(
                paired_bootstrap_scores(
                    now, then, reference_iteration=reference.number, seed=seed
                ).model_copy(update={"measure": "gold_log_probability"})
            )
        if classification and metric is Metric.macro_f1:
            comparisons.append(
                paired_bootstrap(
                    [candidate[r].gold or "" for r in rows],
                    [candidate[r].predicted for r in rows],
                    [before[r].predicted for r in rows],
                    reference_iteration=reference.number,
                    metric="macro_f1",
                    labels=ctx.labels,
                    seed=seed,
                )
            )
        else:
            comparisons.append(
                paired_bootstrap_correct(
                    [bool(candidate[r].correct) for r in rows],
                    [bool(before[r].correct) for r in rows],
                    reference_iteration=reference.number,
                    seed=seed,
                )
            )
    selection = select_iteration(
        comparisons,
        metric="macro_f1" if classification and metric is Metric.macro_f1 else "accuracy",
        min_delta=ctx.spec.stopping.min_delta,
        new_examples=iteration.examples_accepted,
        certainty=certainty,
        labels=labels,
    )
    if clean is None:
        return selection
    numbers = ", ".join(str(n) for n in clean.without)
    which = f"iteration {numbers}'s" if len(clean.without) == 1 else f"iterations {numbers}'"
    return selection.model_copy(
        update={
            "reason": f"{selection.reason} (both students without {which} examples, which "
            "were written near these rows)"
        }
    )


# A probability of 0 for the gold label would make its logarithm -inf; 1e-6 bounds what one row
# can weigh (a student that is sure and wrong on a row costs it about 14 units).
_MIN_PROBABILITY = 1e-6


def _gold_log_probabilities(
    predictions: dict[uuid.UUID, PredictionRow], rows: list[uuid.UUID]
) -> list[float] | None:
    """log p(gold) of each row, or None when the student gave no probabilities for some row
    (an endpoint or external student)."""
    out = []
    for row_id in rows:
        p = predictions[row_id]
        if not p.probabilities or p.gold is None or p.gold not in p.probabilities:
            return None
        out.append(math.log(max(float(p.probabilities[p.gold]), _MIN_PROBABILITY)))
    return out


def finish_phase(session: Session, iteration_id: uuid.UUID, phase: str, ports: Ports) -> None:
    """Fan-in of a phase: plan the strategy's next phase, or hand over to training."""
    iteration = session.get(Iteration, iteration_id)
    if (
        iteration is None
        or iteration.phase != phase
        or iteration.status not in (IterationStatus.generating, IterationStatus.scoring)
    ):
        return
    still_open = session.scalar(
        select(GenerationBatch.id)
        .where(
            GenerationBatch.iteration_id == iteration.id,
            GenerationBatch.phase == phase,
            GenerationBatch.status.in_([BatchStatus.pending, BatchStatus.running]),
        )
        .limit(1)
    )
    if still_open is not None:
        return
    # The job's row before the iteration's (service.jobs.lock_job): a cancel committed while
    # the phase ends is seen here, instead of its iteration being moved on after it, and two
    # deliveries of the phase's end take turns.
    lock_job(session, iteration.job_id)
    job = session.get(Job, iteration.job_id, populate_existing=True)
    assert job is not None
    session.refresh(iteration)
    if (
        job.status is not JobStatus.running
        or iteration.phase != phase
        or iteration.status not in (IterationStatus.generating, IterationStatus.scoring)
    ):
        return  # cancelled, or another delivery of this phase's end got here first
    refresh_iteration_counters(session, iteration)
    ctx = load_job_context(session, job)
    phases = ctx.strategy.phases
    position = phases.index(phase) if phase in phases else len(phases) - 1
    if position + 1 < len(phases):
        next_phase = phases[position + 1]
        plan_ctx = plan_context(
            session, job, ctx, iteration.number, next_phase, best_iteration(session, job)
        )
        plan_ctx.previous_phase = _phase_results(session, iteration, phase)
        if next_phase == "final":
            iteration.status = IterationStatus.scoring
            plan_ctx.drafts = score_drafts(session, iteration, ctx, ports)
            store_preference_pairs(session, job, iteration, ctx, plan_ctx.drafts)
        targets = ctx.strategy.plan(plan_ctx)
        store_batches(session, job, iteration, next_phase, list(targets), ctx.spec.batch_size)
        session.commit()
        return
    if _plan_top_up(session, job, iteration, ctx, phase):
        session.commit()
        return
    iteration.status = IterationStatus.training
    tasks.enqueue(session, tasks.ITERATION_EVALUATE, str(iteration.id))
    session.commit()


def _plan_top_up(
    session: Session, job: Job, iteration: Iteration, ctx: JobContext, phase: str
) -> bool:
    """Ask the teacher again for what the filters' rejections left of the last iteration's
    share of the example budget; whether a top-up was planned.

    An iteration's shortfall is made up by the next one (`examples_for_iteration` shares what
    is left), but nothing comes after the last: a teacher that strays (labels other than asked,
    near-duplicates, unparseable answers) left it short, and the budget unspent (a teacher that
    gives half its labels wrong: 13 of 20 examples on SST-2). So the last iteration is planned
    again for its shortfall, as new samples (`as_top_up`), at most `TOP_UP_ROUNDS` times, and
    only while the round before had examples accepted: a teacher none of whose answers pass is
    not asked again. Strategies of one phase only (a second phase's plan depends on the
    first's results)."""
    budget = ctx.spec.budget
    phases = ctx.strategy.phases
    done = top_up_round(phase)
    if (
        len(phases) != 1
        or budget.max_examples is None
        or iteration.number < budget.max_iterations
        or done >= TOP_UP_ROUNDS
    ):
        return False
    refresh_job_counters(session, job)
    if (budget.max_tokens is not None and job.tokens_in + job.tokens_out >= budget.max_tokens) or (
        budget.max_cost_usd is not None and job.cost_usd >= budget.max_cost_usd
    ):
        return False  # the teacher budget (tokens, cost) is spent: nothing more is asked
    accepted = iteration.examples_accepted or 0
    share = examples_for_iteration(
        budget,
        iteration=iteration.number,
        accepted_so_far=job.examples_accepted - accepted,
        n_labels=len(ctx.labels) if ctx.labels else None,
    )
    shortfall = (share or 0) - accepted
    if shortfall <= 0:
        return False
    accepted_last_round = session.scalar(
        select(func.count())
        .select_from(Example)
        .join(GenerationBatch, GenerationBatch.id == Example.batch_id)
        .where(
            Example.iteration_id == iteration.id,
            GenerationBatch.phase == phase,
            Example.status == ExampleStatus.accepted,
        )
    )
    if not accepted_last_round:
        return False
    plan_ctx = plan_context(
        session, job, ctx, iteration.number, phases[0], best_iteration(session, job)
    )
    plan_ctx.max_examples = shortfall
    targets = as_top_up(ctx.strategy.plan(plan_ctx), done + 1)
    if not targets:
        return False
    log.info(
        "iteration.top_up",
        job_id=str(job.id),
        iteration=iteration.number,
        round=done + 1,
        shortfall=shortfall,
        targets=len(targets),
    )
    store_batches(session, job, iteration, top_up_phase(done + 1), targets, ctx.spec.batch_size)
    return True


def _phase_results(session: Session, iteration: Iteration, phase: str) -> list[PhaseResult]:
    results: dict[str, PhaseResult] = {}
    for ex in session.scalars(
        select(Example)
        .join(GenerationBatch, GenerationBatch.id == Example.batch_id)
        .where(Example.iteration_id == iteration.id, GenerationBatch.phase == phase)
        .order_by(Example.target_id, Example.dedup_key)
    ):
        key = ex.target_id or ""
        res = results.setdefault(
            key,
            PhaseResult(
                target_id=key,
                source_row_id=str(ex.source_row_id) if ex.source_row_id else None,
                accepted=0,
                rejected=0,
                reasons={},
            ),
        )
        if ex.status.value == "accepted":
            res.accepted += 1
        else:
            res.rejected += 1
            reason = ex.rejection_reason or "unknown"
            res.reasons[reason] = res.reasons.get(reason, 0) + 1
    return list(results.values())


def store_preference_pairs(
    session: Session, job: Job, iteration: Iteration, ctx: JobContext, drafts: list[ScoredDraft]
) -> None:
    """ARTE's (chosen, rejected) draft pairs, answers to the same prompt, kept for DPO of an
    open teacher; the prompt is the one the teacher was given."""
    from service.domain.strategies.arte import preference_pairs

    n_pairs = int(getattr(ctx.params, "n_preference_pairs", 0))
    pairs = preference_pairs(drafts, n_pairs)
    if not pairs:
        return
    prompts: dict[str, list[dict[str, Any]]] = {}
    for targets in session.scalars(
        select(GenerationBatch.targets).where(
            GenerationBatch.iteration_id == iteration.id, GenerationBatch.phase == "draft"
        )
    ):
        for target in targets:
            prompts[target["target_id"]] = target["request"]["messages"]

    def item(d: ScoredDraft) -> dict[str, Any]:
        return {"input": d.input, "output": d.output, "rationale": d.rationale, "score": d.score}

    now = utcnow()
    lock_job(session, job.id)  # every write of a job's examples is numbered under its lock
    seq = next_example_seq(session, job.id)
    insert_ignore(
        session,
        Example,
        [
            {
                "id": uuid.uuid4(),
                "job_id": job.id,
                "iteration_id": iteration.id,
                "dedup_key": f"pref:{chosen.draft_id}:{rejected.draft_id}",
                "kind": "preference_pair",
                "status": "accepted",
                "input": chosen.input,
                "output": chosen.output,
                "rationale": chosen.rationale,
                "input_hash": text_hash(chosen.input),
                "target_id": chosen.target_id,
                "target_reason": "preference",
                "meta": {
                    "prompt": prompts.get(chosen.target_id or "", []),
                    "chosen": item(chosen),
                    "rejected": item(rejected),
                },
                "created_at": now,
                "seq": seq,
            }
            for chosen, rejected in pairs
        ],
        ["job_id", "dedup_key"],
    )


def score_drafts(
    session: Session, iteration: Iteration, ctx: JobContext, ports: Ports
) -> list[ScoredDraft]:
    """ARTE's student preference: each accepted draft scored by the student's accuracy on a
    validation slice with that draft as its one in-context example."""
    drafts = list(
        session.scalars(
            select(Example)
            .join(GenerationBatch, GenerationBatch.id == Example.batch_id)
            .where(
                Example.iteration_id == iteration.id,
                GenerationBatch.phase == "draft",
                Example.status == "accepted",
            )
            .order_by(Example.dedup_key)
        )
    )
    if not drafts:
        return []
    student = ports.make_student(ctx.spec.task, ctx.spec.student, ctx.student_public_only)
    # Drafts are scored on rows that steer this iteration, never on those that judge it.
    steering = ctx.validation_roles(iteration.number).steering
    probe_rows = [r for r in ctx.validation if r.row_id in steering]
    every = max(1, len(probe_rows) // int(getattr(ctx.params, "score_rows", 32)))
    probe = _eval_rows(probe_rows[::every][: int(getattr(ctx.params, "score_rows", 32))])
    scorer = getattr(student, "score_demonstration", None)
    scored: list[ScoredDraft] = []
    for ex in drafts:
        demonstration = f"{ex.input}\n{ex.rationale or ''}\nAnswer: {ex.output}".strip()
        if scorer is not None:
            score = float(scorer(demonstration, probe))
        else:
            # A built-in classifier has no context window: its preference for a draft is its
            # accuracy on the probe after training on the seed set plus that one draft.
            fit = student.fit  # type: ignore[attr-defined]
            fit(
                [TrainRow(input=r.input, output=r.output) for r in ctx.train]
                + [TrainRow(input=ex.input, output=ex.output or "")]
            )
            preds = student.predict(probe)
            score = sum(bool(p.correct) for p in preds) / max(len(preds), 1)
        ex.meta = {**(ex.meta or {}), "student_score": score}
        scored.append(
            ScoredDraft(
                draft_id=ex.dedup_key,
                target_id=ex.target_id,
                input=ex.input,
                output=ex.output or "",
                rationale=ex.rationale,
                score=score,
            )
        )
    session.flush()
    return scored
