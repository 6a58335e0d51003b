"""Optional teacher verification: the teacher re-answers each candidate; keep on agreement."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from service.models import Example, GenerationBatch, TeacherCall
from tests.data_factory import question_slice
from tests.e2e.conftest import wait_for
from tests.integration.conftest import InlineStack
from workers.steps.generate import _verification_record


def _spec(st: InlineStack, **changes: Any) -> dict[str, Any]:
    """A one-iteration job on questions against the fake teacher, saved as a teacher."""
    train, val = question_slice(per_class=4, val_per_class=4)
    teacher = st.client.post(
        "/v1/teachers",
        json={"name": "t", "base_url": st.teacher.base_url, "model": "fake-teacher"},
        headers=st.auth,
    ).json()["id"]
    return {
        "task": {"instructions": "Classify the question."},
        "datasets": {"train": st.upload(train), "validation": st.upload(val)},
        "teacher": teacher,
        "student": {"type": "builtin", "model": "tfidf"},
        "budget": {"max_iterations": 1},
        **changes,
    }


def _two_slot_teacher(st: InlineStack, name: str) -> str:
    """The fake teacher saved with a limit of 2 requests in flight: batches wait for slots."""
    response = st.client.post(
        "/v1/teachers",
        json={
            "name": name,
            "base_url": st.teacher.base_url,
            "model": "fake-teacher",
            "limits": {"max_concurrency": 2},
        },
        headers=st.auth,
    )
    return str(response.json()["id"])


def _verified_in_batches_of_two(st: InlineStack, name: str, *, rows: int) -> str:
    """A `random` job of one example per row, every example verified, in batches of 2 against
    the two-slot teacher; its id (not run yet)."""
    spec = _spec(
        st,
        name=name,
        strategy="random",
        filters={"teacher_verification": True},
        budget={"max_iterations": 1, "max_examples_per_iteration": rows},
        params={"rows_per_iteration": rows, "examples_per_row": 1},
        batch_size=2,
        teacher=_two_slot_teacher(st, f"{name}-teacher"),
    )
    return str(st.client.post("/v1/jobs", json=spec, headers=st.auth).json()["id"])


def test_verification_keeps_only_candidates_the_teacher_agrees_with(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    spec = _spec(st, name="verify", strategy="pgkd", filters={"teacher_verification": True})
    job_id = st.client.post("/v1/jobs", json=spec, headers=st.auth).json()["id"]
    st.sender.run_until_idle()
    assert st.job(job_id)["status"] == "succeeded"
    with st.sessions() as session:
        examples = session.scalars(select(Example)).all()
        calls = {c.fingerprint: c for c in session.scalars(select(TeacherCall))}
        verified = [e for e in examples if "verification_call" in e.meta]
        assert verified, "accepted candidates must go through verification"
        verify_calls = [c for c in calls.values() if c.template_id == "verify"]
        assert len(verify_calls) == len({e.meta["verification_call"] for e in verified})
        for ex in verified:
            call = calls[ex.meta["verification_call"]]
            agrees = isinstance(call.parsed, dict) and call.parsed.get("answer") == ex.output
            if ex.status == "accepted":
                assert agrees
            else:
                assert ex.rejection_reason == "verification_disagreed" and not agrees
        reasons = {e.rejection_reason for e in verified}
        # The fake teacher picks a label blind to the candidate: it disagrees sometimes.
        assert "verification_disagreed" in reasons
    # The same spec again, same teacher: nothing is paid twice (the fingerprint cache).
    served = st.teacher.stats()["completions_ok"]
    again = st.client.post("/v1/jobs", json={**spec, "name": "verify-again"}, headers=st.auth)
    st.sender.run_until_idle()
    assert st.job(again.json()["id"])["status"] == "succeeded"
    assert st.teacher.stats()["completions_ok"] == served


def test_a_sample_that_disagrees_widens_verification_to_the_whole_batch(
    inline_stack: InlineStack,
) -> None:
    """`teacher_verification: sample` verifies a fifth of a batch (at least 10) first. The fake
    teacher labels a verified text blind to it, so it disagrees with most of its own labels:
    the sample shows it, and every accepted candidate of the batch is verified too."""
    st = inline_stack
    spec = _spec(
        st,
        name="verify-sample",
        strategy="random",
        filters={"teacher_verification": "sample"},
        budget={"max_iterations": 1, "max_examples": 40},
    )
    job_id = st.client.post("/v1/jobs", json=spec, headers=st.auth).json()["id"]
    st.sender.run_until_idle()
    assert st.job(job_id)["status"] == "succeeded"
    with st.sessions() as session:
        examples = session.scalars(select(Example)).all()
        verify_calls = session.scalars(
            select(TeacherCall).where(TeacherCall.template_id == "verify")
        ).all()
    by_batch: dict[object, list[Example]] = {}
    for ex in examples:
        by_batch.setdefault(ex.batch_id, []).append(ex)
    # A batch with more candidates than the sample: the widening is what verified them all.
    widened = [
        b for b in by_batch.values() if len([e for e in b if "verification_call" in e.meta]) > 10
    ]
    assert widened, {k: len(v) for k, v in by_batch.items()}
    for batch in by_batch.values():
        assert not [e for e in batch if e.meta.get("verification") == "not sampled"]
    assert len(verify_calls) == len(
        {e.meta["verification_call"] for e in examples if "verification_call" in e.meta}
    )
    assert {e.rejection_reason for e in examples} >= {"verification_disagreed"}
    # The job's record, which a later batch's sample is weighed with: read off the rows.
    verified = [e for e in examples if "verification_call" in e.meta]
    with st.sessions() as session:
        assert _verification_record(session, uuid.UUID(job_id)) == (
            len(verified),
            len([e for e in verified if e.rejection_reason == "verification_disagreed"]),
        )
        assert _verification_record(session, uuid.uuid4()) == (0, 0)


# A hang cannot be interrupted in the main thread (the step waits for its DB thread): the
# thread method dumps every stack and ends the test process, which fails the run.
@pytest.mark.timeout(120, method="thread")
def test_verification_with_batches_in_flight_and_waiting_for_slots_finishes(
    inline_stack: InlineStack,
) -> None:
    """A batch is verified while it closes on the pipeline's DB thread, with the next batches'
    requests in flight and more waiting for one of the teacher's 2 slots. Verification used to
    call the teacher from an event loop of its own on that thread, which took the process's
    limiter over from the pipeline's loop: both waited for ever."""
    st = inline_stack
    st.teacher.configure(latency_ms=50)
    narrow = _two_slot_teacher(st, "narrow")
    spec = _spec(
        st,
        name="verify-in-flight",
        strategy="random",
        filters={"teacher_verification": True},
        budget={"max_iterations": 1, "max_examples": 60},
        batch_size=4,
    )
    job_id = st.client.post("/v1/jobs", json={**spec, "teacher": narrow}, headers=st.auth)
    st.sender.run_until_idle()
    assert st.job(job_id.json()["id"])["status"] == "succeeded"
    with st.sessions() as session:
        verified = [e for e in session.scalars(select(Example)) if "verification_call" in e.meta]
    assert len(verified) > 4  # more than one batch was verified


@pytest.mark.timeout(120, method="thread")
def test_a_batch_under_verification_leaves_the_next_ones_answers_to_be_stored(
    inline_stack: InlineStack,
) -> None:
    """Verification's calls go out on the event loop, not on the DB thread, which stores the
    answers that come in meanwhile. A teacher of 2 slots answering in 1 s, batches of 2: the
    first batch's answers come at 1 s and free the slots for the second batch's requests; its
    verification calls wait for the next free slots (2 s) and are answered at 3 s. The second
    batch's answers, in at 2 s, are stored then. With verification run on the DB thread they
    waited for it, and were stored after the first batch's verification calls."""
    st = inline_stack
    st.teacher.configure(latency_ms=1000)
    job_id = _verified_in_batches_of_two(st, "verify-beside", rows=6)
    st.sender.run_until_idle()
    assert st.job(job_id)["status"] == "succeeded"
    with st.sessions() as session:
        batches = session.scalars(
            select(GenerationBatch)
            .where(GenerationBatch.job_id == uuid.UUID(job_id))
            .order_by(GenerationBatch.index)
        ).all()
        assert len(batches) == 3
        calls = session.scalars(select(TeacherCall)).all()
    first, second = batches[0].id, batches[1].id
    verifying_first = [c for c in calls if c.batch_id == first and c.template_id == "verify"]
    answers_of_second = [c for c in calls if c.batch_id == second and c.template_id != "verify"]
    assert verifying_first and answers_of_second
    assert max(c.created_at for c in answers_of_second) < min(c.created_at for c in verifying_first)


@pytest.mark.timeout(180, method="thread")
def test_a_job_paused_while_a_batch_is_verified_resumes_and_verifies_every_example(
    inline_stack: InlineStack,
) -> None:
    """A pause while a batch's verification calls are out (the batch held, its close waiting
    for them): the run ends without losing the batch, and after the resume every accepted
    example of the job has been verified and no batch is left running."""
    st = inline_stack
    st.teacher.configure(latency_ms=600)
    job_id = _verified_in_batches_of_two(st, "verify-pause", rows=8)
    with st.executing_in_background():
        # The first batch's 2 answers are in (at 0.6 s): its verification calls go out next.
        wait_for(lambda: st.teacher_calls() >= 2, 60, "the first answers")
        time.sleep(0.3)
        assert st.client.post(f"/v1/jobs/{job_id}/pause", headers=st.auth).status_code == 202
        wait_for(
            lambda: not _running_batches(st, job_id), 60, "the paused run to let its batches go"
        )
        assert st.job(job_id)["status"] == "paused"
        assert st.client.post(f"/v1/jobs/{job_id}/resume", headers=st.auth).status_code == 202
        wait_for(lambda: st.job(job_id)["status"] == "succeeded", 120, "the resumed job")
    with st.sessions() as session:
        examples = session.scalars(select(Example).where(Example.job_id == uuid.UUID(job_id))).all()
    unverified = [
        e.dedup_key
        for e in examples
        if e.status.value == "accepted" and "verification_call" not in e.meta
    ]
    assert examples and not unverified
    assert not _running_batches(st, job_id)


def _running_batches(st: InlineStack, job_id: str) -> list[int]:
    with st.sessions() as session:
        return list(
            session.scalars(
                select(GenerationBatch.index).where(
                    GenerationBatch.job_id == uuid.UUID(job_id),
                    GenerationBatch.status == "running",
                )
            )
        )
