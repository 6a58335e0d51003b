"""Student metrics, checked against scikit-learn on random inputs and by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from service.domain.metrics import (
    NO_PREDICTION,
    ClassificationReport,
    ConfusionPair,
    ScoredPrediction,
    classification_report,
    confident_mistakes,
    qa_report,
)

# Stands in for a None prediction on the scikit-learn side: a value outside every label list.
_SKLEARN_NONE = "\x00no prediction"


def _assert_matches_sklearn(
    report: ClassificationReport,
    gold: list[str],
    predicted: list[str | None],
) -> None:
    classes = list(report.per_class)
    y_pred = [_SKLEARN_NONE if p is None else p for p in predicted]
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, y_pred, labels=classes, zero_division=0
    )
    for i, label in enumerate(classes):
        metrics = report.per_class[label]
        assert metrics.precision == pytest.approx(precision[i], abs=1e-12)
        assert metrics.recall == pytest.approx(recall[i], abs=1e-12)
        assert metrics.f1 == pytest.approx(f1[i], abs=1e-12)
        assert metrics.support == support[i]
    for average, ours in (("macro", report.macro_f1), ("weighted", report.weighted_f1)):
        _, _, expected, _ = precision_recall_fscore_support(
            gold, y_pred, labels=classes, average=average, zero_division=0
        )
        assert ours == pytest.approx(expected, abs=1e-12)
    macro_p, macro_r, _, _ = precision_recall_fscore_support(
        gold, y_pred, labels=classes, average="macro", zero_division=0
    )
    assert report.macro_precision == pytest.approx(macro_p, abs=1e-12)
    assert report.macro_recall == pytest.approx(macro_r, abs=1e-12)
    assert report.accuracy == pytest.approx(accuracy_score(gold, y_pred), abs=1e-12)


def test_report_equals_sklearn_on_random_inputs() -> None:
    rng = np.random.default_rng(20240611)
    for _ in range(400):
        n_labels = int(rng.integers(1, 7))
        vocabulary = [f"c{i}" for i in range(n_labels)]
        n = int(rng.integers(1, 40))
        gold = [str(label) for label in rng.choice(vocabulary, size=n)]
        # Predictions may use a label absent from gold and from `labels`, or be missing.
        pool = [*vocabulary, "stray"]
        predicted: list[str | None] = [
            None if rng.random() < 0.15 else str(rng.choice(pool)) for _ in range(n)
        ]
        labels = None
        if rng.random() < 0.6:
            labels = [*vocabulary, *(["unseen"] if rng.random() < 0.5 else [])]
        report = classification_report(gold, predicted, labels)
        expected_classes = sorted(
            set(labels or ()) | set(gold) | {p for p in predicted if p is not None}
        )
        assert list(report.per_class) == expected_classes
        assert report.n == n
        _assert_matches_sklearn(report, gold, predicted)


def test_single_class_all_correct() -> None:
    report = classification_report(["a", "a", "a"], ["a", "a", "a"])
    assert report.accuracy == 1.0
    assert report.macro_f1 == 1.0
    assert report.per_class["a"].support == 3
    assert report.confusion_pairs == []
    _assert_matches_sklearn(report, ["a", "a", "a"], ["a", "a", "a"])


def test_label_never_predicted_and_label_never_seen() -> None:
    gold = ["pos", "neg", "neg", "pos"]
    predicted: list[str | None] = ["pos", "pos", "neg", "pos"]
    report = classification_report(gold, predicted, labels=["neutral", "pos", "neg"])
    assert list(report.per_class) == ["neg", "neutral", "pos"]
    assert report.per_class["neutral"].model_dump() == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
    }
    # The unseen class pulls the macro average down, as scikit-learn does with `labels=`.
    assert report.macro_f1 == pytest.approx((2 / 3 + 0.0 + 0.8) / 3)
    _assert_matches_sklearn(report, gold, predicted)


def test_none_prediction_is_wrong_and_never_a_class() -> None:
    gold = ["a", "b", "b"]
    predicted: list[str | None] = [None, "b", None]
    report = classification_report(gold, predicted)
    assert list(report.per_class) == ["a", "b"]
    assert report.accuracy == pytest.approx(1 / 3)
    assert report.per_class["b"].precision == 1.0
    assert report.per_class["b"].recall == 0.5
    assert report.confusion_pairs == [
        ConfusionPair(gold="a", predicted=NO_PREDICTION, count=1),
        ConfusionPair(gold="b", predicted=NO_PREDICTION, count=1),
    ]
    _assert_matches_sklearn(report, gold, predicted)


def test_all_predictions_missing() -> None:
    report = classification_report(["a", "b"], [None, None])
    assert report.accuracy == 0.0
    assert report.macro_f1 == 0.0
    assert report.macro_precision == 0.0
    _assert_matches_sklearn(report, ["a", "b"], [None, None])


def test_empty_input_gives_zeros() -> None:
    report = classification_report([], [], labels=["x", "y"])
    assert report.n == 0
    assert report.accuracy == 0.0
    assert report.macro_f1 == report.weighted_f1 == 0.0
    assert report.macro_precision == report.macro_recall == 0.0
    assert list(report.per_class) == ["x", "y"]
    assert all(m.support == 0 and m.f1 == 0.0 for m in report.per_class.values())
    assert report.confusion_pairs == []
    assert classification_report([], []).per_class == {}


def test_confusion_pairs_order_by_count_then_gold_then_predicted() -> None:
    gold = ["b", "b", "a", "a", "c", "c", "a", "b"]
    predicted: list[str | None] = ["a", "a", "c", "b", "a", None, "a", "c"]
    pairs = classification_report(gold, predicted).confusion_pairs
    assert [(p.gold, p.predicted, p.count) for p in pairs] == [
        ("b", "a", 2),
        ("a", "b", 1),
        ("a", "c", 1),
        ("b", "c", 1),
        ("c", NO_PREDICTION, 1),
        ("c", "a", 1),
    ]


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="rows"):
        classification_report(["a"], [])


def _row(
    row_id: str, gold: str, predicted: str | None, confidence: float | None
) -> ScoredPrediction:
    return ScoredPrediction(row_id=row_id, gold=gold, predicted=predicted, confidence=confidence)


def test_confident_mistakes_sorts_wrong_rows_by_confidence() -> None:
    rows = [
        _row("r1", "a", "b", 0.6),
        _row("r2", "a", "a", 0.99),  # correct: never a mistake
        _row("r3", "a", None, None),
        _row("r4", "b", "a", 0.9),
        _row("r5", "b", "c", None),
        _row("r0", "c", "a", 0.6),
        _row("r6", "c", "b", 0.1),
    ]
    mistakes = confident_mistakes(rows)
    # Ties on confidence go by row_id; unknown confidence comes last.
    assert [row.row_id for row in mistakes] == ["r4", "r0", "r1", "r6", "r3", "r5"]
    assert [row.row_id for row in confident_mistakes(rows, min_confidence=0.6)] == [
        "r4",
        "r0",
        "r1",
    ]
    assert [row.row_id for row in confident_mistakes(rows, limit=2)] == ["r4", "r0"]
    assert confident_mistakes(rows, limit=0) == []
    assert confident_mistakes([]) == []


def test_confident_mistakes_rejects_negative_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        confident_mistakes([], limit=-1)


def test_qa_report() -> None:
    report = qa_report([True, False, True, True])
    assert (report.n, report.n_correct, report.accuracy) == (4, 3, 0.75)
    empty = qa_report([])
    assert (empty.n, empty.n_correct, empty.accuracy) == (0, 0, 0.0)
