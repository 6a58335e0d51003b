"""The ports a step needs, built once per process by the composition root."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.domain.spec import StudentSpec, TaskSpec
from service.models import Teacher as TeacherRow
from service.settings import Settings

if TYPE_CHECKING:
    from workers.students.base import Student
    from workers.teacher.gateway import Teacher


@dataclass
class Ports:
    settings: Settings
    make_teacher: Callable[[TeacherRow], Teacher]
    # (task, spec, public_only): public_only, every connection to an endpoint student must go
    # to a public address (JobContext.student_public_only).
    make_student: Callable[[TaskSpec, StudentSpec, bool], Student]
