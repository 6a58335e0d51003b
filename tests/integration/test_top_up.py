"""The last iteration asks the teacher again for what the filters' rejections left of its share
of the example budget (`evaluate._plan_top_up`): nothing comes after it to make that up."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from sqlalchemy import select

from service.domain.strategies.base import TOP_UP_ROUNDS
from service.models import Example, GenerationBatch, Iteration, TeacherCall
from tests.integration.conftest import InlineStack


def _job(st: InlineStack, strategy: str, iterations: int, budget: int) -> str:
    job_id = st.create_job(
        st.job_spec(
            strategy=strategy, budget={"max_iterations": iterations, "max_examples": budget}
        )
    )
    st.sender.run_until_idle()
    assert st.job(job_id)["status"] == "succeeded", st.job(job_id)
    return job_id


def _phases(st: InlineStack, job_id: str) -> dict[int, Counter[str]]:
    """Accepted examples by iteration and by the phase of the batch that made them."""
    with st.sessions() as s:
        rows = s.execute(
            select(Iteration.number, GenerationBatch.phase, Example.status)
            .join(GenerationBatch, GenerationBatch.id == Example.batch_id)
            .join(Iteration, Iteration.id == Example.iteration_id)
            .where(Example.job_id == uuid.UUID(job_id))
        ).all()
    out: dict[int, Counter[str]] = {}
    for number, phase, status in rows:
        counter = out.setdefault(number, Counter())
        counter[phase] += status.value == "accepted"
        counter.setdefault(phase, 0)
    return out


@pytest.mark.parametrize("strategy", ["llm2llm", "pgkd", "random"])
def test_the_last_iteration_asks_again_for_what_rejections_left(
    inline_stack: InlineStack, strategy: str
) -> None:
    st = inline_stack
    st.teacher.configure(mislabel_rate=0.5)  # half of what it writes is rejected
    job_id = _job(st, strategy, iterations=1, budget=60)
    by_phase = _phases(st, job_id)[1]
    first = by_phase["generate"]
    assert 0 < first < 60
    rounds = [p for p in by_phase if p.startswith("top-up-")]
    assert rounds and len(rounds) <= TOP_UP_ROUNDS, by_phase
    accepted = sum(by_phase.values())
    assert first < accepted <= 60
    job = st.job(job_id)
    assert job["examples_accepted"] == accepted
    with st.sessions() as s:
        examples = s.scalars(select(Example).where(Example.job_id == uuid.UUID(job_id))).all()
        calls = s.scalars(select(TeacherCall).where(TeacherCall.job_id == uuid.UUID(job_id))).all()
    topped = [e for e in examples if (e.target_id or "").startswith("top-up-")]
    assert topped and all(e.target_id.split(":")[0] in rounds for e in topped)
    # Every prompt of a top-up is a new call, never a cached answer of the round before.
    assert len({c.fingerprint for c in calls}) == len(calls)
    # The examples are the iteration's, and the student was evaluated on all of them.
    iteration = st.client.get(f"/v1/jobs/{job_id}/iterations/1", headers=st.auth).json()
    assert iteration["examples_accepted"] == accepted and iteration["status"] == "completed"


def test_a_teacher_none_of_whose_answers_pass_is_not_asked_again(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    st.teacher.configure(mislabel_rate=1.0)
    job_id = _job(st, "random", iterations=1, budget=30)
    assert _phases(st, job_id)[1] == Counter({"generate": 0})


def test_only_the_last_iteration_is_topped_up(inline_stack: InlineStack) -> None:
    """An earlier iteration's shortfall goes to the next one's share instead."""
    st = inline_stack
    st.teacher.configure(mislabel_rate=0.5)
    job_id = _job(st, "random", iterations=2, budget=60)
    phases = _phases(st, job_id)
    assert set(phases[1]) == {"generate"}
    assert any(p.startswith("top-up-") for p in phases[2]), phases


def test_no_top_up_once_the_teacher_budget_is_spent(inline_stack: InlineStack) -> None:
    st = inline_stack
    st.teacher.configure(mislabel_rate=0.5)
    job_id = st.create_job(
        st.job_spec(
            strategy="random",
            budget={"max_iterations": 1, "max_examples": 60, "max_tokens": 1},
        )
    )
    st.sender.run_until_idle()
    assert _phases(st, job_id)[1]["generate"] > 0
    with st.sessions() as s:
        planned = set(
            s.scalars(
                select(GenerationBatch.phase).where(GenerationBatch.job_id == uuid.UUID(job_id))
            )
        )
    assert planned == {"generate"}
