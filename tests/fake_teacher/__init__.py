"""Deterministic fake OpenAI-compatible teacher server for tests and benchmarks."""

from tests.fake_teacher.client import FakeTeacherProcess

__all__ = ["FakeTeacherProcess"]
