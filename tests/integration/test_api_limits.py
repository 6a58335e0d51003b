"""Values the database cannot hold are 4xx in the one error shape, naming the field, and
nothing is written: strings longer than their column or holding NUL / lone surrogates,
integers beyond a Postgres integer, NaN and Infinity, unknown filter values, unknown keys."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.api.routes import teachers as teacher_routes
from service.domain.statuses import JobStatus
from service.models import Job, Prediction, Teacher
from service.settings import Settings

PUBLIC = {"name": "hosted", "base_url": "https://93.184.215.14/v1", "model": "gpt-x"}
INLINE = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
SEED = b"".join(
    f'{{"text": "question {i} about {lab}", "label": "{lab}"}}\n'.encode()
    for i in range(6)
    for lab in ("HUM", "LOC", "NUM")
)
INT_MAX = 2**31 - 1
NUL = "a\u0000b"
SURROGATE = "a\ud800b"
ROW_ID = "00000000-0000-4000-8000-000000000001"


def send(client: TestClient, method: str, url: str, auth: dict[str, str], body: Any) -> Response:
    """`body` as written: a str is sent verbatim (Infinity, NaN), anything else as ASCII JSON
    (so NUL and lone surrogates travel as \\u escapes, as a client's JSON encoder sends them)."""
    text = body if isinstance(body, str) else json.dumps(body)
    return client.request(
        method, url, content=text.encode(), headers={**auth, "Content-Type": "application/json"}
    )


def assert_error(resp: Response, status: int, code: str, field: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], list) and error["details"], error
    assert all(set(d) >= {"field", "message"} for d in error["details"]), error
    fields = [d["field"] for d in error["details"]]
    assert field in fields, error
    return error


def count(session: Session, model: type[Any]) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


@pytest.fixture
def train(client: TestClient, auth: dict[str, str], settings: Settings) -> str:
    settings.api.allow_private_teacher_urls = True
    resp = client.post(
        "/v1/datasets", content=SEED, headers={**auth, "Content-Type": "application/x-ndjson"}
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


@pytest.fixture
def teacher(client: TestClient, auth: dict[str, str]) -> dict[str, Any]:
    resp = client.post("/v1/teachers", json=PUBLIC, headers=auth)
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


def job_spec(train: str, teacher: Any, **changes: Any) -> dict[str, Any]:
    return {
        "name": "limits",
        "strategy": "pgkd",
        "task": {"kind": "classification", "instructions": "Classify the question."},
        "datasets": {"train": train},
        "teacher": teacher,
        "student": {"type": "builtin", "model": "tfidf"},
        "budget": {"max_iterations": 2},
        **changes,
    }


@pytest.fixture
def job(
    client: TestClient, auth: dict[str, str], train: str, teacher: dict[str, Any]
) -> dict[str, Any]:
    resp = client.post("/v1/jobs", json=job_spec(train, teacher["id"]), headers=auth)
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


# --- teachers -------------------------------------------------------------------------------


def test_renaming_a_teacher_to_a_taken_name_is_409(
    client: TestClient, auth: dict[str, str], db_session: Session
) -> None:
    first = client.post("/v1/teachers", json=PUBLIC, headers=auth).json()
    second = client.post("/v1/teachers", json={**PUBLIC, "name": "other"}, headers=auth).json()
    resp = client.patch(
        f"/v1/teachers/{second['id']}", json={"name": first["name"], "model": "new"}, headers=auth
    )
    error = assert_error(resp, 409, "conflict", "name")
    assert "hosted" in error["message"]
    again = client.get(f"/v1/teachers/{second['id']}", headers=auth).json()
    assert (again["name"], again["model"]) == ("other", "gpt-x")
    stored = db_session.get(Teacher, uuid.UUID(second["id"]))
    assert stored is not None and (stored.name, stored.model) == ("other", "gpt-x")


TEACHER_CASES = [
    ({"name": NUL}, "name"),
    ({"name": SURROGATE}, "name"),
    ({"name": "n" * 201}, "name"),
    ({"model": NUL}, "model"),
    ({"model": "m" * 501}, "model"),
    ({"model": ""}, "model"),
    ({"base_url": "https://93.184.215.14/" + "x" * 2000}, "base_url"),
    ({"base_url": "https://93.184.215.14/v1\u0000"}, "base_url"),
    ({"api_key": NUL}, "api_key"),
    ({"api_key": SURROGATE}, "api_key"),
    ({"api_key_env": "E" * 201}, "api_key_env"),
    ({"api_key_env": NUL}, "api_key_env"),
    ({"limits": {"metrics_url": "http://h/metrics\u0000"}}, "limits.metrics_url"),
    ('{"prices": {"input_per_million": Infinity}}', "prices.input_per_million"),
    ('{"prices": {"output_per_million": NaN}}', "prices.output_per_million"),
    ('{"prices": {"input_per_million": 1e999}}', "prices.input_per_million"),
    ('{"generation": {"temperature": NaN}}', "generation.temperature"),
    ('{"timeout_s": Infinity}', "timeout_s"),
]


def _merge(base: dict[str, Any], change: dict[str, Any] | str) -> dict[str, Any] | str:
    if isinstance(change, str):  # raw JSON: splice the base fields in front of it
        return json.dumps(base)[:-1] + ", " + change[1:] if base else change
    return {**base, **change}


@pytest.mark.parametrize(("change", "field"), TEACHER_CASES)
def test_unstorable_teacher_fields_are_422_on_create(
    client: TestClient,
    auth: dict[str, str],
    db_session: Session,
    change: dict[str, Any] | str,
    field: str,
) -> None:
    before = count(db_session, Teacher)
    resp = send(client, "POST", "/v1/teachers", auth, _merge(PUBLIC, change))
    assert_error(resp, 422, "validation_failed", field)
    assert count(db_session, Teacher) == before


@pytest.mark.parametrize(("change", "field"), TEACHER_CASES)
def test_unstorable_teacher_fields_are_422_on_update(
    client: TestClient,
    auth: dict[str, str],
    db_session: Session,
    teacher: dict[str, Any],
    change: dict[str, Any] | str,
    field: str,
) -> None:
    url = f"/v1/teachers/{teacher['id']}"
    resp = send(client, "PATCH", url, auth, _merge({}, change))
    assert_error(resp, 422, "validation_failed", field)
    after = client.get(url, headers=auth).json()
    assert {k: after[k] for k in teacher if k != "updated_at"} == {
        k: v for k, v in teacher.items() if k != "updated_at"
    }


# --- jobs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [191, 192, 199, 200])
def test_an_inline_teacher_of_a_long_job_name_fits_its_column(
    client: TestClient, auth: dict[str, str], train: str, db_session: Session, length: int
) -> None:
    name = "j" * length
    resp = client.post("/v1/jobs", json=job_spec(train, INLINE, name=name), headers=auth)
    assert resp.status_code == 201, resp.text
    stored = db_session.get(Teacher, uuid.UUID(resp.json()["spec"]["teacher"]))
    assert stored is not None
    assert len(stored.name) <= 200
    prefix, _, suffix = stored.name.rpartition("-")
    assert name.startswith(prefix) and len(suffix) == 8


JOB_CASES = [
    ({"name": NUL}, "name"),
    ({"name": SURROGATE}, "name"),
    ({"name": "n" * 201}, "name"),
    ({"teacher": NUL}, "teacher"),
    ({"task": {"instructions": NUL}}, "task.instructions"),
    ({"task": {"instructions": "x", "labels": ["HUM", "LOC", "N\u0000UM"]}}, "task.labels.2"),
    ({"task": {"instructions": "x", "input_field": "te\u0000xt"}}, "task.input_field"),
    ({"student": {"type": "builtin", "model": NUL}}, "student.model"),
    ({"teacher": {**INLINE, "model": "m" * 501}}, "teacher.TeacherSpec.model"),
    ({"teacher": {**INLINE, "model": NUL}}, "teacher.TeacherSpec.model"),
    (
        {"teacher": {**INLINE, "base_url": "http://127.0.0.1:9/" + "x" * 2000}},
        "teacher.TeacherSpec.base_url",
    ),
    ({"teacher": {**INLINE, "api_key_env": "E" * 201}}, "teacher.TeacherSpec.api_key_env"),
    (
        {"teacher": {**INLINE, "limits": {"metrics_url": "http://h/\u0000"}}},
        "teacher.TeacherSpec.limits.metrics_url",
    ),
    ({"filters": {"min_chars": 50, "max_chars": 10}}, "filters.max_chars"),
    ('{"budget": {"max_cost_usd": Infinity}}', "budget.max_cost_usd"),
    ('{"stopping": {"min_delta": Infinity}}', "stopping.min_delta"),
    (
        '{"teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "m", '
        '"prices": {"input_per_million": Infinity}}}',
        "teacher.TeacherSpec.prices.input_per_million",
    ),
]


@pytest.mark.parametrize(("change", "field"), JOB_CASES)
def test_unstorable_job_specs_are_422(
    client: TestClient,
    auth: dict[str, str],
    db_session: Session,
    train: str,
    teacher: dict[str, Any],
    change: dict[str, Any] | str,
    field: str,
) -> None:
    jobs, teachers = count(db_session, Job), count(db_session, Teacher)
    resp = send(client, "POST", "/v1/jobs", auth, _merge(job_spec(train, teacher["id"]), change))
    assert_error(resp, 422, "validation_failed", field)
    assert (count(db_session, Job), count(db_session, Teacher)) == (jobs, teachers)


@pytest.mark.parametrize("value", [INT_MAX + 1, 10**11, -1])
@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/v1/jobs/{job}/iterations/{number}", "path.number"),
        ("/v1/jobs/{job}/examples?iteration={number}", "query.iteration"),
    ],
)
def test_integers_outside_a_postgres_integer_are_422(
    client: TestClient,
    auth: dict[str, str],
    job: dict[str, Any],
    url: str,
    field: str,
    value: int,
) -> None:
    resp = client.get(url.format(job=job["id"], number=value), headers=auth)
    assert_error(resp, 422, "validation_failed", field)
    # The largest integer itself is a valid number (of an iteration that does not exist).
    within = client.get(url.format(job=job["id"], number=INT_MAX), headers=auth)
    assert within.status_code in (200, 404), within.text


def test_feedback_for_an_iteration_beyond_a_postgres_integer_is_422(
    client: TestClient, auth: dict[str, str], job: dict[str, Any], db_session: Session
) -> None:
    url = f"/v1/jobs/{job['id']}/iterations/{INT_MAX + 1}/feedback"
    resp = client.post(url, json={"predictions": []}, headers=auth)
    assert_error(resp, 422, "validation_failed", "path.number")
    assert count(db_session, Prediction) == 0


@pytest.mark.parametrize(
    ("url", "field", "allowed"),
    [
        ("/v1/jobs?strategy=bogus", "query.strategy", "pgkd"),
        ("/v1/jobs?strategy=%00", "query.strategy", "pgkd"),
        ("/v1/jobs?status=bogus", "query.status", "queued"),
        ("/v1/jobs/{job}/examples?kind=bogus", "query.kind", "hard_negative"),
        ("/v1/jobs/{job}/examples?kind=%00", "query.kind", "hard_negative"),
        ("/v1/jobs/{job}/examples?status=bogus", "query.status", "accepted"),
        ("/v1/jobs/{job}/examples?label=a%00b", "query.label", "NUL"),
    ],
)
def test_unknown_or_unstorable_filter_values_are_422(
    client: TestClient,
    auth: dict[str, str],
    job: dict[str, Any],
    url: str,
    field: str,
    allowed: str,
) -> None:
    resp = client.get(url.format(job=job["id"]), headers=auth)
    error = assert_error(resp, 422, "validation_failed", field)
    assert allowed in error["details"][0]["message"], error


def test_known_filter_values_still_filter(
    client: TestClient, auth: dict[str, str], job: dict[str, Any]
) -> None:
    listed = client.get("/v1/jobs", params={"strategy": "pgkd"}, headers=auth).json()
    assert [j["id"] for j in listed["items"]] == [job["id"]]
    assert client.get("/v1/jobs", params={"strategy": "arte"}, headers=auth).json()["items"] == []
    examples = client.get(
        f"/v1/jobs/{job['id']}/examples",
        params={"kind": "augmented", "status": "accepted", "label": "HUM", "iteration": 0},
        headers=auth,
    )
    assert examples.status_code == 200 and examples.json()["items"] == []


# --- transitions ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [JobStatus.queued, JobStatus.running])
def test_resuming_a_job_that_is_not_paused_is_409_saying_why(
    client: TestClient,
    auth: dict[str, str],
    db_session: Session,
    job: dict[str, Any],
    status: JobStatus,
) -> None:
    job_id = uuid.UUID(job["id"])
    db_session.execute(update(Job).where(Job.id == job_id).values(status=status))
    db_session.commit()
    resp = client.post(f"/v1/jobs/{job_id}/resume", headers=auth)
    error = assert_error(resp, 409, "conflict", "status")
    assert error["message"] == f"cannot resume a job that is {status.value}"
    assert "paused" in error["details"][0]["message"]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == status.value


def test_pausing_a_finished_job_names_the_status(
    client: TestClient, auth: dict[str, str], job: dict[str, Any]
) -> None:
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).status_code == 202
    resp = client.post(f"/v1/jobs/{job['id']}/pause", headers=auth)
    error = assert_error(resp, 409, "conflict", "status")
    assert error["message"] == "cannot pause a job that is cancelled"


# --- feedback -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {"predictions": [{"row_id": ROW_ID, "predicted": "HUM", "x": 1}]},
            "predictions.0.x",
        ),
        ({"predictions": [], "extra": True}, "extra"),
        (
            '{"predictions": [{"row_id": "' + ROW_ID + '", "confidence": NaN}]}',
            "predictions.0.confidence",
        ),
    ],
)
def test_feedback_with_unknown_keys_or_non_finite_numbers_is_422(
    client: TestClient,
    auth: dict[str, str],
    db_session: Session,
    job: dict[str, Any],
    body: Any,
    field: str,
) -> None:
    url = f"/v1/jobs/{job['id']}/iterations/0/feedback"
    assert_error(send(client, "POST", url, auth, body), 422, "validation_failed", field)
    assert count(db_session, Prediction) == 0


def test_jsonl_feedback_with_unknown_keys_is_422(
    client: TestClient, auth: dict[str, str], db_session: Session, job: dict[str, Any]
) -> None:
    line = json.dumps({"row_id": str(uuid.uuid4()), "predicted": "HUM", "prediction": "HUM"})
    resp = client.post(
        f"/v1/jobs/{job['id']}/iterations/0/feedback",
        content=(line + "\n").encode(),
        headers={**auth, "Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["details"][0]["line"] == 1
    assert "Extra inputs" in error["details"][0]["message"]
    assert count(db_session, Prediction) == 0


# --- the request itself ---------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/v1/teachers", "/v1/jobs"])
def test_a_body_that_is_not_json_names_the_body(
    client: TestClient, auth: dict[str, str], db_session: Session, url: str
) -> None:
    before = count(db_session, Teacher)
    resp = send(client, "POST", url, auth, '{"name": "t",')
    error = assert_error(resp, 422, "validation_failed", "body")
    assert error["message"].startswith("body: the body is not valid JSON"), error
    assert "character" in error["message"]
    assert count(db_session, Teacher) == before


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Token abc"])
def test_a_scheme_other_than_bearer_is_named(client: TestClient, header: str) -> None:
    resp = client.get("/v1/teachers", headers={"Authorization": header})
    error = assert_error(resp, 401, "unauthorized", "Authorization")
    assert "must be Bearer" in error["message"]
    assert resp.headers["WWW-Authenticate"] == "Bearer"


# --- the safety net -------------------------------------------------------------------------


def _unchecked_update(value: dict[str, Any]) -> Any:
    """An update_teacher that skips every check: what a missing validation would do."""

    def update_teacher(session: Session, teacher: Teacher, *_: Any, **__: Any) -> Teacher:
        for field, new in value.items():
            setattr(teacher, field, new)
        session.flush()
        return teacher

    return update_teacher


@pytest.mark.parametrize(
    ("value", "status", "code"),
    [
        ({"model": "m" * 501}, 422, "invalid_value"),
        ({"model": NUL}, 422, "invalid_value"),
        ({"max_attempts": INT_MAX + 1}, 422, "invalid_value"),
        ({"name": "taken"}, 409, "conflict"),
    ],
)
def test_database_errors_that_slip_through_are_4xx_and_rolled_back(
    client: TestClient,
    auth: dict[str, str],
    teacher: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    value: dict[str, Any],
    status: int,
    code: str,
) -> None:
    assert client.post("/v1/teachers", json={**PUBLIC, "name": "taken"}, headers=auth).is_success
    monkeypatch.setattr(teacher_routes, "update_teacher", _unchecked_update(value))
    url = f"/v1/teachers/{teacher['id']}"
    with caplog.at_level(logging.ERROR, logger="service.api.errors"):
        resp = client.patch(url, json={"model": "ok"}, headers=auth)
    error = assert_error(resp, status, code, "request")
    for sql in ("INSERT", "UPDATE", "SELECT", "psycopg", "teachers"):
        assert sql not in error["message"]
    assert any(r.exc_info for r in caplog.records), caplog.records
    # The session was rolled back: it still answers, and the change is gone.
    after = client.get(url, headers=auth)
    assert after.status_code == 200, after.text
    assert (after.json()["name"], after.json()["model"]) == ("hosted", "gpt-x")
