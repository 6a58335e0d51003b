"""ARTE drafting, in-context alignment with scored drafts, and preference pairs, on fixed inputs."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest

from service.domain.spec import TaskKind, TaskSpec
from service.domain.strategies import (
    ARTE,
    ARTEParams,
    ExampleKind,
    GenerationTarget,
    LabelledRow,
    PlanContext,
    ScoredDraft,
    preference_pairs,
    validate_params,
)
from service.domain.strategies.arte import best_and_worst, split_in_chunks

LABELS = ["negative", "positive"]
CLASSIFICATION = TaskSpec(
    kind=TaskKind.classification, instructions="Sentiment of a review.", labels=LABELS
)
QA = TaskSpec(kind=TaskKind.qa, instructions="Solve the word problem.")
DATA_RE = re.compile(r"(?:^|\n)([^\n]*):\n<data>\n(.*?)\n?</data>", re.DOTALL)


def _seeds(n: int = 6) -> list[LabelledRow]:
    return [
        LabelledRow(row_id=f"s{i}", input=f"review {i}", output=LABELS[i % 2]) for i in range(n)
    ]


def _drafts() -> list[ScoredDraft]:
    return [
        ScoredDraft(
            draft_id="d1",
            input="Great phone",
            output="positive",
            rationale="praise",
            score=0.9,
            target_id="draft:0",
        ),
        ScoredDraft(
            draft_id="d2",
            input="Meh",
            output="negative",
            rationale="flat",
            score=0.4,
            target_id="draft:0",
        ),
        ScoredDraft(
            draft_id="d3",
            input="Broke in a day",
            output="negative",
            rationale="defect",
            score=0.7,
            target_id="draft:1",
        ),
        ScoredDraft(
            draft_id="d4",
            input="Fine I guess",
            output="positive",
            rationale="hedge",
            score=0.2,
            target_id="draft:1",
        ),
        ScoredDraft(
            draft_id="d5",
            input="Superb",
            output="positive",
            rationale="praise",
            score=0.9,
            target_id="draft:1",
        ),
    ]


def _ctx(phase: str, params: dict[str, Any] | None = None, **update: Any) -> PlanContext:
    ctx = PlanContext(
        task=CLASSIFICATION,
        params=validate_params("arte", params or {}),
        iteration=1,
        phase=phase,
        seed=3,
        labels=LABELS,
        train_rows=_seeds(),
        drafts=_drafts() if phase == "final" else [],
    )
    return ctx.model_copy(update=update)


def _blocks(target: GenerationTarget) -> dict[str, list[dict[str, Any]]]:
    user = target.request.messages[1].content
    return {
        heading.strip(): [json.loads(line) for line in body.split("\n") if line]
        for heading, body in DATA_RE.findall(user)
    }


# --------------------------------------------------------------------------- draft phase


def test_draft_phase_asks_for_drafts_with_rationales() -> None:
    targets = ARTE().plan(_ctx("draft", {"n_drafts": 10, "drafts_per_target": 4}))
    assert [t.target_id for t in targets] == ["draft:0", "draft:1", "draft:2"]
    assert [t.n_examples for t in targets] == [4, 4, 2]
    assert {t.reason for t in targets} == {"draft"}
    assert {t.kind for t in targets} == {ExampleKind.augmented}
    assert {t.request.template_id for t in targets} == {"arte_draft"}
    schema = targets[0].request.response_schema
    assert schema is not None
    item = schema["properties"]["examples"]["items"]
    assert list(item["properties"]) == ["text", "rationale", "label"]
    assert item["properties"]["label"]["enum"] == LABELS


def test_draft_targets_rotate_through_the_labels() -> None:
    targets = ARTE().plan(_ctx("draft", {"n_drafts": 8, "drafts_per_target": 2}))
    expected = [t.expected_label for t in targets]
    assert set(expected) == set(LABELS)
    assert all(a != b for a, b in itertools.pairwise(expected))


def test_draft_prompts_show_different_seed_rows() -> None:
    targets = ARTE().plan(_ctx("draft", {"n_drafts": 6, "drafts_per_target": 2, "n_shots": 2}))
    shots = [tuple(t.meta["shot_row_ids"]) for t in targets]
    assert all(len(s) == 2 for s in shots)
    assert len(set(shots)) == 3
    shown = _blocks(targets[0])["Examples from the task's training set"]
    assert [row["text"] for row in shown] == [
        f"review {i.removeprefix('s')}" for i in targets[0].meta["shot_row_ids"]
    ]


def test_qa_drafts_have_no_expected_label() -> None:
    seeds = [LabelledRow(row_id="q1", input="1+1?", output="#### 2")]
    targets = ARTE().plan(_ctx("draft", task=QA, labels=None, train_rows=seeds))
    assert {t.expected_label for t in targets} == {None}
    schema = targets[0].request.response_schema
    assert schema is not None
    item = schema["properties"]["examples"]["items"]
    assert list(item["properties"]) == ["question", "rationale", "answer"]


def test_generation_tasks_are_refused() -> None:
    generation = TaskSpec(kind=TaskKind.generation, instructions="Summarise.")
    with pytest.raises(ValueError, match=r"task\.kind"):
        ARTE().plan(_ctx("draft", task=generation))


def test_budget_trims_the_drafts() -> None:
    targets = ARTE().plan(_ctx("draft", {"n_drafts": 12, "drafts_per_target": 4}, max_examples=5))
    assert [t.n_examples for t in targets] == [4, 1]


# --------------------------------------------------------------------------- final phase


def test_final_phase_shows_best_and_worst_drafts() -> None:
    targets = ARTE().plan(
        _ctx("final", {"n_best": 2, "n_worst": 2, "examples_final": 20, "examples_per_target": 8})
    )
    assert [t.n_examples for t in targets] == [8, 8, 4]
    assert {t.reason for t in targets} == {"aligned"}
    assert {t.request.template_id for t in targets} == {"arte_final"}
    first = targets[0]
    assert first.meta["best_draft_ids"] == ["d1", "d5"]
    assert first.meta["worst_draft_ids"] == ["d4", "d2"]
    blocks = _blocks(first)
    assert blocks["Highest-scored drafts"] == [
        {"text": "Great phone", "rationale": "praise", "label": "positive", "score": 0.9},
        {"text": "Superb", "rationale": "praise", "label": "positive", "score": 0.9},
    ]
    assert [d["text"] for d in blocks["Lowest-scored drafts"]] == ["Fine I guess", "Meh"]
    assert "more like the highest-scored drafts" in first.request.messages[1].content


def test_equal_scores_are_no_preference() -> None:
    flat = [d.model_copy(update={"score": 0.5}) for d in _drafts()]
    best, worst = best_and_worst(flat, n_best=2, n_worst=2)
    assert [d.draft_id for d in best] == ["d1", "d2"]
    assert worst == []
    (target, *_) = ARTE().plan(_ctx("final", drafts=flat))
    assert "Lowest-scored drafts" not in target.request.messages[1].content


def test_final_phase_without_scored_drafts_plans_nothing() -> None:
    assert ARTE().plan(_ctx("final", drafts=[])) == []


def test_final_plan_is_deterministic() -> None:
    ctx = _ctx("final")
    assert [t.model_dump() for t in ARTE().plan(ctx)] == [t.model_dump() for t in ARTE().plan(ctx)]


def test_params_bound_the_scoring_slice() -> None:
    assert validate_params("arte", {"score_rows": 16}) == ARTEParams(score_rows=16)
    with pytest.raises(ValueError, match=r"params\.score_rows"):
        validate_params("arte", {"score_rows": 0})


def test_split_in_chunks() -> None:
    assert split_in_chunks(10, 4) == [4, 4, 2]
    assert split_in_chunks(8, 4) == [4, 4]
    assert split_in_chunks(3, 5) == [3]


# --------------------------------------------------------------------------- parse


def test_parse_keeps_rationales() -> None:
    ctx = _ctx("final")
    target = ARTE().plan(ctx)[0]
    output = {
        "examples": [
            {"text": "Loved it", "rationale": "  clear praise ", "label": "positive"},
            {"text": "No rationale", "label": "negative"},
            {"text": "Blank rationale", "rationale": " ", "label": "negative"},
            {"rationale": "no text", "label": "negative"},
        ]
    }
    candidates = ARTE().parse(target, output, ctx)
    assert [(c.input, c.rationale, c.output) for c in candidates] == [
        ("Loved it", "clear praise", "positive"),
        ("No rationale", None, "negative"),
        ("Blank rationale", None, "negative"),
    ]
    assert {c.kind for c in candidates} == {ExampleKind.augmented}


# --------------------------------------------------------------------------- preference pairs


def test_preference_pairs_pair_within_a_prompt_widest_margin_first() -> None:
    pairs = preference_pairs(_drafts(), n_pairs=10)
    assert [(c.draft_id, r.draft_id) for c, r in pairs] == [("d5", "d4"), ("d1", "d2")]
    for chosen, rejected in pairs:
        assert chosen.score > rejected.score
        assert chosen.target_id == rejected.target_id


def test_preference_pairs_never_reuse_a_draft_and_respect_the_limit() -> None:
    drafts = [
        ScoredDraft(draft_id=f"d{i}", input=f"x{i}", output="positive", score=i / 10)
        for i in range(7)
    ]
    pairs = preference_pairs(drafts, n_pairs=10)
    assert [(c.draft_id, r.draft_id) for c, r in pairs] == [
        ("d6", "d0"),
        ("d5", "d1"),
        ("d4", "d2"),
    ]
    used = [d.draft_id for pair in pairs for d in pair]
    assert len(used) == len(set(used))
    assert len(preference_pairs(drafts, n_pairs=1)) == 1
    assert preference_pairs(drafts, n_pairs=0) == []


def test_no_pairs_without_a_score_difference() -> None:
    flat = [d.model_copy(update={"score": 0.5}) for d in _drafts()]
    assert preference_pairs(flat, n_pairs=5) == []
    assert preference_pairs([], n_pairs=5) == []
