"""A module-scoped stack for the export tests: a fresh database, the fake teacher, the embedded
executor, and three finished jobs on the repository's banking example data (built here, not
read from ../shared): PGKD, rationale distillation (whose seed set has no validation file,
so its own hold-out applies) and ARTE."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.auth import create_api_key, get_or_create_tenant
from service.cli import upgrade_database
from service.db import make_engine, session_factory
from service.settings import ApiSettings, BrokerSettings, DatabaseSettings, Settings
from tests.conftest import REPO, fresh_database
from tests.fake_teacher.client import FakeTeacherProcess
from workers import runtime
from workers.inline import InlineTaskSender

SEED = (REPO / "examples" / "data" / "banking-seed.jsonl").read_bytes()
VALIDATION = (REPO / "examples" / "data" / "banking-validation.jsonl").read_bytes()
INSTRUCTIONS = "Classify a bank customer's message by what the customer wants."


@dataclass
class ExportStack:
    client: TestClient
    auth: dict[str, str]
    sessions: sessionmaker[Session]
    sender: InlineTaskSender
    url: str
    teacher: FakeTeacherProcess
    jobs: dict[str, str]

    def stream(self, strategy: str, **params: Any) -> httpx.Response:
        return self.client.get(
            f"/v1/jobs/{self.jobs[strategy]}/export", params=params, headers=self.auth
        )

    def body(self, strategy: str, **params: Any) -> bytes:
        resp = self.stream(strategy, **params)
        assert resp.status_code == 200, resp.text
        return resp.content


def _upload(client: TestClient, auth: dict[str, str], data: bytes, name: str) -> str:
    resp = client.post(
        "/v1/datasets",
        params={"name": name},
        content=data,
        headers={**auth, "Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


@contextlib.contextmanager
def export_stack() -> Iterator[ExportStack]:
    with fresh_database("distill_exports") as url, FakeTeacherProcess() as teacher:
        upgrade_database(url)
        engine = make_engine(url)
        sessions = session_factory(engine)
        sender = InlineTaskSender()
        runtime.configure(sessions=sessions, sender=sender)
        settings = Settings(
            database=DatabaseSettings(url=url),
            broker=BrokerSettings(url=None),
            api=ApiSettings(allow_private_teacher_urls=True),
        )
        app = create_app(settings, sessions=sessions, task_sender=sender)
        with sessions() as s:
            _, key = create_api_key(s, get_or_create_tenant(s, "exports"))
            s.commit()
        auth = {"Authorization": f"Bearer {key}"}
        try:
            with TestClient(app) as client:
                train = _upload(client, auth, SEED, "banking-seed")
                validation = _upload(client, auth, VALIDATION, "banking-validation")
                common = {
                    "task": {"instructions": INSTRUCTIONS},
                    "teacher": {"base_url": teacher.base_url, "model": "fake-teacher"},
                    "student": {"type": "builtin", "model": "tfidf"},
                }
                specs = {
                    "pgkd": {
                        "strategy": "pgkd",
                        "datasets": {"train": train, "validation": validation},
                        "budget": {"max_iterations": 2},
                    },
                    "rationales": {
                        "strategy": "rationales",
                        "datasets": {"train": train},
                        "budget": {"max_iterations": 2},
                    },
                    "arte": {
                        "strategy": "arte",
                        "datasets": {"train": train, "validation": validation},
                        "budget": {"max_iterations": 2},
                    },
                }
                jobs = {}
                for strategy, spec in specs.items():
                    resp = client.post(
                        "/v1/jobs",
                        json={"name": f"banking {strategy}", **common, **spec},
                        headers=auth,
                    )
                    assert resp.status_code == 201, resp.text
                    jobs[strategy] = str(resp.json()["id"])
                sender.run_until_idle()
                for strategy, job_id in jobs.items():
                    job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
                    assert job["status"] == "succeeded", (strategy, job["status_reason"])
                yield ExportStack(client, auth, sessions, sender, url, teacher, jobs)
        finally:
            runtime.reset()
            engine.dispose()
