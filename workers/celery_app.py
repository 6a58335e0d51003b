"""The Celery application: Redis broker, no result backend (state lives in the database)."""

from __future__ import annotations

import gc
from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from kombu import Queue  # type: ignore[attr-defined]

from service.settings import get_settings
from service.tasks import ALL_QUEUES, JOB_RECONCILE, QUEUES, WEBHOOKS_DELIVER


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery("distill", broker=settings.broker.url or "memory://")
    app.conf.update(
        task_acks_late=True,  # a task killed mid-run is redelivered; every step is idempotent
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue="control",
        task_queues=[Queue(q) for q in ALL_QUEUES],  # type: ignore[no-untyped-call]
        task_routes={name: {"queue": queue} for name, queue in QUEUES.items()},
        broker_transport_options={
            "visibility_timeout": settings.broker.visibility_timeout_s,
            **(
                {"global_keyprefix": settings.broker.key_prefix}
                if settings.broker.key_prefix
                else {}
            ),
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        beat_schedule={
            "reconcile": {
                "task": JOB_RECONCILE,
                "schedule": float(settings.worker.reconcile_interval_s),
            },
            # Webhook deliveries are rows; this sends the due ones and schedules retries.
            "webhooks": {"task": WEBHOOKS_DELIVER, "schedule": settings.webhooks.interval_s},
        },
    )
    app.conf.imports = ("workers.tasks",)
    return app


celery_app = make_celery()

# Young-generation collections: 10,000 allocations between them instead of CPython's 700.
GC_GEN0_THRESHOLD = 10_000


def tune_gc(**_: Any) -> None:
    """Garbage collection tuned for a pool process, once its imports are done.

    `gc.freeze()` moves every object alive now (modules, the ORM's and pydantic's classes and
    schemas, tens of thousands of them) to a permanent generation that collections never scan
    again: they live as long as the process, and a full collection otherwise walks them all.
    A generation pipeline allocates and drops a few dicts and strings per teacher answer, so
    at the default gen0 threshold (700) it ran a young collection every couple of answers and
    an old one every hundred or so; 10,000 keeps the young generation a few MB and the
    collections rare (bench/job_throughput.py: worker CPU per call, see docs/generation.md).
    Reference cycles are still collected; memory is not held longer than a collection cycle.
    """
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


worker_process_init.connect(tune_gc)
