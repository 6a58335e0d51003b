"""A cancel while batches are being recorded never deadlocks: every writer takes the job's row
before its iterations and batches (service/jobs.py lock_job), so a cancel waits its turn."""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

from sqlalchemy import select, text
from structlog.testing import capture_logs

from service.models import GenerationBatch
from tests.data_factory import question_slice
from tests.integration.conftest import InlineStack
from workers.runtime import run_step
from workers.steps.generate import generate_batch

ROUNDS = 4
WORKERS = 3


def _deadlocks(st: InlineStack) -> int:
    """Deadlocks Postgres detected in this test's database (every backend's, flushed)."""
    with st.sessions() as session:
        session.execute(text("SELECT pg_stat_clear_snapshot()"))
        return int(
            session.scalar(
                text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            )
            or 0
        )


def _batches(st: InlineStack, job_id: str) -> list[uuid.UUID]:
    with st.sessions() as session:
        return list(
            session.scalars(
                select(GenerationBatch.id)
                .where(GenerationBatch.job_id == uuid.UUID(job_id))
                .order_by(GenerationBatch.index)
            )
        )


def test_cancel_during_generation_never_deadlocks(inline_stack: InlineStack) -> None:
    st = inline_stack
    st.teacher.configure(latency_ms=5)
    train, val = question_slice(per_class=4, val_per_class=4)
    spec = st.job_spec(train=train, validation=val, name="cancel-locks", batch_size=1)
    before = _deadlocks(st)
    errors: list[BaseException] = []
    rng = random.Random(13)
    with capture_logs() as logs:
        for _ in range(ROUNDS):
            job_id = st.create_job(spec)
            st.sender.run_until_idle(should_stop=lambda: bool(_batches(st, job_id)))  # noqa: B023
            batches = _batches(st, job_id)
            assert len(batches) >= 2 * WORKERS, len(batches)

            def work(share: list[uuid.UUID]) -> None:
                # A generation worker: its pipeline claims the phase's other batches too.
                try:
                    for batch_id in share:
                        run_step(generate_batch, str(batch_id))
                except BaseException as exc:
                    errors.append(exc)

            threads = [
                threading.Thread(target=work, args=(batches[i::WORKERS],), daemon=True)
                for i in range(WORKERS)
            ]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.05, 0.4))  # somewhere in the middle of recording
            cancelled = st.client.post(f"/v1/jobs/{job_id}/cancel", headers=st.auth)
            assert cancelled.status_code in (202, 409), cancelled.text  # 409: it had finished
            for thread in threads:
                thread.join(timeout=120)
                assert not thread.is_alive()
            assert st.job(job_id)["status"] in ("cancelled", "succeeded")
    assert not errors, errors
    retried: list[dict[str, Any]] = [
        e for e in logs if "deadlock" in str(e.get("error", "")).lower()
    ]
    assert not retried, retried[:3]
    # Backends report their counters when idle or when they exit: close them all first.
    st.sessions.kw["bind"].dispose()
    time.sleep(1)
    assert _deadlocks(st) == before, "Postgres detected deadlocks"
