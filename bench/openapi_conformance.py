"""The OpenAPI document against the behaviour: schemathesis with every check, the long run.

    python -m bench.openapi_conformance [--max-examples 100] [--seed 1] [-- <schemathesis args>]

Starts a fresh Postgres database, the API in production mode (a real secret, a broker URL so
nothing runs embedded; tasks are recorded, not run) on a free port, creates an API key and one
dataset, teacher and job so that the operations on them have something to find, then runs
`schemathesis run --checks all` against `/openapi.json` with that key and prints its summary.
Exits with schemathesis's exit code (0: no failure). `make conformance` runs it; the bounded
version of the same run is tests/integration/test_openapi_conformance.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

PG_SERVER = os.environ.get("DISTILL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("DISTILL_TEST_REDIS", "redis://127.0.0.1:6379/0")
REPO = Path(__file__).resolve().parents[1]
SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _database() -> Iterator[str]:
    from service.cli import upgrade_database

    name = f"distill_conformance_{uuid.uuid4().hex[:10]}"
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = f"{PG_SERVER}/{name}"
        upgrade_database(url, quiet=True)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _api_key(url: str) -> str:
    from sqlalchemy.orm import Session

    from service.auth import create_api_key, get_or_create_tenant
    from service.db import make_engine

    engine = make_engine(url)
    try:
        with Session(engine) as session:
            _, key = create_api_key(session, get_or_create_tenant(session, "conformance"))
            session.commit()
    finally:
        engine.dispose()
    return key


@contextlib.contextmanager
def _server(url: str, port: int) -> Iterator[str]:
    import uvicorn

    from service.api.app import create_app
    from service.db import make_engine, session_factory
    from service.settings import (
        ApiSettings,
        BrokerSettings,
        DatabaseSettings,
        Environment,
        Settings,
    )
    from service.tasks import RecordingTaskSender

    settings = Settings(
        environment=Environment.production,
        secret_key=uuid.uuid4().hex,
        database=DatabaseSettings(url=url),
        broker=BrokerSettings(url=REDIS_URL, key_prefix=f"conformance-{uuid.uuid4().hex[:8]}:"),
        api=ApiSettings(max_upload_bytes=1024 * 1024),
    )
    engine = make_engine(url)
    app = create_app(settings, sessions=session_factory(engine), task_sender=RecordingTaskSender())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API did not start")
        time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.dispose()


def seed_resources(http: httpx.Client) -> dict[str, str]:
    """One dataset, teacher and job, so that the operations on them are not only 404s."""
    rows = "".join(f'{{"text": "example {i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(20))
    dataset = http.post(
        "/v1/datasets",
        params={"name": "seed"},
        content=rows,
        headers={"Content-Type": "application/x-ndjson"},
    )
    dataset.raise_for_status()
    teacher = http.post(
        "/v1/teachers",
        json={"name": "seed", "base_url": "http://93.184.215.14/v1", "model": "m"},
    )
    teacher.raise_for_status()
    job = http.post(
        "/v1/jobs",
        json={
            "name": "seed",
            "strategy": "random",
            "task": {"kind": "classification", "instructions": "Classify."},
            "datasets": {"train": dataset.json()["id"]},
            "teacher": teacher.json()["id"],
            "student": {"type": "builtin", "model": "tfidf"},
            "budget": {"max_iterations": 1},
        },
    )
    job.raise_for_status()
    return {
        "dataset_id": dataset.json()["id"],
        "teacher_id": teacher.json()["id"],
        "job_id": job.json()["id"],
    }


def run_schemathesis(
    database_url: str,
    *,
    max_examples: int,
    seed: int,
    extra: Sequence[str] = (),
    cwd: Path | None = None,
    capture: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Serve the API on `database_url` (migrated, empty) and run schemathesis against it with
    every check, deterministically; `capture` keeps its output in the result."""
    key = _api_key(database_url)
    with _server(database_url, _free_port()) as base:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as http:
            seed_resources(http)
        command = [
            SCHEMATHESIS,
            "--config-file",
            str(REPO / "schemathesis.toml"),
            "--no-color",
            "run",
            f"{base}/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {key}",
            "--max-examples",
            str(max_examples),
            "--seed",
            str(seed),
            "--generation-deterministic",  # no example database either
            "--workers",
            "1",
            *extra,
        ]
        shown = [c if not c.startswith("Authorization") else "Authorization: ***" for c in command]
        print("$", " ".join(shown), flush=True)
        return subprocess.run(
            command, check=False, cwd=cwd, text=True, capture_output=capture, timeout=3600
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("extra", nargs="*", help="more schemathesis arguments, after --")
    args = parser.parse_args(argv)
    with _database() as url:
        result = run_schemathesis(
            url, max_examples=args.max_examples, seed=args.seed, extra=args.extra
        )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
