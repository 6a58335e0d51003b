"""Jobs over REST: creation from a spec, idempotency, state changes, listing, tenancy."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.domain.statuses import IterationStatus
from service.jobs import STUDENT_PRIVATE_KEY
from service.models import Iteration, Job
from service.settings import Settings
from service.tasks import JOB_START, RecordingTaskSender

SEED = b"".join(
    f'{{"text": "question {i} about {lab}", "label": "{lab}"}}\n'.encode()
    for i in range(6)
    for lab in ("HUM", "LOC", "NUM")
)


@pytest.fixture
def spec(client: TestClient, auth: dict[str, str], settings: Settings) -> dict[str, Any]:
    settings.api.allow_private_teacher_urls = True
    ds = client.post(
        "/v1/datasets", content=SEED, headers={**auth, "Content-Type": "application/x-ndjson"}
    ).json()
    teacher = client.post(
        "/v1/teachers",
        json={"name": "t", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
        headers=auth,
    ).json()
    return {
        "name": "trec-pgkd",
        "strategy": "pgkd",
        "task": {"kind": "classification", "instructions": "Classify the question."},
        "datasets": {"train": ds["id"]},
        "teacher": teacher["id"],
        "student": {"type": "builtin", "model": "tfidf"},
        "budget": {"max_iterations": 2},
    }


def test_create_job_infers_labels_and_enqueues_start(
    client: TestClient, auth: dict[str, str], spec: dict[str, Any], sender: RecordingTaskSender
) -> None:
    resp = client.post("/v1/jobs", json=spec, headers=auth)
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["status"] == "queued"
    assert job["spec"]["task"]["labels"] == ["HUM", "LOC", "NUM"]
    assert job["spec"]["params"]  # strategy defaults filled in
    assert [m.name for m in sender.sent] == [JOB_START]
    assert sender.sent[0].args == (job["id"],)
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["id"] == job["id"]


def test_idempotency_key_replays_and_conflicts(
    client: TestClient, auth: dict[str, str], spec: dict[str, Any], sender: RecordingTaskSender
) -> None:
    headers = {**auth, "Idempotency-Key": "abc-1"}
    first = client.post("/v1/jobs", json=spec, headers=headers)
    second = client.post("/v1/jobs", json=spec, headers=headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    assert len(sender.sent) == 1
    changed = client.post("/v1/jobs", json={**spec, "name": "other"}, headers=headers)
    assert changed.status_code == 409


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"strategy": "nope"}, "strategy"),
        ({"budget": {"max_iterations": 0}}, "budget.max_iterations"),
        ({"datasets": {"train": "00000000-0000-0000-0000-000000000000"}}, "datasets.train"),
        ({"teacher": "00000000-0000-0000-0000-000000000000"}, "teacher"),
        ({"params": {"examples_per_target": -1}}, "params"),
        ({"task": {"instructions": "x", "input_field": "question"}}, "datasets.train"),
    ],
)
def test_bad_specs_are_422_naming_the_field(
    client: TestClient,
    auth: dict[str, str],
    spec: dict[str, Any],
    change: dict[str, Any],
    field: str,
) -> None:
    resp = client.post("/v1/jobs", json={**spec, **change}, headers=auth)
    assert resp.status_code == 422, resp.text
    details = resp.json()["error"]["details"]
    assert any(d["field"].startswith(field) for d in details), details


def test_pause_resume_cancel_transitions(
    client: TestClient, auth: dict[str, str], spec: dict[str, Any]
) -> None:
    job = client.post("/v1/jobs", json=spec, headers=auth).json()
    paused = client.post(f"/v1/jobs/{job['id']}/pause", headers=auth)
    assert paused.status_code == 202 and paused.json()["status"] == "paused"
    assert client.post(f"/v1/jobs/{job['id']}/pause", headers=auth).status_code == 409
    resumed = client.post(f"/v1/jobs/{job['id']}/resume", headers=auth)
    assert resumed.json()["status"] == "queued"  # never started: back to the queue
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job['id']}/resume", headers=auth)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"


def test_a_finished_job_can_be_deleted_and_frees_its_teacher(
    client: TestClient,
    auth: dict[str, str],
    other_auth: dict[str, str],
    spec: dict[str, Any],
    db_session: Session,
) -> None:
    job = client.post("/v1/jobs", json=spec, headers=auth).json()
    url = f"/v1/jobs/{job['id']}"
    running = client.delete(url, headers=auth)
    assert running.status_code == 409 and "cancel it first" in running.json()["error"]["message"]
    in_use = client.delete(f"/v1/teachers/{spec['teacher']}", headers=auth)
    assert in_use.status_code == 409
    client.post(f"{url}/cancel", headers=auth)
    db_session.add(
        Iteration(job_id=uuid.UUID(job["id"]), number=0, status=IterationStatus.completed)
    )
    db_session.flush()
    assert db_session.scalar(select(func.count()).select_from(Iteration)) == 1
    assert client.delete(url, headers=other_auth).status_code == 404  # another tenant's job
    assert client.delete(url, headers=auth).status_code == 204
    assert client.get(url, headers=auth).status_code == 404
    assert db_session.scalar(select(func.count()).select_from(Iteration)) == 0
    assert client.delete(f"/v1/teachers/{spec['teacher']}", headers=auth).status_code == 204


def test_list_filters_paginates_and_isolates_tenants(
    client: TestClient, auth: dict[str, str], other_auth: dict[str, str], spec: dict[str, Any]
) -> None:
    ids = [
        client.post("/v1/jobs", json={**spec, "name": f"j{i}"}, headers=auth).json()["id"]
        for i in range(3)
    ]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth)
    page = client.get("/v1/jobs", params={"limit": 2}, headers=auth).json()
    assert [j["id"] for j in page["items"]] == [ids[2], ids[1]]
    rest = client.get("/v1/jobs", params={"cursor": page["next_cursor"]}, headers=auth).json()
    assert [j["id"] for j in rest["items"]] == [ids[0]]
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}, headers=auth).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[0]]
    assert client.get("/v1/jobs", headers=other_auth).json()["items"] == []
    assert client.get(f"/v1/jobs/{ids[1]}", headers=other_auth).status_code == 404
    assert client.get(f"/v1/jobs/{ids[1]}/examples", headers=other_auth).status_code == 404
    assert client.get(f"/v1/jobs/{ids[1]}/iterations", headers=auth).json() == []


def test_job_schema_is_published(client: TestClient) -> None:
    schema = client.get("/v1/schemas/job").json()
    assert schema["title"] == "JobSpec"
    assert {"name", "strategy", "task", "datasets", "teacher"} <= set(schema["required"])


def test_openapi_documents_bearer_auth(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert "/v1/jobs/{job_id}/examples" in spec["paths"]


def test_a_jobs_teacher_and_endpoint_student_are_held_to_the_key_and_address_guards(
    client: TestClient,
    auth: dict[str, str],
    spec: dict[str, Any],
    settings: Settings,
    db_session: Session,
) -> None:
    settings.api.allow_private_teacher_urls = False
    public = {"base_url": "https://93.184.215.14/v1", "model": "m"}

    def refused(changes: dict[str, Any]) -> dict[str, Any]:
        resp = client.post("/v1/jobs", json={**spec, **changes}, headers=auth)
        assert resp.status_code == 422, resp.text
        error: dict[str, Any] = resp.json()["error"]
        return error

    inline = refused({"teacher": {**public, "api_key_env": "DISTILL_SECRET_KEY"}})
    assert inline["code"] == "key_env_not_allowed"
    assert inline["details"][0]["field"] == "teacher.api_key_env"

    # A served student gets every validation row and its answers are stored: it may not point
    # inside the network, nor carry a variable it may not have.
    student = {"type": "endpoint", "model": "s"}
    private = refused({"student": {**student, "base_url": "http://127.0.0.1:9/v1"}})
    assert private["code"] == "private_address"
    assert private["details"][0]["field"] == "student.base_url"
    metadata = refused({"student": {**student, "base_url": "http://169.254.169.254/v1"}})
    assert metadata["details"][0]["field"] == "student.base_url"
    keyed = refused({"student": {**student, **public, "model": "s", "api_key_env": "DATABASE_URL"}})
    assert keyed["details"][0]["field"] == "student.api_key_env"

    # What the operator allows passes.
    settings.api.key_env_allowlist = ["STUDENT_KEY=93.184.215.14"]
    ok = client.post(
        "/v1/jobs",
        json={**spec, "student": {**student, **public, "model": "s", "api_key_env": "STUDENT_KEY"}},
        headers=auth,
    )
    assert ok.status_code == 201, ok.text
    # The workers check every connection to it (a name may resolve elsewhere later): the job
    # records that its URL was not allowed a private address; an allowed one records so.
    stored = db_session.get(Job, uuid.UUID(ok.json()["id"]))
    assert stored is not None and stored.spec[STUDENT_PRIVATE_KEY] is False
    assert STUDENT_PRIVATE_KEY not in ok.json()["spec"]  # the tenant never sees it
    settings.api.teacher_host_allowlist = ["127.0.0.1"]
    allowed = client.post(
        "/v1/jobs",
        json={**spec, "student": {**student, "base_url": "http://127.0.0.1:9/v1"}},
        headers=auth,
    )
    assert allowed.status_code == 201, allowed.text
    stored = db_session.get(Job, uuid.UUID(allowed.json()["id"]))
    assert stored is not None and stored.spec[STUDENT_PRIVATE_KEY] is True
