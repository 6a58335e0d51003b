"""Input validation without a database: JSONL line splitting, values JSONB cannot hold, the
label text the splits use, and the private-address error naming commands that exist."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from typer.main import get_command

from service.datasets import parse_jsonl, unstorable
from service.domain.strategies.base import LabelledRow
from service.errors import ValidationFailed
from service.splits import (
    HELD_OUT_FRACTION,
    held_out_count,
    hold_out,
    label_text,
    min_class_rows_for_validation,
)
from service.teachers import check_base_url


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\u0085"])
def test_only_newline_ends_a_line(sep: str) -> None:
    rows = [{"t": f"a{sep}b"}, {"t": "c"}]
    data = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
    parsed = parse_jsonl(b"\xef\xbb\xbf" + data + b"\r\n\n")
    assert list(parsed) == rows
    assert parsed.lines == [1, 2]


def test_blank_lines_keep_the_numbers_of_the_lines_below() -> None:
    parsed = parse_jsonl(b'\n{"a": 1}\n   \n\n{"a": 2}\n')
    assert parsed.lines == [2, 5]
    with pytest.raises(ValidationFailed) as caught:
        parse_jsonl(b'\n{"a": 1}\n   \n\n{"a": }\n')
    assert caught.value.details == [
        {"line": 5, "message": "invalid JSON: Expecting value at column 7"}
    ]


def test_the_utf8_error_names_the_line() -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_jsonl('{"a": "\u2028"}\n{"a": 1}\n{"a": "caf'.encode() + b'\xe9"}\n')
    assert caught.value.details[0]["line"] == 3


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"a": "fine", "b": [1, 2.5, None, True, {"c": "ok"}]}, None),
        ({"a": "\U0001f600 \u2028 \u0085"}, None),
        ({"a": "x\x00"}, '"a" contains a NUL character'),
        ({"a": {"b": ["\ud800"]}}, '"a.b[0]" contains an unpaired surrogate'),
        ({"x\x00": 1}, 'the key "x\\u0000" contains a NUL character'),
        ({"a": [{"\udfff": 1}]}, 'the key "\\udfff" in "a[0]" contains an unpaired surrogate'),
        ({"a": math.nan}, '"a" is NaN, Infinity'),
        ({"a": [0, -math.inf]}, '"a[1]" is NaN, Infinity'),
    ],
)
def test_unstorable_names_the_field(value: dict[str, Any], problem: str | None) -> None:
    found = unstorable(value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem), found
        found.encode("utf-8")  # the message itself can always be sent


def test_label_text_is_what_the_splits_compare() -> None:
    assert [label_text(v) for v in ("x", 1, 0, True, False, 2.5)] == [
        "x", "1", "0", "True", "False", "2.5"
    ]  # fmt: skip


def test_the_smallest_class_that_gives_a_validation_row() -> None:
    n = min_class_rows_for_validation()
    assert held_out_count(n) >= 1 > held_out_count(n - 1)
    assert n == 5 and HELD_OUT_FRACTION == 0.2
    rows = [LabelledRow(row_id=f"train:{i}", input=str(i), output=str(i % 2)) for i in range(2 * n)]
    _, validation = hold_out(rows, seed=0)
    assert sorted(r.output for r in validation) == ["0", "1"]
    _, validation = hold_out(rows[: 2 * (n - 1)], seed=0)
    assert validation == []


def test_private_address_error_names_what_an_operator_can_do() -> None:
    with pytest.raises(ValidationFailed) as caught:
        check_base_url("http://127.0.0.1:9/v1", allow_private=False)
    message = caught.value.message
    assert caught.value.code == "private_address"
    assert "teachers create" not in message
    assert "DISTILL_API__ALLOW_PRIVATE_TEACHER_URLS=true" in message
    assert "distill run" in message and "distill jobs create" in message
    # The commands named exist (workers.cli is the `distill` entry point).
    from workers.cli import app

    root = get_command(app)
    assert "run" in root.commands  # type: ignore[attr-defined]
    assert "create" in root.commands["jobs"].commands  # type: ignore[attr-defined]
