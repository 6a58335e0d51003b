"""The fault suite: real processes (workers, beat, the fake teacher, a Redis of its own where a
scenario restarts it) and the checks every scenario ends with."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.auth import create_api_key, get_or_create_tenant
from service.cli import upgrade_database
from service.db import make_engine, session_factory
from service.domain.statuses import BatchStatus
from service.models import Example, GenerationBatch, Iteration, TeacherCall
from service.settings import ApiSettings, BrokerSettings, DatabaseSettings, Settings
from service.tasks import CeleryTaskSender
from tests.conftest import REDIS_URL, fresh_database
from tests.data_factory import question_slice
from tests.e2e.conftest import DISTILL, wait_for
from tests.fake_teacher.client import FakeTeacherProcess
from tests.integration.conftest import inline_stack  # noqa: F401  (a fixture used here too)

# Short enough that a scenario recovers in seconds; the README states the defaults' promise.
LEASE_S = 3
RECONCILE_S = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    """A Redis server of the scenario's own (no persistence, like the issue's), restartable."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.home = home
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.home),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        try:
            wait_for(lambda: _pings(client), 10, "redis to start")
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@dataclass
class FaultStack:
    db_url: str
    redis_url: str
    prefix: str
    env: dict[str, str]
    teacher: FakeTeacherProcess
    home: Path
    sessions: sessionmaker[Session]
    client: TestClient
    auth: dict[str, str]

    def __post_init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.home / f"{args[0]}-{len(self.processes)}.log").open("wb")
        proc = subprocess.Popen(
            [DISTILL, *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.home,  # beat keeps its schedule file in the working directory
        )
        log.close()
        self.processes.append(proc)
        return proc

    def start_worker(self, *extra: str) -> subprocess.Popen[bytes]:
        return self.start("worker", "--concurrency", "1", "--loglevel", "WARNING", *extra)

    def start_beat(self) -> subprocess.Popen[bytes]:
        return self.start("beat", "--loglevel", "WARNING")

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)  # the Celery parent and its pool children
        proc.wait(timeout=60)

    def stop_all(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                self.stop(proc, signal.SIGKILL)
        self.processes.clear()

    def upload(self, data: bytes, name: str) -> str:
        resp = self.client.post(
            "/v1/datasets",
            params={"name": name},
            content=data,
            headers={**self.auth, "Content-Type": "application/x-ndjson"},
        )
        assert resp.status_code in (200, 201), resp.text  # 200: the same upload again
        return str(resp.json()["id"])

    def create_job(
        self, *, concurrency: int = 4, batch_size: int = 4, per_class: int = 6, **teacher: Any
    ) -> str:
        train, val = question_slice(per_class=per_class, val_per_class=5)
        spec = {
            "name": "faults",
            "strategy": "pgkd",
            "task": {"instructions": "Classify the question by the type of its answer."},
            "datasets": {
                "train": self.upload(train, "seed"),
                "validation": self.upload(val, "val"),
            },
            "teacher": {
                "base_url": self.teacher.base_url,
                "model": "fake-teacher",
                "limits": {"max_concurrency": concurrency},
                **teacher,
            },
            "student": {"type": "builtin", "model": "tfidf"},
            "budget": {"max_iterations": 2},
            "stopping": {"patience": 5},
            "batch_size": batch_size,
            "seed": 3,
        }
        resp = self.client.post("/v1/jobs", json=spec, headers=self.auth)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.client.get(f"/v1/jobs/{job_id}", headers=self.auth).json()
        return body

    def calls(self, job_id: str) -> int:
        with self.sessions() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(TeacherCall)
                    .where(TeacherCall.job_id == uuid.UUID(job_id))
                )
                or 0
            )

    def wait_finished(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        job: dict[str, Any] = wait_for(
            lambda: (j := self.job(job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
            timeout,
            "the job to end on its own",
        )
        return job

    def check_exactly_once(self, job_id: str, *, in_flight: int) -> None:
        """What every scenario ends with: nothing lost (every target of every batch has its
        call and its rows, every batch closed), nothing duplicated (one call per fingerprint,
        one row per dedup key), and no more answers paid twice than were in flight."""
        jid = uuid.UUID(job_id)
        with self.sessions() as session:
            open_batches = session.scalar(
                select(func.count())
                .select_from(GenerationBatch)
                .where(
                    GenerationBatch.job_id == jid,
                    GenerationBatch.status.in_([BatchStatus.pending, BatchStatus.running]),
                )
            )
            assert open_batches == 0
            keys = session.scalars(select(Example.dedup_key).where(Example.job_id == jid)).all()
            assert len(keys) == len(set(keys))
            per_fp = session.execute(
                select(TeacherCall.fingerprint, func.count())
                .where(TeacherCall.job_id == jid)
                .group_by(TeacherCall.fingerprint)
            ).all()
            assert all(n == 1 for _, n in per_fp)
            for iteration in session.scalars(
                select(Iteration).where(Iteration.job_id == jid, Iteration.number > 0)
            ):
                assert iteration.teacher_calls == iteration.targets_count, iteration.number
                answered = session.scalar(
                    select(func.count(func.distinct(Example.prompt_fingerprint))).where(
                        Example.iteration_id == iteration.id
                    )
                )
                assert answered == iteration.targets_count, "a target has no row"
        assert self.teacher.stats()["duplicate_successes"] <= in_flight


@contextlib.contextmanager
def fault_stack(tmp_path: Path, redis_url: str = REDIS_URL, **env: str) -> Iterator[FaultStack]:
    with fresh_database("distill_faults") as url:
        upgrade_database(url)
        prefix = f"distill-faults:{uuid.uuid4().hex[:10]}:"
        environment = {
            **os.environ,
            "DATABASE_URL": url,
            "REDIS_URL": redis_url,
            "DISTILL_BROKER__KEY_PREFIX": prefix,
            "DISTILL_WORKER__TEACHER_LEASE_TTL_S": "3",
            "DISTILL_WORKER__LEASE_S": str(LEASE_S),
            "DISTILL_WORKER__RECONCILE_INTERVAL_S": str(RECONCILE_S),
            "DISTILL_WORKER__REQUEUE_AFTER_S": "4",
            "DISTILL_WORKER__STUCK_AFTER_S": "6",
            "DISTILL_HOME": str(tmp_path / "home"),
            "DISTILL_LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
            **env,
        }
        engine = make_engine(url)
        sessions = session_factory(engine)
        settings = Settings(
            database=DatabaseSettings(url=url),
            broker=BrokerSettings(url=redis_url, key_prefix=prefix),
            api=ApiSettings(allow_private_teacher_urls=True),
        )
        sender = CeleryTaskSender(redis_url, key_prefix=prefix)
        app = create_app(settings, sessions=sessions, task_sender=sender)
        with sessions() as session:
            _, key = create_api_key(session, get_or_create_tenant(session, "faults"))
            session.commit()
        with FakeTeacherProcess(latency_ms=200) as teacher, TestClient(app) as client:
            stack = FaultStack(
                url,
                redis_url,
                prefix,
                environment,
                teacher,
                tmp_path,
                sessions,
                client,
                {"Authorization": f"Bearer {key}"},
            )
            try:
                yield stack
            finally:
                stack.stop_all()
                with contextlib.suppress(redis.RedisError):
                    r = redis.Redis.from_url(redis_url)
                    keys = list(r.scan_iter(f"{prefix}*"))
                    if keys:
                        r.delete(*keys)
                    r.close()
                engine.dispose()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[FaultStack]:
    with fault_stack(tmp_path) as st:
        yield st


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def elapsed_until(predicate: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    wait_for(predicate, timeout, what)
    return time.monotonic() - started
