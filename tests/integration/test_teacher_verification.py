"""Optional teacher verification: the teacher re-answers each candidate; keep on agreement."""

from __future__ import annotations

from sqlalchemy import select

from service.models import Example, TeacherCall
from tests.data_factory import question_slice
from tests.integration.conftest import InlineStack


def test_verification_keeps_only_candidates_the_teacher_agrees_with(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    train, val = question_slice(per_class=4, val_per_class=4)
    teacher = st.client.post(
        "/v1/teachers",
        json={"name": "t", "base_url": st.teacher.base_url, "model": "fake-teacher"},
        headers=st.auth,
    ).json()["id"]
    spec = {
        "name": "verify",
        "strategy": "pgkd",
        "task": {"instructions": "Classify the question."},
        "datasets": {"train": st.upload(train), "validation": st.upload(val)},
        "teacher": teacher,
        "student": {"type": "builtin", "model": "tfidf"},
        "filters": {"teacher_verification": True},
        "budget": {"max_iterations": 1},
    }
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
