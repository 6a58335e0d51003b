"""Student ports: what the loops need from a student, whoever trains and serves it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from service.domain.evaluation import EvalRow, Prediction, TrainRow


class StudentError(Exception):
    """Base of the errors a student raises."""


class StudentNotFittedError(StudentError):
    """`predict` was called on a trainable student before `fit`."""


class StudentUnavailableError(StudentError):
    """The student could not be reached (connection, timeout, 429, 5xx after the client's retries).

    Transient: the evaluation should be retried later, not scored as a wall of wrong answers.
    """


class StudentConfigurationError(StudentError):
    """The student refuses every request the same way: bad key, unknown model, unusable format.

    Permanent: retrying will not help and scoring the rows as wrong would poison the loop.
    """


@runtime_checkable
class Student(Protocol):
    """Anything that answers evaluation rows; the loops only read its mistakes."""

    def predict(self, rows: Sequence[EvalRow]) -> list[Prediction]:
        """One prediction per row, in the same order; `correct` is set when the row has a gold."""
        ...


@runtime_checkable
class TrainableStudent(Student, Protocol):
    """A student the service trains itself (the built-in CPU students)."""

    def fit(self, rows: Sequence[TrainRow]) -> None:
        """Train from scratch on `rows`; a later `fit` replaces the previous model."""
        ...


@runtime_checkable
class InContextScorer(Protocol):
    """ARTE's student preference: accuracy on `rows` with `demonstration` as the one example."""

    def score_demonstration(self, demonstration: str, rows: Sequence[EvalRow]) -> float:
        """Fraction of `rows` (all with a gold) answered correctly, in [0, 1]."""
        ...
