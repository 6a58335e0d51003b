"""The random-augmentation baseline: seed rows picked at random, blind to the student."""

from __future__ import annotations

from service.domain.spec import TaskKind, TaskSpec
from service.domain.strategies import LabelledRow, PlanContext, get_strategy, validate_params
from service.domain.strategies.base import as_top_up, strategy_phase, top_up_round

LABELS = ["a", "b", "c"]
TASK = TaskSpec(kind=TaskKind.classification, instructions="Sort it.", labels=LABELS)


def _ctx(iteration: int, seed: int = 0, rows_per_iteration: int = 4) -> PlanContext:
    seeds = [
        LabelledRow(row_id=f"train:{i}", input=f"text {i}", output=LABELS[i % 3]) for i in range(12)
    ]
    return PlanContext(
        task=TASK,
        params=validate_params("random", {"rows_per_iteration": rows_per_iteration}),
        iteration=iteration,
        phase="generate",
        seed=seed,
        labels=LABELS,
        train_rows=seeds,
        evaluated=[],
        report=None,
        max_examples=None,
    )


def test_picks_random_seed_rows_without_looking_at_errors() -> None:
    strategy = get_strategy("random")
    targets = strategy.plan(_ctx(1))
    assert len(targets) == 4
    assert all(t.reason == "random" and t.target_id.startswith("rand:train:") for t in targets)
    assert all(t.expected_label in LABELS for t in targets)
    prompt = targets[0].request.messages[-1].content
    assert "prediction" not in prompt or "null" in prompt  # no student verdict is shown


def test_is_deterministic_and_varies_by_iteration() -> None:
    strategy = get_strategy("random")
    first = [t.target_id for t in strategy.plan(_ctx(1))]
    assert first == [t.target_id for t in strategy.plan(_ctx(1))]
    assert any([t.target_id for t in strategy.plan(_ctx(i))] != first for i in range(2, 6))


def test_budget_caps_the_examples_asked_for() -> None:
    ctx = _ctx(1, rows_per_iteration=10).model_copy(update={"max_examples": 5})
    targets = get_strategy("random").plan(ctx)
    assert sum(t.n_examples for t in targets) == 5


def test_a_top_up_plan_is_a_new_sample_of_each_prompt_under_its_own_phase() -> None:
    targets = get_strategy("random").plan(_ctx(3))
    again = as_top_up(targets, 2)
    assert [t.target_id for t in again] == [f"top-up-2:{t.target_id}" for t in targets]
    assert [t.request.messages for t in again] == [t.request.messages for t in targets]
    fingerprints = {t.request.fingerprint("m") for t in targets}
    assert not fingerprints & {t.request.fingerprint("m") for t in again}
    assert not {t.request.fingerprint("m") for t in as_top_up(targets, 1)} & {
        t.request.fingerprint("m") for t in again
    }
    # Past any iteration's sample indices (1,000 iterations at most).
    later = get_strategy("random").plan(_ctx(1000))
    assert max(t.request.sample_index for t in later) < min(
        t.request.sample_index for t in as_top_up(targets, 1)
    )
    assert [top_up_round(p) for p in ("generate", "top-up-1", "top-up-12", "top-up-x")] == [
        0,
        1,
        12,
        0,
    ]
    assert strategy_phase("top-up-1", ("generate",)) == "generate"
    assert strategy_phase("draft", ("draft", "final")) == "draft"
