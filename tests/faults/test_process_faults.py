"""Broker, database and worker faults against real `distill worker` and `distill beat`
processes: the job ends on its own, nothing is lost or duplicated, and no more answers are
paid twice than were in flight when the fault hit."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, select, text, update

from service.domain.statuses import BatchStatus
from service.models import GenerationBatch
from tests.conftest import REDIS_URL
from tests.e2e.conftest import wait_for
from tests.faults.conftest import (
    LEASE_S,
    RECONCILE_S,
    FaultStack,
    OwnRedis,
    elapsed_until,
    fault_stack,
)

CAP = 4  # the job's teacher concurrency: at most this many answers can be in flight


def _running_batch(st: FaultStack, job_id: str) -> bool:
    with st.sessions() as session:
        return (
            session.scalar(
                select(GenerationBatch.id)
                .where(
                    GenerationBatch.job_id == uuid.UUID(job_id),
                    GenerationBatch.status == BatchStatus.running,
                )
                .limit(1)
            )
            is not None
        )


def test_a_killed_worker_is_replaced_within_the_lease(stack: FaultStack) -> None:
    st = stack
    st.start_beat()
    victim = st.start_worker()
    job_id = st.create_job(concurrency=CAP)
    wait_for(lambda: st.calls(job_id) >= 3 and _running_batch(st, job_id), 120, "generation")
    st.stop(victim, signal.SIGKILL)  # parent and pool child: nothing is acknowledged
    at_kill = st.calls(job_id)
    st.start_worker()
    # The batch the dead worker held is taken over once its lease lapses.
    recovery = elapsed_until(lambda: st.calls(job_id) > at_kill, 60, "work to resume")
    assert recovery < LEASE_S + RECONCILE_S + 15  # the worker's own start-up included
    job = st.wait_finished(job_id)
    assert job["status"] == "succeeded", job
    st.check_exactly_once(job_id, in_flight=CAP)


@pytest.mark.faults  # make faults; not in the default suite (time)
def test_sigterm_mid_job_and_a_new_worker_finish_the_job(stack: FaultStack) -> None:
    st = stack
    st.start_beat()
    first = st.start_worker()
    job_id = st.create_job(concurrency=CAP)
    wait_for(lambda: st.calls(job_id) >= 3, 120, "generation")
    st.stop(first, signal.SIGTERM)  # warm shutdown: the task under way finishes or is put back
    st.start_worker()
    job = st.wait_finished(job_id)
    assert job["status"] == "succeeded", job
    st.check_exactly_once(job_id, in_flight=CAP)


@pytest.mark.faults  # make faults; not in the default suite (time)
def test_postgres_dropping_every_connection_mid_job(stack: FaultStack) -> None:
    st = stack
    st.start_beat()
    st.start_worker()
    job_id = st.create_job(concurrency=CAP)
    wait_for(lambda: st.calls(job_id) >= 3, 120, "generation")
    # What a Postgres restart does to the workers: every connection is terminated
    # (AdminShutdown), twice, a second apart.
    database = st.db_url.rsplit("/", 1)[1]
    admin = create_engine(st.db_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    try:
        for _ in range(2):
            with admin.connect() as conn:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": database},
                )
            time.sleep(1.0)
    finally:
        admin.dispose()
    st.sessions.kw["bind"].dispose()  # our own pooled connections were cut too
    job = st.wait_finished(job_id)
    assert job["status"] == "succeeded", job
    st.check_exactly_once(job_id, in_flight=CAP)


def test_a_redis_restart_mid_job_loses_no_paid_answer(tmp_path: Path) -> None:
    server = OwnRedis(tmp_path)
    server.start()
    try:
        with fault_stack(tmp_path, redis_url=server.url) as st:
            st.teacher.configure(latency_ms=400)
            st.start_beat()
            st.start_worker()
            job_id = st.create_job(concurrency=CAP)
            wait_for(lambda: st.calls(job_id) >= 3, 120, "generation")
            server.kill()  # no persistence: queued messages and limiter leases are gone
            time.sleep(3.0)
            server.start()
            job = st.wait_finished(job_id)
            assert job["status"] == "succeeded", job
            st.check_exactly_once(job_id, in_flight=CAP)
            with st.sessions() as session:
                from service.models import TeacherCall

                codes = set(session.scalars(select(TeacherCall.error_code)).all())
            assert "internal_error" not in codes
    finally:
        server.kill()


@pytest.mark.faults  # make faults; not in the default suite (time)
def test_a_poison_batch_fails_alone_after_max_crashes(tmp_path: Path) -> None:
    with fault_stack(tmp_path, DISTILL_WORKER__MAX_CRASHES="3") as st:
        st.teacher.configure(latency_ms=50)
        job_id = st.create_job(concurrency=CAP, batch_size=2)
        # No worker yet: the first iteration is planned by a worker, so start one for control
        # only, poison a stored batch, then let generation start.
        control = st.start_worker("--queues", "control,evaluation,export")
        wait_for(lambda: _has_batches(st, job_id), 120, "the iteration to be planned")
        st.stop(control, signal.SIGKILL)
        with st.sessions() as session:
            poisoned = session.scalar(
                select(GenerationBatch.id)
                .where(GenerationBatch.job_id == uuid.UUID(job_id))
                .order_by(GenerationBatch.index)
                .limit(1)
            )
            session.execute(
                update(GenerationBatch)
                .where(GenerationBatch.id == poisoned)
                .values(targets=[{"not": "a target"}])
            )
            session.commit()
        st.start_beat()
        st.start_worker()
        job = st.wait_finished(job_id, timeout=300)
        assert job["status"] == "succeeded", job
        with st.sessions() as session:
            batch = session.get(GenerationBatch, poisoned)
            assert batch is not None and batch.status is BatchStatus.failed
            assert batch.crashes == 3
            assert "given up after 3 crashes" in (batch.error or "")


def _has_batches(st: FaultStack, job_id: str) -> bool:
    with st.sessions() as session:
        return (
            session.scalar(
                select(GenerationBatch.id)
                .where(GenerationBatch.job_id == uuid.UUID(job_id))
                .limit(1)
            )
            is not None
        )


@pytest.mark.faults  # make faults; not in the default suite (time)
def test_messages_lost_between_mining_and_generation_are_sent_again(stack: FaultStack) -> None:
    st = stack
    control = st.start_worker("--queues", "control,evaluation,export")
    job_id = st.create_job(concurrency=CAP)
    wait_for(lambda: _has_batches(st, job_id), 120, "the iteration to be planned")
    st.stop(control, signal.SIGKILL)
    # The broker loses every message: the batches exist only as rows.
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(f"{st.prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
    st.start_beat()
    st.start_worker()
    job = st.wait_finished(job_id)
    assert job["status"] == "succeeded", job
    st.check_exactly_once(job_id, in_flight=CAP)


@pytest.mark.faults  # make faults; not in the default suite (time)
def test_retry_delays_longer_than_the_visibility_timeout(tmp_path: Path) -> None:
    # Redis redelivers a message nobody acknowledged within the visibility timeout: a retry
    # scheduled further out arrives twice. The second delivery is a no-op.
    with fault_stack(tmp_path, DISTILL_BROKER__VISIBILITY_TIMEOUT_S="5") as st:
        st.teacher.configure(down=True)
        st.start_beat()
        st.start_worker()
        job_id = st.create_job(concurrency=CAP, max_attempts=1)
        wait_for(
            lambda: st.job(job_id)["status_reason"] == "teacher unavailable",
            120,
            "the teacher to be reported unavailable",
        )
        time.sleep(12.0)  # retries 2 s, 4 s, 8 s apart: past the visibility timeout
        st.teacher.configure(down=False)
        job = st.wait_finished(job_id)
        assert job["status"] == "succeeded", job
        st.check_exactly_once(job_id, in_flight=CAP)
