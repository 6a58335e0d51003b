"""Datasets over REST on real Postgres: upload, line-numbered errors, limits, tenancy."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import Dataset, DatasetRow
from service.settings import Settings
from tests.data_factory import question_rows, to_jsonl


def test_upload_of_thousands_of_rows_stores_every_row(
    client: TestClient, auth: dict[str, str], db_session: Session
) -> None:
    data = to_jsonl(question_rows(909))  # 5,454 rows, TREC train's size
    resp = client.post(
        "/v1/datasets",
        params={"name": "questions-train"},
        content=data,
        headers={**auth, "Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["row_count"] == 5454
    assert set(body["fields"]) >= {"text", "label"}
    assert len(body["content_hash"]) == 64
    stored = db_session.scalar(
        select(func.count()).select_from(DatasetRow).where(DatasetRow.dataset_id == body["id"])
    )
    assert stored == 5454

    detail = client.get(f"/v1/datasets/{body['id']}", params={"preview": 3}, headers=auth)
    assert detail.status_code == 200
    first = json.loads(data.splitlines()[0])
    assert detail.json()["preview"][0]["data"] == first
    assert len(detail.json()["preview"]) == 3


def test_multipart_upload(client: TestClient, auth: dict[str, str]) -> None:
    content = b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'
    resp = client.post(
        "/v1/datasets", files={"file": ("seed.jsonl", content, "application/jsonl")}, headers=auth
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["row_count"] == 2
    assert resp.json()["name"] == "seed.jsonl"


def test_broken_line_three_is_named_and_nothing_is_stored(
    client: TestClient, auth: dict[str, str], db_session: Session
) -> None:
    before = db_session.scalar(select(func.count()).select_from(Dataset))
    content = b'{"text": "ok", "label": "a"}\n{"text": "ok2", "label": "b"}\n{"text": broken\n'
    resp = client.post(
        "/v1/datasets",
        content=content,
        headers={**auth, "Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "invalid_jsonl"
    assert error["details"][0]["line"] == 3
    assert "line 3" in error["message"]
    assert db_session.scalar(select(func.count()).select_from(Dataset)) == before


def test_non_object_and_empty_uploads_are_rejected(
    client: TestClient, auth: dict[str, str]
) -> None:
    headers = {**auth, "Content-Type": "application/x-ndjson"}
    resp = client.post("/v1/datasets", content=b'{"a": 1}\n[1, 2]\n', headers=headers)
    assert resp.status_code == 422
    assert resp.json()["error"]["details"][0] == {
        "line": 2,
        "message": "each line must be a JSON object",
    }
    assert client.post("/v1/datasets", content=b"\n\n", headers=headers).status_code == 422


def test_upload_over_the_limit_is_413(client: TestClient, auth: dict[str, str]) -> None:
    big = b'{"text": "' + b"x" * (9 * 1024 * 1024) + b'"}\n'
    resp = client.post(
        "/v1/datasets", content=big, headers={**auth, "Content-Type": "application/x-ndjson"}
    )
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"


def test_no_key_is_401_and_bad_key_is_401(client: TestClient) -> None:
    resp = client.get("/v1/datasets")
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthorized"
    resp = client.get("/v1/datasets", headers={"Authorization": "Bearer dst_nope"})
    assert resp.status_code == 401


def test_other_tenant_gets_404(
    client: TestClient, auth: dict[str, str], other_auth: dict[str, str]
) -> None:
    resp = client.post(
        "/v1/datasets",
        content=b'{"text": "a", "label": "x"}\n',
        headers={**auth, "Content-Type": "application/x-ndjson"},
    )
    dataset_id = resp.json()["id"]
    assert client.get(f"/v1/datasets/{dataset_id}", headers=auth).status_code == 200
    other = client.get(f"/v1/datasets/{dataset_id}", headers=other_auth)
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "not_found"
    assert client.get("/v1/datasets", headers=other_auth).json()["items"] == []


def test_delete_removes_the_rows_and_is_refused_while_a_job_uses_the_dataset(
    client: TestClient,
    auth: dict[str, str],
    other_auth: dict[str, str],
    db_session: Session,
    settings: Settings,
) -> None:
    ndjson = {**auth, "Content-Type": "application/x-ndjson"}
    # 5 rows a class or more, so a job can hold a validation split out of them.
    unused = client.post("/v1/datasets", content=to_jsonl(question_rows(5)), headers=ndjson).json()[
        "id"
    ]
    used = client.post("/v1/datasets", content=to_jsonl(question_rows(6)), headers=ndjson).json()[
        "id"
    ]
    assert unused != used
    settings.api.allow_private_teacher_urls = True
    job = client.post(
        "/v1/jobs",
        json={
            "name": "uses-it",
            "strategy": "pgkd",
            "task": {"instructions": "Classify the question."},
            "datasets": {"train": used},
            "teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
            "student": {"type": "builtin", "model": "tfidf"},
        },
        headers=auth,
    )
    assert job.status_code == 201, job.text

    # Another tenant cannot see it, let alone delete it.
    assert client.delete(f"/v1/datasets/{unused}", headers=other_auth).status_code == 404
    assert client.delete(f"/v1/datasets/{unused}", headers=auth).status_code == 204
    assert client.get(f"/v1/datasets/{unused}", headers=auth).status_code == 404
    rows = select(func.count()).select_from(DatasetRow).where(DatasetRow.dataset_id == unused)
    assert db_session.scalar(rows) == 0
    assert client.delete(f"/v1/datasets/{unused}", headers=auth).status_code == 404

    refused = client.delete(f"/v1/datasets/{used}", headers=auth)
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "conflict" and job.json()["id"] in error["message"]
    assert client.get(f"/v1/datasets/{used}", headers=auth).status_code == 200


def test_list_paginates_with_a_cursor(client: TestClient, auth: dict[str, str]) -> None:
    headers = {**auth, "Content-Type": "application/x-ndjson"}
    ids = [
        client.post("/v1/datasets", content=f'{{"t": {i}}}\n'.encode(), headers=headers).json()[
            "id"
        ]
        for i in range(5)
    ]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/datasets", params=params, headers=auth).json()
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    bad = client.get("/v1/datasets", params={"cursor": "!!"}, headers=auth)
    assert bad.status_code == 422


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["database"] == "ok"
    metrics = client.get("/metrics/")
    assert metrics.status_code == 200
    assert "python_info" in metrics.text or "process_" in metrics.text


def test_metrics_token_guards_metrics_only(tmp_path: Path) -> None:
    from service.api.app import create_app
    from service.db import make_engine, session_factory
    from service.settings import ApiSettings, DatabaseSettings, Settings

    url = f"sqlite:///{tmp_path}/m.db"
    settings = Settings(database=DatabaseSettings(url=url), api=ApiSettings(metrics_token="s3cret"))
    engine = make_engine(url)
    app = create_app(settings, sessions=session_factory(engine))
    with TestClient(app) as guarded:
        refused = guarded.get("/metrics/")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"
        wrong = guarded.get("/metrics/", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = guarded.get("/metrics/", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and "python_info" in ok.text
        assert guarded.get("/healthz").status_code == 200
    engine.dispose()
