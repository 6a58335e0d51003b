"""Export formats (one line each, as docs/exports.md shows them), the selection's checks, the
stratified split and the counts a manifest carries."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from pydantic import ValidationError

from service.domain.export_formats import (
    ANSWER_WITH_RATIONALE,
    ExportCounts,
    ExportRow,
    ExportSelection,
    StratifiedSplit,
    arte_pair,
    outcome_pair,
    render_pair,
    render_row,
    validation_target,
)
from service.domain.spec import TaskKind, TaskSpec

TASK = TaskSpec(instructions="Classify the message.", labels=["card_lost", "balance"])
QA = TaskSpec(
    kind=TaskKind.qa, instructions="Solve.", input_field="question", output_field="answer"
)
ROW = ExportRow(input="I lost my card", output="card_lost", kind="augmented", iteration=1)
REASONED = ROW._replace(rationale="The card is gone.")


def _line(fmt: str, row: ExportRow = ROW, task: TaskSpec = TASK) -> dict[str, object]:
    line = render_row(task, row, fmt)
    assert line.endswith("\n") and line.count("\n") == 1
    parsed: dict[str, object] = json.loads(line)
    return parsed


def test_each_format_writes_one_json_object_per_line() -> None:
    assert _line("jsonl") == {"text": "I lost my card", "label": "card_lost"}
    assert _line("jsonl", REASONED, QA) == {
        "question": "I lost my card",
        "answer": "card_lost",
        "rationale": "The card is gone.",
    }
    assert _line("chat") == {
        "messages": [
            {"role": "system", "content": "Classify the message."},
            {"role": "user", "content": "I lost my card"},
            {"role": "assistant", "content": "card_lost"},
        ]
    }
    assert _line("alpaca") == {
        "instruction": "Classify the message.",
        "input": "I lost my card",
        "output": "card_lost",
    }
    assert _line("sharegpt") == {
        "conversations": [
            {"from": "system", "value": "Classify the message."},
            {"from": "human", "value": "I lost my card"},
            {"from": "gpt", "value": "card_lost"},
        ]
    }
    lineage = _line("lineage")
    assert lineage["kind"] == "augmented" and lineage["iteration"] == 1
    assert lineage["status"] == "accepted" and lineage["cause"] is None


def test_a_rationale_is_written_into_the_answer_by_the_template() -> None:
    answer = "The card is gone.\n#### card_lost"
    assert ANSWER_WITH_RATIONALE.format(rationale="The card is gone.", output="card_lost") == answer
    messages = _line("chat", REASONED)["messages"]
    assert isinstance(messages, list) and messages[2]["content"] == answer
    assert _line("alpaca", REASONED)["output"] == answer
    conversations = _line("sharegpt", REASONED)["conversations"]
    assert isinstance(conversations, list) and conversations[2]["value"] == answer


def test_a_label_the_data_wrote_as_a_number_stays_a_number() -> None:
    assert _line("jsonl", ROW._replace(output="1", typed_output=1))["label"] == 1


def test_text_is_written_as_is_and_lines_never_break() -> None:
    row = ROW._replace(input='ünï "quoted"\nsecond line\u2028')
    line = render_row(TASK, row, "jsonl")
    assert "ünï" in line and line.count("\n") == 1
    assert json.loads(line)["text"] == row.input


def test_dpo_rows_are_trls_conversational_preference_rows() -> None:
    rejected = ROW._replace(output="balance", rationale="Money.")
    pair = json.loads(render_pair(outcome_pair(TASK, REASONED, rejected, group="h")))
    assert pair == {
        "prompt": [
            {"role": "system", "content": "Classify the message."},
            {"role": "user", "content": "I lost my card"},
        ],
        "chosen": [{"role": "assistant", "content": "The card is gone.\n#### card_lost"}],
        "rejected": [{"role": "assistant", "content": "Money.\n#### balance"}],
    }
    arte = json.loads(
        render_pair(
            arte_pair(
                [{"role": "system", "content": "Write drafts."}],
                {"text": "a", "label": "card_lost", "score": 0.9},
                {"text": "b", "label": "balance", "score": 0.2},
                group="1:draft:0",
                label="card_lost",
                iteration=1,
            )
        )
    )
    assert json.loads(arte["chosen"][0]["content"]) == {"text": "a", "label": "card_lost"}
    assert (arte["score_chosen"], arte["score_rejected"]) == (0.9, 0.2)


@pytest.mark.parametrize(
    "raw",
    [
        {"iteration": -1},
        {"iteration": "latest"},
        {"validation_fraction": 0.6},
        {"validation_fraction": float("nan")},
        {"status": "pending"},
        {"kinds": ["x"] * 9},
        {"unknown": 1},
    ],
)
def test_a_selection_out_of_range_is_refused(raw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ExportSelection.model_validate(raw)


def test_the_default_selection_is_the_best_dataset() -> None:
    selection = ExportSelection()
    assert selection.iteration == "best" and selection.status == "accepted"
    assert selection.kinds is None and selection.validation_fraction == 0
    assert ExportSelection.model_validate({"iteration": "3"}).iteration == 3


def _split(strata: list[str], fraction: float, seed: int) -> list[str]:
    splitter = StratifiedSplit(Counter(strata), fraction, seed)
    return [splitter.assign(s) for s in strata]


def test_the_split_holds_out_each_strata_share_exactly() -> None:
    strata = ["a"] * 50 + ["b"] * 7 + ["c"] * 3 + ["d"]
    assigned = _split(strata, 0.2, seed=0)
    held = Counter(s for s, a in zip(strata, assigned, strict=True) if a == "validation")
    assert held == Counter({"a": 10, "b": 1, "c": 1})  # d: a single row stays in train
    assert [validation_target(n, 0.5) for n in (0, 1, 2, 3, 4)] == [0, 0, 1, 2, 2]


def test_the_split_is_seeded_and_a_stratum_ignores_the_others() -> None:
    strata = ["a", "b"] * 40
    assert _split(strata, 0.25, seed=3) == _split(strata, 0.25, seed=3)
    assert _split(strata, 0.25, seed=3) != _split(strata, 0.25, seed=4)
    only_a = _split(["a"] * 40, 0.25, seed=3)
    assert [x for s, x in zip(strata, _split(strata, 0.25, 3), strict=True) if s == "a"] == only_a


def test_rows_beyond_the_counted_ones_stay_in_train() -> None:
    splitter = StratifiedSplit({"a": 4}, 0.5, seed=0)
    assigned = [splitter.assign("a") for _ in range(8)]
    assert assigned.count("validation") == 2 and assigned[4:] == ["train"] * 4
    assert StratifiedSplit({}, 0.5, seed=0).assign("new") == "train"


def test_counts_per_kind_label_and_iteration() -> None:
    counts = ExportCounts()
    counts.add("seed", "a", None, "train")
    counts.add("augmented", "a", 2, "validation")
    counts.add("augmented", "b", 10, "train")
    assert counts.rows == 3
    assert counts.as_dict() == {
        "kind": {"augmented": 2, "seed": 1},
        "label": {"a": 2, "b": 1},
        "iteration": {"0": 1, "2": 1, "10": 1},
    }
