"""The CLI's job document over REST: datasets and teachers by name, `teacher: local`, and the
operator's policy for private teacher addresses (allow-list, single-user embedded server)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.models import Job, Teacher
from service.settings import Settings
from workers.cli import local_teacher_spec
from workers.teacher.local import LOCAL_TEACHER_DEFAULTS

SEED = b"".join(
    f'{{"text": "question {i} about {lab}", "label": "{lab}"}}\n'.encode()
    for i in range(6)
    for lab in ("HUM", "LOC", "NUM")
)
NDJSON = {"Content-Type": "application/x-ndjson"}


def _upload(client: TestClient, auth: dict[str, str], name: str, data: bytes = SEED) -> str:
    resp = client.post(f"/v1/datasets?name={name}", content=data, headers={**auth, **NDJSON})
    assert resp.status_code in (200, 201), resp.text
    return str(resp.json()["id"])


def _spec(**changes: Any) -> dict[str, Any]:
    return {
        "name": "by-names",
        "strategy": "pgkd",
        "task": {"kind": "classification", "instructions": "Classify the question."},
        "datasets": {"train": "seed"},
        "teacher": "my-teacher",
        "student": {"type": "builtin", "model": "tfidf"},
        **changes,
    }


@pytest.fixture
def named_teacher(client: TestClient, auth: dict[str, str], settings: Settings) -> str:
    settings.api.teacher_host_allowlist = ["127.0.0.1"]
    resp = client.post(
        "/v1/teachers",
        json={"name": "my-teacher", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
        headers=auth,
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def test_a_job_names_its_datasets_and_teacher(
    client: TestClient, auth: dict[str, str], named_teacher: str
) -> None:
    train = _upload(client, auth, "seed")
    validation = _upload(client, auth, "held-out", SEED.replace(b"question", b"query"))
    spec = _spec(datasets={"train": "seed", "validation": "held-out"})
    resp = client.post("/v1/jobs", json=spec, headers=auth)
    assert resp.status_code == 201, resp.text
    job = resp.json()
    # Stored by id: what the job runs on, whatever is uploaded under those names later.
    assert job["spec"]["datasets"] == {"train": train, "validation": validation, "test": None}
    assert job["spec"]["teacher"] == named_teacher
    # Ids still work, and mixing the two is fine.
    by_id = client.post(
        "/v1/jobs", json=_spec(datasets={"train": train}, teacher=named_teacher), headers=auth
    )
    assert by_id.status_code == 201, by_id.text


def test_list_endpoints_filter_by_name(
    client: TestClient, auth: dict[str, str], named_teacher: str
) -> None:
    seed = _upload(client, auth, "seed")
    _upload(client, auth, "other")
    listed = client.get("/v1/datasets?name=seed", headers=auth).json()["items"]
    assert [d["id"] for d in listed] == [seed]
    teachers = client.get("/v1/teachers?name=my-teacher", headers=auth).json()["items"]
    assert [t["id"] for t in teachers] == [named_teacher]
    assert client.get("/v1/teachers?name=nope", headers=auth).json()["items"] == []


def test_an_ambiguous_dataset_name_is_refused_with_the_candidates(
    client: TestClient, auth: dict[str, str], named_teacher: str
) -> None:
    first = _upload(client, auth, "seed")
    second = _upload(client, auth, "seed", SEED.replace(b"question", b"query"))
    resp = client.post("/v1/jobs", json=_spec(), headers=auth)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "ambiguous_name"
    assert error["details"][0]["field"] == "datasets.train"
    assert error["details"][0]["candidates"] == [first, second]
    assert first in error["message"] and second in error["message"]


def test_a_dataset_name_is_per_tenant(
    client: TestClient, auth: dict[str, str], other_auth: dict[str, str], named_teacher: str
) -> None:
    _upload(client, other_auth, "seed")  # another tenant's
    resp = client.post("/v1/jobs", json=_spec(), headers=auth)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "dataset_not_found"
    assert error["details"][0]["field"] == "datasets.train"
    assert "GET /v1/datasets" in error["message"]


def test_an_unknown_teacher_names_the_field_and_where_to_look(
    client: TestClient, auth: dict[str, str], named_teacher: str
) -> None:
    _upload(client, auth, "seed")
    resp = client.post("/v1/jobs", json=_spec(teacher="vllm"), headers=auth)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "teacher_not_found"
    assert error["details"][0]["field"] == "teacher"
    assert "GET /v1/teachers" in error["message"] and "'vllm'" in error["message"]


def test_teacher_local_without_a_local_teacher_is_a_clear_422(
    client: TestClient, auth: dict[str, str]
) -> None:
    _upload(client, auth, "seed")
    resp = client.post("/v1/jobs", json=_spec(teacher="local"), headers=auth)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "no_local_teacher"
    assert error["details"][0]["field"] == "teacher"
    assert "DISTILL_API__LOCAL_TEACHER_URL" in error["message"]


def test_teacher_local_uses_the_servers_local_teacher(
    client: TestClient, auth: dict[str, str], settings: Settings, db_session: Session
) -> None:
    settings.api.local_teacher_url = "http://127.0.0.1:8181/v1"
    spec = local_teacher_spec(settings)  # what `distill serve` passes to the app
    assert spec == LOCAL_TEACHER_DEFAULTS.teacher_spec("http://127.0.0.1:8181/v1")
    client.app.state.local_teacher = spec  # type: ignore[attr-defined]
    _upload(client, auth, "seed")
    resp = client.post("/v1/jobs", json=_spec(teacher="local"), headers=auth)
    assert resp.status_code == 201, resp.text
    job = db_session.get(Job, uuid.UUID(resp.json()["id"]))
    assert job is not None
    teacher = db_session.get(Teacher, job.teacher_id)
    assert teacher is not None
    # The defaults `distill run` gives the local teacher; a loopback address the operator set.
    assert (teacher.base_url, teacher.model) == ("http://127.0.0.1:8181/v1", spec.model)
    assert teacher.limits["max_concurrency"] == 1
    assert teacher.structured_mode == spec.structured_mode.value
    assert teacher.allow_private_network


def test_a_tenants_teacher_named_local_comes_first(
    client: TestClient, auth: dict[str, str], settings: Settings
) -> None:
    settings.api.allow_private_teacher_urls = True
    mine = client.post(
        "/v1/teachers",
        json={"name": "local", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
        headers=auth,
    ).json()
    _upload(client, auth, "seed")
    resp = client.post("/v1/jobs", json=_spec(teacher="local"), headers=auth)
    assert resp.status_code == 201, resp.text
    assert resp.json()["spec"]["teacher"] == mine["id"]


@pytest.mark.parametrize(
    ("allowlist", "url", "allowed"),
    [
        (["vllm"], "http://vllm:8000/v1", True),
        (["VLLM"], "http://vllm.:8000/v1", True),
        (["vllm"], "http://127.0.0.1:8000/v1", False),
        (["10.0.0.5"], "http://10.0.0.5:8000/v1", True),
        (["10.0.0.5"], "http://10.0.0.6:8000/v1", False),
        (["10.0.0.0/8"], "http://10.20.30.40/v1", True),
        (["fd00::/8"], "http://[fd12::1]:8000/v1", True),
        ([], "http://10.0.0.5:8000/v1", False),
    ],
)
def test_the_teacher_host_allowlist(
    client: TestClient,
    auth: dict[str, str],
    settings: Settings,
    db_session: Session,
    allowlist: list[str],
    url: str,
    allowed: bool,
) -> None:
    settings.api.teacher_host_allowlist = allowlist
    resp = client.post(
        "/v1/teachers", json={"name": "t", "base_url": url, "model": "m"}, headers=auth
    )
    if not allowed:
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["code"] in ("private_address", "validation_failed")
        assert error["details"][0]["field"] == "base_url"
        return
    assert resp.status_code == 201, resp.text
    teacher = db_session.get(Teacher, uuid.UUID(resp.json()["id"]))
    assert teacher is not None and teacher.allow_private_network


def test_the_private_address_hint_names_the_allowlist(
    client: TestClient, auth: dict[str, str]
) -> None:
    resp = client.post(
        "/v1/teachers",
        json={"name": "t", "base_url": "http://127.0.0.1:8000/v1", "model": "m"},
        headers=auth,
    )
    assert resp.status_code == 422
    assert "DISTILL_API__TEACHER_HOST_ALLOWLIST" in resp.json()["error"]["message"]


def test_an_inline_job_teacher_follows_the_allowlist(
    client: TestClient, auth: dict[str, str], settings: Settings
) -> None:
    _upload(client, auth, "seed")
    inline = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
    refused = client.post("/v1/jobs", json=_spec(teacher=inline), headers=auth)
    assert refused.status_code == 422
    assert refused.json()["error"]["details"][0]["field"] == "base_url"
    settings.api.teacher_host_allowlist = ["127.0.0.1"]
    assert client.post("/v1/jobs", json=_spec(teacher=inline), headers=auth).status_code == 201


def test_patching_a_teacher_to_a_host_off_the_list_is_refused(
    client: TestClient, auth: dict[str, str], named_teacher: str, db_session: Session
) -> None:
    moved = client.patch(
        f"/v1/teachers/{named_teacher}", json={"base_url": "http://10.1.2.3/v1"}, headers=auth
    )
    assert moved.status_code == 422
    teacher = db_session.get(Teacher, uuid.UUID(named_teacher))
    assert teacher is not None and teacher.base_url == "http://127.0.0.1:9/v1"


def test_a_single_user_embedded_server_allows_a_loopback_teacher(
    client: TestClient, auth: dict[str, str], settings: Settings
) -> None:
    """No DATABASE_URL and no REDIS_URL: the laptop's server, whose one user is the operator,
    takes the snippet `distill teacher local` prints."""
    settings.database.url = None
    assert settings.single_user
    resp = client.post(
        "/v1/teachers",
        json={"name": "t", "base_url": "http://127.0.0.1:8081/v1", "model": "gemma-3-270m"},
        headers=auth,
    )
    assert resp.status_code == 201, resp.text
