"""Uploads under abuse: memory that does not grow with the row count, nothing stored (and no
work done) after the client went away, and a retried upload that stores nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tracemalloc
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.api.app import create_app
from service.models import Dataset, DatasetRow
from service.settings import Settings
from service.tasks import RecordingTaskSender


def _tiny_rows(n: int) -> bytes:
    return b"".join(b'{"t":"r%d","l":"a"}\n' % i for i in range(n))


def test_an_upload_of_many_tiny_rows_takes_memory_independent_of_its_row_count(
    client: TestClient, auth: dict[str, str], db_session: Session
) -> None:
    body = _tiny_rows(60_000)  # 1.3 MB; the 1,000,000 rows took 1.9 GB
    tracemalloc.start()
    try:
        resp = client.post(
            "/v1/datasets",
            params={"name": "tiny"},
            content=body,
            headers={**auth, "Content-Type": "application/x-ndjson"},
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resp.status_code == 201, resp.text
    assert resp.json()["row_count"] == 60_000
    # The body itself (held by the test client) plus chunks of rows: not rows x overhead.
    assert peak < 4 * len(body) + 12_000_000, f"peak {peak / 1e6:.1f} MB"
    stored = db_session.scalar(
        select(func.count())
        .select_from(DatasetRow)
        .where(DatasetRow.dataset_id == resp.json()["id"])
    )
    assert stored == 60_000


def test_a_client_that_goes_away_mid_upload_leaves_nothing_stored(
    db_session: Session, settings: Settings, auth: dict[str, str]
) -> None:
    app = create_app(
        settings,
        sessions=lambda: contextlib.nullcontext(db_session),  # type: ignore[arg-type,return-value]
        task_sender=RecordingTaskSender(),
    )
    before = db_session.scalar(select(func.count()).select_from(Dataset))
    chunk = _tiny_rows(5_000)
    sent: list[dict[str, Any]] = []
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        if received <= 3:  # three chunks of a longer body, then the connection drops
            return {"type": "http.request", "body": chunk, "more_body": True}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/datasets",
        "raw_path": b"/v1/datasets",
        "query_string": b"name=gone",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/x-ndjson"),
            (b"authorization", auth["Authorization"].encode()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 422  # never a 500; nobody is there to read it anyway
    assert db_session.scalar(select(func.count()).select_from(Dataset)) == before
    assert (
        db_session.scalar(select(func.count()).select_from(Dataset).where(Dataset.name == "gone"))
        == 0
    )


def test_a_retried_upload_is_the_same_dataset(
    client: TestClient, auth: dict[str, str], db_session: Session
) -> None:
    body = b"".join(json.dumps({"text": f"q{i}", "label": "a"}).encode() + b"\n" for i in range(50))
    headers = {**auth, "Content-Type": "application/x-ndjson"}
    first = client.post("/v1/datasets", params={"name": "seed"}, content=body, headers=headers)
    again = client.post("/v1/datasets", params={"name": "seed"}, content=body, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert (
        db_session.scalar(select(func.count()).select_from(Dataset).where(Dataset.name == "seed"))
        == 1
    )
    # Other content, or another name, is another dataset.
    other = client.post("/v1/datasets", params={"name": "seed2"}, content=body, headers=headers)
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
