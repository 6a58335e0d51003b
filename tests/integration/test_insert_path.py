"""`insert_ignore` on real Postgres: large batches go through COPY and a staging table, small
ones through one VALUES statement; both store the same values, count the rows they added,
and store nothing twice."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.auth import get_or_create_tenant
from service.datasets import create_dataset
from service.db import COPY_MIN_ROWS, insert_ignore
from service.domain.statuses import ExampleStatus, IterationStatus, JobStatus
from service.models import Example, Iteration, Job, Teacher, TeacherCall, utcnow


def _job(session: Session) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    tenant = get_or_create_tenant(session, f"insert-{uuid.uuid4().hex[:6]}")
    teacher = Teacher(tenant_id=tenant.id, name="t", base_url="http://127.0.0.1:9/v1", model="m")
    session.add(teacher)
    data = create_dataset(session, tenant.id, "seed", [{"text": "a", "label": "x"}], size_bytes=1)
    job = Job(
        tenant_id=tenant.id,
        name="j",
        strategy="pgkd",
        spec={},
        status=JobStatus.running,
        teacher_id=teacher.id,
        train_dataset_id=data.id,
    )
    session.add(job)
    session.flush()
    iteration = Iteration(job_id=job.id, number=1, status=IterationStatus.generating)
    session.add(iteration)
    session.flush()
    return job.id, iteration.id, teacher.id


def _rows(job_id: uuid.UUID, iteration_id: uuid.UUID, tag: str, n: int) -> list[dict[str, Any]]:
    now = utcnow()
    return [
        {
            "id": uuid.uuid4(),
            "job_id": job_id,
            "iteration_id": iteration_id,
            "dedup_key": f"{tag}:{i}",
            "kind": "augmented",
            "status": ExampleStatus.accepted if i % 2 else "rejected",
            "rejection_reason": None if i % 2 else "duplicate",
            "input": f"text {i} with a tab\there, a newline\nand a backslash \\ and ünïcode",
            "output": None if i % 3 == 0 else "x",
            "rationale": None,
            "input_hash": hashlib.sha256(str(i).encode()).hexdigest(),
            "meta": {"i": i, "nested": {"list": [1, None, "two"]}} if i % 4 else {},
            "created_at": now,
        }
        for i in range(n)
    ]


def _stored(session: Session, tag: str) -> list[tuple[Any, ...]]:
    rows = session.execute(
        select(
            Example.dedup_key,
            Example.kind,
            Example.status,
            Example.rejection_reason,
            Example.input,
            Example.output,
            Example.meta,
        ).where(Example.dedup_key.like(f"{tag}:%"))
    ).all()
    return sorted((key.split(":")[1], *rest) for key, *rest in rows)


def test_copy_and_values_paths_store_the_same_values(db_session: Session) -> None:
    job_id, iteration_id, _ = _job(db_session)
    n = COPY_MIN_ROWS + 6
    assert (
        insert_ignore(
            db_session, Example, _rows(job_id, iteration_id, "copy", n), ["job_id", "dedup_key"]
        )
        == n
    )
    small = _rows(job_id, iteration_id, "values", n)
    added = sum(
        insert_ignore(db_session, Example, small[i : i + 10], ["job_id", "dedup_key"])
        for i in range(0, n, 10)
    )
    assert added == n
    assert _stored(db_session, "copy") == _stored(db_session, "values")


def test_a_batch_stored_twice_is_stored_once(db_session: Session) -> None:
    job_id, iteration_id, _ = _job(db_session)
    # 5,000 example rows: past the 65,535 parameters one VALUES statement can carry.
    batch = _rows(job_id, iteration_id, "twice", 5000)
    assert insert_ignore(db_session, Example, batch, ["job_id", "dedup_key"]) == 5000
    again = [{**row, "id": uuid.uuid4()} for row in batch]
    assert insert_ignore(db_session, Example, again, ["job_id", "dedup_key"]) == 0
    half_new = _rows(job_id, iteration_id, "twice", 7000)[2500:]
    assert insert_ignore(db_session, Example, half_new, ["job_id", "dedup_key"]) == 2000
    count = db_session.scalar(
        select(func.count()).select_from(Example).where(Example.job_id == job_id)
    )
    assert count == 7000


def test_json_none_is_stored_alike_on_both_paths(db_session: Session) -> None:
    """A JSON column given None: both paths store what SQLAlchemy's JSON type makes of it
    (JSON null, not SQL NULL: `IS NULL` tells them apart)."""
    job_id, _, teacher_id = _job(db_session)

    def calls(tag: str, n: int) -> list[dict[str, Any]]:
        return [
            {
                "id": uuid.uuid4(),
                "teacher_id": teacher_id,
                "job_id": job_id,
                "fingerprint": f"{tag}-{i}",
                "template_id": "t",
                "template_version": "1",
                "status": "failed",
                "parsed": None,
                "retry_causes": {},
                "created_at": utcnow(),
                "updated_at": utcnow(),
            }
            for i in range(n)
        ]

    insert_ignore(
        db_session, TeacherCall, calls("copy", COPY_MIN_ROWS), ["teacher_id", "fingerprint"]
    )
    insert_ignore(db_session, TeacherCall, calls("values", 1), ["teacher_id", "fingerprint"])
    stored = dict(
        db_session.execute(
            select(TeacherCall.fingerprint, TeacherCall.parsed.is_(None)).where(
                TeacherCall.job_id == job_id
            )
        ).all()
    )
    assert stored["copy-0"] == stored["values-0"]
