"""Exports in embedded mode (SQLite): `distill run`, then `distill export` and the streaming
endpoint on the same database give the same bytes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.auth import create_api_key, get_or_create_tenant
from service.db import make_engine, session_factory
from service.settings import ApiSettings, BrokerSettings, DatabaseSettings, Settings
from tests.conftest import REPO
from tests.fake_teacher.client import FakeTeacherProcess

DISTILL = str(Path(sys.executable).parent / "distill")
SEED = REPO / "examples" / "data" / "banking-seed.jsonl"
VALIDATION = REPO / "examples" / "data" / "banking-validation.jsonl"


def _distill(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("DISTILL_")
    }
    env.update(DISTILL_HOME=str(home), DISTILL_LOG_LEVEL="WARNING", COLUMNS="200")
    return subprocess.run(
        [DISTILL, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_distill_export_and_the_stream_on_the_embedded_database(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spec = tmp_path / "job.yaml"
    with FakeTeacherProcess() as teacher:
        spec.write_text(
            "name: embedded-export\nstrategy: pgkd\n"
            "task: {kind: classification, instructions: Classify a bank customer's message.}\n"
            f"datasets: {{train: '{SEED}', validation: '{VALIDATION}'}}\n"
            f"teacher: {{base_url: '{teacher.base_url}', model: fake-teacher}}\n"
            "student: {type: builtin, model: tfidf}\nbudget: {max_iterations: 1}\n"
        )
        run = _distill(home, "run", str(spec))
    assert run.returncode == 0, run.stdout + run.stderr
    match = re.search(r"job ([0-9a-f-]{36}) \(pgkd\) created", run.stdout)
    assert match, run.stdout
    job_id = match.group(1)

    out = tmp_path / "out"
    export = _distill(
        home, "export", job_id, "--format", "sharegpt", "--out", str(out),
        "--validation-fraction", "0.2", "--gzip",
    )  # fmt: skip
    assert export.returncode == 0, export.stdout + export.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {"train", "validation"} and manifest["gzip"] is True
    assert manifest["counts"]["kind"]["seed"] == 48 and manifest["rows"] > 48

    engine = make_engine(f"sqlite:///{home / 'distill.db'}")
    try:
        sessions = session_factory(engine)
        with sessions() as session:
            _, key = create_api_key(session, get_or_create_tenant(session, "default"))
            session.commit()
        settings = Settings(
            database=DatabaseSettings(url=f"sqlite:///{home / 'distill.db'}"),
            broker=BrokerSettings(url=None),
            api=ApiSettings(),
        )
        with TestClient(create_app(settings, sessions=sessions)) as client:
            for split in ("train", "validation"):
                resp = client.get(
                    f"/v1/jobs/{job_id}/export",
                    params={
                        "format": "sharegpt",
                        "validation_fraction": 0.2,
                        "split": split,
                        "gzip": True,
                    },
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert resp.status_code == 200, resp.text
                assert resp.content == (out / f"{split}.jsonl.gz").read_bytes()
    finally:
        engine.dispose()
