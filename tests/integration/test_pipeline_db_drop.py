"""The generation pipeline's DB thread after Postgres dropped its connection: the step that met
the drop is rolled back, so the next one (a store of paid answers) runs on a new connection
instead of failing with PendingRollbackError (tests/faults: Postgres dropping every connection
mid-job once paid 12 answers twice with 4 in flight)."""

from __future__ import annotations

import types
import uuid

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.domain.statuses import JobStatus
from service.models import Job
from tests.integration.conftest import InlineStack
from workers.steps.generate import _Pipeline


def _drop_connection(st: InlineStack, session: Session) -> None:
    """What a Postgres restart does to the session's connection, mid-transaction."""
    pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
    with st.sessions() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


def _db_thread(session: Session, job_id: uuid.UUID) -> types.SimpleNamespace:
    """The part of a pipeline its DB steps use, with the pipeline's own methods."""
    stub = types.SimpleNamespace(
        session=session, job_id=job_id, settings=types.SimpleNamespace(lease_s=5.0)
    )
    for name in ("_while_database_returns", "_rolled_back_on_failure", "_job_status"):
        setattr(stub, name, types.MethodType(getattr(_Pipeline, name), stub))
    return stub


def test_a_step_that_met_a_dropped_connection_leaves_the_next_one_a_working_session(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    job_id = uuid.UUID(st.create_job(st.job_spec()))
    with st.sessions() as session:
        pipeline = _db_thread(session, job_id)
        _drop_connection(st, session)

        def status_read_without_retry() -> object:
            return session.scalar(select(Job.status).where(Job.id == job_id))

        with pytest.raises(OperationalError):
            pipeline._rolled_back_on_failure(status_read_without_retry)
        # The next step (here the same read) runs on a new connection.
        assert pipeline._rolled_back_on_failure(status_read_without_retry) is not None

        # The status read the pipeline polls with rides out a drop on its own.
        _drop_connection(st, session)
        assert pipeline._job_status() in (JobStatus.queued, JobStatus.running)
