"""A real stack for end-to-end tests: its own Postgres database, a Redis key prefix, the fake
teacher process and real `distill worker` processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.auth import create_api_key, get_or_create_tenant
from service.cli import upgrade_database
from service.db import make_engine, session_factory
from service.settings import ApiSettings, BrokerSettings, DatabaseSettings, Settings
from service.tasks import CeleryTaskSender
from tests.conftest import REDIS_URL, fresh_database
from tests.fake_teacher.client import FakeTeacherProcess

DISTILL = str(Path(sys.executable).parent / "distill")


@dataclass
class Stack:
    db_url: str
    prefix: str
    env: dict[str, str]
    teacher: FakeTeacherProcess
    home: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self, *extra: str) -> subprocess.Popen[bytes]:
        log = (self.home / f"worker-{len(self.workers)}.log").open("wb")
        proc = subprocess.Popen(
            [DISTILL, "worker", "--concurrency", "1", "--loglevel", "WARNING", *extra],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.workers.append(proc)
        return proc

    def kill_worker(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)  # the Celery parent and its pool children
        proc.wait(timeout=30)

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                self.kill_worker(proc, signal.SIGTERM)
        self.workers.clear()

    def settings(self) -> Settings:
        return Settings(
            database=DatabaseSettings(url=self.db_url),
            broker=BrokerSettings(url=REDIS_URL, key_prefix=self.prefix),
            api=ApiSettings(allow_private_teacher_urls=True),
        )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with fresh_database("distill_e2e") as url:
        upgrade_database(url)
        prefix = f"distill-test:{uuid.uuid4().hex[:10]}:"
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "REDIS_URL": REDIS_URL,
            "DISTILL_BROKER__KEY_PREFIX": prefix,
            # A killed worker's teacher slots come back sooner than in production.
            "DISTILL_WORKER__TEACHER_LEASE_TTL_S": "5",
            "DISTILL_HOME": str(tmp_path / "home"),
            "DISTILL_LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
        }
        with FakeTeacherProcess(latency_ms=20) as teacher:
            stack = Stack(url, prefix, env, teacher, tmp_path)
            try:
                yield stack
            finally:
                stack.stop_workers()
                client = redis.Redis.from_url(REDIS_URL)
                keys = list(client.scan_iter(f"{prefix}*"))
                if keys:
                    client.delete(*keys)
                client.close()


@pytest.fixture
def api(stack: Stack) -> Iterator[tuple[TestClient, dict[str, str], Any]]:
    settings = stack.settings()
    engine = make_engine(stack.db_url)
    sessions = session_factory(engine)
    sender = CeleryTaskSender(REDIS_URL, key_prefix=stack.prefix)
    app = create_app(settings, sessions=sessions, task_sender=sender)
    with sessions() as session:
        _, key = create_api_key(session, get_or_create_tenant(session, "e2e"))
        session.commit()
    with TestClient(app) as client:
        yield client, {"Authorization": f"Bearer {key}"}, sessions
    engine.dispose()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
