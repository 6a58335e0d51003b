"""Keep a claimed row fresh while a long step works on it, so the reconcile leaves it alone.

The reconcile releases a running batch or an evaluating iteration whose `updated_at` is older
than the lease (`lease_s`: its worker died). A live worker proves it is alive by touching the row
from a small thread every few minutes, on its own connection: an evaluation over a large
validation set, or a batch waiting out a teacher's long Retry-After, is then never taken for
an abandoned one and run twice.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

import structlog
from sqlalchemy import text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from service.models import utcnow

log = structlog.get_logger()


def interval_for(lease_s: float) -> float:
    """Touch often enough that two missed beats still leave the row fresh."""
    return max(0.05, min(120.0, lease_s / 3.0))


@contextmanager
def heartbeat(
    bind: Engine | Connection, model: Any, row_id: uuid.UUID, status: Enum, *, every_s: float
) -> Iterator[None]:
    """Touch `model` row `row_id` every `every_s` while it still has `status`."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                with Session(bind) as session:
                    if session.get_bind().dialect.name == "postgresql":
                        # The step's own transaction may hold the row for a moment; a beat
                        # never waits on it (the next one will do).
                        session.execute(text("SET LOCAL lock_timeout = '2s'"))
                    session.execute(
                        update(model)
                        .where(model.id == row_id, model.status == status)
                        .values(updated_at=utcnow())
                    )
                    session.commit()
            except Exception as exc:  # a missed beat is retried at the next one
                log.warning("step.heartbeat_failed", row_id=str(row_id), error=str(exc))

    thread = threading.Thread(target=beat, name=f"heartbeat-{row_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        # Not waited for long: a beat still running touches the row only while it keeps the
        # status, so one landing after the step moved on changes nothing.
        stop.set()
        thread.join(timeout=1.0)


class HeldBatches:
    """The generation batches one worker holds right now, each with its claim token."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[uuid.UUID, int] = {}

    def add(self, batch_id: uuid.UUID, token: int) -> None:
        with self._lock:
            self._held[batch_id] = token

    def discard(self, batch_id: uuid.UUID) -> None:
        with self._lock:
            self._held.pop(batch_id, None)

    def snapshot(self) -> dict[uuid.UUID, int]:
        with self._lock:
            return dict(self._held)


@contextmanager
def keep_batch_leases(
    bind: Engine | Connection, job_id: uuid.UUID, held: HeldBatches, *, every_s: float
) -> Iterator[None]:
    """Renew the lease of every batch in `held` (and the job's heartbeat) every `every_s`.

    A lease is the batch's `updated_at` while it is `running` under the holder's token
    (`attempts`): a batch whose token changed was taken over and is no longer renewed here.
    """
    from service.domain.statuses import BatchStatus
    from service.models import GenerationBatch, Job

    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            batches = held.snapshot()
            if not batches:
                continue
            try:
                with Session(bind) as session:
                    if session.get_bind().dialect.name == "postgresql":
                        session.execute(text("SET LOCAL lock_timeout = '2s'"))
                    now = utcnow()
                    # The job first: every writer locks a job before its batches/iterations.
                    session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=now))
                    for batch_id, token in batches.items():
                        session.execute(
                            update(GenerationBatch)
                            .where(
                                GenerationBatch.id == batch_id,
                                GenerationBatch.status == BatchStatus.running,
                                GenerationBatch.attempts == token,
                            )
                            .values(updated_at=now)
                        )
                    session.commit()
            except Exception as exc:  # Postgres away: the next beat tries again
                log.warning("batch.lease_renew_failed", job_id=str(job_id), error=str(exc))

    thread = threading.Thread(target=beat, name=f"leases-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1.0)
