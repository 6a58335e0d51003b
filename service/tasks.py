"""Enqueueing work by task name, after commit: the API never imports worker code.

Task names are stable strings "<area>.<verb>"; arguments are ids and small ints. A
`TaskSender` delivers them: `CeleryTaskSender` through the Redis broker (production) or an
in-process sender that the workers' composition root provides (embedded mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy.orm import Session

# Task name → queue. Queues by workload so each scales on its own.
JOB_START = "jobs.start"
JOB_RECONCILE = "jobs.reconcile"
ITERATION_EVALUATE = "iterations.evaluate"
BATCH_GENERATE = "batches.generate"
PHASE_FINISH = "iterations.finish_phase"
EXPORT_WRITE = "exports.write"
WEBHOOKS_DELIVER = "webhooks.deliver"

QUEUES: dict[str, str] = {
    JOB_START: "control",
    JOB_RECONCILE: "control",
    ITERATION_EVALUATE: "evaluation",
    PHASE_FINISH: "evaluation",
    BATCH_GENERATE: "generation",
    EXPORT_WRITE: "export",
    # Periodic, bounded by the delivery timeout; it never holds up a step of the loop.
    WEBHOOKS_DELIVER: "control",
}
ALL_QUEUES = ("control", "generation", "evaluation", "export")


@dataclass(frozen=True)
class TaskMessage:
    name: str
    args: tuple[Any, ...]
    countdown: float = 0.0  # seconds before it may run (a scheduled retry)

    @property
    def queue(self) -> str:
        return QUEUES[self.name]


class TaskSender(Protocol):
    def send(self, message: TaskMessage) -> None: ...


class CeleryTaskSender:
    """Sends by name through the broker; only the Celery client is loaded, not worker code."""

    def __init__(self, broker_url: str, *, key_prefix: str = "", visibility_timeout_s: int = 7200):
        from celery import Celery

        self._app = Celery("distill-client", broker=broker_url)
        options: dict[str, Any] = {"visibility_timeout": visibility_timeout_s}
        if key_prefix:
            options["global_keyprefix"] = key_prefix
        self._app.conf.broker_transport_options = options

    def send(self, message: TaskMessage) -> None:
        self._app.send_task(
            message.name,
            args=list(message.args),
            queue=message.queue,
            countdown=message.countdown or None,
        )


class RecordingTaskSender:
    """Keeps messages in a list; for a control plane with no executor attached (and tests)."""

    def __init__(self) -> None:
        self.sent: list[TaskMessage] = []

    def send(self, message: TaskMessage) -> None:
        self.sent.append(message)


_PENDING = "distill.pending_tasks"
SENDER = "distill.task_sender"


def enqueue(session: Session, name: str, *args: Any, countdown: float = 0.0) -> None:
    """Queue a task to be sent when this session commits; dropped on rollback.

    A message with a countdown is a convenience, not the record: the row it is about says
    when it is due, and the reconcile re-sends it if the message is lost."""
    if name not in QUEUES:
        raise ValueError(f"unknown task {name!r}")
    session.info.setdefault(_PENDING, []).append(TaskMessage(name, tuple(args), countdown))


@event.listens_for(Session, "after_commit")
def _send_after_commit(session: Session) -> None:
    pending: list[TaskMessage] = session.info.pop(_PENDING, [])
    if not pending:
        return
    sender: TaskSender | None = session.info.get(SENDER)
    if sender is None:
        raise RuntimeError("a task was enqueued on a session that has no task sender")
    for message in pending:
        sender.send(message)


@event.listens_for(Session, "after_rollback")
def _drop_after_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)
