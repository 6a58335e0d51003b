"""A long step keeps its claimed row fresh, so the reconcile never takes it for abandoned."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import select, update

from service.domain.statuses import IterationStatus
from service.models import Iteration, utcnow
from tests.integration.conftest import InlineStack
from tests.integration.test_reconcile import _job, _reconcile
from workers.steps.heartbeat import heartbeat, interval_for


def test_a_live_evaluation_is_kept_fresh_and_left_alone(inline_stack: InlineStack) -> None:
    st = inline_stack
    job_id = _job(st)
    st.sender.run_until_idle(should_stop=lambda: st.job(str(job_id))["status"] == "running")
    old = utcnow() - timedelta(hours=1)
    with st.sessions() as session:
        iteration = session.scalar(select(Iteration).where(Iteration.job_id == job_id))
        assert iteration is not None
        iteration.status = IterationStatus.evaluating
        iteration.updated_at = old
        session.commit()
        iteration_id = iteration.id
        bind = session.get_bind()

    with heartbeat(bind, Iteration, iteration_id, IterationStatus.evaluating, every_s=0.1):
        time.sleep(0.5)  # the step at work
        assert _reconcile(st, stuck_after_s=60) == []  # alive: not released

    with st.sessions() as session:
        live = session.get(Iteration, iteration_id)
        assert live is not None and live.status is IterationStatus.evaluating
        assert live.updated_at > old + timedelta(minutes=59)
        # Once the step is over the beats stop, and a row that changed status is never touched.
        session.execute(
            update(Iteration)
            .where(Iteration.id == iteration_id)
            .values(status=IterationStatus.completed, updated_at=old)
        )
        session.commit()
    with heartbeat(bind, Iteration, iteration_id, IterationStatus.evaluating, every_s=0.05):
        time.sleep(0.3)
    with st.sessions() as session:
        done = session.get(Iteration, iteration_id)
        assert done is not None and done.updated_at == old


def test_beats_come_well_inside_the_deadline() -> None:
    assert interval_for(900) == 120.0
    assert interval_for(6) == 2.0
