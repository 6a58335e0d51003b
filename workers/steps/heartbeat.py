"""Keep a claimed row fresh while a long step works on it, so the reconcile leaves it alone.

The reconcile releases a running batch or an evaluating iteration whose `updated_at` is older
than `stuck_after_s` (its worker died). A live worker proves it is alive by touching the row
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


def interval_for(stuck_after_s: float) -> float:
    """Touch often enough that two missed beats still leave the row fresh."""
    return max(0.05, min(120.0, stuck_after_s / 3.0))


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
