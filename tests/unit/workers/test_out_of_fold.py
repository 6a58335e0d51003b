"""Mining the train split with a built-in student: predictions by students that never saw the
row, because a logistic regression scores its own training rows perfectly."""

from __future__ import annotations

from service.domain.evaluation import EvalRow, TrainRow
from service.domain.strategies.base import LabelledRow
from workers.steps.evaluate import out_of_fold_predictions
from workers.students.tfidf import TfidfStudent

LABELS = ["weather", "sports"]
SEEDS = [
    LabelledRow(row_id=f"train:{i}", input=text, output=label)
    for i, (text, label) in enumerate(
        [
            ("rain and wind tomorrow", "weather"),
            ("sunny skies all week", "weather"),
            ("snow expected tonight", "weather"),
            ("a cold front brings rain", "weather"),
            ("the striker scored twice", "sports"),
            ("the match went to extra time", "sports"),
            ("a late penalty won the cup", "sports"),
            # Worded like the other class: only a student that memorised it gets it right.
            ("rain and snow and wind all week", "sports"),
        ]
    )
]


def test_in_sample_predictions_are_perfect_out_of_fold_ones_are_not() -> None:
    student = TfidfStudent(LABELS)
    student.fit([TrainRow(input=r.input, output=r.output) for r in SEEDS])
    rows = [EvalRow(row_id=r.row_id, input=r.input, gold=r.output) for r in SEEDS]
    assert all(p.correct for p in student.predict(rows))  # memorised: nothing to mine

    made: list[TfidfStudent] = []

    def make() -> TfidfStudent:
        made.append(TfidfStudent(LABELS))
        return made[-1]

    preds = out_of_fold_predictions(make, SEEDS, extra=[], k=4)
    assert [p.row_id for p in preds] == [r.row_id for r in SEEDS]
    assert len(made) == 4
    wrong = {p.row_id for p in preds if not p.correct}
    assert "train:7" in wrong  # the odd one out is found
    assert len(wrong) < len(SEEDS)
    # Deterministic: the same seeds give the same folds and the same answers.
    again = out_of_fold_predictions(lambda: TfidfStudent(LABELS), SEEDS, extra=[], k=4)
    assert [(p.predicted, p.correct) for p in again] == [(p.predicted, p.correct) for p in preds]


def test_generated_examples_train_every_fold_and_a_lone_class_is_unlearnable() -> None:
    seeds = SEEDS[:5]  # four weather rows and one sports row
    preds = out_of_fold_predictions(lambda: TfidfStudent(LABELS), seeds, extra=[], k=5)
    lone = preds[4]
    assert lone.correct is False and lone.error is not None and "single class" in lone.error
    extra = [("the keeper saved a penalty", "sports"), ("the team won the league", "sports")]
    preds = out_of_fold_predictions(lambda: TfidfStudent(LABELS), seeds, extra=extra, k=5)
    assert preds[4].error is None and preds[4].predicted in LABELS
