"""/metrics and /metrics/ both answer (no 307 for a scraper to follow), guarded alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.db import make_engine, session_factory
from service.settings import ApiSettings, DatabaseSettings, Settings


def _client(tmp_path: Path, **api: object) -> Iterator[TestClient]:
    url = f"sqlite:///{tmp_path}/m.db"
    settings = Settings(database=DatabaseSettings(url=url), api=ApiSettings(**api))
    engine = make_engine(url)
    with TestClient(create_app(settings, sessions=session_factory(engine))) as client:
        yield client
    engine.dispose()


@pytest.fixture
def open_metrics(tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path)


@pytest.fixture
def guarded_metrics(tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path, metrics_token="s3cret")


@pytest.mark.parametrize("path", ["/metrics", "/metrics/"])
def test_both_paths_answer_without_a_redirect(open_metrics: TestClient, path: str) -> None:
    resp = open_metrics.get(path, follow_redirects=False)
    assert resp.status_code == 200, resp.status_code
    assert "python_info" in resp.text
    assert resp.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("path", ["/metrics", "/metrics/"])
def test_the_token_guards_both_paths(guarded_metrics: TestClient, path: str) -> None:
    assert guarded_metrics.get(path, follow_redirects=False).status_code == 401
    ok = guarded_metrics.get(path, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and "python_info" in ok.text


def test_metrics_are_not_in_the_openapi_document(open_metrics: TestClient) -> None:
    assert not [p for p in open_metrics.get("/openapi.json").json()["paths"] if "metrics" in p]
