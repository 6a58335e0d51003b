"""Students: the built-in CPU classifiers and the endpoint student, behind the `Student` ports."""

from workers.students.base import (
    InContextScorer,
    Student,
    StudentConfigurationError,
    StudentError,
    StudentNotFittedError,
    StudentUnavailableError,
    TrainableStudent,
)
from workers.students.embedding import EmbeddingStudent
from workers.students.endpoint import EndpointStudent
from workers.students.factory import build_student
from workers.students.tfidf import TfidfStudent

__all__ = [
    "EmbeddingStudent",
    "EndpointStudent",
    "InContextScorer",
    "Student",
    "StudentConfigurationError",
    "StudentError",
    "StudentNotFittedError",
    "StudentUnavailableError",
    "TfidfStudent",
    "TrainableStudent",
    "build_student",
]
