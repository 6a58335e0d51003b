"""LLM2LLM planning, parsing and stopping on fixed inputs; the strategy registry."""

from __future__ import annotations

import json
import random
import re
from typing import Any, Literal

import pytest

from service.domain.spec import Budget, Stopping, TaskKind, TaskSpec
from service.domain.strategies import (
    LLM2LLM,
    STRATEGIES,
    EvaluatedRow,
    ExampleKind,
    GenerationTarget,
    IterationOutcome,
    LabelledRow,
    LLM2LLMParams,
    PlanContext,
    get_strategy,
    validate_params,
)
from service.domain.strategies.base import contrast_count

LABELS = ["billing", "shipping", "refund"]
CLASSIFICATION = TaskSpec(kind=TaskKind.classification, instructions="Route it.", labels=LABELS)
QA = TaskSpec(kind=TaskKind.qa, instructions="Solve the word problem.")
GENERATION = TaskSpec(kind=TaskKind.generation, instructions="Summarise in one line.")
DATA_RE = re.compile(r"<data>\n(.*?)\n</data>", re.DOTALL)


def _seeds(n: int = 8) -> list[LabelledRow]:
    return [
        LabelledRow(row_id=f"s{i}", input=f"seed text {i}", output=LABELS[i % 3]) for i in range(n)
    ]


def _verdict(
    row: LabelledRow, predicted: str, split: Literal["train", "validation"] = "train"
) -> EvaluatedRow:
    return EvaluatedRow(
        row_id=row.row_id,
        split=split,
        input=row.input,
        gold=row.output,
        predicted=predicted,
        confidence=0.8,
        correct=predicted == row.output,
    )


def _ctx(
    seeds: list[LabelledRow],
    wrong: set[str],
    *,
    task: TaskSpec = CLASSIFICATION,
    params: dict[str, Any] | None = None,
    extra: list[EvaluatedRow] | None = None,
    iteration: int = 1,
    seed: int = 0,
    max_examples: int | None = None,
) -> PlanContext:
    evaluated = [
        _verdict(row, "refund" if row.output != "refund" else "billing")
        if row.row_id in wrong
        else _verdict(row, row.output)
        for row in seeds
    ]
    return PlanContext(
        task=task,
        params=validate_params("llm2llm", params or {}),
        iteration=iteration,
        phase="generate",
        seed=seed,
        labels=task.labels,
        train_rows=seeds,
        evaluated=evaluated + (extra or []),
        max_examples=max_examples,
    )


def _data(target: GenerationTarget) -> list[dict[str, Any]]:
    blocks = DATA_RE.findall(target.request.messages[1].content)
    return [json.loads(line) for block in blocks for line in block.split("\n")]


# --------------------------------------------------------------------------- plan


def test_one_target_per_wrong_seed_row() -> None:
    seeds = _seeds()
    targets = LLM2LLM().plan(_ctx(seeds, {"s1", "s4"}))
    assert [t.target_id for t in targets] == ["err:s1", "err:s4"]
    first = targets[0]
    assert first.reason == "wrong_seed"
    assert first.source_row_id == "s1"
    assert first.expected_label == "shipping"
    assert first.n_examples == 3
    assert first.kind is ExampleKind.augmented
    assert first.request.template_id == "llm2llm"
    assert first.request.response_schema is not None
    examples = first.request.response_schema["properties"]["examples"]
    assert examples["minItems"] == examples["maxItems"] == 3
    assert examples["items"]["properties"]["label"]["enum"] == LABELS
    assert _data(first) == [
        {"text": "seed text 1", "label": "shipping", "student_prediction": "refund"}
    ]
    assert 'Write 3 new examples like it, each labelled "shipping".' in (
        first.request.messages[1].content
    )


def test_no_wrong_seed_rows_means_no_targets() -> None:
    assert LLM2LLM().plan(_ctx(_seeds(), set())) == []


def test_synthetic_errors_never_seed_new_data_held_out_validation_errors_do() -> None:
    seeds = _seeds(3)
    synthetic = LabelledRow(row_id="gen-1", input="a synthetic example", output="billing")
    held_out = LabelledRow(row_id="v1", input="a validation row", output="billing")
    extra = [_verdict(synthetic, "refund"), _verdict(held_out, "refund", split="validation")]
    targets = LLM2LLM().plan(_ctx(seeds, {"s2"}, extra=extra))
    # The orchestration hands the strategy only the validation rows that steer this iteration
    # (tests/unit/domain/test_selection.py); a real row the student got wrong is a real error.
    assert [(t.source_row_id, t.reason) for t in targets] == [
        ("s2", "wrong_seed"),
        ("v1", "wrong_validation"),
    ]
    assert _data(targets[1]) == [
        {"text": "a validation row", "label": "billing", "student_prediction": "refund"}
    ]


def test_the_seed_row_not_the_evaluation_supplies_input_and_gold() -> None:
    seeds = _seeds(3)
    tampered = EvaluatedRow(
        row_id="s0",
        split="train",
        input="other text",
        gold="refund",
        predicted="shipping",
        confidence=0.9,
        correct=False,
    )
    ctx = _ctx(seeds, set()).model_copy(update={"evaluated": [tampered]})
    (target,) = LLM2LLM().plan(ctx)
    assert _data(target)[0]["text"] == "seed text 0"
    assert target.expected_label == "billing"


def test_errors_are_capped_and_sampled_deterministically_in_seed_order() -> None:
    seeds = _seeds(20)
    wrong = {row.row_id for row in seeds}
    ctx = _ctx(seeds, wrong, params={"max_errors_per_iteration": 5})
    first = LLM2LLM().plan(ctx)
    assert len(first) == 5
    order = [int(t.source_row_id.removeprefix("s")) for t in first if t.source_row_id]
    assert order == sorted(order)
    again = LLM2LLM().plan(ctx)
    assert [t.model_dump() for t in again] == [t.model_dump() for t in first]
    other_seeds = {
        tuple(
            t.source_row_id
            for t in LLM2LLM().plan(
                _ctx(seeds, wrong, seed=s, params={"max_errors_per_iteration": 5})
            )
        )
        for s in range(5)
    }
    assert len(other_seeds) > 1, "the job seed drives the sample"


def test_plan_does_not_depend_on_the_order_rows_were_loaded_in() -> None:
    seeds = _seeds(12)
    ctx = _ctx(seeds, {"s1", "s3", "s7", "s8"}, params={"max_errors_per_iteration": 2})
    shuffled = list(ctx.evaluated)
    random.Random(3).shuffle(shuffled)
    reordered = ctx.model_copy(update={"evaluated": shuffled})
    assert [t.model_dump() for t in LLM2LLM().plan(reordered)] == [
        t.model_dump() for t in LLM2LLM().plan(ctx)
    ]


def test_a_context_rebuilt_from_json_plans_the_same() -> None:
    ctx = _ctx(_seeds(), {"s1", "s2"}, params={"examples_per_error": 4})
    rebuilt = PlanContext.model_validate_json(ctx.model_dump_json())
    assert rebuilt.params == {"examples_per_error": 4, "max_errors_per_iteration": None}
    assert [t.model_dump() for t in LLM2LLM().plan(rebuilt)] == [
        t.model_dump() for t in LLM2LLM().plan(ctx)
    ]


def _share_of(target: GenerationTarget) -> str:
    """The label whose share a target is spent out of: a contrast target (examples of the label
    the student wrongly predicted) is spent out of the share of the row's own label."""
    label = target.meta.get("contrast_of", target.expected_label)
    assert isinstance(label, str)
    return label


def _spent_by_label(targets: list[GenerationTarget]) -> dict[str, int]:
    spent: dict[str, int] = {}
    for target in targets:
        spent[_share_of(target)] = spent.get(_share_of(target), 0) + target.n_examples
    return spent


def test_the_share_is_spent_over_the_labels_by_error_rate_with_a_floor() -> None:
    seeds = _seeds(12)  # four rows a label
    # billing: 3 of 4 wrong, shipping: 1 of 4, refund: none.
    targets = LLM2LLM().plan(_ctx(seeds, {"s0", "s3", "s6", "s1"}, max_examples=20))
    # Weights 0.25 + error rate: 1.0, 0.5, 0.25 → 20 examples as 11, 6, 3 (largest remainders).
    assert _spent_by_label(targets) == {"billing": 11, "shipping": 6, "refund": 3}
    billing = [t for t in targets if t.expected_label == "billing"]
    assert {t.source_row_id for t in billing} == {"s0", "s3", "s6"}
    assert all(t.reason == "wrong_seed" and t.n_examples <= 3 for t in billing)
    # A label the student gets right is not starved: examples like its rows (coverage), shown
    # as what they are, not as mistakes.
    refund = [t for t in targets if _share_of(t) == "refund"]
    assert [t.reason for t in refund] == ["coverage"] * 3
    assert {t.request.template_id for t in refund} == {"augment"}
    assert all("student_prediction" not in _data(t)[0] for t in refund)
    assert "got one of its training examples wrong" not in refund[0].request.messages[0].content


def test_coverage_prefers_validation_rows_the_student_never_trained_on() -> None:
    seeds = _seeds(6)
    held_out = LabelledRow(row_id="v9", input="a validation refund", output="refund")
    ctx = _ctx(seeds, {"s0"}, extra=[_verdict(held_out, "refund", "validation")], max_examples=9)
    refund = [t for t in LLM2LLM().plan(ctx) if _share_of(t) == "refund"]
    assert refund and refund[0].source_row_id == "v9"


def test_a_label_share_covers_its_held_out_rows_and_weighs_validation_mistakes_double() -> None:
    # billing (LABELS[0]) has seed rows s0, s3 (s0 wrong out of fold), one wrong validation row
    # and two it gets right; nothing else is wrong.
    seeds = _seeds(6)
    rows = {
        "v1": ("a billing question", "refund"),
        "v2": ("another billing question", "billing"),
        "v3": ("a third billing question", "billing"),
    }
    extra = [
        _verdict(LabelledRow(row_id=k, input=text, output="billing"), pred, "validation")
        for k, (text, pred) in rows.items()
    ]
    targets = LLM2LLM().plan(_ctx(seeds, {"s0"}, extra=extra, max_examples=30))
    billing = {
        t.source_row_id: t
        for t in targets
        if t.expected_label == "billing" and t.reason != "contrast"
    }
    asked: dict[str | None, int] = {}
    for t in targets:
        if _share_of(t) == "billing":
            asked[t.source_row_id] = asked.get(t.source_row_id, 0) + t.n_examples
    # Every held-out row of the label is shown; the seed row it gets right is not (the student
    # trained on it).
    assert set(billing) == {"s0", "v1", "v2", "v3"}
    assert billing["s0"].reason == "wrong_seed" and billing["v1"].reason == "wrong_validation"
    assert billing["v2"].reason == billing["v3"].reason == "coverage"
    assert billing["v2"].request.template_id == "augment"
    # Weights 1, 2, 1, 1: a validation mistake is asked for twice what a covered row is; a
    # seed mistake as much, since the student trains on it (largest remainders: within one
    # example).
    share = _spent_by_label(targets)["billing"]
    assert sum(asked.values()) == share
    for row_id, weight in (("s0", 1), ("v1", 2), ("v2", 1), ("v3", 1)):
        assert abs(asked[row_id] - share * weight / 5) < 1
    assert asked["v1"] > asked["s0"]
    assert all(t.n_examples <= 3 for t in targets), "at most examples_per_error per prompt"
    # A label with no held-out row but its seed rows still gets its floor, from the seed rows.
    assert {t.reason for t in targets if _share_of(t) == "refund"} == {"coverage"}


def test_the_share_trims_the_plan_and_zero_plans_nothing() -> None:
    seeds = _seeds()
    targets = LLM2LLM().plan(_ctx(seeds, {"s0", "s1", "s2", "s3"}, max_examples=7))
    assert sum(t.n_examples for t in targets) == 7
    assert LLM2LLM().plan(_ctx(seeds, {"s0"}, max_examples=0)) == []


def test_qa_spends_its_share_over_the_wrong_rows() -> None:
    seeds = [
        LabelledRow(row_id=f"q{i}", input=f"{i} + 1?", output=f"#### {i + 1}") for i in range(4)
    ]
    ctx = _ctx(seeds, {"q0", "q1"}, task=QA, max_examples=10)
    targets = LLM2LLM().plan(ctx)
    assert sum(t.n_examples for t in targets) == 10
    assert {t.source_row_id for t in targets} == {"q0", "q1"}
    assert max(t.n_examples for t in targets) <= 3


def test_a_seed_still_wrong_next_iteration_gets_a_fresh_request() -> None:
    seeds = _seeds(3)
    first = LLM2LLM().plan(_ctx(seeds, {"s1"}, iteration=1))[0]
    second = LLM2LLM().plan(_ctx(seeds, {"s1"}, iteration=2))[0]
    assert first.request.messages == second.request.messages
    assert first.request.fingerprint("m") != second.request.fingerprint("m")


def test_qa_targets_ask_for_the_same_skill_with_new_answers() -> None:
    seeds = [
        LabelledRow(row_id="q1", input="Tom has 3 apples and buys 4.", output="3+4=7\n#### 7"),
        LabelledRow(row_id="q2", input="Ann has 10 pens and loses 2.", output="10-2=8\n#### 8"),
    ]
    evaluated = [
        EvaluatedRow(
            row_id="q1",
            split="train",
            input=seeds[0].input,
            gold="7",
            predicted="12",
            correct=False,
        ),
        EvaluatedRow(
            row_id="q2", split="train", input=seeds[1].input, gold="8", predicted="8", correct=True
        ),
    ]
    ctx = PlanContext(
        task=QA,
        params=LLM2LLMParams(examples_per_error=2),
        iteration=1,
        phase="generate",
        train_rows=seeds,
        evaluated=evaluated,
    )
    (target,) = LLM2LLM().plan(ctx)
    assert target.expected_label is None
    assert _data(target) == [
        {"question": seeds[0].input, "answer": "3+4=7\n#### 7", "student_prediction": "12"}
    ]
    schema = target.request.response_schema
    assert schema is not None
    item = schema["properties"]["examples"]["items"]
    assert list(item["properties"]) == ["question", "rationale", "answer"]


def test_generation_tasks_get_free_text_outputs() -> None:
    seeds = [LabelledRow(row_id="g1", input="A long text.", output="Short.")]
    evaluated = [
        EvaluatedRow(
            row_id="g1",
            split="train",
            input="A long text.",
            gold="Short.",
            predicted="Long.",
            correct=False,
        )
    ]
    ctx = PlanContext(
        task=GENERATION,
        params=LLM2LLMParams(),
        iteration=1,
        phase="generate",
        train_rows=seeds,
        evaluated=evaluated,
    )
    (target,) = LLM2LLM().plan(ctx)
    schema = target.request.response_schema
    assert schema is not None
    item = schema["properties"]["examples"]["items"]
    assert item["properties"] == {"input": {"type": "string"}, "output": {"type": "string"}}


def test_unknown_phase_is_refused() -> None:
    ctx = _ctx(_seeds(), {"s1"}).model_copy(update={"phase": "final"})
    with pytest.raises(ValueError, match="unknown phase"):
        LLM2LLM().plan(ctx)


# --------------------------------------------------------------------------- parse


def _target(n: int = 3) -> GenerationTarget:
    targets = LLM2LLM().plan(_ctx(_seeds(), {"s1"}, params={"examples_per_error": n}))
    return targets[0]


def test_parse_keeps_good_items_and_skips_malformed_ones() -> None:
    target = _target(3)
    output = {
        "examples": [
            {"text": "  Where is my parcel?  ", "label": "shipping"},
            "not an object",
            {"text": "missing label"},
            {"text": None, "label": "shipping"},
            {"text": "Label outside the set", "label": "weather"},
            {"text": "Another label", "label": "billing"},
            {"text": "Past the requested count", "label": "shipping"},
        ]
    }
    candidates = LLM2LLM().parse(target, output, _ctx(_seeds(), {"s1"}))
    assert [(c.input, c.output) for c in candidates] == [
        ("Where is my parcel?", "shipping"),
        ("Label outside the set", "weather"),
        ("Another label", "billing"),
    ]
    assert all(c.kind is ExampleKind.augmented for c in candidates)
    assert candidates[0].meta == {"item_index": 0, "expected_label": "shipping"}
    assert candidates[1].meta["item_index"] == 4


@pytest.mark.parametrize("output", [None, [], "text", {"items": []}, {"examples": {"a": 1}}])
def test_parse_raises_only_on_a_wrong_top_level_shape(output: Any) -> None:
    with pytest.raises(ValueError):
        LLM2LLM().parse(_target(), output, _ctx(_seeds(), {"s1"}))


def test_parse_of_an_empty_list_is_empty() -> None:
    assert LLM2LLM().parse(_target(), {"examples": []}, _ctx(_seeds(), {"s1"})) == []


# --------------------------------------------------------------------------- decide


def _history(*metrics: float | None) -> list[IterationOutcome]:
    return [
        IterationOutcome(iteration=i, metric=m, accepted=5, targets=2)
        for i, m in enumerate(metrics)
    ]


def test_decide_stops_when_no_seed_example_is_wrong() -> None:
    seeds = _seeds()
    decision = LLM2LLM().decide(
        _history(0.5, 0.6),
        stopping=Stopping(),
        budget=Budget(max_iterations=5),
        ctx=_ctx(seeds, set()),
    )
    assert (decision.stop, decision.reason, decision.best_iteration) == (True, "no_errors", 1)


def test_decide_continues_while_seed_errors_remain() -> None:
    decision = LLM2LLM().decide(
        _history(0.5, 0.6),
        stopping=Stopping(),
        budget=Budget(max_iterations=5),
        ctx=_ctx(_seeds(), {"s3"}),
    )
    assert (decision.stop, decision.reason) == (False, None)


def test_decide_without_an_evaluation_keeps_going() -> None:
    ctx = _ctx(_seeds(), set()).model_copy(update={"evaluated": []})
    decision = LLM2LLM().decide(
        _history(0.5, 0.6), stopping=Stopping(), budget=Budget(max_iterations=5), ctx=ctx
    )
    assert decision.stop is False


def test_decide_stops_after_max_iterations() -> None:
    decision = LLM2LLM().decide(
        _history(0.5, 0.6, 0.7),
        stopping=Stopping(),
        budget=Budget(max_iterations=2),
        ctx=_ctx(_seeds(), {"s3"}),
    )
    assert (decision.stop, decision.reason, decision.best_iteration) == (
        True,
        "max_iterations",
        2,
    )


# --------------------------------------------------------------------------- registry


def test_registry_names_every_strategy() -> None:
    assert sorted(STRATEGIES) == ["arte", "llm2llm", "pgkd", "random", "rationales"]
    for name, cls in STRATEGIES.items():
        strategy = get_strategy(name)
        assert isinstance(strategy, cls)
        assert strategy.name == name
        assert strategy.mining_split in ("train", "validation")
        assert isinstance(validate_params(name, {}), cls.Params)


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        get_strategy("nope")


def test_validate_params_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match=r"params\.examples_per_error: .*greater than or equal"):
        validate_params("llm2llm", {"examples_per_error": 0})
    with pytest.raises(ValueError, match=r"params\.examples_per_eror: Extra inputs"):
        validate_params("llm2llm", {"examples_per_eror": 3})
    assert validate_params("llm2llm", {"examples_per_error": 5}) == LLM2LLMParams(
        examples_per_error=5
    )


def test_validate_params_checks_the_task_kind_when_given() -> None:
    with pytest.raises(ValueError, match=r"task\.kind: strategy pgkd supports classification"):
        validate_params("pgkd", {}, task=QA)
    validate_params("llm2llm", {}, task=GENERATION)


def test_a_mistake_is_also_answered_from_the_side_of_the_label_the_student_chose() -> None:
    # billing's validation row v1 was predicted as refund: a third of what it is asked for
    # (rounded half up) are refund examples that resemble it, shown with its true label.
    seeds = _seeds(6)
    wrong = LabelledRow(row_id="v1", input="charged twice for one order", output="billing")
    targets = LLM2LLM().plan(
        _ctx(seeds, set(), extra=[_verdict(wrong, "refund", "validation")], max_examples=12)
    )
    about_v1 = [t for t in targets if t.source_row_id == "v1"]
    contrast = [t for t in about_v1 if t.reason == "contrast"]
    own = [t for t in about_v1 if t.reason == "wrong_validation"]
    asked = sum(t.n_examples for t in about_v1)
    assert asked >= 2 and contrast and own
    assert sum(t.n_examples for t in contrast) == int(asked / 3 + 0.5)
    for t in contrast:
        assert t.expected_label == "refund" and t.meta == {"contrast_of": "billing"}
        assert t.kind is ExampleKind.hard_negative
        assert t.request.template_id == "contrast"
        assert _data(t) == [
            {"text": wrong.input, "label": "billing", "student_prediction": "refund"}
        ]
        # The closing instruction names the label to write first, then the one it is not.
        closing = t.request.messages[-1].content.rsplit("</data>", 1)[-1]
        assert closing.index('"refund"') < closing.index('"billing"')
    assert {t.expected_label for t in own} == {"billing"}
    # A row asked for a single example gets no contrast: its own label comes first.
    assert contrast_count(1) == 0 and contrast_count(2) == 1 and contrast_count(3) == 1


def test_no_contrast_without_a_real_predicted_label() -> None:
    seeds = _seeds(6)
    # The student gave no label (a failed prediction) for v1: nothing to contrast with.
    wrong = LabelledRow(row_id="v1", input="charged twice for one order", output="billing")
    unlabelled = _verdict(wrong, "billing", "validation").model_copy(
        update={"predicted": None, "correct": False}
    )
    targets = LLM2LLM().plan(_ctx(seeds, set(), extra=[unlabelled], max_examples=12))
    assert any(t.reason == "wrong_validation" for t in targets)
    assert not [t for t in targets if t.reason == "contrast"]
