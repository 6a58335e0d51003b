"""PGKD planning and parsing on fixed held-out predictions; the shared stopping rule."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from typing import Any

import pytest

from service.domain.spec import Budget, Stopping, TaskKind, TaskSpec
from service.domain.strategies import (
    PGKD,
    EvaluatedRow,
    ExampleKind,
    GenerationTarget,
    IterationOutcome,
    PlanContext,
    decide_by_metric,
    get_strategy,
    validate_params,
)

LABELS = ["billing", "other", "refund", "shipping"]
TASK = TaskSpec(kind=TaskKind.classification, instructions="Route the ticket.", labels=LABELS)
# row id, gold, predicted, confidence
VALIDATION: list[tuple[str, str, str | None, float | None]] = [
    ("v01", "billing", "billing", 0.9),
    ("v02", "billing", "billing", 0.8),
    ("v03", "shipping", "billing", 0.95),
    ("v04", "shipping", "billing", 0.85),
    ("v05", "shipping", "billing", 0.3),
    ("v06", "shipping", "shipping", 0.7),
    ("v07", "refund", "shipping", 0.9),
    ("v08", "refund", "refund", 0.8),
    ("v09", "other", None, None),
    ("v10", "other", "other", 0.6),
    ("v11", "other", "other", 0.9),
    ("v12", "billing", "billing", 0.99),
]
DATA_RE = re.compile(r"(?:^|\n)([^\n]*):\n<data>\n(.*?)\n?</data>", re.DOTALL)


def _evaluated(rows: Sequence[tuple[str, str, str | None, float | None]]) -> list[EvaluatedRow]:
    return [
        EvaluatedRow(
            row_id=row_id,
            split="validation",
            input=f"text of {row_id}",
            gold=gold,
            predicted=predicted,
            confidence=confidence,
            correct=gold == predicted,
        )
        for row_id, gold, predicted, confidence in rows
    ]


def _ctx(params: dict[str, Any] | None = None, **update: Any) -> PlanContext:
    ctx = PlanContext(
        task=TASK,
        params=validate_params("pgkd", params or {}),
        iteration=1,
        phase="generate",
        seed=7,
        labels=LABELS,
        evaluated=_evaluated(VALIDATION),
        max_examples=20,
    )
    return ctx.model_copy(update=update)


def _blocks(target: GenerationTarget) -> dict[str, list[dict[str, Any]]]:
    """Data blocks of the user message by their heading line."""
    user = target.request.messages[1].content
    return {
        heading.strip(): [json.loads(line) for line in body.split("\n") if line]
        for heading, body in DATA_RE.findall(user)
    }


def _by_id(targets: list[GenerationTarget]) -> dict[str, GenerationTarget]:
    return {t.target_id: t for t in targets}


# --------------------------------------------------------------------------- plan


def test_the_share_goes_to_the_labels_by_weakness_and_half_to_their_confusions() -> None:
    targets = PGKD().plan(_ctx())
    # F1: billing 0.667, other 0.8, refund 0.667, shipping 0.333; weights 0.25 + (1 - F1)
    # share 20 examples as 5, 3, 5, 7; half of a confused class's share goes to its pairs.
    assert [
        (t.target_id, t.reason, t.kind, t.expected_label, t.source_row_id, t.n_examples)
        for t in targets
    ] == [
        ("weak:billing", "weak_class", ExampleKind.augmented, "billing", None, 5),
        ("weak:other", "weak_class", ExampleKind.augmented, "other", None, 3),
        ("pair:refund->shipping", "confused_pair", ExampleKind.hard_negative, "refund", "v07", 2),
        ("weak:refund", "weak_class", ExampleKind.augmented, "refund", "v07", 3),
        (
            "pair:shipping->billing",
            "confused_pair",
            ExampleKind.hard_negative,
            "shipping",
            "v03",
            3,
        ),
        ("weak:shipping", "weak_class", ExampleKind.augmented, "shipping", "v03", 4),
    ]
    assert all(t.request.template_id == "pgkd" for t in targets)
    assert _by_id(targets)["pair:shipping->billing"].meta == {
        "f1": pytest.approx(2 / 6),
        "confused_with": "billing",
    }


def test_limits_aim_at_the_weakest_classes_and_most_frequent_pairs_only() -> None:
    targets = PGKD().plan(_ctx({"max_weak_classes": 1, "max_confused_pairs": 1}))
    assert {t.expected_label for t in targets} == {"shipping"}
    assert sum(t.n_examples for t in targets) == 20
    assert [t.target_id for t in targets if t.reason == "confused_pair"] == [
        "pair:shipping->billing",
        "pair:shipping->billing#2",
    ]
    only_pairs = PGKD().plan(_ctx({"max_weak_classes": 0}))
    assert {t.reason for t in only_pairs} == {"confused_pair"}
    assert sum(t.n_examples for t in only_pairs) == 20


def test_a_missing_prediction_is_no_class_to_contrast_with() -> None:
    ids = [t.target_id for t in PGKD().plan(_ctx())]
    assert "pair:other-><none>" not in ids
    assert [i for i in ids if i.startswith("pair:")] == [
        "pair:refund->shipping",
        "pair:shipping->billing",
    ]


def test_prompt_carries_the_report_table_weakest_first() -> None:
    pair = _by_id(PGKD().plan(_ctx()))["pair:shipping->billing"]
    table = _blocks(pair)["Per-class report, weakest classes first"]
    assert [row["class"] for row in table] == ["shipping", "billing", "refund", "other"]
    assert table[0] == {
        "class": "shipping",
        "precision": 0.5,
        "recall": 0.25,
        "f1": 0.333,
        "support": 4,
    }
    user = pair.request.messages[1].content
    assert "Held-out accuracy 0.583, macro-F1 0.617, on 12 rows." in user


def test_prompt_carries_hard_negatives_paired_with_the_confused_class() -> None:
    blocks = _blocks(_by_id(PGKD().plan(_ctx()))["pair:shipping->billing"])
    negatives = blocks["Hard negatives (confident mistakes)"]
    # The pair's own confident mistakes first, then others involving its classes; v05 is below
    # min_confidence and v09 has no prediction to pair with.
    assert negatives == [
        {"text": "text of v03", "gold": "shipping", "confused_with": "billing", "confidence": 0.95},
        {"text": "text of v04", "gold": "shipping", "confused_with": "billing", "confidence": 0.85},
        {"text": "text of v07", "gold": "refund", "confused_with": "shipping", "confidence": 0.9},
    ]
    wrong = blocks["Classified wrongly"]
    assert wrong == [
        {"text": "text of v05", "gold": "shipping", "predicted": "billing"},
        {"text": "text of v09", "gold": "other", "predicted": None},
    ]
    # Rows the student gets right come from the class it confuses the target with (all three
    # billing ones), then from other classes, never from the target itself.
    correct = blocks["Classified correctly"]
    assert len(correct) == 4
    assert [row["label"] for row in correct[:3]] == ["billing"] * 3
    assert "shipping" not in {row["label"] for row in correct}


def test_a_class_prompt_shows_its_own_held_out_rows_first_but_no_seed_row() -> None:
    # A seed row the fold students got right: the student trained on it, so it is not shown.
    seed = EvaluatedRow(
        row_id="train:1",
        split="train",
        input="a shipping seed the fold students got right",
        gold="shipping",
        predicted="shipping",
        confidence=0.9,
        correct=True,
    )
    targets = _by_id(PGKD().plan(_ctx(evaluated=[seed, *_evaluated(VALIDATION)])))
    correct = _blocks(targets["weak:shipping"])["Classified correctly"]
    # v06 is shipping's one held-out row the student gets right; then the class it confuses
    # shipping with (billing) and the one it confuses with shipping (refund).
    assert correct[0] == {"text": "text of v06", "label": "shipping"}
    assert len(correct) == 4
    assert {row["label"] for row in correct[1:]} <= {"billing", "refund"}
    assert "a shipping seed the fold students got right" not in {row["text"] for row in correct}
    # The pair's prompt still shows none of the target's own right rows.
    pair = _blocks(targets["pair:shipping->billing"])["Classified correctly"]
    assert "shipping" not in {row["label"] for row in pair}


def test_the_prompts_of_one_large_share_show_different_rows() -> None:
    params = {"examples_per_target": 1, "n_hard_negatives": 1}
    targets = _by_id(PGKD().plan(_ctx(params, max_examples=40)))
    shown = [
        _blocks(targets[f"weak:shipping{suffix}"])["Hard negatives (confident mistakes)"]
        for suffix in ("", "#2")
    ]
    assert [s[0]["text"] for s in shown] == ["text of v03", "text of v04"]


def test_prompt_request_names_the_pair() -> None:
    targets = _by_id(PGKD().plan(_ctx()))
    pair_user = targets["pair:shipping->billing"].request.messages[1].content
    assert 'confuses class "shipping" with class "billing"' in pair_user
    assert 'Write 3 new examples of class "shipping"' in pair_user
    weak_user = targets["weak:billing"].request.messages[1].content
    assert 'The student is weak on class "billing".' in weak_user


def test_min_confidence_selects_the_hard_negatives() -> None:
    blocks = _blocks(_by_id(PGKD().plan(_ctx({"min_confidence": 0.9})))["weak:shipping"])
    negatives = blocks["Hard negatives (confident mistakes)"]
    assert [n["text"] for n in negatives] == ["text of v03", "text of v07"]


def test_report_table_is_capped_but_keeps_the_target_classes() -> None:
    targets = _by_id(PGKD().plan(_ctx({"max_report_classes": 1})))
    table = _blocks(targets["pair:refund->shipping"])["Per-class report, weakest classes first"]
    assert [row["class"] for row in table] == ["shipping", "refund"]


def test_the_share_sets_the_plan_and_zero_plans_nothing() -> None:
    assert sum(t.n_examples for t in PGKD().plan(_ctx(max_examples=7))) == 7
    assert PGKD().plan(_ctx(max_examples=0)) == []


def test_a_perfect_student_gets_no_targets() -> None:
    perfect = [(r, g, g, 0.9) for r, g, _, _ in VALIDATION]
    assert PGKD().plan(_ctx(evaluated=_evaluated(perfect))) == []


def test_seed_rows_judged_out_of_fold_are_mined_beside_validation_rows() -> None:
    seed = EvaluatedRow(
        row_id="train:3",
        split="train",
        input="a seed the fold students missed",
        gold="refund",
        predicted="billing",
        confidence=0.97,
        correct=False,
    )
    targets = _by_id(PGKD().plan(_ctx(evaluated=[*_evaluated(VALIDATION), seed])))
    assert "pair:refund->billing" in targets
    negatives = _blocks(targets["pair:refund->billing"])["Hard negatives (confident mistakes)"]
    assert negatives[0]["text"] == "a seed the fold students missed"


def test_plan_is_deterministic_and_independent_of_row_order() -> None:
    ctx = _ctx()
    first = [t.model_dump() for t in PGKD().plan(ctx)]
    assert [t.model_dump() for t in PGKD().plan(ctx)] == first
    shuffled = list(ctx.evaluated)
    random.Random(1).shuffle(shuffled)
    reordered = ctx.model_copy(update={"evaluated": shuffled})
    assert [t.model_dump() for t in PGKD().plan(reordered)] == first


def test_pgkd_needs_held_out_predictions_and_a_classification_task() -> None:
    with pytest.raises(ValueError, match="held-out rows"):
        PGKD().plan(_ctx(evaluated=[]))
    qa = TaskSpec(kind=TaskKind.qa, instructions="Solve.")
    with pytest.raises(ValueError, match=r"task\.kind"):
        PGKD().plan(_ctx(task=qa))


def test_params_need_some_targets() -> None:
    with pytest.raises(ValueError, match="cannot both be 0"):
        validate_params("pgkd", {"max_weak_classes": 0, "max_confused_pairs": 0})
    with pytest.raises(ValueError, match=r"params\.min_confidence"):
        validate_params("pgkd", {"min_confidence": 1.5})


def test_seed_rows_are_scored_out_of_fold_for_mining() -> None:
    assert get_strategy("pgkd").mining_split == "train"


# --------------------------------------------------------------------------- parse


def test_parse_keeps_teacher_labels_for_the_filter_to_judge() -> None:
    ctx = _ctx()
    pair = _by_id(PGKD().plan(ctx))["pair:shipping->billing"]
    output = {
        "examples": [
            {"text": "My parcel is late but I was charged twice", "label": "shipping"},
            {"text": "Charged twice", "label": "billing"},
            {"text": "no label"},
            {"text": "Wrong label", "label": "spam"},
        ]
    }
    candidates = PGKD().parse(pair, output, ctx)
    assert [(c.output, c.kind) for c in candidates] == [
        ("shipping", ExampleKind.hard_negative),
        ("billing", ExampleKind.hard_negative),
        ("spam", ExampleKind.hard_negative),
    ]
    assert all(c.meta["expected_label"] == "shipping" for c in candidates)


# --------------------------------------------------------------------------- decide (shared)


def _history(
    *metrics: float | None, accepted: int = 10, targets: int = 3, excluded: Sequence[int] = ()
) -> list[IterationOutcome]:
    return [
        IterationOutcome(
            iteration=i,
            metric=m,
            accepted=0 if i == 0 else accepted,
            targets=0 if i == 0 else targets,
            included=i not in excluded,
        )
        for i, m in enumerate(metrics)
    ]


def _decide(history: list[IterationOutcome], **kwargs: Any) -> tuple[bool, str | None, int | None]:
    stopping = Stopping(**{k: v for k, v in kwargs.items() if k in Stopping.model_fields})
    budget = Budget(**{k: v for k, v in kwargs.items() if k in Budget.model_fields})
    decision = PGKD().decide(history, stopping=stopping, budget=budget, ctx=None)
    return decision.stop, decision.reason, decision.best_iteration


def test_decide_continues_and_exports_the_latest_kept_iteration() -> None:
    assert _decide(_history(0.5, 0.6, 0.7), max_iterations=5) == (False, None, 2)


def test_a_dip_within_the_noise_is_kept_and_does_not_stop_the_loop() -> None:
    # Iterations 2 and 3 score below iteration 1 but were kept (within the noise): the data
    # stays, the export holds all of it, and patience is not spent.
    assert _decide(_history(0.5, 0.7, 0.65, 0.68), patience=2, max_iterations=9) == (
        False,
        None,
        3,
    )


def test_decide_stops_after_patience_excluded_iterations_in_a_row() -> None:
    history = _history(0.5, 0.7, 0.6, 0.61, excluded=(2, 3))
    assert _decide(history, patience=2, max_iterations=9) == (True, "patience", 1)
    # An excluded iteration followed by a kept one starts the count again.
    history = _history(0.5, 0.7, 0.6, 0.72, 0.6, excluded=(2, 4))
    assert _decide(history, patience=2, max_iterations=9) == (False, None, 3)


def test_when_every_iteration_is_excluded_the_seed_set_is_what_is_exported() -> None:
    history = _history(0.845, 0.815, 0.80, excluded=(1, 2))
    assert _decide(history, patience=2, max_iterations=9) == (True, "patience", 0)


def test_decide_stops_when_the_kept_student_reaches_the_target() -> None:
    assert _decide(_history(0.5, 0.91), target=0.9, max_iterations=9) == (
        True,
        "target_reached",
        1,
    )
    # An excluded iteration's score does not count: its data is not in the export.
    assert _decide(_history(0.5, 0.91, excluded=(1,)), target=0.9, max_iterations=9) == (
        False,
        None,
        0,
    )


def test_decide_stops_after_max_iterations() -> None:
    assert _decide(_history(0.5, 0.6, 0.7), max_iterations=2) == (True, "max_iterations", 2)


def test_decide_stops_when_nothing_was_planned() -> None:
    assert _decide(_history(0.5, 0.6, targets=0), max_iterations=9) == (True, "no_targets", 1)


def test_decide_stops_when_the_example_budget_is_spent() -> None:
    assert _decide(_history(0.5, 0.6, 0.7, accepted=20), max_examples=40, max_iterations=9) == (
        True,
        "max_examples",
        2,
    )


def test_decide_ignores_unscored_iterations_and_history_order() -> None:
    history = list(reversed(_history(0.5, None, 0.6)))
    assert _decide(history, patience=1, max_iterations=9) == (False, None, 2)


def test_decide_on_empty_history() -> None:
    decision = decide_by_metric([], stopping=Stopping(), budget=Budget())
    assert (decision.stop, decision.best_iteration) == (False, None)
