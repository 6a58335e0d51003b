"""Student metrics: the per-class report and confusions, confident mistakes, QA accuracy."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from pydantic import BaseModel

# How a missing prediction (the student gave no parseable answer) is shown in confusion pairs.
# It is never a class: it gets no per-class row and counts as wrong for the gold class.
NO_PREDICTION = "<none>"


class ClassMetrics(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class ConfusionPair(BaseModel):
    gold: str
    predicted: str
    count: int


class ClassificationReport(BaseModel):
    n: int
    accuracy: float
    macro_f1: float
    weighted_f1: float
    macro_precision: float
    macro_recall: float
    per_class: dict[str, ClassMetrics]
    confusion_pairs: list[ConfusionPair]


class ScoredPrediction(BaseModel):
    """One evaluated row: the gold label, the student's prediction and its confidence."""

    row_id: str
    gold: str
    predicted: str | None = None
    confidence: float | None = None


class QAReport(BaseModel):
    n: int
    n_correct: int
    accuracy: float


def _ratio(numerator: float, denominator: float) -> float:
    # scikit-learn's zero_division=0: an undefined ratio counts as 0.
    return numerator / denominator if denominator else 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def classification_report(
    gold: Sequence[str],
    predicted: Sequence[str | None],
    labels: Sequence[str] | None = None,
) -> ClassificationReport:
    """Per-class precision/recall/F1 and the off-diagonal confusions of a classifier.

    The class list is `labels` plus every label seen in `gold` or `predicted`, sorted. The numbers
    equal scikit-learn's `precision_recall_fscore_support(gold, predicted, labels=<class list>,
    zero_division=0)`: macro averages run over the whole class list, so a class that has no gold
    rows still counts (with zeros unless it was predicted). A `None` prediction is wrong and is no
    class. Empty input gives `n=0` and zeros.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"gold has {len(gold)} rows but predicted has {len(predicted)}")
    classes = sorted(set(labels or ()) | set(gold) | {p for p in predicted if p is not None})
    pair_counts = Counter(zip(gold, predicted, strict=True))
    support = Counter(gold)
    predicted_count: Counter[str] = Counter()
    true_positives: Counter[str] = Counter()
    for (gold_label, predicted_label), count in pair_counts.items():
        if predicted_label is not None:
            predicted_count[predicted_label] += count
        if gold_label == predicted_label:
            true_positives[gold_label] += count

    per_class: dict[str, ClassMetrics] = {}
    for label in classes:
        tp = true_positives[label]
        false_positives = predicted_count[label] - tp
        false_negatives = support[label] - tp
        per_class[label] = ClassMetrics(
            precision=_ratio(tp, tp + false_positives),
            recall=_ratio(tp, tp + false_negatives),
            # The count form (not the harmonic mean of the rounded ratios) is what sklearn uses.
            f1=_ratio(2 * tp, 2 * tp + false_positives + false_negatives),
            support=support[label],
        )

    n = len(gold)
    metrics = list(per_class.values())
    confusion_pairs = [
        ConfusionPair(
            gold=gold_label,
            predicted=NO_PREDICTION if predicted_label is None else predicted_label,
            count=count,
        )
        for (gold_label, predicted_label), count in pair_counts.items()
        if gold_label != predicted_label
    ]
    confusion_pairs.sort(key=lambda pair: (-pair.count, pair.gold, pair.predicted))
    return ClassificationReport(
        n=n,
        accuracy=_ratio(sum(true_positives.values()), n),
        macro_f1=_mean([m.f1 for m in metrics]),
        weighted_f1=_ratio(sum(m.f1 * m.support for m in metrics), n),
        macro_precision=_mean([m.precision for m in metrics]),
        macro_recall=_mean([m.recall for m in metrics]),
        per_class=per_class,
        confusion_pairs=confusion_pairs,
    )


def confident_mistakes(
    rows: Sequence[ScoredPrediction],
    min_confidence: float = 0.0,
    limit: int | None = None,
) -> list[ScoredPrediction]:
    """The wrong rows, most confident first: PGKD's hard negatives.

    A row is wrong when its prediction differs from gold (a `None` prediction is wrong). Rows
    below `min_confidence` are dropped; a row with unknown confidence is kept only while
    `min_confidence <= 0` and comes after every row with a confidence. Ties keep `row_id` order.
    """
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    wrong = [
        row
        for row in rows
        if row.predicted != row.gold
        and (
            row.confidence >= min_confidence if row.confidence is not None else min_confidence <= 0
        )
    ]
    wrong.sort(
        key=lambda row: (
            row.confidence is None,
            -(row.confidence or 0.0),
            row.row_id,
        )
    )
    return wrong if limit is None else wrong[:limit]


def qa_report(correct: Sequence[bool]) -> QAReport:
    n_correct = sum(1 for ok in correct if ok)
    return QAReport(n=len(correct), n_correct=n_correct, accuracy=_ratio(n_correct, len(correct)))
