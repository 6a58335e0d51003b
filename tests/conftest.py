"""Shared fixtures: a fresh Postgres database per test session, migrated with Alembic; each
test inside a transaction rolled back at teardown; an API client on that transaction. Tests
marked `shared_data` read the real public sets beside CI's checkout and skip where a clone
has none."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

# pytest-xdist's worker processes are started with COLUMNS=80 and LINES=24. The CLI's rich
# consoles (service/cli.py) read COLUMNS once, when imported, and would cut the tables the CLI
# tests read to 80 columns whatever width a test asks for; without it they read the width of
# the moment.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from service.api.app import create_app
from service.auth import create_api_key, get_or_create_tenant
from service.cli import upgrade_database
from service.db import make_engine
from service.settings import ApiSettings, BrokerSettings, DatabaseSettings, Settings
from service.tasks import SENDER, RecordingTaskSender

REPO = Path(__file__).resolve().parents[1]
# The real public data sets (../shared/data/README.md): beside CI's checkout, absent in a clone.
# Only tests marked `shared_data` read them; DISTILL_SHARED_DATA points elsewhere (the suite's
# own check that they skip cleanly points it at a directory that does not exist).
SHARED_DATA = Path(os.environ.get("DISTILL_SHARED_DATA") or REPO.parent / "shared" / "data")
PG_SERVER = os.environ.get("DISTILL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("DISTILL_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.shared_data("trec/train.jsonl", ...)`: skip, naming the missing files,
    when the real data is not beside the checkout."""
    marker = item.get_closest_marker("shared_data")
    if marker is None:
        return
    if not marker.args:
        raise pytest.UsageError(f"{item.nodeid}: shared_data needs the files it reads")
    missing = [str(SHARED_DATA / name) for name in marker.args if not (SHARED_DATA / name).exists()]
    if missing:
        pytest.skip(
            f"needs {', '.join(missing)} (real data beside CI's checkout; absent in a clone)"
        )


@contextlib.contextmanager
def fresh_database(prefix: str = "distill_test") -> Iterator[str]:
    """Create an empty database and drop it afterwards; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        upgrade_database(url)
        yield url


@pytest.fixture(scope="session")
def engine(pg_url: str) -> Iterator[Engine]:
    eng = make_engine(pg_url)
    yield eng
    eng.dispose()


@pytest.fixture
def db_session(engine: Engine) -> Iterator[Session]:
    connection = engine.connect()
    outer = connection.begin()
    session = Session(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    session.info[SENDER] = RecordingTaskSender()
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        connection.close()


@pytest.fixture
def settings(pg_url: str) -> Settings:
    return Settings(
        database=DatabaseSettings(url=pg_url),
        broker=BrokerSettings(url=None),
        api=ApiSettings(allow_private_teacher_urls=False, max_upload_bytes=8 * 1024 * 1024),
    )


@pytest.fixture
def sender() -> RecordingTaskSender:
    return RecordingTaskSender()


@pytest.fixture
def client(
    db_session: Session, settings: Settings, sender: RecordingTaskSender
) -> Iterator[TestClient]:
    app = create_app(
        settings,
        sessions=lambda: contextlib.nullcontext(db_session),  # type: ignore[arg-type,return-value]
        task_sender=sender,
    )
    with TestClient(app) as c:
        yield c


def make_key(session: Session, tenant: str) -> dict[str, str]:
    _, plain = create_api_key(session, get_or_create_tenant(session, tenant))
    session.commit()
    return {"Authorization": f"Bearer {plain}"}


@pytest.fixture
def auth(db_session: Session) -> dict[str, str]:
    return make_key(db_session, f"tenant-a-{uuid.uuid4().hex[:6]}")


@pytest.fixture
def other_auth(db_session: Session) -> dict[str, str]:
    return make_key(db_session, f"tenant-b-{uuid.uuid4().hex[:6]}")
