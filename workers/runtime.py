"""Running a step: one session per task, the ports of this process, commit at the end."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service import tasks
from service.db import get_engine, session_factory
from service.settings import get_settings
from workers.composition import build_ports, build_task_sender
from workers.ports import Ports


@dataclass
class _Runtime:
    """What this process runs steps with; built lazily from settings, replaceable by a
    composition root (the CLI, the embedded server, tests)."""

    sessions: sessionmaker[Session] | None = None
    ports: Ports | None = None
    sender: tasks.TaskSender | None = None


_runtime = _Runtime()


def configure(
    *,
    sessions: sessionmaker[Session] | None = None,
    ports: Ports | None = None,
    sender: tasks.TaskSender | None = None,
) -> None:
    if sessions is not None:
        _runtime.sessions = sessions
    if ports is not None:
        _runtime.ports = ports
    if sender is not None:
        _runtime.sender = sender


def reset() -> None:
    global _runtime
    _runtime = _Runtime()


def process_ports() -> Ports:
    if _runtime.ports is None:
        _runtime.ports = build_ports(get_settings())
    return _runtime.ports


def process_sessions() -> sessionmaker[Session]:
    if _runtime.sessions is None:
        _runtime.sessions = session_factory(get_engine())
    return _runtime.sessions


def set_sender(sender: tasks.TaskSender) -> None:
    _runtime.sender = sender


def current_sender() -> tasks.TaskSender:
    if _runtime.sender is None:
        _runtime.sender = build_task_sender(get_settings())
    return _runtime.sender


def run_step(step: Callable[..., Any], *args: Any, with_ports: bool = True) -> None:
    with process_sessions()() as session:
        session.info[tasks.SENDER] = current_sender()
        parsed = [uuid.UUID(a) if _is_uuid(a) else a for a in args]
        if with_ports:
            step(session, *parsed, process_ports())
        else:
            step(session, *parsed)
        session.commit()


def _is_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
