"""Teacher gateway: the Teacher port, its OpenAI-compatible adapter, and shared limits.

Exports resolve lazily (PEP 562): importing a submodule such as `workers.teacher.local` must
not load the openai SDK and the Prometheus collectors, because `distill worker --metrics-port`
has to switch prometheus_client to multiprocess mode before any collector exists.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.teacher.gateway import OpenAITeacher, Teacher, run_sync
    from workers.teacher.limits import Lease, Limiter, LocalLimiter, RedisLimiter, TeacherQuota
    from workers.teacher.retry import BackoffPolicy
    from workers.teacher.structured import DEFAULT_CAPABILITIES, CapabilityCache

_EXPORTS = {
    "OpenAITeacher": "gateway",
    "Teacher": "gateway",
    "run_sync": "gateway",
    "Lease": "limits",
    "Limiter": "limits",
    "LocalLimiter": "limits",
    "RedisLimiter": "limits",
    "TeacherQuota": "limits",
    "BackoffPolicy": "retry",
    "DEFAULT_CAPABILITIES": "structured",
    "CapabilityCache": "structured",
}


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'workers.teacher' has no attribute {name!r}") from None
    return getattr(importlib.import_module(f"workers.teacher.{module}"), name)


__all__ = [
    "DEFAULT_CAPABILITIES",
    "BackoffPolicy",
    "CapabilityCache",
    "Lease",
    "Limiter",
    "LocalLimiter",
    "OpenAITeacher",
    "RedisLimiter",
    "Teacher",
    "TeacherQuota",
    "run_sync",
]
