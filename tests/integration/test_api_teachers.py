"""Teachers over REST: keys are write-only, the SSRF guard, updates and deletion."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.models import Teacher
from service.settings import Settings
from workers.steps.generate import endpoint_for

PUBLIC = {"name": "hosted", "base_url": "https://93.184.215.14/v1", "model": "gpt-x"}


def test_create_never_returns_the_key(client: TestClient, auth: dict[str, str]) -> None:
    resp = client.post("/v1/teachers", json={**PUBLIC, "api_key": "sk-secret"}, headers=auth)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["has_api_key"] is True
    assert "sk-secret" not in resp.text
    assert "api_key" not in body
    got = client.get(f"/v1/teachers/{body['id']}", headers=auth)
    assert "sk-secret" not in got.text
    assert got.json()["limits"]["max_concurrency"] == 16


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/v1",
        "http://169.254.169.254/latest",
        "http://10.0.0.5/v1",
        "http://localhost:9/v1",
        "ftp://example.org/v1",
        # Not private in RFC 1918's sense, but no tenant's business either (issue 11): a cloud
        # metadata address in shared address space, the rest of 100.64.0.0/10, benchmarking
        # and IETF ranges, an IPv4-mapped private address, and metadata service names.
        "http://100.100.100.200/latest/meta-data",
        "http://100.64.12.7/v1",
        "http://198.18.0.1/v1",
        "http://192.0.0.8/v1",
        "http://[::ffff:10.0.0.1]/v1",
        "http://metadata.google.internal/computeMetadata/v1",
        "http://instance-data/latest",
    ],
)
def test_tenants_cannot_point_a_teacher_at_private_addresses(
    client: TestClient, auth: dict[str, str], url: str
) -> None:
    resp = client.post("/v1/teachers", json={**PUBLIC, "base_url": url}, headers=auth)
    assert resp.status_code == 422
    assert resp.json()["error"]["details"][0]["field"] == "base_url"


def test_operator_setting_allows_private_addresses(
    client: TestClient, auth: dict[str, str], settings: Settings, db_session: Session
) -> None:
    settings.api.allow_private_teacher_urls = True
    resp = client.post(
        "/v1/teachers", json={**PUBLIC, "base_url": "http://127.0.0.1:8000/v1"}, headers=auth
    )
    assert resp.status_code == 201
    teacher = db_session.get(Teacher, uuid.UUID(resp.json()["id"]))
    assert teacher is not None and teacher.allow_private_network


def test_a_tenants_teacher_is_held_to_public_addresses_at_connect_time(
    client: TestClient, auth: dict[str, str], db_session: Session
) -> None:
    resp = client.post("/v1/teachers", json=PUBLIC, headers=auth)
    assert resp.status_code == 201
    teacher = db_session.get(Teacher, uuid.UUID(resp.json()["id"]))
    assert teacher is not None and not teacher.allow_private_network
    assert endpoint_for(teacher).public_only


def test_validation_errors_name_the_field(client: TestClient, auth: dict[str, str]) -> None:
    resp = client.post(
        "/v1/teachers", json={**PUBLIC, "limits": {"max_concurrency": 0}}, headers=auth
    )
    assert resp.status_code == 422
    assert resp.json()["error"]["details"][0]["field"] == "limits.max_concurrency"


def test_update_list_delete_and_tenancy(
    client: TestClient, auth: dict[str, str], other_auth: dict[str, str]
) -> None:
    teacher = client.post("/v1/teachers", json=PUBLIC, headers=auth).json()
    assert teacher["has_api_key"] is False
    patched = client.patch(
        f"/v1/teachers/{teacher['id']}",
        json={"model": "gpt-y", "prices": {"input_per_million": 1.5, "output_per_million": 6}},
        headers=auth,
    )
    assert patched.status_code == 200
    assert patched.json()["model"] == "gpt-y"
    assert patched.json()["prices"]["output_per_million"] == 6
    dup = client.post("/v1/teachers", json=PUBLIC, headers=auth)
    assert dup.status_code == 409
    assert [t["id"] for t in client.get("/v1/teachers", headers=auth).json()["items"]] == [
        teacher["id"]
    ]
    assert client.get(f"/v1/teachers/{teacher['id']}", headers=other_auth).status_code == 404
    assert client.delete(f"/v1/teachers/{teacher['id']}", headers=other_auth).status_code == 404
    assert client.delete(f"/v1/teachers/{teacher['id']}", headers=auth).status_code == 204
    assert client.get(f"/v1/teachers/{teacher['id']}", headers=auth).status_code == 404


def test_replicas_are_stored_checked_one_by_one_and_reach_the_gateway(
    client: TestClient, auth: dict[str, str], db_session: Session
) -> None:
    replicas = ["https://93.184.215.15/v1/", "https://93.184.215.16/v1"]
    resp = client.post("/v1/teachers", json={**PUBLIC, "replica_urls": replicas}, headers=auth)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["replica_urls"] == ["https://93.184.215.15/v1", "https://93.184.215.16/v1"]
    teacher = db_session.get(Teacher, uuid.UUID(body["id"]))
    assert teacher is not None
    assert endpoint_for(teacher).replica_urls == body["replica_urls"]

    # Each replica passes the base_url's SSRF check, and the error names which one failed.
    bad = client.patch(
        f"/v1/teachers/{body['id']}",
        json={"replica_urls": ["https://93.184.215.15/v1", "http://10.0.0.5/v1"]},
        headers=auth,
    )
    assert bad.status_code == 422
    assert bad.json()["error"]["details"][0]["field"] == "replica_urls[1]"
    repeated = client.patch(
        f"/v1/teachers/{body['id']}", json={"replica_urls": [PUBLIC["base_url"]]}, headers=auth
    )
    assert repeated.status_code == 422
    assert repeated.json()["error"]["details"][0]["field"] == "replica_urls[0]"
    too_many = client.patch(
        f"/v1/teachers/{body['id']}",
        json={"replica_urls": [f"https://93.184.215.{i}/v1" for i in range(17)]},
        headers=auth,
    )
    assert too_many.status_code == 422
    assert too_many.json()["error"]["details"][0]["field"] == "replica_urls"
    cleared = client.patch(f"/v1/teachers/{body['id']}", json={"replica_urls": []}, headers=auth)
    assert cleared.status_code == 200
    assert cleared.json()["replica_urls"] == []


def test_a_tenant_names_only_allowed_key_variables_and_only_for_their_hosts(
    client: TestClient, auth: dict[str, str], settings: Settings, db_session: Session
) -> None:
    # The workers would send the variable's value to the tenant's URL: DISTILL_SECRET_KEY
    # next to a server of the tenant's own is refused, and nothing is stored.
    stolen = client.post(
        "/v1/teachers", json={**PUBLIC, "api_key_env": "DISTILL_SECRET_KEY"}, headers=auth
    )
    assert stolen.status_code == 422
    error = stolen.json()["error"]
    assert error["code"] == "key_env_not_allowed"
    assert error["details"][0]["field"] == "api_key_env"
    assert "DISTILL_API__KEY_ENV_ALLOWLIST" in error["message"]
    assert db_session.query(Teacher).filter_by(name=PUBLIC["name"]).count() == 0

    # The operator lets tenants send OPENAI_API_KEY to PUBLIC's host only.
    settings.api.key_env_allowlist = ["OPENAI_API_KEY=93.184.215.14"]
    created = client.post(
        "/v1/teachers", json={**PUBLIC, "api_key_env": "OPENAI_API_KEY"}, headers=auth
    )
    assert created.status_code == 201, created.text
    teacher_id = created.json()["id"]
    elsewhere = client.post(
        "/v1/teachers",
        json={
            **PUBLIC,
            "name": "split",
            "api_key_env": "OPENAI_API_KEY",
            "replica_urls": ["https://93.184.215.15/v1"],
        },
        headers=auth,
    )
    assert elsewhere.status_code == 422
    assert "not to '93.184.215.15'" in elsewhere.json()["error"]["message"]

    # Moving the teacher would carry the key elsewhere: refused, the teacher unchanged; a change
    # that keeps its URL is fine.
    moved = client.patch(
        f"/v1/teachers/{teacher_id}", json={"base_url": "https://93.184.215.15/v1"}, headers=auth
    )
    assert moved.status_code == 422
    assert moved.json()["error"]["code"] == "key_env_not_allowed"
    assert (
        client.get(f"/v1/teachers/{teacher_id}", headers=auth).json()["base_url"]
        == (PUBLIC["base_url"])
    )
    renamed = client.patch(f"/v1/teachers/{teacher_id}", json={"model": "gpt-z"}, headers=auth)
    assert renamed.status_code == 200
    swapped = client.patch(
        f"/v1/teachers/{teacher_id}", json={"api_key_env": "DATABASE_URL"}, headers=auth
    )
    assert swapped.status_code == 422
