"""`insert_ignore` on real Postgres: large batches go through a binary COPY into the table (the
keys it already holds looked up first; a concurrent writer's keys sent through a staging table
and ON CONFLICT DO NOTHING), small ones through one VALUES statement; both store the same
values, count the rows they added, and store nothing twice."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.orm import Session

from service.auth import get_or_create_tenant
from service.datasets import create_dataset
from service.db import COPY_MIN_ROWS, insert_ignore
from service.domain.statuses import ExampleStatus, IterationStatus, JobStatus
from service.models import (
    DatasetRow,
    Example,
    Iteration,
    Job,
    Prediction,
    Teacher,
    TeacherCall,
    Tenant,
    utcnow,
)


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
    # The keys stored before were found by the lookup: nothing went the staged way.
    assert not _staged(db_session)
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


def test_rows_without_ids_get_the_column_default(db_session: Session) -> None:
    job_id, iteration_id, _ = _job(db_session)
    rows = _rows(job_id, iteration_id, "noid", COPY_MIN_ROWS + 1)
    for row in rows:
        del row["id"], row["created_at"]
    assert insert_ignore(db_session, Example, rows, ["job_id", "dedup_key"]) == len(rows)
    ids, created = zip(
        *db_session.execute(
            select(Example.id, Example.created_at).where(Example.dedup_key.like("noid:%"))
        ).all(),
        strict=True,
    )
    assert len(set(ids)) == len(rows) and all(isinstance(i, uuid.UUID) for i in ids)
    assert all(moment is not None and moment.tzinfo is not None for moment in created)


def test_a_key_twice_in_one_batch_keeps_its_first_row(db_session: Session) -> None:
    """As one INSERT … ON CONFLICT DO NOTHING keeps the first of a batch's rows with one key
    (the VALUES path, row by row, does the same)."""
    job_id, iteration_id, _ = _job(db_session)
    first = _rows(job_id, iteration_id, "dup", 50)
    again = [{**row, "id": uuid.uuid4(), "output": "second"} for row in first]
    added = insert_ignore(db_session, Example, first + again, ["job_id", "dedup_key"])
    assert added == 50
    values = _rows(job_id, iteration_id, "vdup", 50)
    values_again = [{**row, "id": uuid.uuid4(), "output": "second"} for row in values]
    assert insert_ignore(db_session, Example, values[:30], ["job_id", "dedup_key"]) == 30
    assert (
        insert_ignore(db_session, Example, values[30:] + values_again[:10], ["job_id", "dedup_key"])
        == 20
    )
    assert _stored(db_session, "dup") == _stored(db_session, "vdup")
    assert all(row[5] != "second" for row in _stored(db_session, "dup"))
    one = _rows(job_id, iteration_id, "one", 1)[0]
    copies = [{**one, "id": uuid.uuid4(), "output": str(i)} for i in range(COPY_MIN_ROWS)]
    assert insert_ignore(db_session, Example, copies, ["job_id", "dedup_key"]) == 1
    assert db_session.scalar(select(Example.output).where(Example.dedup_key == "one:0")) == "0"
    assert not _staged(db_session)  # settled before the COPY, not by its fallback


def test_keys_with_a_null_never_conflict(db_session: Session) -> None:
    """A unique key with a NULL in it never conflicts in Postgres: every such row is stored,
    as ON CONFLICT stores them; rows whose keys are whole and equal are stored once."""
    job_id, _, teacher_id = _job(db_session)
    job = db_session.get(Job, job_id)
    assert job is not None

    def job_row(key: str | None) -> dict[str, Any]:
        return {
            "tenant_id": job.tenant_id,
            "name": "n",
            "strategy": "pgkd",
            "spec": {},
            "status": JobStatus.queued,
            "idempotency_key": key,
            "teacher_id": teacher_id,
            "train_dataset_id": job.train_dataset_id,
        }

    rows = [job_row(None) for _ in range(COPY_MIN_ROWS)] + [job_row("k"), job_row("k")]
    assert insert_ignore(db_session, Job, rows, ["tenant_id", "idempotency_key"]) == len(rows) - 1
    assert insert_ignore(db_session, Job, rows, ["tenant_id", "idempotency_key"]) == COPY_MIN_ROWS


def test_floats_booleans_and_json_round_trip_alike_on_both_paths(db_session: Session) -> None:
    job_id, iteration_id, _ = _job(db_session)
    job = db_session.get(Job, job_id)
    assert job is not None
    row_id = db_session.scalar(
        select(DatasetRow.id).where(DatasetRow.dataset_id == job.train_dataset_id)
    )

    def predictions(tag: str, n: int) -> list[dict[str, Any]]:
        return [
            {
                "job_id": job_id,
                "iteration_id": iteration_id,
                "split": f"{tag}{i}",
                "row_id": row_id,
                "gold": "x",
                "predicted": None if i % 5 == 0 else "ÿ ü 日本",
                "confidence": None if i % 3 == 0 else i / 7,
                "correct": None if i % 4 == 0 else bool(i % 2),
                "probabilities": None if i % 2 else {"x": i / 3, "ü": [None, True, 1e-300]},
                "source": "builtin",
            }
            for i in range(n)
        ]

    n = COPY_MIN_ROWS + 3
    conflict = ["iteration_id", "split", "row_id"]
    assert insert_ignore(db_session, Prediction, predictions("c", n), conflict) == n
    for i in range(0, n, 8):
        insert_ignore(db_session, Prediction, predictions("v", n)[i : i + 8], conflict)

    def stored(tag: str) -> list[tuple[Any, ...]]:
        rows = db_session.execute(
            select(
                Prediction.split,
                Prediction.predicted,
                Prediction.confidence,
                Prediction.correct,
                Prediction.probabilities,
                Prediction.probabilities.is_(None),
            ).where(Prediction.split.like(f"{tag}%"))
        ).all()
        return sorted((int(split[1:]), *rest) for split, *rest in rows)

    assert stored("c") == stored("v")
    assert len(stored("c")) == n


def _committed_job(engine: Engine) -> tuple[uuid.UUID, uuid.UUID]:
    with Session(engine) as session:
        job_id, iteration_id, _ = _job(session)
        session.commit()
    return job_id, iteration_id


def _drop_tenant_of(engine: Engine, job_id: uuid.UUID) -> None:
    with Session(engine) as session:
        tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
        session.execute(delete(Job).where(Job.id == job_id))
        session.execute(delete(Teacher).where(Teacher.tenant_id == tenant_id))
        session.execute(delete(Tenant).where(Tenant.id == tenant_id))
        session.commit()


def _when_waiting(engine: Engine, pid: int, then: Callable[[], None]) -> threading.Thread:
    """A thread that calls `then` once backend `pid` waits for a lock (a row another
    transaction is writing), or after 20 s."""

    def run() -> None:
        deadline = time.monotonic() + 20
        with engine.connect() as conn:
            while time.monotonic() < deadline:
                waiting = conn.scalar(
                    text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"),
                    {"pid": pid},
                )
                conn.rollback()
                if waiting == "Lock":
                    break
                time.sleep(0.02)
        then()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _staged(session: Session) -> bool:
    """Whether this transaction sent rows through the staging table (the fallback path): the
    table outlives a transaction on its connection, its rows do not."""
    if session.scalar(text("SELECT to_regclass('pg_temp._stage_examples')")) is None:
        return False
    return bool(session.scalar(text("SELECT EXISTS (SELECT FROM pg_temp._stage_examples)")))


@pytest.mark.parametrize("writer_commits", [True, False])
def test_a_concurrent_writer_of_the_same_keys_loses_nothing(
    engine: Engine, writer_commits: bool
) -> None:
    """Another transaction writes keys of the batch after the lookup: the COPY waits for it;
    when it commits the COPY fails on the unique index, the savepoint is rolled back and the
    batch goes through the staging table and ON CONFLICT DO NOTHING (its rows stay theirs,
    ours are all stored, the transaction's earlier work survives); when it rolls back the
    COPY goes on."""
    job_id, iteration_id = _committed_job(engine)
    try:
        with Session(engine) as writer, Session(engine) as ours:
            theirs = _rows(job_id, iteration_id, "race", 10)
            theirs = [{**row, "output": "theirs"} for row in theirs]
            assert insert_ignore(writer, Example, theirs, ["job_id", "dedup_key"]) == 10
            writer.flush()
            before = _rows(job_id, iteration_id, "before", 1)
            assert insert_ignore(ours, Example, before, ["job_id", "dedup_key"]) == 1
            pid = int(ours.scalar(text("SELECT pg_backend_pid()")) or 0)
            assert not _staged(ours)
            end_writer = writer.commit if writer_commits else writer.rollback
            thread = _when_waiting(engine, pid, end_writer)
            try:
                batch = _rows(job_id, iteration_id, "race", 100)
                batch = [{**row, "output": "ours"} for row in batch]
                added = insert_ignore(ours, Example, batch, ["job_id", "dedup_key"])
            finally:
                thread.join()
            assert _staged(ours) is writer_commits
            ours.commit()
        assert added == (90 if writer_commits else 100)
        with Session(engine) as session:
            outputs = dict(
                session.execute(
                    select(Example.dedup_key, Example.output).where(Example.job_id == job_id)
                ).all()
            )
        assert outputs.pop("before:0", "missing") is None  # written before, in our transaction
        assert outputs == {
            f"race:{i}": "theirs" if writer_commits and i < 10 else "ours" for i in range(100)
        }
    finally:
        _drop_tenant_of(engine, job_id)
