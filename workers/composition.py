"""The composition root: builds teachers, students and the task sender from settings."""

from __future__ import annotations

from functools import lru_cache

from service.domain.spec import StudentSpec, TaskSpec
from service.models import Teacher as TeacherRow
from service.secrets import resolve_api_key
from service.settings import Settings
from service.tasks import CeleryTaskSender, TaskSender
from workers.ports import Ports


def build_ports(settings: Settings) -> Ports:
    from workers.students.base import Student
    from workers.students.factory import build_student
    from workers.teacher import OpenAITeacher
    from workers.teacher.gateway import Teacher
    from workers.teacher.limits import LocalLimiter, RedisLimiter

    # One limiter per process: in production it shares each teacher's limits with every
    # other worker through Redis; embedded, all tasks run in this process anyway.
    limiter = (
        RedisLimiter(
            settings.broker.url,
            prefix=f"{settings.broker.key_prefix}distill:limits:",
            lease_ttl_s=settings.worker.teacher_lease_ttl_s,
        )
        if settings.broker.url
        else LocalLimiter()
    )

    def make_teacher(row: TeacherRow) -> Teacher:
        from workers.steps.generate import endpoint_for

        return OpenAITeacher(endpoint_for(row), limiter=limiter)

    def make_student(task: TaskSpec, spec: StudentSpec, public_only: bool) -> Student:
        api_key = resolve_api_key(None, spec.api_key_env)
        student = build_student(
            task, spec, cache_dir=settings.cache_dir, api_key=api_key, public_only=public_only
        )
        if spec.trainer_command:
            from workers.students.trainer_hook import CommandTrainedStudent

            return CommandTrainedStudent(
                student, spec.trainer_command, task, settings.home / "trainer"
            )
        return student

    return Ports(settings=settings, make_teacher=make_teacher, make_student=make_student)


@lru_cache
def _celery_sender(url: str, prefix: str, visibility_timeout_s: int) -> CeleryTaskSender:
    return CeleryTaskSender(url, key_prefix=prefix, visibility_timeout_s=visibility_timeout_s)


def build_task_sender(settings: Settings) -> TaskSender:
    if settings.broker.url:
        return _celery_sender(
            settings.broker.url, settings.broker.key_prefix, settings.broker.visibility_timeout_s
        )
    from workers.inline import inline_sender

    return inline_sender()
