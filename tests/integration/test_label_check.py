"""The teacher's labels checked against a student trained without them
(`evaluate._teacher_label_check`, `selection.label_agreement`): on many classes a right label
is agreed with about as often as a held-out row's gold label, a wrong one almost never."""

from __future__ import annotations

import dataclasses
import random
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from service.domain.evaluation import EvalRow, Prediction, TrainRow
from service.domain.selection import LABEL_AGREEMENT_FLOOR, LABEL_CHECK_MIN_CLASSES
from service.domain.strategies import get_strategy
from service.jobs import STUDENT_PRIVATE_KEY
from service.models import Example, Iteration, Job
from tests.data_factory import to_jsonl
from tests.integration.conftest import InlineStack
from workers.steps.context import generated_training_rows, load_job_context
from workers.steps.evaluate import _teacher_label_check

LABELS = [f"topic{i}" for i in range(12)]


def _rows(per_label: int, seed: str) -> list[dict[str, str]]:
    """Texts of a label mostly made of that label's own words."""
    rng = random.Random(seed)
    rows = []
    for n, label in enumerate(LABELS):
        own = [f"{label}word{j}" for j in range(6)]
        for i in range(per_label):
            words = [*rng.sample(own, 3), rng.choice(["about", "which", "where"]), f"{seed}{i}"]
            rng.shuffle(words)
            rows.append({"text": " ".join(words) + f" {n}", "label": label})
    return rows


class Student:
    """Predicts a held-out row's gold label; on the new examples (`new:` rows) their label when
    `agree`, else another one. Remembers what it was fitted on."""

    agree = True
    fits: list[list[tuple[str, str]]] = []
    held: list[str] = []  # the held-out rows it was asked about

    def fit(self, rows: list[TrainRow]) -> None:
        self.fits.append([(r.input, r.output) for r in rows])

    def predict(self, rows: list[EvalRow]) -> list[Prediction]:
        self.held.extend(r.row_id for r in rows if not r.row_id.startswith("new:"))

        def label(r: EvalRow) -> str | None:
            if r.row_id.startswith("new:") and not self.agree:
                return next(x for x in LABELS if x != r.gold)
            return r.gold

        return [Prediction(row_id=r.row_id, predicted=label(r)) for r in rows]


@pytest.fixture
def job_id(inline_stack: InlineStack) -> str:
    st = inline_stack
    train, validation = to_jsonl(_rows(5, "t")), to_jsonl(_rows(5, "v"))
    spec = st.job_spec(
        train=train,
        validation=validation,
        strategy="random",
        budget={"max_iterations": 1, "max_examples": 48},
    )
    job_id = st.create_job(spec)
    st.sender.run_until_idle()
    return job_id


def test_many_classes_the_teachers_labels_are_checked_by_a_student_trained_without_them(
    inline_stack: InlineStack, job_id: str
) -> None:
    assert len(LABELS) >= LABEL_CHECK_MIN_CLASSES
    with inline_stack.sessions() as s:
        job = s.get(Job, uuid.UUID(job_id))
        assert job is not None
        first = s.scalars(
            select(Iteration).where(Iteration.job_id == job.id, Iteration.number == 1)
        ).one()
        assert first.examples_accepted > 0, first.selection_reason
        # The job's own built-in student measured it, beside the step's comparisons.
        measured = [c for c in first.comparisons or [] if c["measure"] == "teacher_label_agreement"]
        assert len(measured) == 1 and measured[0]["n"] == first.examples_accepted

        # As while it is evaluated: its examples count among the included ones (the fake
        # teacher's labels may have had it excluded since).
        first.included = True
        s.flush()
        ctx = load_job_context(s, job)
        generated = generated_training_rows(s, job)
        new = [(i, o) for n, i, o in generated if n == 1]
        seeds = [(r.input, r.output) for r in ctx.train]
        roles = ctx.validation_roles(1)

        def make_student() -> Any:
            return Student()

        Student.agree, Student.fits, Student.held = True, [], []
        agreed = _teacher_label_check(job, first, ctx, make_student, generated, roles)
        assert agreed is not None and agreed.delta == pytest.approx(1.0)
        assert agreed.n == len(new)
        # Fitted once, on the seed rows without this iteration's examples; asked about every
        # validation row (no kept iteration's examples were written near any).
        assert Student.fits == [seeds]
        assert sorted(Student.held) == sorted(r.row_id for r in ctx.validation)

        # A strategy that steers with validation rows, in its second iteration after a kept
        # first: the held-out accuracy is read on the rows the first did not steer.
        steering = dataclasses.replace(ctx, strategy=get_strategy("pgkd"))
        half = len(new) // 2
        two = [(1, i, o) for i, o in new[:half]] + [(2, i, o) for i, o in new[half:]]
        Student.fits, Student.held = [], []
        second = _teacher_label_check(
            job, Iteration(number=2), steering, make_student, two, steering.validation_roles(2)
        )
        assert second is not None and second.n == len(new) - half
        assert Student.fits == [seeds + new[:half]]
        shown = steering.validation_roles(1).steering
        assert shown and sorted(Student.held) == sorted(
            r.row_id for r in ctx.validation if r.row_id not in shown
        )

        Student.agree = False
        wrong = _teacher_label_check(job, first, ctx, make_student, generated, roles)
        assert wrong is not None and wrong.delta == 0.0 and wrong.high < LABEL_AGREEMENT_FLOOR

        # Fewer classes: nothing is measured (a wrong label is too often the student's guess).
        few = dataclasses.replace(ctx, labels=LABELS[: LABEL_CHECK_MIN_CLASSES - 1])
        Student.fits = []
        assert _teacher_label_check(job, first, few, make_student, generated, roles) is None
        assert Student.fits == []
        s.rollback()


def _label_agreement(st: InlineStack, job_id: str, number: int) -> list[dict[str, Any]]:
    it = st.client.get(f"/v1/jobs/{job_id}/iterations/{number}", headers=st.auth).json()
    assert it["examples_accepted"] > 0, it
    measured = [c for c in it["comparisons"] or [] if c["measure"] == "teacher_label_agreement"]
    assert len(measured) == 1, it["comparisons"]
    assert measured[0]["n"] == it["examples_accepted"]
    return measured


def test_an_endpoint_students_job_has_the_teachers_labels_checked_by_a_built_in_one(
    inline_stack: InlineStack,
) -> None:
    """An endpoint student cannot be fitted for the check (each fit is a training run), but the
    teacher's labels are the teacher's fault whoever learns from them: a built-in student checks
    them."""
    st = inline_stack
    spec = st.job_spec(
        train=to_jsonl(_rows(5, "t")),
        validation=to_jsonl(_rows(5, "v")),
        strategy="random",
        student={"type": "endpoint", "base_url": st.teacher.base_url, "model": "fake-teacher"},
        budget={"max_iterations": 1, "max_examples": 48},
    )
    job_id = st.create_job(spec)
    st.sender.run_until_idle()
    assert st.job(job_id)["status"] == "succeeded", st.job(job_id)
    _label_agreement(st, job_id, 1)


def test_an_external_students_job_has_the_teachers_labels_checked_by_a_built_in_one(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    spec = st.job_spec(
        train=to_jsonl(_rows(5, "t")),
        validation=to_jsonl(_rows(5, "v")),
        strategy="random",
        student={"type": "external"},
        budget={"max_iterations": 1, "max_examples": 48},
    )
    job_id = st.create_job(spec)
    for number in (0, 1):
        st.sender.run_until_idle()
        rows = st.client.get(f"/v1/jobs/{job_id}/evaluation-rows", headers=st.auth).json()
        body = {"predictions": [{"row_id": r["row_id"], "predicted": LABELS[0]} for r in rows]}
        resp = st.client.post(
            f"/v1/jobs/{job_id}/iterations/{number}/feedback", json=body, headers=st.auth
        )
        assert resp.status_code == 202, resp.text
    st.sender.run_until_idle()
    assert st.job(job_id)["status"] == "succeeded", st.job(job_id)
    _label_agreement(st, job_id, 1)


@pytest.mark.parametrize("strategy", ["llm2llm", "pgkd", "random"])
def test_examples_labelled_otherwise_than_asked_are_rejected_on_few_classes(
    inline_stack: InlineStack, strategy: str
) -> None:
    """A teacher that gives half its examples another label than the one the prompt asked for,
    on 6 classes, where the student-based check measures nothing: those examples are rejected
    (`label_not_asked`, both labels in the detail) and none reaches the dataset."""
    st = inline_stack
    st.teacher.configure(mislabel_rate=0.5)
    job_id = st.create_job(
        st.job_spec(strategy=strategy, budget={"max_iterations": 1, "max_examples": 60})
    )
    st.sender.run_until_idle()
    assert st.job(job_id)["status"] == "succeeded", st.job(job_id)
    with st.sessions() as s:
        examples = s.scalars(select(Example).where(Example.job_id == uuid.UUID(job_id))).all()
    generated = [e for e in examples if e.meta.get("expected_label") is not None]
    assert len(generated) >= 30
    strayed = [e for e in generated if e.output != e.meta["expected_label"]]
    # Half the labels are another than the one asked for.
    assert len(strayed) >= len(generated) // 4
    for e in strayed:
        assert e.status.value == "rejected" and e.rejection_reason == "label_not_asked", e.meta
        assert e.rejection_detail == (
            f"asked for {e.meta['expected_label']!r}, labelled {e.output!r}"
        )
    accepted = [e for e in generated if e.status.value == "accepted"]
    assert accepted and all(e.output == e.meta["expected_label"] for e in accepted)


def test_an_endpoint_student_whose_name_now_resolves_inside_the_network_stops_the_job(
    inline_stack: InlineStack,
) -> None:
    """Its URL was checked when the job was created, but a name can resolve elsewhere later
    (DNS rebinding): a job whose student was not allowed a private address checks every
    connection, and stops with the reason rather than send the validation rows inside."""
    st = inline_stack
    spec = st.job_spec(
        train=to_jsonl(_rows(5, "t")),
        validation=to_jsonl(_rows(5, "v")),
        strategy="random",
        student={
            "type": "endpoint",
            "base_url": st.teacher.base_url.replace("127.0.0.1", "localhost"),
            "model": "fake-teacher",
        },
        budget={"max_iterations": 1, "max_examples": 48},
    )
    job_id = st.create_job(spec)
    with st.sessions() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None and job.spec[STUDENT_PRIVATE_KEY] is True  # the stack allows it
        # As for a tenant's public name that now resolves to loopback.
        job.spec = {**job.spec, STUDENT_PRIVATE_KEY: False}
        session.commit()
    st.sender.run_until_idle()
    done = st.job(job_id)
    assert done["status"] == "failed", done
    assert "localhost resolves to" in done["status_reason"], done
    assert st.teacher.stats()["by_status"].get("200", 0) == 0  # nothing reached the server
