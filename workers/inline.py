"""Embedded mode: the same steps as the Celery tasks, executed in this process in FIFO order.

Celery's own eager mode would run a task inside the commit hook of the task that enqueued it
(recursion, nested transactions); a queue drained by a loop keeps each step in its own
session and transaction, exactly as a worker would.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from functools import lru_cache

import structlog

from service import tasks as names
from service.tasks import TaskMessage

log = structlog.get_logger()

RETRY_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def _handlers() -> dict[str, Callable[..., None]]:
    from service.settings import get_settings
    from workers.runtime import run_step
    from workers.steps.evaluate import evaluate_iteration, finish_phase
    from workers.steps.export import write_export
    from workers.steps.generate import generate_batch
    from workers.steps.job import reconcile, start_job
    from workers.steps.webhooks import deliver_due

    return {
        names.JOB_START: lambda job_id: run_step(start_job, job_id, with_ports=False),
        names.BATCH_GENERATE: lambda batch_id: run_step(generate_batch, batch_id),
        names.PHASE_FINISH: lambda it, phase: run_step(finish_phase, it, phase),
        names.ITERATION_EVALUATE: lambda it: run_step(evaluate_iteration, it),
        names.EXPORT_WRITE: lambda export_id: run_step(write_export, export_id, with_ports=False),
        names.JOB_RECONCILE: lambda: run_step(reconcile, get_settings().worker, with_ports=False),
        names.WEBHOOKS_DELIVER: lambda: run_step(deliver_due, with_ports=False),
    }


class InlineTaskSender:
    """A task queue in this process; `run_until_idle` or a background thread drains it."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[float, TaskMessage, int]] = queue.Queue()
        self._handlers: dict[str, Callable[..., None]] | None = None
        self.on_task_done: Callable[[TaskMessage], None] | None = None

    def send(self, message: TaskMessage) -> None:
        not_before = time.monotonic() + message.countdown if message.countdown else 0.0
        self._queue.put((not_before, message, 0))

    def _run_one(self, item: tuple[float, TaskMessage, int]) -> None:
        not_before, message, attempt = item
        delay = not_before - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if self._handlers is None:
            self._handlers = _handlers()
        from workers.steps.evaluate import StudentUnavailable

        try:
            self._handlers[message.name](*message.args)
        except StudentUnavailable as exc:
            wait = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
            log.warning("task.retry_scheduled", task=message.name, wait_s=wait, error=str(exc))
            self._queue.put((time.monotonic() + wait, message, attempt + 1))
        if self.on_task_done is not None:
            self.on_task_done(message)

    def run_until_idle(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        while not should_stop():
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._run_one(item)

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._run_one(item)
            except Exception:  # a bug in one step must not kill the embedded executor
                log.exception("task.failed", task=item[1].name)

    def pending(self) -> int:
        return self._queue.qsize()


@lru_cache
def inline_sender() -> InlineTaskSender:
    return InlineTaskSender()
