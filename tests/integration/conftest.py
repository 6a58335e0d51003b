"""Embedded steps on real Postgres: the API and the in-process executor share one database."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.auth import create_api_key, get_or_create_tenant
from service.cli import upgrade_database
from service.db import make_engine, session_factory
from service.models import TeacherCall
from service.settings import ApiSettings, BrokerSettings, DatabaseSettings, Settings
from tests.conftest import fresh_database
from tests.data_factory import question_slice
from tests.fake_teacher.client import FakeTeacherProcess
from workers import runtime
from workers.inline import InlineTaskSender


@dataclass
class InlineStack:
    client: TestClient
    auth: dict[str, str]
    sender: InlineTaskSender
    sessions: sessionmaker[Session]
    teacher: FakeTeacherProcess

    def upload(self, data: bytes, name: str = "data") -> str:
        resp = self.client.post(
            "/v1/datasets",
            params={"name": name},
            content=data,
            headers={**self.auth, "Content-Type": "application/x-ndjson"},
        )
        assert resp.status_code in (200, 201), resp.text  # 200: the same upload again
        return str(resp.json()["id"])

    @contextlib.contextmanager
    def executing_in_background(self) -> Iterator[None]:
        """The embedded executor draining its queue on a thread, as `distill serve` runs it."""
        stop = threading.Event()
        runner = threading.Thread(target=self.sender.run_forever, args=(stop,), daemon=True)
        runner.start()
        try:
            yield
        finally:
            stop.set()
            runner.join(timeout=30)

    def teacher_calls(self) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(TeacherCall)) or 0)

    def job_spec(
        self, *, train: bytes | None = None, validation: bytes | None = None, **changes: Any
    ) -> dict[str, Any]:
        """A small job on this stack's fake teacher: TREC with 5 rows per class (train and
        validation) unless given, PGKD, the TF-IDF student, one iteration; `changes` replace
        top-level keys of the spec."""
        if train is None:
            train, validation = question_slice(per_class=5, val_per_class=5)
        datasets = {"train": self.upload(train)}
        if validation is not None:
            datasets["validation"] = self.upload(validation)
        return {
            "name": "job",
            "strategy": "pgkd",
            "task": {"instructions": "Classify the question."},
            "datasets": datasets,
            "teacher": {"base_url": self.teacher.base_url, "model": "fake-teacher"},
            "student": {"type": "builtin", "model": "tfidf"},
            "budget": {"max_iterations": 1},
            **changes,
        }

    def create_job(self, spec: dict[str, Any]) -> str:
        resp = self.client.post("/v1/jobs", json=spec, headers=self.auth)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.client.get(f"/v1/jobs/{job_id}", headers=self.auth).json()
        return body


@pytest.fixture
def inline_stack() -> Iterator[InlineStack]:
    with fresh_database("distill_inline") as url, FakeTeacherProcess() as teacher:
        upgrade_database(url)
        engine = make_engine(url)
        sessions = session_factory(engine)
        sender = InlineTaskSender()
        runtime.configure(sessions=sessions, sender=sender)
        settings = Settings(
            database=DatabaseSettings(url=url),
            broker=BrokerSettings(url=None),
            api=ApiSettings(
                allow_private_teacher_urls=True,
                # A key tenants may name, for the local fake teacher only.
                key_env_allowlist=["DISTILL_TEST_NO_SUCH_KEY=127.0.0.1"],
            ),
        )
        app = create_app(settings, sessions=sessions, task_sender=sender)
        with sessions() as s:
            _, key = create_api_key(s, get_or_create_tenant(s, "t"))
            s.commit()
        try:
            with TestClient(app) as client:
                yield InlineStack(
                    client, {"Authorization": f"Bearer {key}"}, sender, sessions, teacher
                )
        finally:
            runtime.reset()
            engine.dispose()
