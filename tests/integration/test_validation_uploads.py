"""JSONL uploads on real Postgres: line splitting that follows JSON (not str.splitlines), and
values JSONB cannot hold rejected as a 422 naming the line, through the API and the CLIs."""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from service import cli as service_cli
from service.models import Dataset, DatasetRow
from workers import cli as workers_cli

NDJSON = "application/x-ndjson"


def _count(session: Session) -> tuple[int, int]:
    datasets = session.scalar(select(func.count()).select_from(Dataset)) or 0
    rows = session.scalar(select(func.count()).select_from(DatasetRow)) or 0
    return datasets, rows


def _post(client: TestClient, auth: dict[str, str], content: bytes, **params: str) -> Any:
    return client.post(
        "/v1/datasets", content=content, params=params, headers={**auth, "Content-Type": NDJSON}
    )


def _rows(*rows: dict[str, Any], ensure_ascii: bool = False, nl: str = "\n") -> bytes:
    return "".join(json.dumps(r, ensure_ascii=ensure_ascii) + nl for r in rows).encode()


# --------------------------------------------------------------------------- line splitting


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085"])
def test_line_separators_inside_json_strings_are_data(
    client: TestClient, auth: dict[str, str], char: str
) -> None:
    # json.dumps(ensure_ascii=False) writes these raw; str.splitlines() used to break at them.
    rows = [
        {"text": "first", "label": "a"},
        {"text": "second", "label": "b"},
        {"text": f"one{char}two", "label": "a", "meta": {f"k{char}": [f"x{char}y"]}},
        {"text": "last", "label": "b"},
    ]
    content = _rows(*rows)
    assert char.encode() in content  # written raw, not as a \u escape
    resp = _post(client, auth, content)
    assert resp.status_code == 201, resp.text
    assert resp.json()["row_count"] == 4
    preview = client.get(f"/v1/datasets/{resp.json()['id']}", headers=auth).json()["preview"]
    assert [p["data"] for p in preview] == rows
    assert [p["index"] for p in preview] == [0, 1, 2, 3]


def test_control_characters_do_not_shift_line_numbers(
    client: TestClient, auth: dict[str, str], db_session: Session
) -> None:
    # A raw form feed / group separator inside a string is invalid JSON: it is one error on the
    # line it is on, and later lines keep their numbers (no phantom lines).
    before = _count(db_session)
    content = (
        b'{"text": "a\x0cb", "label": "x"}\n'
        b'{"text": "ok", "label": "y"}\n'
        b'{"text": "c\x1dd\x0be", "label": "x"}\n'
        b'{"text": broken}\n'
    )
    resp = _post(client, auth, content)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_jsonl"
    assert [d["line"] for d in error["details"]] == [1, 3, 4]
    assert all(d["message"].startswith("invalid JSON") for d in error["details"])
    assert error["message"].startswith("line 1: invalid JSON")
    assert _count(db_session) == before


def test_crlf_bom_and_blank_lines_keep_their_line_numbers(
    client: TestClient, auth: dict[str, str], db_session: Session
) -> None:
    good = b'\xef\xbb\xbf{"text": "a", "label": "x"}\r\n\r\n{"text": "b", "label": "y"}\r\n\r\n'
    resp = _post(client, auth, good)
    assert resp.status_code == 201, resp.text
    assert resp.json()["row_count"] == 2
    preview = client.get(f"/v1/datasets/{resp.json()['id']}", headers=auth).json()["preview"]
    assert [p["data"]["text"] for p in preview] == ["a", "b"]
    # Rows are stored at their line of the upload (0-based), blank lines leave a gap.
    assert [p["index"] for p in preview] == [0, 2]

    before = _count(db_session)
    bad = b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}\r\n{"text": \r\n'
    resp = _post(client, auth, bad)
    assert resp.status_code == 422
    assert resp.json()["error"]["details"] == [
        {"line": 4, "message": "invalid JSON: Expecting value at column 10"}
    ]
    assert _count(db_session) == before


# --------------------------------------------------------------------------- unstorable values


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (r'{"text": "a\ud800b", "label": "x"}', '"text" contains an unpaired surrogate'),
        (r'{"text": "a", "label": "x", "m": {"k": ["ok", "\udfff"]}}', '"m.k[1]" contains an unp'),
        (r'{"text": "a", "label": "x", "\udc00": 1}', 'the key "\\udc00" contains an unpaired'),
        (r'{"text": "a\u0000b", "label": "x"}', '"text" contains a NUL character'),
        (r'{"text": "a", "label": "x", "m": [{"\u0000": 1}]}', 'the key "\\u0000" in "m[0]"'),
        ('{"text": "a", "label": "x", "score": NaN}', '"score" is NaN, Infinity'),
        ('{"text": "a", "label": "x", "score": Infinity}', '"score" is NaN, Infinity'),
        ('{"text": "a", "label": "x", "s": [-Infinity]}', '"s[0]" is NaN, Infinity'),
        ('{"text": "a", "label": "x", "score": 1e999}', '"score" is NaN, Infinity'),
    ],
)
def test_values_jsonb_cannot_hold_are_a_422_naming_line_and_field(
    client: TestClient, auth: dict[str, str], db_session: Session, line: str, expected: str
) -> None:
    before = _count(db_session)
    content = b'{"text": "fine", "label": "y"}\n' + line.encode() + b'\n{"text": "b"}\n'
    resp = _post(client, auth, content)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_jsonl"
    assert [d["line"] for d in error["details"]] == [2]
    assert error["details"][0]["message"].startswith(expected), error
    assert error["message"] == f"line 2: {error['details'][0]['message']}"
    assert _count(db_session) == before


def test_every_unstorable_line_is_reported_with_the_broken_ones(
    client: TestClient, auth: dict[str, str], db_session: Session
) -> None:
    before = _count(db_session)
    content = b"\n".join(
        [
            b'{"text": "ok"}',
            rb'{"text": "\u0000"}',
            b'{"text": broken',
            b'{"n": NaN}',
            rb'{"text": "\ud83d\ude00 a valid pair"}',
        ]
    )
    resp = _post(client, auth, content)
    assert resp.status_code == 422
    assert [d["line"] for d in resp.json()["error"]["details"]] == [2, 3, 4]
    assert _count(db_session) == before


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"n": ' + b"1" * 5000 + b"}\n", "invalid JSON: Exceeds the limit"),
        (b'{"n": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", "invalid JSON: nested too deeply"),
    ],
)
def test_numbers_and_nesting_python_cannot_parse_are_a_422(
    client: TestClient, auth: dict[str, str], db_session: Session, content: bytes, expected: str
) -> None:
    before = _count(db_session)
    resp = _post(client, auth, b'{"text": "ok"}\n' + content)
    assert resp.status_code == 422, resp.text
    detail = resp.json()["error"]["details"][0]
    assert detail["line"] == 2 and detail["message"].startswith(expected)
    assert _count(db_session) == before


def test_a_name_postgres_cannot_hold_is_a_422(
    client: TestClient, auth: dict[str, str], db_session: Session
) -> None:
    before = _count(db_session)
    content = b'{"text": "a", "label": "x"}\n'
    resp = _post(client, auth, content, name="bad\x00name")
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["details"][0]["field"] == "name"
    long_name = "x" * 250 + ".jsonl"  # a multipart filename has no length check of its own
    resp = client.post(
        "/v1/datasets", files={"file": (long_name, content, "application/jsonl")}, headers=auth
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["details"] == [
        {"field": "name", "message": "is longer than 200 characters"}
    ]
    assert _count(db_session) == before


# --------------------------------------------------------------------------- the CLIs


@pytest.fixture
def cli_session(db_session: Session, monkeypatch: pytest.MonkeyPatch) -> Session:
    monkeypatch.setattr(service_cli, "open_session", lambda: contextlib.nullcontext(db_session))
    return db_session


def test_cli_datasets_upload_shares_the_parser(cli_session: Session, tmp_path: Path) -> None:
    runner = CliRunner()
    tenant = f"cli-{uuid.uuid4().hex[:6]}"
    good = tmp_path / "good.jsonl"
    good.write_bytes(_rows({"text": "a\u2028b", "label": "x"}, {"text": "c", "label": "y"}))
    result = runner.invoke(service_cli.app, ["datasets", "upload", str(good), "--tenant", tenant])
    assert result.exit_code == 0, result.output
    dataset = cli_session.get(Dataset, uuid.UUID(result.stdout.strip().splitlines()[-1]))
    assert dataset is not None and dataset.row_count == 2

    before = _count(cli_session)
    for content in (b'{"text": "a"}\n{"text": "a\\u0000b"}\n', b'{"text": "a"}\n{"n": NaN}\n'):
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(content)
        result = runner.invoke(
            service_cli.app, ["datasets", "upload", str(bad), "--tenant", tenant]
        )
        assert result.exit_code == 2, result.output
        assert "invalid_jsonl: line 2:" in result.output
        assert _count(cli_session) == before


def test_distill_run_uploads_through_the_same_parser(
    cli_session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `distill run` uploads the spec's JSONL paths with parse_jsonl too; stop it before it runs.
    monkeypatch.setattr(service_cli, "upgrade_database", lambda url=None, quiet=False: None)
    monkeypatch.setattr(service_cli, "set_task_sender", lambda sender: None)
    monkeypatch.setattr("workers.runtime.set_sender", lambda sender: None)
    tenant = f"run-{uuid.uuid4().hex[:6]}"
    spec = {
        "name": "run-check",
        "strategy": "llm2llm",
        "task": {"instructions": "Classify."},
        "datasets": {"train": "train.jsonl"},
        "teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    runner = CliRunner()
    before = _count(cli_session)
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "a\\ud800"}\n')
    args = ["run", str(tmp_path / "spec.yaml"), "--tenant", tenant]
    result = runner.invoke(workers_cli.app, args)
    assert result.exit_code == 2, result.output
    assert 'invalid_jsonl: line 2: "text" contains an unpaired surrogate' in result.output
    assert _count(cli_session) == before

    # A U+2029 inside a string is data; the file parses, and the job is refused for its size.
    rows = [{"text": "a\u2029b", "label": "x"}, {"text": "c", "label": "y"}]
    (tmp_path / "train.jsonl").write_bytes(_rows(*rows))
    result = runner.invoke(workers_cli.app, args)
    assert result.exit_code == 2, result.output
    assert "datasets.validation: no validation rows" in result.output
    assert "invalid_jsonl" not in result.output
