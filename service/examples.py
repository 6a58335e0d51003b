"""A job's examples: filtered pages (REST and dashboard alike) and one example's lineage."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from service.domain.statuses import ExampleStatus
from service.errors import NotFound
from service.models import (
    Dataset,
    DatasetRow,
    Example,
    GenerationBatch,
    Iteration,
    Job,
    Prediction,
    TeacherCall,
)
from service.pagination import paginate


@dataclass(frozen=True)
class ExampleFilters:
    """What a user narrows a job's examples by; None means any."""

    iteration: int | None = None
    kind: str | None = None
    status: ExampleStatus | None = None
    label: str | None = None
    text: str | None = None  # a case-insensitive substring of the input, output or rationale


def examples_query(job: Job, filters: ExampleFilters) -> Select[Any]:
    stmt = select(Example).where(Example.job_id == job.id)
    if filters.iteration is not None:
        stmt = stmt.join(Iteration, Iteration.id == Example.iteration_id).where(
            Iteration.number == filters.iteration
        )
    if filters.kind is not None:
        stmt = stmt.where(Example.kind == filters.kind)
    if filters.status is not None:
        stmt = stmt.where(Example.status == filters.status)
    if filters.label is not None:
        stmt = stmt.where(Example.output == filters.label)
    if filters.text:
        # autoescape: a user's % or _ is a character to find, not a wildcard.
        stmt = stmt.where(
            or_(
                Example.input.icontains(filters.text, autoescape=True),
                Example.output.icontains(filters.text, autoescape=True),
                Example.rationale.icontains(filters.text, autoescape=True),
            )
        )
    return stmt


def list_examples(
    session: Session,
    job: Job,
    filters: ExampleFilters,
    *,
    cursor: str | None = None,
    limit: int = 100,
) -> tuple[list[Example], str | None]:
    """One page of the job's examples in the order they were written, and the next cursor."""
    return paginate(
        session,
        examples_query(job, filters),
        created_col=Example.created_at,
        id_col=Example.id,
        cursor=cursor,
        limit=limit,
        ascending=True,
    )


def count_examples(session: Session, job: Job, filters: ExampleFilters) -> int:
    subquery = examples_query(job, filters).with_only_columns(Example.id).subquery()
    return int(session.scalar(select(func.count()).select_from(subquery)) or 0)


def get_example(session: Session, job: Job, example_id: uuid.UUID) -> Example:
    """An example of this job (the caller found the job for its tenant), else NotFound."""
    example = session.get(Example, example_id)
    if example is None or example.job_id != job.id:
        raise NotFound(f"example {example_id} of job {job.id} not found")
    return example


@dataclass(frozen=True)
class StudentAnswer:
    """The student's answer on the example's source row in one earlier evaluation."""

    iteration: int
    split: str
    gold: str | None
    predicted: str | None
    confidence: float | None
    correct: bool | None
    error: str | None


@dataclass
class Lineage:
    """Where one example comes from, from the student's error to the teacher's answer."""

    example: Example
    iteration: Iteration | None
    source_row: DatasetRow | None = None
    source_dataset: str | None = None
    # The student's answers on the source row in the evaluations before this example's
    # iteration, oldest first: the mistakes its prompt was written against.
    student_answers: list[StudentAnswer] = field(default_factory=list)
    # The stored generation target (why the prompt exists, what it aimed at, the request).
    target: dict[str, Any] | None = None
    teacher_call: TeacherCall | None = None

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        request = (self.target or {}).get("request") or {}
        messages = request.get("messages") or []
        return [m for m in messages if isinstance(m, dict)]

    @property
    def template(self) -> str | None:
        request = (self.target or {}).get("request") or {}
        if not request.get("template_id"):
            return None
        return f"{request['template_id']} v{request.get('template_version', '?')}"


def example_lineage(session: Session, job: Job, example: Example) -> Lineage:
    """The example's lineage: its iteration, source row, the student's answers on that row
    before it, the target and rendered prompt that asked for it, and the teacher call."""
    iteration = session.get(Iteration, example.iteration_id) if example.iteration_id else None
    lineage = Lineage(example=example, iteration=iteration)
    if example.source_row_id is not None:
        row = session.get(DatasetRow, example.source_row_id)
        if row is not None:
            lineage.source_row = row
            dataset = session.get(Dataset, row.dataset_id)
            lineage.source_dataset = dataset.name if dataset is not None else None
            before = iteration.number if iteration is not None else None
            stmt = (
                select(Prediction, Iteration.number)
                .join(Iteration, Iteration.id == Prediction.iteration_id)
                .where(
                    Prediction.job_id == job.id,
                    Prediction.row_id == row.id,
                    Prediction.split != "test",
                )
                .order_by(Iteration.number, Prediction.split)
            )
            if before is not None:
                stmt = stmt.where(Iteration.number < before)
            lineage.student_answers = [
                StudentAnswer(
                    iteration=number,
                    split=p.split,
                    gold=p.gold,
                    predicted=p.predicted,
                    confidence=p.confidence,
                    correct=p.correct,
                    error=p.error,
                )
                for p, number in session.execute(stmt)
            ]
    lineage.target = _stored_target(session, example)
    if example.teacher_call_id is not None:
        lineage.teacher_call = session.get(TeacherCall, example.teacher_call_id)
    return lineage


def _stored_target(session: Session, example: Example) -> dict[str, Any] | None:
    """The generation target the example answers, as its batch stored it before the call."""
    if example.target_id is None:
        return None
    if example.batch_id is not None:
        batches = [session.get(GenerationBatch, example.batch_id)]
    elif example.iteration_id is not None:
        batches = list(
            session.scalars(
                select(GenerationBatch).where(GenerationBatch.iteration_id == example.iteration_id)
            )
        )
    else:
        batches = []
    for batch in batches:
        for target in (batch.targets if batch is not None else None) or []:
            if isinstance(target, dict) and target.get("target_id") == example.target_id:
                return target
    return None
