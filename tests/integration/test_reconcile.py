"""The reconcile releases work a dead worker left claimed, even while the rest of its job runs."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import select, update

from service import tasks
from service.domain.statuses import BatchStatus, IterationStatus
from service.models import GenerationBatch, Iteration, Job, utcnow
from service.settings import WorkerSettings
from service.tasks import SENDER, RecordingTaskSender
from tests.data_factory import question_slice
from tests.integration.conftest import InlineStack
from workers.steps.job import reconcile


def _job(st: InlineStack) -> uuid.UUID:
    train, val = question_slice(per_class=4, val_per_class=4)
    return uuid.UUID(
        st.create_job(st.job_spec(train=train, validation=val, name="reconcile", batch_size=2))
    )


def _reconcile(st: InlineStack, stuck_after_s: int) -> list[tasks.TaskMessage]:
    recorder = RecordingTaskSender()
    with st.sessions() as session:
        session.info[SENDER] = recorder
        reconcile(session, WorkerSettings(stuck_after_s=stuck_after_s, lease_s=stuck_after_s))
        session.commit()
    return recorder.sent


def _batches(st: InlineStack, job_id: uuid.UUID) -> list[GenerationBatch]:
    with st.sessions() as session:
        return list(
            session.scalars(
                select(GenerationBatch)
                .where(GenerationBatch.job_id == job_id)
                .order_by(GenerationBatch.created_at, GenerationBatch.id)
            )
        )


def test_a_dead_workers_batch_is_re_enqueued_while_its_job_looks_alive(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    job_id = _job(st)
    # Run until the first iteration's batches exist, then lose every queued message.
    st.sender.run_until_idle(should_stop=lambda: bool(_batches(st, job_id)))
    batches = _batches(st, job_id)
    assert len(batches) >= 2
    dead, alive = batches[0].id, batches[1].id
    now = utcnow()
    with st.sessions() as session:
        session.execute(
            update(GenerationBatch)
            .where(GenerationBatch.id == dead)
            .values(status=BatchStatus.running, updated_at=now - timedelta(hours=1))
        )
        session.execute(
            update(GenerationBatch)
            .where(GenerationBatch.id == alive)
            .values(status=BatchStatus.running, updated_at=now)
        )
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=now))
        session.commit()

    sent = _reconcile(st, stuck_after_s=60)

    assert [(m.name, m.args) for m in sent] == [(tasks.BATCH_GENERATE, (str(dead),))]
    by_id = {b.id: b.status for b in _batches(st, job_id)}
    assert by_id[dead] is BatchStatus.pending
    assert by_id[alive] is BatchStatus.running  # a live claim is left alone
    # A second pass finds nothing more to release.
    assert _reconcile(st, stuck_after_s=60) == []


def test_an_abandoned_evaluation_is_released_and_re_enqueued(inline_stack: InlineStack) -> None:
    st = inline_stack
    job_id = _job(st)
    st.sender.run_until_idle(should_stop=lambda: st.job(str(job_id))["status"] == "running")
    now = utcnow()
    with st.sessions() as session:
        iteration = session.scalar(select(Iteration).where(Iteration.job_id == job_id))
        assert iteration is not None
        iteration.status = IterationStatus.evaluating
        iteration.updated_at = now - timedelta(hours=1)
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=now))
        session.commit()
        iteration_id = iteration.id

    sent = _reconcile(st, stuck_after_s=60)

    assert [(m.name, m.args) for m in sent] == [(tasks.ITERATION_EVALUATE, (str(iteration_id),))]
    with st.sessions() as session:
        released = session.get(Iteration, iteration_id)
        assert released is not None and released.status is IterationStatus.pending
    # The executor's redelivery evaluates it and the job runs on to the end.
    st.sender.run_until_idle()
    assert st.job(str(job_id))["status"] == "succeeded"


def test_a_cancelled_jobs_abandoned_batch_is_released_but_not_sent(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    job_id = _job(st)
    st.sender.run_until_idle(should_stop=lambda: bool(_batches(st, job_id)))
    resp = st.client.post(f"/v1/jobs/{job_id}/cancel", headers=st.auth)
    assert resp.status_code == 202
    dead = _batches(st, job_id)[0].id
    with st.sessions() as session:
        session.execute(
            update(GenerationBatch)
            .where(GenerationBatch.id == dead)
            .values(status=BatchStatus.running, updated_at=utcnow() - timedelta(hours=1))
        )
        session.commit()
    assert _reconcile(st, stuck_after_s=60) == []
