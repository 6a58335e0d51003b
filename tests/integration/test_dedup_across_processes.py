"""Two processes closing batches of one job side by side: each process's dedup index learns
what the others committed, incrementally (`Example.seq`, the job's commit order), and a
batch's close, under the job's lock, rejects what another batch committed meanwhile."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select

from service.jobs import lock_job
from service.models import Example, Iteration, Job
from tests.data_factory import question_slice
from tests.integration.conftest import InlineStack
from workers.steps.context import load_job_context
from workers.steps.generate import (
    _INDEXES,
    _filter_config,
    _indexes,
    _insert_examples,
    _reject_concurrent_duplicates,
)


def _finished_job(st: InlineStack) -> uuid.UUID:
    train, val = question_slice(per_class=4, val_per_class=4)
    spec = {
        "name": "dedup",
        "task": {"instructions": "Classify the question."},
        "datasets": {"train": st.upload(train), "validation": st.upload(val)},
        "teacher": {"base_url": st.teacher.base_url, "model": "fake-teacher"},
        "student": {"type": "builtin", "model": "tfidf"},
        "strategy": "random",
        "budget": {"max_iterations": 1},
        "batch_size": 8,
    }
    job_id = st.client.post("/v1/jobs", json=spec, headers=st.auth).json()["id"]
    st.sender.run_until_idle()
    assert st.job(job_id)["status"] == "succeeded"
    return uuid.UUID(job_id)


def test_the_index_reads_only_what_was_committed_since_and_a_close_rejects_it(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    job_id = _finished_job(st)
    other_text = "Which river flows through the old city of Cairo in Egypt today?"
    with st.sessions() as session:
        job = session.get_one(Job, job_id)
        ctx = load_job_context(session, job)
        iteration = session.scalars(
            select(Iteration).where(Iteration.job_id == job_id, Iteration.number == 1)
        ).one()
        stored = session.scalars(select(Example).where(Example.job_id == job_id)).all()
        # Every close numbered its rows, one number per close, in commit order.
        by_batch: dict[Any, set[int | None]] = {}
        for example in stored:
            by_batch.setdefault(example.batch_id, set()).add(example.seq)
        assert all(len(seqs) == 1 and None not in seqs for seqs in by_batch.values())
        assert len({next(iter(s)) for s in by_batch.values()}) == len(by_batch) > 1

        def row(key: str, text: str, kind: str = "augmented") -> dict[str, Any]:
            return {
                "job_id": job_id,
                "iteration_id": iteration.id,
                "dedup_key": key,
                "kind": kind,
                "status": "accepted",
                "input": text,
                "output": ctx.labels[0] if ctx.labels else "x",
                "meta": {},
            }

        _INDEXES.pop(job_id, None)
        config = _filter_config(ctx)
        first = _indexes(session, job, ctx, config)
        accepted = [e for e in stored if e.status.value == "accepted" and e.kind != "rationale"]
        assert len(first.learned) == len(accepted) > 0  # a new process reads them all once
        seen = first.seen_seq
        assert seen == max(e.seq for e in stored if e.status.value == "accepted")
        assert _indexes(session, job, ctx, config).learned == []  # nothing committed since
        session.commit()

        # Another process closes a batch (under the job's lock) after this one's filters ran.
        lock_job(session, job_id)
        _insert_examples(session, job_id, [row("other:0", other_text)])
        session.commit()

        mine = [
            row("mine:0", "which river flows through the old city of Cairo in Egypt today ?"),
            row("mine:1", "Which river flows through the old city of Cairo in Egyp today?"),
            row("mine:2", "How many legs does a spider have, counting all of them?"),
            row("mine:3", other_text, kind="rationale"),
        ]
        lock_job(session, job_id)
        _reject_concurrent_duplicates(session, job, ctx, mine)
        session.rollback()
    assert [(r["status"], r.get("rejection_reason")) for r in mine] == [
        ("rejected", "duplicate"),
        ("rejected", "near_duplicate"),
        ("accepted", None),
        ("accepted", None),  # a rationale's input is its seed row's text by design
    ]
    assert (
        "other:0" in mine[0]["rejection_detail"] and "another batch" in mine[0]["rejection_detail"]
    )
    # The index read only the other process's write, and moved past it.
    cached = _INDEXES[job_id]
    assert cached.learned == [("other:0", other_text)]
    assert cached.seen_seq == (seen or 0) + 1
