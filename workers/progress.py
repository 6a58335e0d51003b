"""How far a job has come, per iteration and per teacher call, read from the database.

`distill run` draws one bar per iteration from it. A generation step works through all of a
phase's batches in one task, so counting closed batches (or tasks) would hold a bar still for
the whole phase; teacher answers are stored as they arrive (within STORE_EVERY_S), so counting
them moves the bar once per call, whichever process makes the calls.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.domain.statuses import BatchStatus, IterationStatus
from service.models import GenerationBatch, Iteration, TeacherCall

_OPEN = (BatchStatus.pending, BatchStatus.running)


@dataclass(frozen=True, slots=True)
class IterationProgress:
    """One iteration: its teacher calls answered out of those planned so far, and its outcome."""

    number: int
    status: IterationStatus
    calls_done: int
    calls_planned: int
    accepted: int
    rejected: int
    metric: float | None


class JobProgress:
    """Reads a job's progress; remembers each batch's size (its targets never change), so a
    read costs two small aggregate queries and the batches created since the last read."""

    def __init__(self, sessions: Callable[[], Session], job_id: uuid.UUID) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self._planned: dict[uuid.UUID, tuple[uuid.UUID, int]] = {}

    def read(self) -> list[IterationProgress]:
        with self.sessions() as session:
            return self._read(session)

    def _read(self, session: Session) -> list[IterationProgress]:
        iterations = session.scalars(
            select(Iteration).where(Iteration.job_id == self.job_id).order_by(Iteration.number)
        ).all()
        batches = session.execute(
            select(GenerationBatch.id, GenerationBatch.status).where(
                GenerationBatch.job_id == self.job_id
            )
        ).all()
        new = [batch_id for batch_id, _ in batches if batch_id not in self._planned]
        if new:
            for batch_id, iteration_id, targets in session.execute(
                select(
                    GenerationBatch.id, GenerationBatch.iteration_id, GenerationBatch.targets
                ).where(GenerationBatch.id.in_(new))
            ):
                self._planned[batch_id] = (iteration_id, len(targets))
        answered = dict(
            session.execute(
                select(TeacherCall.batch_id, func.count())
                .where(TeacherCall.job_id == self.job_id)
                .group_by(TeacherCall.batch_id)
            ).all()
        )
        done: dict[uuid.UUID, int] = {}
        planned: dict[uuid.UUID, int] = {}
        for batch_id, status in batches:
            iteration_id, size = self._planned[batch_id]
            # A closed batch is whole, answers served from the cache of an earlier job included.
            calls = min(size, answered.get(batch_id, 0)) if status in _OPEN else size
            planned[iteration_id] = planned.get(iteration_id, 0) + size
            done[iteration_id] = done.get(iteration_id, 0) + calls
        return [
            IterationProgress(
                number=it.number,
                status=it.status,
                calls_done=done.get(it.id, 0),
                calls_planned=planned.get(it.id, 0),
                accepted=it.examples_accepted,
                rejected=it.examples_rejected,
                metric=it.metric,
            )
            for it in iterations
        ]
