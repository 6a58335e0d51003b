"""What an export holds: a selection resolved against a job, then its rows read from a
server-side cursor, so the memory an export needs does not grow with the row count.

One place for the asynchronous export (workers/steps/export.py), the streaming endpoint
(`GET /v1/jobs/{id}/export`) and `distill export`. The seed rows come first, in dataset order
(the seed set is read whole to apply the job's own hold-out; it is bounded by the upload
limit); then each selected iteration's examples, accepted before rejected, in the order they
were written, each query walking the index `ix_examples_job_iteration` so that the first row
arrives without a sort of the whole job.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.orm import Session, aliased

from service.datasets import load_rows
from service.domain.export_formats import (
    ALL_FORMATS,
    DPO_SOURCES,
    FORMAT_HELP,
    GENERATED_KINDS,
    PAIR_KIND,
    PAIR_REJECTION_REASONS,
    PREFERENCE_FORMATS,
    ROW_KINDS,
    SEED_KIND,
    ExportRow,
    ExportSelection,
    PreferencePair,
    arte_pair,
    outcome_pair,
)
from service.domain.spec import JobSpec, TaskKind
from service.domain.statuses import ExampleStatus
from service.errors import ValidationFailed
from service.models import DatasetRow, Example, Iteration, Job, Prediction, Teacher, TeacherCall
from service.splits import hold_out, job_spec, labelled

AnySelect = Select[*tuple[Any, ...]]

# Rows fetched per round trip from the server-side cursor: large enough that the round trips
# cost little, small enough that a buffer of rows stays a few megabytes.
YIELD_PER = 2000


def _invalid(field: str, message: str, hint: str) -> ValidationFailed:
    return ValidationFailed(f"{field}: {message}", details=[{"field": field, "message": hint}])


@dataclass
class ExportPlan:
    """A validated selection against one job: the iterations it reads and the seed rows."""

    job: Job
    spec: JobSpec
    fmt: str
    selection: ExportSelection
    bound: int | None  # included iterations up to this number; None: every one
    iterations: list[tuple[uuid.UUID, int, bool]]  # (id, number, included), by number
    previous: dict[int, uuid.UUID]  # iteration number → the id of the one before it
    seed: list[ExportRow]
    labels: list[str] | None  # the task's label set (classification)
    teacher: Teacher | None
    split_seed: int
    classification: bool = field(init=False)

    def __post_init__(self) -> None:
        self.classification = self.spec.task.kind is TaskKind.classification

    @property
    def dpo_source(self) -> str | None:
        return DPO_SOURCES.get(self.job.strategy) if self.fmt in PREFERENCE_FORMATS else None

    @property
    def statuses(self) -> list[ExampleStatus]:
        status = self.selection.status
        if status == "all":
            return [ExampleStatus.accepted, ExampleStatus.rejected]
        return [ExampleStatus(status)]

    @property
    def included_iterations(self) -> list[tuple[uuid.UUID, int]]:
        return [(i, n) for i, n, included in self.iterations if included]

    @property
    def exported_iteration(self) -> int | None:
        """The iteration whose student trained on exactly this data: the last included one."""
        numbers = [n for _, n, included in self.iterations if included]
        return numbers[-1] if numbers else None

    def stratum(self, kind: str, label: str | None) -> str:
        """What the split keeps in proportion: the label (classification), else the kind."""
        return label if self.classification and label is not None else kind

    def wanted_generated_kinds(self) -> list[str]:
        kinds = self.selection.kinds
        return list(GENERATED_KINDS) if kinds is None else [k for k in kinds if k != SEED_KIND]


def plan_export(
    session: Session, job: Job, fmt: str, selection: ExportSelection | None = None
) -> ExportPlan:
    """Resolve and check an export request; every problem is a ValidationFailed naming its
    field, raised before anything is written or streamed."""
    selection = selection or ExportSelection()
    if fmt not in ALL_FORMATS:
        raise _invalid("format", f"unknown export format {fmt!r}", FORMAT_HELP)
    spec = job_spec(job)
    if fmt in PREFERENCE_FORMATS and job.strategy not in DPO_SOURCES:
        raise _invalid(
            "format",
            f"{fmt!r} exports preference pairs, which only the arte and rationales strategies "
            f"store (this job is {job.strategy})",
            "use jsonl, chat, alpaca, sharegpt or lineage",
        )
    _check_kinds(job, fmt, selection)
    if selection.status != "accepted" and fmt != "lineage":
        raise _invalid(
            "status",
            f"{selection.status!r} rows are for inspection: only the lineage format says why "
            "each was rejected",
            "use format lineage, or status accepted",
        )
    iteration = selection.iteration
    if isinstance(iteration, int) and iteration > job.current_iteration:
        raise _invalid(
            "iteration",
            f"the job has no iteration {iteration} yet",
            f"latest is {job.current_iteration}",
        )
    if iteration == "all":
        bound: int | None = None
    elif isinstance(iteration, int):
        bound = iteration
    else:
        bound = job.best_iteration if job.best_iteration is not None else job.current_iteration
    stmt = select(Iteration.id, Iteration.number, Iteration.included).where(
        Iteration.job_id == job.id
    )
    every = [(i, n, bool(inc)) for i, n, inc in session.execute(stmt.order_by(Iteration.number))]
    previous = {n: every[k - 1][0] for k, (_, n, _) in enumerate(every) if k > 0}
    chosen = [row for row in every if bound is None or row[1] <= bound]
    seed, label_set = _seed_rows(session, job, spec)
    labels = (spec.task.labels or label_set) if spec.task.kind is TaskKind.classification else None
    _check_labels(spec, selection, labels)
    return ExportPlan(
        job=job,
        spec=spec,
        fmt=fmt,
        selection=selection,
        bound=bound,
        iterations=chosen,
        previous=previous,
        seed=seed,
        labels=labels,
        teacher=session.get(Teacher, job.teacher_id),
        split_seed=selection.split_seed if selection.split_seed is not None else spec.seed,
    )


def _check_kinds(job: Job, fmt: str, selection: ExportSelection) -> None:
    if selection.kinds is None:
        return
    allowed: tuple[str, ...]
    if fmt in PREFERENCE_FORMATS:
        allowed = (PAIR_KIND,) if DPO_SOURCES.get(job.strategy) == "arte_pairs" else GENERATED_KINDS
    else:
        allowed = ROW_KINDS
    unknown = [k for k in selection.kinds if k not in allowed]
    if unknown or not selection.kinds:
        raise _invalid(
            "kinds",
            f"{unknown[0]!r} is no kind of this export" if unknown else "name at least one kind",
            f"one or more of {', '.join(allowed)}",
        )


def _check_labels(spec: JobSpec, selection: ExportSelection, labels: list[str] | None) -> None:
    if selection.labels is None:
        return
    if labels is None:
        raise _invalid(
            "labels",
            f"a {spec.task.kind.value} task has no labels to select by",
            "only classification exports select by label",
        )
    unknown = [label for label in selection.labels if label not in labels]
    if unknown or not selection.labels:
        raise _invalid(
            "labels",
            f"{unknown[0]!r} is not a label of this task" if unknown else "name at least one",
            f"one or more of {', '.join(labels)}",
        )


def _seed_rows(session: Session, job: Job, spec: JobSpec) -> tuple[list[ExportRow], list[str]]:
    """The seed rows the loop trains on (the train set less the job's own hold-out when it has
    no validation set), and the labels they carry."""
    rows = load_rows(session, job.train_dataset_id)
    classification = spec.task.kind is TaskKind.classification
    typed: dict[str, Any] = {}
    if classification:
        for row in rows:
            value = row.data.get(spec.task.output_field) if isinstance(row.data, dict) else None
            if value is not None and not isinstance(value, str):
                typed.setdefault(str(value), value)  # the text the loop compares: 1 → "1"
    ids: dict[str, uuid.UUID] = {}
    train = labelled(rows, spec, "train", ids)
    if job.validation_dataset_id is None:
        train, _ = hold_out(train, spec.seed, stratified=classification)
    seed = [
        ExportRow(
            input=r.input,
            output=r.output,
            kind=SEED_KIND,
            source_row_id=str(ids[r.row_id]),
            typed_output=typed.get(r.output),
        )
        for r in train
    ]
    return seed, sorted({r.output for r in seed}) if classification else []


# --- rows ---------------------------------------------------------------------------------------


def _seed_selected(plan: ExportPlan, row: ExportRow) -> bool:
    sel = plan.selection
    return (
        sel.status != "rejected"
        and (sel.kinds is None or SEED_KIND in sel.kinds)
        and (sel.labels is None or row.output in sel.labels)
    )


def _example_filters(
    plan: ExportPlan, iteration_id: uuid.UUID, status: ExampleStatus
) -> list[ColumnElement[bool]]:
    conditions = [
        Example.job_id == plan.job.id,
        Example.iteration_id == iteration_id,
        Example.status == status,
        Example.kind != PAIR_KIND,
    ]
    if plan.selection.kinds is not None:
        conditions.append(Example.kind.in_(plan.wanted_generated_kinds()))
    if plan.selection.labels is not None:
        conditions.append(Example.output.in_(plan.selection.labels))
    return conditions


def _example_queries(plan: ExportPlan) -> Iterator[tuple[int, uuid.UUID, ExampleStatus]]:
    if not plan.wanted_generated_kinds():
        return
    for iteration_id, number in plan.included_iterations:
        for status in plan.statuses:
            yield number, iteration_id, status


def _lineage_statement(
    plan: ExportPlan, iteration_id: uuid.UUID, number: int, status: ExampleStatus
) -> AnySelect:
    source = aliased(DatasetRow)
    before = plan.previous.get(number)
    student = aliased(Prediction)
    stmt = (
        select(
            Example.input,
            Example.output,
            Example.rationale,
            Example.kind,
            Example.id,
            Example.source_row_id,
            Example.rejection_reason,
            Example.rejection_detail,
            Example.target_id,
            Example.target_reason,
            Example.prompt_fingerprint,
            Example.meta,
            Example.teacher_call_id,
            TeacherCall.template_id,
            TeacherCall.template_version,
            TeacherCall.status.label("call_status"),
            TeacherCall.tokens_in,
            TeacherCall.tokens_out,
            TeacherCall.latency_s,
            TeacherCall.attempts,
            TeacherCall.cost_usd,
            source.data.label("source_data"),
            student.predicted,
            student.confidence,
            student.correct,
        )
        .outerjoin(TeacherCall, TeacherCall.id == Example.teacher_call_id)
        .outerjoin(source, source.id == Example.source_row_id)
        .outerjoin(
            student,
            and_(
                student.iteration_id == before,
                student.row_id == Example.source_row_id,
                student.split != "test",
            ),
        )
    )
    return stmt.where(*_example_filters(plan, iteration_id, status)).order_by(
        Example.created_at, Example.id
    )


def iter_rows(session: Session, plan: ExportPlan) -> Iterator[ExportRow]:
    """The selected rows in export order, examples streamed from a server-side cursor."""
    for row in plan.seed:
        if _seed_selected(plan, row):
            yield row
    typed = {r.output: r.typed_output for r in plan.seed if r.typed_output is not None}
    lineage = plan.fmt == "lineage"
    # Core, not the ORM: plain rows, without the ORM's per-row loading work.
    connection = session.connection()
    for number, iteration_id, status in _example_queries(plan):
        if lineage:
            stmt = _lineage_statement(plan, iteration_id, number, status)
        else:
            stmt = (
                select(Example.input, Example.output, Example.rationale, Example.kind)
                .where(*_example_filters(plan, iteration_id, status))
                .order_by(Example.created_at, Example.id)
            )
        result = connection.execute(stmt, execution_options={"yield_per": YIELD_PER})
        try:
            if lineage:
                for r in result:
                    yield _lineage_row(plan, r, number, status.value, typed)
                continue
            for text, output, rationale, kind in result:
                output = output or ""
                yield ExportRow(
                    text, output, kind, rationale, None, number, None, typed.get(output)
                )
        finally:
            result.close()  # a client that went away ends the query here


def _lineage_row(
    plan: ExportPlan, r: Any, number: int, status: str, typed: dict[str, Any]
) -> ExportRow:
    task = plan.spec.task
    source_row_id = str(r.source_row_id) if r.source_row_id else None
    source = None
    if isinstance(r.source_data, dict):
        source = {
            "id": source_row_id,
            task.input_field: r.source_data.get(task.input_field),
            task.output_field: r.source_data.get(task.output_field),
        }
    student = None
    if r.predicted is not None or r.correct is not None:
        student = {
            "iteration": number - 1,
            "predicted": r.predicted,
            "confidence": r.confidence,
            "correct": r.correct,
        }
    call = None
    if r.teacher_call_id is not None:
        call = {
            "id": str(r.teacher_call_id),
            "model": plan.teacher.model if plan.teacher is not None else None,
            "template": f"{r.template_id} v{r.template_version}" if r.template_id else None,
            "prompt_fingerprint": r.prompt_fingerprint,
            "status": r.call_status,
            "tokens_in": r.tokens_in,
            "tokens_out": r.tokens_out,
            "latency_s": r.latency_s,
            "attempts": r.attempts,
            "cost_usd": r.cost_usd,
        }
    cause = {
        "reason": r.target_reason,
        "target_id": r.target_id,
        "seed_row": source,
        "student": student,
        "details": r.meta or {},
    }
    output = r.output or ""
    return ExportRow(
        input=r.input,
        output=output,
        kind=r.kind,
        rationale=r.rationale,
        example_id=str(r.id),
        iteration=number,
        source_row_id=source_row_id,
        typed_output=typed.get(output),
        status=status,
        rejection_reason=r.rejection_reason,
        rejection_detail=r.rejection_detail,
        cause=cause,
        teacher_call=call,
    )


def stratum_sizes_of_rows(session: Session, plan: ExportPlan) -> dict[str, int]:
    """How many rows of each stratum `iter_rows` yields, counted in the database."""
    sizes: dict[str, int] = {}
    for row in plan.seed:
        if _seed_selected(plan, row):
            key = plan.stratum(row.kind, row.output)
            sizes[key] = sizes.get(key, 0) + 1
    column = Example.output if plan.classification else Example.kind
    for _, iteration_id, status in _example_queries(plan):
        stmt = (
            select(column, Example.kind, func.count())
            .where(*_example_filters(plan, iteration_id, status))
            .group_by(column, Example.kind)
        )
        for value, kind, n in session.execute(stmt):
            key = plan.stratum(kind, value or "")
            sizes[key] = sizes.get(key, 0) + int(n)
    return sizes


# --- preference pairs ---------------------------------------------------------------------------


def iter_pairs(session: Session, plan: ExportPlan) -> Iterator[PreferencePair]:
    """A `dpo` export's pairs, those of one prompt one after another."""
    if plan.dpo_source == "arte_pairs":
        yield from _arte_pairs(session, plan)
    else:
        yield from _outcome_pairs(session, plan)


def _arte_pairs(session: Session, plan: ExportPlan) -> Iterator[PreferencePair]:
    """ARTE's stored draft pairs of the iterations up to the bound (the student's preference
    between two drafts holds whether or not the iteration's final examples were kept)."""
    numbers = {i: n for i, n, _ in plan.iterations}
    if not numbers:
        return
    stmt = (
        select(Example.iteration_id, Example.target_id, Example.meta, Iteration.number)
        .join(Iteration, Iteration.id == Example.iteration_id)
        .where(
            Example.job_id == plan.job.id,
            Example.kind == PAIR_KIND,
            Example.iteration_id.in_(list(numbers)),
        )
        .order_by(Iteration.number, Example.target_id, Example.created_at, Example.dedup_key)
    )
    wanted = set(plan.selection.labels) if plan.selection.labels is not None else None
    result = session.execute(stmt, execution_options={"yield_per": YIELD_PER})
    try:
        for r in result:
            meta = r.meta or {}
            chosen, rejected = dict(meta.get("chosen", {})), dict(meta.get("rejected", {}))
            label = str(chosen.get("output")) if plan.classification else None
            if wanted is not None and label not in wanted:
                continue
            yield arte_pair(
                list(meta.get("prompt", [])),
                chosen,
                rejected,
                group=f"{r.number}:{r.target_id}",
                label=label,
                iteration=r.number,
            )
    finally:
        result.close()


def _outcome_pairs(session: Session, plan: ExportPlan) -> Iterator[PreferencePair]:
    """Each answer rejected as wrong (`PAIR_REJECTION_REASONS`) paired with the first accepted
    answer to the same input: read ordered by input, so one input's answers are together."""
    included = [i for i, _ in plan.included_iterations]
    numbers = {i: n for i, n, _ in plan.iterations}
    if not included:
        return
    kinds = plan.wanted_generated_kinds()
    accepted = and_(Example.status == ExampleStatus.accepted, Example.iteration_id.in_(included))
    wrong = and_(
        Example.status == ExampleStatus.rejected,
        Example.rejection_reason.in_(PAIR_REJECTION_REASONS),
        Example.iteration_id.in_(list(numbers)),
    )
    stmt = (
        select(
            Example.input_hash,
            Example.status,
            Example.iteration_id,
            Example.input,
            Example.output,
            Example.rationale,
            Example.kind,
            Example.id,
        )
        .join(Iteration, Iteration.id == Example.iteration_id)
        .where(Example.job_id == plan.job.id, Example.kind.in_(kinds), or_(accepted, wrong))
        .order_by(
            Example.input_hash, Example.status, Iteration.number, Example.created_at, Example.id
        )
    )
    wanted = set(plan.selection.labels) if plan.selection.labels is not None else None
    result = session.execute(stmt, execution_options={"yield_per": YIELD_PER})
    try:
        group: str | None = None
        chosen: ExportRow | None = None
        for r in result:
            if r.input_hash != group:
                group, chosen = r.input_hash, None
            row = ExportRow(
                input=r.input,
                output=r.output or "",
                kind=r.kind,
                rationale=r.rationale,
                example_id=str(r.id),
                iteration=numbers.get(r.iteration_id),
            )
            if r.status is ExampleStatus.accepted:
                chosen = chosen or row  # "accepted" sorts before "rejected"
                continue
            if chosen is None or chosen.input != row.input:
                continue  # no accepted answer to this input (or a hash collision)
            if wanted is not None and chosen.output not in wanted:
                continue
            yield outcome_pair(plan.spec.task, chosen, row, group or "")
    finally:
        result.close()


def pair_group_sizes(
    pairs: Sequence[PreferencePair] | Iterator[PreferencePair], plan: ExportPlan
) -> dict[str, int]:
    """How many prompts (the unit a pair split keeps together) each stratum has."""
    sizes: dict[str, int] = {}
    last: str | None = None
    for pair in pairs:
        if pair.group != last:
            last = pair.group
            key = plan.stratum(pair.kind, pair.label)
            sizes[key] = sizes.get(key, 0) + 1
    return sizes


# --- what the manifest says about the selection ---------------------------------------------------


def selection_summary(session: Session, plan: ExportPlan) -> dict[str, Any]:
    """Which iterations' examples the dataset holds, why each was kept or excluded, and the
    student of the exported iteration."""
    job = plan.job
    iterations = list(
        session.scalars(
            select(Iteration).where(Iteration.job_id == job.id).order_by(Iteration.number)
        )
    )
    kept = [n for _, n in plan.included_iterations if n > 0]
    holds = (
        f"the seed rows and the examples of iteration(s) {', '.join(map(str, kept))}"
        if kept
        else "the seed rows only: no iteration's examples were kept"
    )
    exported = plan.exported_iteration
    student_it = next((it for it in iterations if it.number == exported), None)
    macro = plan.classification and plan.spec.stopping.metric.value == "macro_f1"
    metric_name = "macro_f1" if macro else "accuracy"  # what the loop judged iterations by
    return {
        "holds": holds,
        "iterations": [
            {
                "number": it.number,
                "metric": it.metric,
                "examples_accepted": it.examples_accepted,
                "included": it.included,
                "selection_reason": it.selection_reason,
            }
            for it in iterations
            if it.metric is not None
        ],
        "student": {
            "iteration": exported,
            "metric_name": metric_name,
            "metric": student_it.metric if student_it is not None else None,
            "test_metric": _headline(student_it.test_metrics, metric_name)
            if student_it is not None
            else None,
        },
    }


def _headline(report: dict[str, Any] | None, name: str) -> float | None:
    if not isinstance(report, dict):
        return None
    value = report.get(name)
    return float(value) if isinstance(value, int | float) else None
