"""The OpenAPI document says what the API does: errors, media types, 405s, cursors, references,
summaries; /docs and /redoc work offline."""

from __future__ import annotations

import re
import uuid
from collections import Counter
from html.parser import HTMLParser
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.pagination import CURSOR_PATTERN, decode_cursor, encode_cursor


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), p, op) for p, ops in doc["paths"].items() for m, op in ops.items()]


def test_every_operation_has_a_unique_descriptive_summary_and_operation_id(
    client: TestClient,
) -> None:
    ops = _operations(client.get("/openapi.json").json())
    summaries = Counter(op["summary"] for _, _, op in ops)
    ids = Counter(op["operationId"] for _, _, op in ops)
    assert [s for s, n in summaries.items() if n > 1] == []
    assert [i for i, n in ids.items() if n > 1] == []
    # Not a bare verb ("Create", "Read") that says nothing of the resource.
    assert [s for s in summaries if len(s.split()) < 2] == []
    assert ids.keys() >= {"create_teacher", "create_job", "list_jobs", "read_job"}


def test_every_reference_resolves_inside_the_document(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    refs: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert "#/components/schemas/FeedbackBody" in refs  # a body the route parses itself
    schemas = doc["components"]["schemas"]
    unresolved = [r for r in refs if not r.startswith("#/components/schemas/")]
    unresolved += [r for r in refs if r.rpartition("/")[2] not in schemas]
    assert unresolved == []
    assert "FeedbackItem" in schemas


def test_errors_are_documented_in_the_one_error_shape(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    error_ref = "#/components/schemas/ErrorBody"
    assert doc["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    for method, path, op in _operations(doc):
        responses = op["responses"]
        if op.get("security"):  # every authenticated operation can answer 401 and 403
            assert {"401", "403"} <= responses.keys(), (method, path)
        if "{" in path:
            assert "404" in responses, (method, path)
        if "requestBody" in op:
            assert {"415", "422"} <= responses.keys(), (method, path)
        for code, response in responses.items():
            if code.startswith("4"):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": error_ref}, (method, path, code)
    export = doc["paths"]["/v1/jobs/{job_id}/export"]["get"]["responses"]["200"]["content"]
    assert set(export) == {"application/x-ndjson", "application/gzip"}


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b'{"name": "t"}'),
        (None, b'{"name": "t"}'),
        ("application/x-www-form-urlencoded", b"name=t"),
    ],
)
def test_a_body_in_another_media_type_is_a_415_naming_the_expected_one(
    client: TestClient, auth: dict[str, str], content_type: str | None, body: bytes
) -> None:
    headers = dict(auth)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = client.post("/v1/teachers", content=body, headers=headers)
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type"
    assert "expected application/json" in error["details"][0]["message"]
    assert error["details"][0]["field"] == "Content-Type"


def test_the_media_types_an_operation_declares_are_the_ones_it_takes(
    client: TestClient, auth: dict[str, str]
) -> None:
    ndjson = {**auth, "Content-Type": "application/x-ndjson; charset=utf-8"}
    rows = b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'
    assert client.post("/v1/datasets", content=rows, headers=ndjson).status_code == 201
    refused = client.post("/v1/datasets", content=rows, headers={**auth, "Content-Type": "x/y"})
    assert refused.status_code == 415
    assert "application/x-ndjson or multipart/form-data" in refused.json()["error"]["message"]


def test_a_json_body_that_cannot_be_read_is_a_422_naming_the_body(
    client: TestClient, auth: dict[str, str]
) -> None:
    headers = {**auth, "Content-Type": "application/json"}
    response = client.post("/v1/teachers", content=b"\xff\xfe{", headers=headers)
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "body"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/teachers/{id}", "DELETE, GET, PATCH"),
        ("OPTIONS", "/v1/jobs", "GET, POST"),
        ("PUT", "/v1/datasets", "GET, POST"),
        ("POST", "/v1/jobs/{id}/iterations", "GET"),
    ],
)
def test_a_405_lists_every_method_of_the_path(
    client: TestClient, auth: dict[str, str], method: str, path: str, allowed: str
) -> None:
    response = client.request(method, path.format(id=uuid.uuid4()), headers=auth)
    assert response.status_code == 405
    assert response.headers["Allow"] == allowed
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_every_cursor_the_pattern_allows_is_a_position(
    client: TestClient, auth: dict[str, str]
) -> None:
    doc = client.get("/openapi.json").json()
    cursor = next(p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "cursor")
    assert cursor["schema"]["anyOf"][0]["pattern"] == CURSOR_PATTERN
    for text in ("A" * 32, "_" * 32, "-" * 32, "z9" * 16):  # extremes of the 64-bit time
        assert re.fullmatch(CURSOR_PATTERN, text)
        decode_cursor(text)
        for path in ("/v1/jobs", "/v1/datasets", "/v1/teachers"):
            assert client.get(path, params={"cursor": text}, headers=auth).status_code == 200
    bad = client.get("/v1/jobs", params={"cursor": "not-a-cursor"}, headers=auth)
    assert bad.status_code == 422
    assert bad.json()["error"]["details"][0]["field"] == "query.cursor"


def test_a_cursor_round_trips_its_position() -> None:
    from datetime import UTC, datetime

    row_id = uuid.uuid4()
    at = datetime(2026, 12, 2, 17, 39, 33, 926228, tzinfo=UTC)
    cursor = encode_cursor(at, row_id)
    assert re.fullmatch(CURSOR_PATTERN, cursor)
    assert decode_cursor(cursor) == (at, row_id)
    naive = encode_cursor(at.replace(tzinfo=None), row_id)  # SQLite's datetimes
    assert naive == cursor


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_only_assets_the_api_serves(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    parser = _Assets()
    parser.feed(response.text)
    assert parser.urls, "the page references its script"
    assert [u for u in parser.urls if not u.startswith("/")] == []
    assert "https://" not in response.text and "http://" not in response.text
    for url in parser.urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000 or url.endswith(".png"), url
    assert "/openapi.json" in response.text


@pytest.mark.parametrize(
    "base_url",
    [
        "http://" + "a" * 64 + "/v1",  # an IDNA label over 63 characters
        "http://a..b/v1",  # an empty label
        "http://host:99999/v1",  # a port out of range
        "http://host:port/v1",
    ],
)
def test_a_base_url_no_resolver_takes_is_a_422_naming_it(
    client: TestClient, auth: dict[str, str], base_url: str
) -> None:
    response = client.post(
        "/v1/teachers", json={"name": "t", "base_url": base_url, "model": "m"}, headers=auth
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == "base_url"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/keys", {"expires_in_s": True}, "expires_in_s"),
        (
            "/v1/teachers",
            {
                "name": "t",
                "base_url": "http://x/v1",
                "model": "m",
                "generation": {"temperature": True},
            },
            "generation.temperature",
        ),
        (
            "/v1/teachers",
            {
                "name": "t",
                "base_url": "http://x/v1",
                "model": "m",
                "limits": {"max_concurrency": True},
            },
            "limits.max_concurrency",
        ),
    ],
)
def test_a_boolean_is_not_a_number(
    client: TestClient, auth: dict[str, str], path: str, body: dict[str, Any], field: str
) -> None:
    response = client.post(path, json=body, headers=auth)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == field
