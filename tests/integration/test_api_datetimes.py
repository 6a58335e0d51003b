"""Every moment in a response is written one way, UTC with a Z: a row just created (held in
memory as UTC) and the same row read back (Postgres gives the session's offset, SQLite none)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.auth import create_api_key, get_or_create_tenant
from service.cli import upgrade_database
from service.db import make_engine, session_factory
from service.models import isoformat_utc
from service.settings import DatabaseSettings, Settings

UTC_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
SEED = b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'
NDJSON = {"Content-Type": "application/x-ndjson"}


def test_isoformat_utc() -> None:
    moment = datetime(2026, 12, 2, 14, 27, 1, 52113, tzinfo=UTC)
    assert isoformat_utc(moment) == "2026-12-02T14:27:01.052113Z"
    assert isoformat_utc(moment.replace(tzinfo=None)) == "2026-12-02T14:27:01.052113Z"
    paris = moment.astimezone(timezone(timedelta(hours=1)))
    assert isoformat_utc(paris) == "2026-12-02T14:27:01.052113Z"


def _same_moment_both_ways(client: TestClient, auth: dict[str, str]) -> None:
    created = client.post("/v1/datasets?name=d", content=SEED, headers={**auth, **NDJSON})
    assert created.status_code == 201, created.text
    read = client.get(f"/v1/datasets/{created.json()['id']}", headers=auth).json()
    listed = client.get("/v1/datasets", headers=auth).json()["items"][0]
    moments = {created.json()["created_at"], read["created_at"], listed["created_at"]}
    assert len(moments) == 1, moments
    assert UTC_Z.match(moments.pop())
    keys = client.get("/v1/keys", headers=auth).json()
    items = keys["items"] if isinstance(keys, dict) else keys
    assert items and all(UTC_Z.match(k["created_at"]) for k in items)


def test_postgres_responses_write_utc_with_z(client: TestClient, auth: dict[str, str]) -> None:
    _same_moment_both_ways(client, auth)


@pytest.fixture
def sqlite_client(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    url = f"sqlite:///{tmp_path}/d.db"
    upgrade_database(url, quiet=True)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions() as session:
        _, key = create_api_key(session, get_or_create_tenant(session, "t"))
        session.commit()
    settings = Settings(database=DatabaseSettings(url=url))
    with TestClient(create_app(settings, sessions=sessions)) as client:
        yield client, {"Authorization": f"Bearer {key}"}
    engine.dispose()


def test_sqlite_responses_write_utc_with_z(
    sqlite_client: tuple[TestClient, dict[str, str]],
) -> None:
    _same_moment_both_ways(*sqlite_client)


def test_the_openapi_document_still_says_date_time(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["DatasetRead"]
    created_at = schema["properties"]["created_at"]
    assert (created_at["type"], created_at["format"]) == ("string", "date-time")
