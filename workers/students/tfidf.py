"""TF-IDF + logistic regression: the built-in student that needs no model at all."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sklearn.feature_extraction.text import TfidfVectorizer

from service.domain.evaluation import EvalRow, Prediction, TrainRow
from workers.students.base import StudentNotFittedError
from workers.students.head import LinearHead, classification_predictions


class TfidfStudent:
    """Word 1-2 gram TF-IDF features (sublinear tf) under the shared logistic-regression head.

    Far weaker than the embedding student with few rows per class (FACTS.md), but it installs
    with scikit-learn alone, so the service can always train a student.
    """

    def __init__(self, labels: Sequence[str] | None = None) -> None:
        self._head = LinearHead(labels)
        self._vectorizer: Any = None

    @property
    def labels(self) -> list[str]:
        return self._head.labels

    def fit(self, rows: Sequence[TrainRow]) -> None:
        if not rows:
            raise ValueError("cannot fit a student on zero rows")
        vectorizer = TfidfVectorizer(
            ngram_range=(1, 2),
            sublinear_tf=True,
            # Keep one-character tokens: digits and short words carry signal in short inputs
            # (questions, intents) that the default pattern would drop.
            token_pattern=r"(?u)\b\w+\b",
        )
        features = vectorizer.fit_transform([row.input for row in rows])
        self._head.fit(features, [row.output for row in rows])
        self._vectorizer = vectorizer

    def predict(self, rows: Sequence[EvalRow]) -> list[Prediction]:
        if self._vectorizer is None or not self._head.fitted:
            raise StudentNotFittedError("TfidfStudent.predict called before fit")
        features = self._vectorizer.transform([row.input for row in rows]) if rows else None
        proba = self._head.predict_proba(features, len(rows))
        return classification_predictions(rows, self._head.labels, proba)
