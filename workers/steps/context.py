"""Loading what a step needs from the database: the job's spec, splits and strategy context."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.domain.selection import ValidationRoles, validation_roles
from service.domain.spec import JobSpec
from service.domain.statuses import ExampleStatus
from service.domain.strategies import get_strategy, validate_params
from service.domain.strategies.base import EvaluatedRow, LabelledRow, Strategy
from service.jobs import STUDENT_PRIVATE_KEY
from service.models import Example, Iteration, Job, Prediction
from service.splits import JobRows, job_spec, load_job_rows


@dataclass
class JobContext:
    """A job's spec, its strategy and its rows split into seed-train, validation and test.

    The rows are read when first asked for (and then kept for the process, see `_job_rows`):
    a generation pipeline needs them only to filter its first answers, so its first requests
    go out without waiting for thousands of rows to be decoded."""

    job: Job
    spec: JobSpec
    strategy: Strategy
    params: Any
    labels: list[str] | None
    load_rows: Callable[[], JobRows] = field(repr=False)
    _rows: JobRows | None = field(default=None, repr=False)

    @property
    def rows(self) -> JobRows:
        if self._rows is None:
            self._rows = self.load_rows()
        return self._rows

    @property
    def student_public_only(self) -> bool:
        """Whether every connection to the endpoint student must go to a public address: its
        URL was not allowed a private one when the job was created (`create_job`). A job
        stored before that was recorded is not checked, as before."""
        return self.job.spec.get(STUDENT_PRIVATE_KEY) is False

    @property
    def protected_texts(self) -> list[str]:
        """The validation and test inputs, which generated examples must not copy."""
        return [r.input for r in self.rows.validation] + [r.input for r in self.rows.test]

    @property
    def train(self) -> list[LabelledRow]:
        return self.rows.train

    @property
    def validation(self) -> list[LabelledRow]:
        return self.rows.validation

    @property
    def test(self) -> list[LabelledRow]:
        return self.rows.test

    @property
    def row_uuid(self) -> dict[str, uuid.UUID]:
        return self.rows.row_uuid

    def stable_id(self, row_uuid: uuid.UUID) -> str | None:
        return self.rows.stable_id(row_uuid)

    def validation_roles(self, iteration: int, *, previous_kept: bool = True) -> ValidationRoles:
        """Which validation rows steer iteration `iteration` and which judge it
        (`selection.validation_roles`; `previous_kept`: whether iteration - 1's examples are
        still in the dataset); a strategy that never shows validation rows to the teacher is
        judged on all of them."""
        if not self.strategy.steers_with_validation:
            every = frozenset(r.row_id for r in self.validation)
            return ValidationRoles(steering=frozenset(), judging_step=every, held_out=every)
        return validation_roles(
            [(r.row_id, r.output) for r in self.validation],
            self.spec.seed,
            iteration,
            previous_kept=previous_kept,
        )


# A job's rows never change (datasets are immutable, the spec is fixed at creation), so each
# process loads them once per job instead of once per batch.
_ROWS: OrderedDict[uuid.UUID, JobRows] = OrderedDict()
_MAX_CACHED_JOBS = 8


def _job_rows(session: Session, job: Job, spec: JobSpec) -> JobRows:
    rows = _ROWS.get(job.id)
    if rows is None:
        rows = load_job_rows(session, job, spec)
        _ROWS[job.id] = rows
        while len(_ROWS) > _MAX_CACHED_JOBS:
            _ROWS.popitem(last=False)
    _ROWS.move_to_end(job.id)
    return rows


def load_job_context(session: Session, job: Job) -> JobContext:
    """The job's context; its rows are read from `session` when first needed."""
    spec = job_spec(job)
    return JobContext(
        job=job,
        spec=spec,
        strategy=get_strategy(spec.strategy),
        params=validate_params(spec.strategy, spec.params),
        labels=spec.task.labels,
        load_rows=lambda: _job_rows(session, job, spec),
    )


def judging_roles(
    session: Session, ctx: JobContext, job_id: uuid.UUID, number: int
) -> ValidationRoles:
    """The validation roles iteration `number` is judged by: its own, knowing whether the
    previous iteration's examples were kept (iteration 1's previous is the seed-only run)."""
    previous = iteration_by_number(session, job_id, number - 1) if number >= 2 else None
    return ctx.validation_roles(
        number, previous_kept=previous is None or previous.included is not False
    )


def iteration_by_number(session: Session, job_id: uuid.UUID, number: int) -> Iteration | None:
    return session.scalar(
        select(Iteration).where(Iteration.job_id == job_id, Iteration.number == number)
    )


def best_iteration(session: Session, job: Job) -> Iteration | None:
    if job.best_iteration is None:
        return None
    return iteration_by_number(session, job.id, job.best_iteration)


def evaluated_rows(session: Session, iteration: Iteration, ctx: JobContext) -> list[EvaluatedRow]:
    """The stored predictions of one iteration's student, joined with the rows' text."""
    by_id = {r.row_id: r for r in ctx.train + ctx.validation}
    position = {r.row_id: i for i, r in enumerate(ctx.train + ctx.validation)}
    out: list[EvaluatedRow] = []
    for pred in session.scalars(
        select(Prediction).where(
            Prediction.iteration_id == iteration.id, Prediction.split != "test"
        )
    ):
        stable = ctx.stable_id(pred.row_id)
        row = by_id.get(stable) if stable else None
        if row is None:
            continue
        out.append(
            EvaluatedRow(
                row_id=row.row_id,
                split="train" if pred.split == "train" else "validation",
                input=row.input,
                gold=row.output,
                predicted=pred.predicted,
                confidence=pred.confidence,
                correct=bool(pred.correct),
            )
        )
    # Dataset order, not UUID order: the same data plans the same targets on any database.
    out.sort(key=lambda r: (r.split, position[r.row_id]))
    return out


def generated_training_rows(session: Session, job: Job) -> list[tuple[int, str, str]]:
    """(iteration number, input, output) of the accepted examples of every iteration still
    included: what the student trains on after the seed rows, in this order."""
    stmt = (
        select(Iteration.number, Example.input, Example.output)
        .join(Iteration, Iteration.id == Example.iteration_id)
        .where(
            Example.job_id == job.id,
            Example.status == ExampleStatus.accepted,
            Example.kind != "preference_pair",
            Iteration.included.is_(True),
        )
        # Content order (the dedup key is the prompt's fingerprint and the item's place), not
        # arrival order: batches finish in any order, and the same examples must train the
        # same student on any executor.
        .order_by(Iteration.number, Example.dedup_key)
    )
    return [(n, i, o) for n, i, o in session.execute(stmt) if o is not None]
