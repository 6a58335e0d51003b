"""Answer extraction and checking, on GSM8K-format rows (written by the tests, and GSM8K's own
where CI has them) and on hand-written outputs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.domain.answers import answers_match, extract_answer, gold_answer, normalize_number
from tests.conftest import SHARED_DATA
from tests.data_factory import arithmetic_rows


@pytest.fixture(
    scope="module",
    params=[
        "written",
        # The same checks on GSM8K's real rows where CI has them (../shared/data/README.md).
        pytest.param("gsm8k", marks=pytest.mark.shared_data("gsm8k/train_sample.jsonl")),
    ],
)
def gsm8k_rows(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """GSM8K-format rows: written by tests/data_factory.py, or the real sample."""
    if request.param == "written":
        return arithmetic_rows(300)
    with (SHARED_DATA / "gsm8k" / "train_sample.jsonl").open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def test_gold_answer_of_every_sample_row_is_its_final_number(
    gsm8k_rows: list[dict[str, Any]],
) -> None:
    assert len(gsm8k_rows) >= 100
    with_commas = 0
    for row in gsm8k_rows:
        final_line = row["answer"].strip().splitlines()[-1]
        assert final_line.startswith("####")
        gold = gold_answer(row["answer"])
        assert gold == final_line.removeprefix("####").strip().replace(",", "")
        assert normalize_number(gold) is not None
        with_commas += "," in final_line
    # Some answers are written "1,080": the comma handling is exercised on every row set.
    assert with_commas > 0


def test_extract_answer_reads_the_marker_past_calculator_annotations(
    gsm8k_rows: list[dict[str, Any]],
) -> None:
    # The reasoning is full of numbers and <<48/2=24>> annotations; the marker must win.
    for row in gsm8k_rows:
        assert extract_answer(row["answer"]) == gold_answer(row["answer"])


def test_extract_answer_from_student_style_outputs(gsm8k_rows: list[dict[str, Any]]) -> None:
    for row in gsm8k_rows[:200]:
        reasoning, _, _ = row["answer"].rpartition("####")
        gold = gold_answer(row["answer"])
        stated = f"{reasoning.strip()}\nSo the answer is {row['answer'].split('####')[-1].strip()}."
        assert extract_answer(stated) == gold
        assert answers_match(extract_answer(stated), gold)
        runaway = f"{row['answer']}\n\nQuestion: something else entirely.\n#### 123456789"
        assert extract_answer(runaway) == gold


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She earns 12 * 5 = 60 dollars.\n#### $1,000.", "1000"),
        ("#### -7", "-7"),
        ("#### 3.25", "3.25"),
        ("#### seventy-two\n", "seventy-two"),
        ("48 + 24 = 72. The answer is 72.", "72"),
        ("the final answer is: **-3.5**", "-3.5"),
        ("The answer is 1,250,000 dollars", "1250000"),
        ("First the answer is 4, no wait, the answer is 5.", "5"),
        ("The answer is Paris. It has 2 million people.", "Paris"),
        ("I think it costs 5 or maybe 7 dollars", "7"),
        ("From 5-3 we get", "3"),
        ("x = -4", "-4"),
        ("It took $1,500.", "1500"),
        ("No numbers at all.", None),
        ("", None),
    ],
)
def test_extract_answer_default_rules(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_with_a_pattern() -> None:
    assert extract_answer("Reasoning...\nAnswer: B) 42", r"Answer:\s*([A-E])\)") == "B"
    assert extract_answer("ANSWER = $2,000.", r"ANSWER = (\S+)") == "2000"
    assert extract_answer("first <a>1</a> then <a>2</a>", r"<a>(\d+)</a>") == "1"
    # A pattern without a group yields the whole match.
    assert extract_answer("value 17", r"\d+") == "17"
    # A pattern that does not match means no answer, with no fallback to the default rules.
    assert extract_answer("#### 72", r"Answer:\s*(\d+)") is None
    # An optional group that did not take part in the match is no answer either.
    assert extract_answer("Answer:", r"Answer:(\d+)?") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", 1000.0),
        ("$5", 5.0),
        (" 3.50. ", 3.5),
        ("-2", -2.0),
        ("1e3", 1000.0),
        (".5", 0.5),
        ("nan", None),
        ("inf", None),
        ("1_000", None),
        ("abc", None),
        ("", None),
        ("12 apples", None),
    ],
)
def test_normalize_number(text: str, expected: float | None) -> None:
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("1,000", "1000.0", True),
        ("$18", "18", True),
        ("72.0000001", "72", True),
        ("72", "73", False),
        ("0.1", "0.10000001", True),
        ("0", "0.0000001", True),
        ("0", "0.01", False),
        (" Paris ", "paris", True),
        ("New  York\n", "new york", True),
        ("Paris", "London", False),
        ("72", "seventy-two", False),
        (None, "72", False),
    ],
)
def test_answers_match(predicted: str | None, gold: str, expected: bool) -> None:
    assert answers_match(predicted, gold) is expected


def test_answers_match_tolerances() -> None:
    assert not answers_match("100", "101")
    assert answers_match("100", "101", rel_tol=0.02)
    assert answers_match("0", "0.004", abs_tol=0.005)


def test_gold_answer_without_a_marker_is_the_field_itself() -> None:
    assert gold_answer("  Paris \n") == "Paris"
    assert gold_answer("2,500") == "2500"
    assert gold_answer("Some steps.\n#### 2,500") == "2500"
    assert gold_answer("#### 1\nlater #### 2") == "2"
