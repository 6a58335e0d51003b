"""The linear classification head shared by the built-in students."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression

from service.domain.evaluation import EvalRow, Prediction

# The reference student in FACTS.md: strong enough regularisation headroom for a few dozen
# rows, enough iterations for lbfgs to converge on tens of thousands of rows.
_C = 10.0
_MAX_ITER = 2000
_RANDOM_STATE = 0


class LinearHead:
    """Logistic regression over a fixed label set.

    The label set is the task's (in its order) or, when the task names none, the sorted union of
    the labels seen by every `fit` so far. Probabilities always cover the whole label set, with 0 for labels
    that have no training rows, so per-class metrics and confusions stay comparable across
    iterations even while a class is still missing from the data.
    """

    def __init__(self, labels: Sequence[str] | None = None) -> None:
        self._fixed = labels is not None
        self._labels: list[str] | None = list(labels) if labels is not None else None
        self._classifier: Any = None
        self._single_label: str | None = None

    @property
    def labels(self) -> list[str]:
        if self._labels is None:
            raise ValueError("the label set is known only after fit")
        return list(self._labels)

    @property
    def fitted(self) -> bool:
        return self._classifier is not None or self._single_label is not None

    def fit(self, features: Any, targets: Sequence[str]) -> None:
        """Fit on `features` (dense array or sparse matrix, one row per target)."""
        if not targets:
            raise ValueError("cannot fit a student on zero rows")
        seen = sorted(set(targets))
        if self._fixed:
            labels = self.labels
        else:
            labels = sorted(set(self._labels or ()) | set(seen))
            self._labels = labels
        unknown = [label for label in seen if label not in labels]
        if unknown:
            raise ValueError(f"train labels outside the label set {labels}: {unknown}")
        self._classifier = None
        self._single_label = None
        if len(seen) == 1:
            # LogisticRegression refuses one class; the only sensible answer is that class.
            self._single_label = seen[0]
            return
        # Balanced class weights: the loops add data where the student is weak, so a few classes
        # gain many rows per iteration; unweighted, the head would then favour those classes
        # and lose accuracy on the rest, and useful data would look harmful.
        classifier = LogisticRegression(
            C=_C, max_iter=_MAX_ITER, random_state=_RANDOM_STATE, class_weight="balanced"
        )
        classifier.fit(features, list(targets))
        self._classifier = classifier

    def predict_proba(self, features: Any, n_rows: int) -> NDArray[np.float64]:
        """Probabilities of shape (n_rows, len(labels)), columns in `labels` order."""
        labels = self.labels
        proba = np.zeros((n_rows, len(labels)), dtype=np.float64)
        if self._single_label is not None:
            proba[:, labels.index(self._single_label)] = 1.0
            return proba
        if self._classifier is None:
            raise ValueError("predict_proba before fit")
        if n_rows == 0:
            return proba
        seen_proba = np.asarray(self._classifier.predict_proba(features), dtype=np.float64)
        columns = [labels.index(str(label)) for label in self._classifier.classes_]
        proba[:, columns] = seen_proba
        return proba


def classification_predictions(
    rows: Sequence[EvalRow], labels: Sequence[str], proba: NDArray[np.float64]
) -> list[Prediction]:
    """Turn a probability matrix into predictions (argmax label, its probability as confidence)."""
    predictions: list[Prediction] = []
    for row, row_proba in zip(rows, proba, strict=True):
        best = int(np.argmax(row_proba))
        predicted = labels[best]
        predictions.append(
            Prediction(
                row_id=row.row_id,
                predicted=predicted,
                # Clipped because float rounding in the softmax can step a hair past 1.
                confidence=float(np.clip(row_proba[best], 0.0, 1.0)),
                probabilities={
                    label: float(np.clip(p, 0.0, 1.0))
                    for label, p in zip(labels, row_proba, strict=True)
                },
                correct=None if row.gold is None else predicted == row.gold,
            )
        )
    return predictions
