"""Every shipped example job spec runs end to end (embedded steps on real Postgres), with the
fake teacher standing in for the local one and a TF-IDF student for speed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.auth import get_or_create_tenant
from service.cli import upgrade_database
from service.datasets import create_dataset, parse_jsonl
from service.db import make_engine, session_factory
from service.domain.statuses import ExampleStatus
from service.jobs import create_job, parse_spec
from service.models import Example, Iteration, Job
from service.tasks import SENDER
from tests.conftest import REPO, fresh_database
from tests.fake_teacher.client import FakeTeacherProcess
from workers import runtime
from workers.inline import InlineTaskSender
from workers.steps.export import export_job

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[sessionmaker[Session], str, str]]:
    with fresh_database("distill_examples") as url, FakeTeacherProcess() as teacher:
        upgrade_database(url)
        engine = make_engine(url)
        try:
            yield session_factory(engine), teacher.base_url, url
        finally:
            engine.dispose()


def _prepare(path: Path, teacher_url: str, session: Session, tenant_id: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    for key, ref in list(raw["datasets"].items()):
        data = (path.parent / ref).read_bytes()
        raw["datasets"][key] = str(
            create_dataset(session, tenant_id, ref, parse_jsonl(data), size_bytes=len(data)).id
        )
    raw["teacher"] = {"base_url": teacher_url, "model": "fake-teacher"}
    if raw["student"]["type"] == "endpoint":
        raw["student"]["base_url"] = teacher_url
        raw["student"]["model"] = "fake-teacher"
    else:
        raw["student"]["model"] = "tfidf"
    return raw


def test_every_example_is_listed() -> None:
    assert {p.stem for p in EXAMPLES} >= {"pgkd-local", "llm2llm-endpoint", "arte", "rationales"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_to_completion(
    env: tuple[sessionmaker[Session], str, str], path: Path, tmp_path: Path
) -> None:
    sessions, teacher_url, _ = env
    sender = InlineTaskSender()
    runtime.configure(sessions=sessions, sender=sender)
    try:
        with sessions() as session:
            session.info[SENDER] = sender
            tenant = get_or_create_tenant(session, f"examples-{path.stem}")
            raw = _prepare(path, teacher_url, session, tenant.id)
            job, _ = create_job(session, tenant.id, parse_spec(raw), allow_private_teacher=True)
            session.commit()
            job_id = job.id
        sender.run_until_idle()
        with sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None
            assert job.status.value == "succeeded", job.status_reason
            iterations = session.scalars(
                select(Iteration).where(Iteration.job_id == job_id).order_by(Iteration.number)
            ).all()
            assert iterations[0].number == 0 and iterations[-1].number >= 1
            assert all(it.metric is not None for it in iterations)
            kinds = dict(
                session.execute(
                    select(Example.kind, func.count())
                    .where(Example.job_id == job_id)
                    .group_by(Example.kind)
                ).all()
            )
            assert sum(kinds.values()) > 0, kinds
            accepted = dict(
                session.execute(
                    select(Example.kind, func.count())
                    .where(Example.job_id == job_id, Example.status == ExampleStatus.accepted)
                    .group_by(Example.kind)
                ).all()
            )
            reasons = dict(
                session.execute(
                    select(Example.rejection_reason, func.count())
                    .where(Example.job_id == job_id, Example.status == ExampleStatus.rejected)
                    .group_by(Example.rejection_reason)
                ).all()
            )
            # Every example spec produces training data, not only rejections.
            assert sum(accepted.values()) > 0, (accepted, reasons)
            if job.strategy == "arte":
                assert kinds.get("preference_pair", 0) > 0
                dpo = export_job(session, job_id, fmt="dpo", out_dir=tmp_path)
                session.commit()
                pairs = [json.loads(x) for x in Path(dpo.path or "").read_text().splitlines()]
                assert len(pairs) == kinds["preference_pair"] == dpo.row_count
                for pair in pairs:
                    assert pair["prompt"][0]["role"] == "system"
                    assert pair["score_chosen"] > pair["score_rejected"]
                    assert json.loads(pair["chosen"][0]["content"]) != json.loads(
                        pair["rejected"][0]["content"]
                    )
            if job.strategy == "rationales":
                assert accepted.get("rationale", 0) > 0, reasons
            export = export_job(session, job_id, out_dir=tmp_path)
            session.commit()
            assert Path(export.path or "").read_text().count("\n") == export.row_count
    finally:
        runtime.reset()
