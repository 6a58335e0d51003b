"""API keys over REST: job-scoped keys (a CI secret), expiry, listing and revocation."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from service.api.app import create_app
from service.auth import JOB_KEY_OPERATIONS
from service.models import ApiKey, utcnow
from service.settings import Settings
from service.tasks import RecordingTaskSender

SEED = b"".join(
    f'{{"text": "question {i} about {lab}", "label": "{lab}"}}\n'.encode()
    for i in range(6)
    for lab in ("HUM", "LOC", "NUM")
)


@pytest.fixture
def jobs(client: TestClient, auth: dict[str, str], settings: Settings) -> tuple[str, str, str]:
    """Two jobs of the tenant, and the teacher they use."""
    settings.api.allow_private_teacher_urls = True
    ds = client.post(
        "/v1/datasets", content=SEED, headers={**auth, "Content-Type": "application/x-ndjson"}
    ).json()
    teacher = client.post(
        "/v1/teachers",
        json={"name": "t", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
        headers=auth,
    ).json()
    spec = {
        "strategy": "pgkd",
        "task": {"instructions": "Classify the question."},
        "datasets": {"train": ds["id"]},
        "teacher": teacher["id"],
        "student": {"type": "builtin", "model": "tfidf"},
    }
    a = client.post("/v1/jobs", json={**spec, "name": "a"}, headers=auth).json()["id"]
    b = client.post("/v1/jobs", json={**spec, "name": "b"}, headers=auth).json()["id"]
    return a, b, teacher["id"]


def _key(client: TestClient, auth: dict[str, str], **body: Any) -> dict[str, Any]:
    resp = client.post("/v1/keys", json=body, headers=auth)
    assert resp.status_code == 201, resp.text
    created: dict[str, Any] = resp.json()
    return created


def _bearer(key: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}"}


def test_a_job_scoped_key_reads_and_refreshes_its_job_and_nothing_else(
    client: TestClient, auth: dict[str, str], jobs: tuple[str, str, str]
) -> None:
    a, b, teacher = jobs
    created = _key(client, auth, name="ci", job_id=a)
    assert created["key"].startswith("dst_") and created["job_id"] == a
    ci = _bearer(created)

    # Its own job: the reads, feedback, exports and the refresh itself are let through.
    assert client.get(f"/v1/jobs/{a}", headers=ci).status_code == 200
    assert client.get(f"/v1/jobs/{a}/iterations", headers=ci).status_code == 200
    assert client.get(f"/v1/jobs/{a}/examples", headers=ci).status_code == 200
    assert client.get(f"/v1/jobs/{a}/evaluation-rows", headers=ci).status_code == 200
    assert client.get(f"/v1/jobs/{a}/refreshes", headers=ci).status_code == 200
    refresh = client.post(f"/v1/jobs/{a}/refresh", headers=ci)
    assert refresh.status_code == 409  # allowed, but the job has not started yet
    assert "not started" in refresh.json()["error"]["message"]
    export = client.post(f"/v1/jobs/{a}/exports", json={"format": "jsonl"}, headers=ci)
    assert export.status_code == 202
    assert client.get(f"/v1/exports/{export.json()['id']}", headers=ci).status_code == 200

    # Another job of the same tenant does not exist for it.
    for method, path in (
        ("GET", f"/v1/jobs/{b}"),
        ("GET", f"/v1/jobs/{b}/iterations"),
        ("POST", f"/v1/jobs/{b}/refresh"),
        ("POST", f"/v1/jobs/{b}/cancel"),
        ("GET", f"/v1/jobs/{uuid.uuid4()}"),
        ("GET", "/v1/jobs/not-a-uuid"),
    ):
        resp = client.request(method, path, headers=ci)
        assert resp.status_code == 404, (method, path, resp.text)
    other_export = client.post(f"/v1/jobs/{b}/exports", json={"format": "jsonl"}, headers=auth)
    assert client.get(f"/v1/exports/{other_export.json()['id']}", headers=ci).status_code == 404

    # Anything else the tenant could do is refused: 403 in the one error shape.
    for method, path, body in (
        ("POST", "/v1/jobs", {"name": "x"}),
        ("GET", "/v1/jobs", None),
        ("POST", "/v1/teachers", {"name": "t2", "base_url": "http://x/v1", "model": "m"}),
        ("GET", f"/v1/teachers/{teacher}", None),
        ("GET", "/v1/datasets", None),
        ("POST", f"/v1/jobs/{a}/cancel", None),
        ("POST", f"/v1/jobs/{a}/pause", None),
        ("DELETE", f"/v1/jobs/{a}", None),
        ("POST", "/v1/keys", {"job_id": a}),
        ("GET", "/v1/keys", None),
        ("POST", "/v1/webhooks", {"url": "https://example.com", "events": ["job.completed"]}),
    ):
        resp = client.request(method, path, json=body, headers=ci)
        assert resp.status_code == 403, (method, path, resp.text)
        assert resp.json()["error"]["code"] == "forbidden"
    assert client.get(f"/v1/jobs/{a}", headers=auth).json()["status"] == "queued"


def test_every_operation_a_job_key_may_call_is_a_route(settings: Settings) -> None:
    paths = create_app(settings, task_sender=RecordingTaskSender()).openapi()["paths"]
    routes = {(method.upper(), path) for path, ops in paths.items() for method in ops}
    assert routes >= JOB_KEY_OPERATIONS, JOB_KEY_OPERATIONS - routes


def test_revoked_and_expired_keys_are_refused(
    client: TestClient, auth: dict[str, str], jobs: tuple[str, str, str], db_session: Session
) -> None:
    a, _, _ = jobs
    scoped = _key(client, auth, name="ci", job_id=a, expires_in_s=3600)
    assert scoped["expires_at"] is not None
    assert client.get(f"/v1/jobs/{a}", headers=_bearer(scoped)).status_code == 200

    listed = client.get("/v1/keys", headers=auth).json()
    assert scoped["id"] in [k["id"] for k in listed]
    assert all("key" not in k for k in listed)

    revoked = client.post(f"/v1/keys/{scoped['id']}/revoke", headers=auth)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    refused = client.get(f"/v1/jobs/{a}", headers=_bearer(scoped))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "key_revoked"
    again = client.post(f"/v1/keys/{scoped['id']}/revoke", headers=auth)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]

    expiring = _key(client, auth, name="short", expires_in_s=60)
    assert client.get("/v1/jobs", headers=_bearer(expiring)).status_code == 200
    db_session.execute(
        update(ApiKey)
        .where(ApiKey.id == uuid.UUID(expiring["id"]))
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )
    db_session.commit()
    expired = client.get("/v1/jobs", headers=_bearer(expiring))
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "key_expired"
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer dst_nope"}).status_code == 401


def test_key_requests_are_checked(
    client: TestClient,
    auth: dict[str, str],
    other_auth: dict[str, str],
    jobs: tuple[str, str, str],
) -> None:
    a, _, _ = jobs
    # Another tenant cannot mint a key for this job, nor revoke this tenant's keys.
    resp = client.post("/v1/keys", json={"job_id": a}, headers=other_auth)
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"] == "job_id"
    mine = _key(client, auth)
    assert client.post(f"/v1/keys/{mine['id']}/revoke", headers=other_auth).status_code == 404
    past = (utcnow() - timedelta(days=1)).isoformat()
    for body in (
        {"expires_at": past},
        {"expires_in_s": 0},
        {"expires_in_s": 60, "expires_at": (utcnow() + timedelta(days=1)).isoformat()},
        {"name": ""},
        {"scope": "all"},
    ):
        assert client.post("/v1/keys", json=body, headers=auth).status_code == 422, body
