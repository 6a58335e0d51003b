"""Rationale distillation: planning per row, parsing, answer checking and hinted retries."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from service.domain.spec import TaskKind, TaskSpec
from service.domain.strategies import (
    EvaluatedRow,
    ExampleKind,
    GenerationTarget,
    LabelledRow,
    PhaseResult,
    PlanContext,
    Rationales,
    answer_matches,
    validate_params,
)

LABELS = ["ham", "spam"]
CLASSIFICATION = TaskSpec(kind=TaskKind.classification, instructions="Spam or not.", labels=LABELS)
QA = TaskSpec(kind=TaskKind.qa, instructions="Solve the word problem.")
GENERATION = TaskSpec(kind=TaskKind.generation, instructions="Name the capital.")
DATA_RE = re.compile(r"(?:^|\n)([^\n]*):\n<data>\n(.*?)\n?</data>", re.DOTALL)
GSM8K_ROWS = [
    LabelledRow(
        row_id="q1",
        input="Tom has 3 boxes of 4 apples. How many apples?",
        output="3 boxes * 4 = 12 apples.\n#### 12",
    ),
    LabelledRow(
        row_id="q2",
        input="A shop sells 1,200 pens a day. How many in 2 days?",
        output="1,200 * 2 = 2,400\n#### 2,400",
    ),
]


def _seeds(n: int = 10) -> list[LabelledRow]:
    return [
        LabelledRow(row_id=f"s{i:02d}", input=f"message {i}", output=LABELS[i % 2])
        for i in range(n)
    ]


def _ctx(
    phase: str = "rationale",
    params: dict[str, Any] | None = None,
    **update: Any,
) -> PlanContext:
    ctx = PlanContext(
        task=CLASSIFICATION,
        params=validate_params("rationales", params or {}),
        iteration=1,
        phase=phase,
        seed=11,
        labels=LABELS,
        train_rows=_seeds(),
    )
    return ctx.model_copy(update=update)


def _blocks(target: GenerationTarget) -> dict[str, list[dict[str, Any]]]:
    user = target.request.messages[1].content
    return {
        heading.strip(): [json.loads(line) for line in body.split("\n") if line]
        for heading, body in DATA_RE.findall(user)
    }


def _wrong(*row_ids: str) -> list[EvaluatedRow]:
    return [
        EvaluatedRow(
            row_id=r,
            split="train",
            input="x",
            gold="ham",
            predicted="spam",
            confidence=0.9,
            correct=False,
        )
        for r in row_ids
    ]


# --------------------------------------------------------------------------- rationale phase


def test_one_target_per_train_row() -> None:
    targets = Rationales().plan(_ctx())
    assert sorted(t.source_row_id or "" for t in targets) == [f"s{i:02d}" for i in range(10)]
    first = targets[0]
    assert first.target_id == f"row:{first.source_row_id}"
    assert first.reason == "rationale"
    assert first.n_examples == 1
    assert first.kind is ExampleKind.rationale
    assert first.request.template_id == "rationale"
    assert first.request.response_schema == {
        "type": "object",
        "properties": {
            "rationale": {"type": "string"},
            "answer": {"type": "string", "enum": LABELS},
        },
        "required": ["rationale", "answer"],
        "additionalProperties": False,
    }
    row = next(r for r in _seeds() if r.row_id == first.source_row_id)
    assert first.expected_label == row.output
    assert _blocks(first) == {"The input": [{"text": row.input}]}
    # The gold label is not given away in the first attempt.
    assert row.output not in first.request.messages[1].content.replace(row.input, "")


def test_rows_the_student_gets_wrong_come_first_and_the_cap_holds() -> None:
    targets = Rationales().plan(
        _ctx(params={"max_rows_per_iteration": 4}, evaluated=_wrong("s07", "s02"))
    )
    assert len(targets) == 4
    assert {t.source_row_id for t in targets[:2]} == {"s07", "s02"}


def test_iterations_walk_through_all_rows_before_repeating() -> None:
    covered: list[str] = []
    for iteration in (1, 2, 3):
        ctx = _ctx(params={"max_rows_per_iteration": 4}, iteration=iteration)
        covered += [t.source_row_id or "" for t in Rationales().plan(ctx)]
    assert len(covered) == 12
    assert set(covered[:10]) == {f"s{i:02d}" for i in range(10)}


def test_budget_caps_the_rows() -> None:
    assert len(Rationales().plan(_ctx(max_examples=3))) == 3


def test_plan_is_deterministic() -> None:
    ctx = _ctx(evaluated=_wrong("s03"))
    assert [t.model_dump() for t in Rationales().plan(ctx)] == [
        t.model_dump() for t in Rationales().plan(ctx)
    ]


def test_qa_rationale_targets() -> None:
    ctx = _ctx(task=QA, labels=None, train_rows=GSM8K_ROWS)
    targets = Rationales().plan(ctx)
    assert {t.expected_label for t in targets} == {None}
    assert targets[0].request.response_schema is not None
    assert targets[0].request.response_schema["properties"]["answer"] == {"type": "string"}
    # The gold worked solution stays out of the prompt.
    assert "####" not in targets[0].request.messages[1].content


# --------------------------------------------------------------------------- parse


def test_parse_returns_the_row_input_with_the_teachers_answer() -> None:
    ctx = _ctx()
    target = Rationales().plan(ctx)[0]
    row = next(r for r in ctx.train_rows if r.row_id == target.source_row_id)
    wrong_answer = "spam" if row.output == "ham" else "ham"
    (candidate,) = Rationales().parse(
        target, {"rationale": " It sells pills. ", "answer": wrong_answer}, ctx
    )
    assert candidate.input == row.input
    assert candidate.output == wrong_answer  # kept: the filter rejects it as answer_mismatch
    assert candidate.rationale == "It sells pills."
    assert candidate.kind is ExampleKind.rationale
    assert candidate.meta == {"gold": row.output, "hinted": False}


@pytest.mark.parametrize(
    "output",
    [
        {"rationale": "", "answer": "ham"},
        {"rationale": None, "answer": "ham"},
        {"rationale": "why", "answer": None},
    ],
)
def test_parse_skips_malformed_answers(output: dict[str, Any]) -> None:
    ctx = _ctx()
    assert Rationales().parse(Rationales().plan(ctx)[0], output, ctx) == []


@pytest.mark.parametrize("output", [None, ["ham"], {"answer": "ham"}, {"rationale": "why"}])
def test_parse_raises_on_a_wrong_top_level_shape(output: Any) -> None:
    ctx = _ctx()
    with pytest.raises(ValueError):
        Rationales().parse(Rationales().plan(ctx)[0], output, ctx)


def test_parse_refuses_a_target_without_its_row() -> None:
    ctx = _ctx()
    target = Rationales().plan(ctx)[0]
    with pytest.raises(ValueError, match="names no train row"):
        Rationales().parse(target, {"rationale": "r", "answer": "ham"}, _ctx(train_rows=[]))


def test_parse_accepts_a_numeric_answer() -> None:
    ctx = _ctx(task=QA, labels=None, train_rows=GSM8K_ROWS)
    target = Rationales().plan(ctx)[0]
    (candidate,) = Rationales().parse(target, {"rationale": "3*4", "answer": 12}, ctx)
    assert candidate.output == "12"


# --------------------------------------------------------------------------- answer check


def test_answer_matches_classification_by_label() -> None:
    assert answer_matches(CLASSIFICATION, "spam", "spam")
    assert answer_matches(CLASSIFICATION, " spam\n", "spam")
    # As the filter reads labels: case, quotes and punctuation around the label do not matter...
    assert answer_matches(CLASSIFICATION, "Spam", "spam")
    assert answer_matches(CLASSIFICATION, '"spam."', "spam")
    assert not answer_matches(CLASSIFICATION, "ham", "spam")
    assert not answer_matches(CLASSIFICATION, "spammy", "spam")
    # ...unless the label set itself tells them apart.
    cased = CLASSIFICATION.model_copy(update={"labels": ["spam", "Spam", "ham"]})
    assert not answer_matches(cased, "Spam", "spam")


@pytest.mark.parametrize(
    ("candidate", "gold", "expected"),
    [
        ("12", "3 * 4 = 12\n#### 12", True),
        ("12.0", "#### 12", True),
        ("2400", "1,200 * 2 = 2,400\n#### 2,400", True),
        ("$2,400.", "#### 2400", True),
        ("The answer is 12.", "#### 12", True),
        ("#### 12", "#### 12", True),
        ("13", "#### 12", False),
        ("twelve", "#### 12", False),
        ("12", "12", True),
    ],
)
def test_answer_matches_qa_by_final_answer(candidate: str, gold: str, expected: bool) -> None:
    assert answer_matches(QA, candidate, gold) is expected


def test_answer_matches_generation_by_normalised_text() -> None:
    assert answer_matches(GENERATION, "  paris ", "Paris")
    assert not answer_matches(GENERATION, "The capital is Paris", "Paris")


def test_answer_matches_uses_the_task_pattern() -> None:
    task = TaskSpec(kind=TaskKind.qa, instructions="Solve.", answer_pattern=r"ANSWER: (\d+)")
    assert answer_matches(task, "ANSWER: 7", "work... ANSWER: 7")
    assert answer_matches(task, "7", "work... ANSWER: 7")
    assert not answer_matches(task, "ANSWER: 8", "work... ANSWER: 7")


# --------------------------------------------------------------------------- retry phase


def _previous() -> list[PhaseResult]:
    return [
        PhaseResult(
            target_id="row:s01", source_row_id="s01", rejected=1, reasons={"answer_mismatch": 1}
        ),
        PhaseResult(target_id="row:s02", source_row_id="s02", accepted=1),
        PhaseResult(
            target_id="row:s03", source_row_id="s03", rejected=1, reasons={"near_duplicate": 1}
        ),
        PhaseResult(
            target_id="row:s04", source_row_id="s04", rejected=1, reasons={"answer_mismatch": 1}
        ),
        PhaseResult(
            target_id="row:gone", source_row_id="gone", rejected=1, reasons={"answer_mismatch": 1}
        ),
    ]


def test_retry_hints_the_gold_answer_for_mismatched_rows_only() -> None:
    targets = Rationales().plan(_ctx("retry", previous_phase=_previous()))
    assert [(t.target_id, t.reason, t.source_row_id) for t in targets] == [
        ("hint:s01", "rationale_hint", "s01"),
        ("hint:s04", "rationale_hint", "s04"),
    ]
    first = targets[0]
    assert first.request.template_id == "rationale_hint"
    assert first.kind is ExampleKind.rationale
    assert first.meta == {"gold": "spam", "hinted": True}
    assert _blocks(first) == {
        "The input": [{"text": "message 1"}],
        "The correct answer (hint)": [{"label": "spam"}],
    }


def test_retry_hint_is_the_final_answer_not_the_worked_solution() -> None:
    previous = [
        PhaseResult(
            target_id="row:q1", source_row_id="q1", rejected=1, reasons={"answer_mismatch": 1}
        )
    ]
    ctx = _ctx("retry", task=QA, labels=None, train_rows=GSM8K_ROWS, previous_phase=previous)
    (target,) = Rationales().plan(ctx)
    assert _blocks(target)["The correct answer (hint)"] == [{"answer": "12"}]
    assert "3 boxes * 4" not in target.request.messages[1].content


def test_no_retry_when_disabled() -> None:
    ctx = _ctx("retry", {"retry_with_hint": False}, previous_phase=_previous())
    assert Rationales().plan(ctx) == []


def test_parse_of_a_hinted_target_marks_it() -> None:
    ctx = _ctx("retry", previous_phase=_previous())
    target = Rationales().plan(ctx)[0]
    (candidate,) = Rationales().parse(target, {"rationale": "pills", "answer": "spam"}, ctx)
    assert candidate.meta["hinted"] is True
    assert answer_matches(ctx.task, candidate.output, candidate.meta["gold"])
