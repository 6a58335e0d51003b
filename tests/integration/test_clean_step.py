"""From iteration 3 on, the validation rows that judge an iteration's step steered an earlier
iteration, whose examples were written near them. A built-in student then judges the step with
two more students trained without those examples (`evaluate._step_without_nearby_examples`):
with and without this iteration's examples, on the judging rows only."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select

from service.domain.evaluation import EvalRow, Prediction, TrainRow
from service.models import Iteration, Job
from tests.integration.conftest import InlineStack
from workers.steps.context import generated_training_rows, load_job_context
from workers.steps.evaluate import _step_without_nearby_examples


class RecordingStudent:
    """Remembers what it was fitted on and predicts every row's gold label."""

    fits: list[list[tuple[str, str]]] = []

    def fit(self, rows: list[TrainRow]) -> None:
        self.fits.append([(r.input, r.output) for r in rows])

    def predict(self, rows: list[EvalRow]) -> list[Prediction]:
        return [
            Prediction(row_id=r.row_id, predicted=r.gold, correct=True, probabilities=None)
            for r in rows
        ]


def _job(st: InlineStack) -> str:
    spec = st.job_spec(strategy="llm2llm", budget={"max_iterations": 3, "max_examples": 90})
    job_id = st.create_job(spec)
    st.sender.run_until_idle()
    return job_id


def test_a_step_judged_where_an_earlier_iteration_steered_is_judged_without_its_examples(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    job_id = _job(st)
    with st.sessions() as s:
        job = s.get(Job, uuid.UUID(job_id))
        assert job is not None
        its = {
            it.number: it for it in s.scalars(select(Iteration).where(Iteration.job_id == job.id))
        }
        assert sorted(its) == [0, 1, 2, 3]
        assert all(its[n].included for n in (1, 2)), [its[n].selection_reason for n in its]
        # Iterations 1 and 2 are judged on rows no iteration steered; iteration 3 on the third
        # iteration 1 steered, by students without iteration 1's examples.
        for n in (1, 2):
            assert "without iteration" not in (its[n].selection_reason or "")
        assert (its[3].selection_reason or "").endswith(
            "(both students without iteration 1's examples, which were written near these rows)"
        ), its[3].selection_reason

        ctx = load_job_context(s, job)
        generated = generated_training_rows(s, job)
        by_iteration: dict[int, list[tuple[str, str]]] = {}
        for n, i, o in generated:
            by_iteration.setdefault(n, []).append((i, o))
        assert all(by_iteration.get(n) for n in (1, 2, 3)), "every iteration added examples"
        seeds = [(r.input, r.output) for r in ctx.train]

        def make_student() -> Any:
            return RecordingStudent()

        RecordingStudent.fits = []
        assert _step_without_nearby_examples(s, job, its[2], ctx, make_student, generated) is None
        assert RecordingStudent.fits == [], "no extra fit where no earlier iteration steered"

        clean = _step_without_nearby_examples(s, job, its[3], ctx, make_student, generated)
        assert clean is not None and clean.without == (1,)
        reference, candidate = RecordingStudent.fits
        assert reference == seeds + by_iteration[2]
        assert candidate == seeds + by_iteration[2] + by_iteration[3]
        judging = ctx.validation_roles(3).judging_step
        assert judging == ctx.validation_roles(1).steering
        expected = {ctx.row_uuid[row_id] for row_id in judging}
        assert set(clean.reference) == set(clean.candidate) == expected
        assert all(p.correct for p in clean.candidate.values())

        # With iteration 2 excluded, the rows it was steered by judge iteration 3 too (no
        # student holds its examples), still without iteration 1's examples.
        its[2].included = False
        s.flush()
        RecordingStudent.fits = []
        generated = generated_training_rows(s, job)
        clean = _step_without_nearby_examples(s, job, its[3], ctx, make_student, generated)
        assert clean is not None and clean.without == (1,)
        reference, candidate = RecordingStudent.fits
        assert reference == seeds and candidate == seeds + by_iteration[3]
        two_thirds = ctx.validation_roles(1).steering | ctx.validation_roles(2).steering
        assert set(clean.candidate) == {ctx.row_uuid[row_id] for row_id in two_thirds}
        its[2].included = True

        # With iteration 1 excluded nothing kept was written near the judging rows.
        its[1].included = False
        s.flush()
        RecordingStudent.fits = []
        generated = generated_training_rows(s, job)
        assert _step_without_nearby_examples(s, job, its[3], ctx, make_student, generated) is None
        assert RecordingStudent.fits == []
        s.rollback()
