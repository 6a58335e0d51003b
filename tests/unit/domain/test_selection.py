"""The keep/exclude rule: paired bootstrap comparisons, noise, ties, nothing kept; the halves of
the validation set that steer and judge; the budget's share per iteration and per label."""

from __future__ import annotations

import random

import pytest

from service.domain.metrics import classification_report
from service.domain.selection import (
    LABEL_AGREEMENT_FLOOR,
    Comparison,
    exclusion_note,
    label_agreement,
    paired_bootstrap,
    paired_bootstrap_correct,
    select_iteration,
    validation_roles,
    validation_thirds,
)
from service.domain.spec import Budget
from service.domain.strategies.base import (
    DEFAULT_EXAMPLES_PER_LABEL,
    DEFAULT_MIN_EXAMPLES,
    apportion,
    examples_for_iteration,
    shares_by_weakness,
    spread,
)

# --------------------------------------------------------------------------- bootstrap


def test_a_half_point_move_on_385_rows_is_noise_and_the_data_is_kept() -> None:
    reference = [True] * 304 + [False] * 81  # 0.790, as in the issue
    # Seven rows the reference got right go wrong and five it got wrong go right: two rows,
    # half a point, worse.
    candidate = [False] * 7 + [True] * 297 + [True] * 5 + [False] * 76
    comparison = paired_bootstrap_correct(candidate, reference, reference_iteration=0, seed=1)
    assert comparison.delta == pytest.approx(-2 / 385)
    assert comparison.low < 0 < comparison.high
    selection = select_iteration([comparison])
    assert selection.included
    assert selection.reason.startswith("kept: within the noise of iteration 0")
    assert "-0.5 pts" in selection.reason


def test_a_clear_drop_is_measurably_worse_and_excluded() -> None:
    reference = [True] * 300 + [False] * 100
    candidate = [True] * 240 + [False] * 160  # 15 points worse, every flip the same way
    comparison = paired_bootstrap_correct(candidate, reference, reference_iteration=1)
    assert comparison.delta == pytest.approx(-0.15)
    assert comparison.high < 0
    selection = select_iteration([comparison])
    assert not selection.included
    assert "measurably worse than iteration 1" in selection.reason
    assert "-15.0 pts" in selection.reason


def test_a_tie_keeps_the_data() -> None:
    rows = [True, False] * 50
    comparison = paired_bootstrap_correct(rows, rows, reference_iteration=2)
    assert (comparison.delta, comparison.low, comparison.high) == (0.0, 0.0, 0.0)
    assert select_iteration([comparison]).included


def test_a_clear_gain_is_reported_as_better() -> None:
    reference = [True] * 200 + [False] * 200
    candidate = [True] * 280 + [False] * 120
    comparison = paired_bootstrap_correct(candidate, reference, reference_iteration=0)
    selection = select_iteration([comparison])
    assert selection.included and selection.improved
    assert selection.reason.startswith("kept: better than iteration 0")


def test_any_comparison_measurably_worse_excludes() -> None:
    fine = Comparison(reference=2, delta=0.01, low=-0.02, high=0.04, n=300)
    drifted = Comparison(reference=0, delta=-0.06, low=-0.09, high=-0.03, n=300)
    selection = select_iteration([fine, drifted])
    assert not selection.included
    assert "iteration 0" in selection.reason


def test_label_agreement_is_the_share_agreed_over_the_held_out_accuracy() -> None:
    # 40 of 100 labels agreed with, 80 of 100 held-out rows right: half as often.
    agrees = [True] * 40 + [False] * 60
    right = [True] * 80 + [False] * 20
    check = label_agreement(agrees, right, reference_iteration=1, seed=3)
    assert check.measure == "teacher_label_agreement"
    assert check.delta == pytest.approx(0.5)
    assert check.low < 0.5 < check.high < LABEL_AGREEMENT_FLOOR
    assert check.n == 100 and check.reference == 1
    # As often as held-out rows: well within the floor.
    truthful = label_agreement([True] * 78 + [False] * 22, right, reference_iteration=1, seed=3)
    assert truthful.low < 1.0 < truthful.high and truthful.low > LABEL_AGREEMENT_FLOOR
    # Nothing to tell: no new examples, no held-out rows, or none of them right.
    for nothing in (
        label_agreement([], right, reference_iteration=1),
        label_agreement(agrees, [], reference_iteration=1),
        label_agreement(agrees, [False] * 10, reference_iteration=1),
    ):
        assert (nothing.delta, nothing.low, nothing.high) == (1.0, 1.0, 1.0)
    # Few examples: the interval is wide, and a low ratio is not *measurably* low.
    few = label_agreement([True, False, False], [True] * 4 + [False], reference_iteration=1)
    assert few.delta < LABEL_AGREEMENT_FLOOR <= few.high


def test_labels_agreed_with_measurably_less_exclude_unless_the_metric_is_measurably_better() -> (
    None
):
    wrong = Comparison(
        reference=1, measure="teacher_label_agreement", delta=0.5, low=0.4, high=0.6, n=128
    )
    flat = Comparison(reference=1, delta=-0.005, low=-0.042, high=0.038, n=420)
    excluded = select_iteration([flat], labels=wrong)
    assert not excluded.included
    assert excluded.reason.startswith("excluded: the teacher's labels look wrong")
    assert exclusion_note(excluded.reason) == "excluded: the teacher's labels look wrong"
    assert "0.50 times as often" in excluded.reason and "128 examples" in excluded.reason
    assert wrong in excluded.comparisons
    # Not measurably below the floor: kept (the interval reaches it).
    unsure = wrong.model_copy(update={"high": LABEL_AGREEMENT_FLOOR + 0.01})
    assert select_iteration([flat], labels=unsure).included
    # The metric measurably better: kept, whatever the labels look like.
    better = flat.model_copy(update={"delta": 0.05, "low": 0.01, "high": 0.09})
    assert select_iteration([better], labels=wrong).included
    # The metric measurably worse: excluded for that, first.
    worse = flat.model_copy(update={"delta": -0.06, "low": -0.1, "high": -0.02})
    assert "measurably worse" in select_iteration([worse], labels=wrong).reason
    assert exclusion_note(select_iteration([worse]).reason) == "excluded: measurably worse"


def test_doubt_about_the_right_labels_excludes_unless_the_metric_is_measurably_better() -> None:
    doubt = Comparison(
        reference=1, measure="gold_log_probability", delta=-0.06, low=-0.1, high=-0.02, n=100
    )
    probably_lower = Comparison(reference=1, delta=-0.05, low=-0.11, high=0.01, n=100, p_worse=0.9)
    excluded = select_iteration([probably_lower], certainty=[doubt])
    assert not excluded.included
    assert "less sure of the right labels" in excluded.reason
    assert "not measurably better" in excluded.reason
    # The run's table says which rule, not "measurably worse" beside a metric that rose.
    assert exclusion_note(excluded.reason) == "excluded: less sure of the right labels"
    assert doubt in excluded.comparisons
    # A mislabelling teacher's data can leave accuracy flat or a little up while the student
    # grows unsure of the right labels: that is excluded too.
    tie = probably_lower.model_copy(update={"delta": 0.0, "low": -0.05, "p_worse": 0.45})
    assert not select_iteration([tie], certainty=[doubt]).included
    slightly_up = probably_lower.model_copy(update={"delta": 0.014, "low": -0.02, "high": 0.05})
    assert not select_iteration([slightly_up], certainty=[doubt]).included
    # A metric measurably better keeps the data, whatever the certainty.
    better = probably_lower.model_copy(update={"delta": 0.06, "low": 0.01, "high": 0.11})
    kept = select_iteration([better], certainty=[doubt])
    assert kept.included and kept.improved
    # Doubt that is not measurable keeps the data.
    sure = doubt.model_copy(update={"high": 0.01})
    assert select_iteration([probably_lower], certainty=[sure]).included
    # min_delta: "measurably better" means above it.
    assert not select_iteration([better], certainty=[doubt], min_delta=0.02).included


def test_p_worse_is_the_share_of_resamples_where_the_candidate_is_worse() -> None:
    reference = [True] * 300 + [False] * 100
    assert paired_bootstrap_correct(
        [True] * 240 + [False] * 160, reference, reference_iteration=0
    ).p_worse == pytest.approx(1.0)
    assert paired_bootstrap_correct(reference, reference, reference_iteration=0).p_worse == 0.0


def test_min_delta_is_a_tolerance_in_both_directions() -> None:
    slightly_worse = Comparison(reference=1, delta=-0.02, low=-0.03, high=-0.01, n=5000)
    assert not select_iteration([slightly_worse]).included
    assert select_iteration([slightly_worse], min_delta=0.02).included
    slightly_better = Comparison(reference=1, delta=0.02, low=0.01, high=0.03, n=5000)
    assert select_iteration([slightly_better]).improved
    assert not select_iteration([slightly_better], min_delta=0.02).improved


def test_an_iteration_that_added_nothing_is_kept_without_a_claim() -> None:
    bad = Comparison(reference=1, delta=-0.2, low=-0.3, high=-0.1, n=100)
    selection = select_iteration([bad], new_examples=0)
    assert selection.included and not selection.improved
    assert "no new examples" in selection.reason


def test_the_bootstrap_is_seeded_and_its_point_is_the_report_difference() -> None:
    rng = random.Random(5)
    labels = ["a", "b", "c"]
    gold = [rng.choice(labels) for _ in range(120)]
    old = [g if rng.random() < 0.6 else rng.choice(labels) for g in gold]
    new = [g if rng.random() < 0.7 else rng.choice(labels) for g in gold]
    first = paired_bootstrap(
        gold, new, old, reference_iteration=0, metric="macro_f1", labels=labels, seed=3
    )
    again = paired_bootstrap(
        gold, new, old, reference_iteration=0, metric="macro_f1", labels=labels, seed=3
    )
    assert first == again
    expected = (
        classification_report(gold, new, labels).macro_f1
        - classification_report(gold, old, labels).macro_f1
    )
    assert first.delta == pytest.approx(expected)
    assert first.low <= first.delta <= first.high
    accuracy = paired_bootstrap(gold, new, old, reference_iteration=0, labels=labels)
    assert accuracy.delta == pytest.approx(
        sum(a == g for a, g in zip(new, gold, strict=True)) / 120
        - sum(a == g for a, g in zip(old, gold, strict=True)) / 120
    )


def test_a_missing_prediction_counts_as_wrong_and_no_class() -> None:
    comparison = paired_bootstrap(
        ["a", "b"], [None, "b"], ["a", "b"], reference_iteration=0, metric="macro_f1"
    )
    assert comparison.delta < 0


def test_no_rows_to_compare_keeps_the_data() -> None:
    comparison = paired_bootstrap_correct([], [], reference_iteration=0)
    assert comparison.n == 0
    assert select_iteration([comparison]).included
    assert select_iteration([]).included


# --------------------------------------------------------------------------- halves


def test_validation_thirds_are_stratified_disjoint_and_drawn_with_the_job_seed() -> None:
    rows = [(f"validation:{i}", "abc"[i % 3]) for i in range(31)]
    first, second, third = validation_thirds(rows, seed=0)
    assert first | second | third == {r for r, _ in rows}
    assert not (first & second or first & third or second & third)
    assert max(map(len, (first, second, third))) - min(map(len, (first, second, third))) <= 1
    for label in "abc":
        counts = [
            sum(1 for r, lab in rows if lab == label and r in part)
            for part in (first, second, third)
        ]
        assert max(counts) - min(counts) <= 1
    assert validation_thirds(list(reversed(rows)), seed=0) == (first, second, third)
    assert validation_thirds(rows, seed=1) != (first, second, third), "the job seed draws them"


def test_the_thirds_steer_in_rotation_and_judge_rows_no_recent_prompt_showed() -> None:
    rows = [(f"v{i}", "ab"[i % 2]) for i in range(30)]
    every = {r for r, _ in rows}
    first, second, third = validation_thirds(rows, seed=3)
    roles = [validation_roles(rows, 3, n) for n in range(6)]
    # Iteration 0 (the seed-only student) shows the teacher nothing: every row judges it.
    assert roles[0].steering == frozenset() and roles[0].held_out == every
    # In three iterations every row steers once, then the rotation starts again.
    assert [r.steering for r in roles[1:]] == [first, second, third, first, second]
    # Iteration 1 is judged on the two thirds it did not show; later ones on the third that
    # neither they nor the iteration before showed.
    assert roles[1].judging_step == second | third
    assert roles[2].judging_step == third
    assert roles[3].judging_step == first
    assert roles[4].judging_step == second
    for n in range(1, 6):
        assert roles[n].steering.isdisjoint(roles[n].judging_step)
        assert roles[n - 1].steering.isdisjoint(roles[n].judging_step)
        # The seed-only comparison and the reported metric use the same rows.
        assert roles[n].held_out == roles[n].judging_step


def test_after_an_excluded_iteration_the_rows_it_was_steered_by_judge_too() -> None:
    rows = [(f"v{i}", ("a", "b", "c")[i % 3]) for i in range(30)]
    first, second, third = validation_thirds(rows, seed=3)
    # Iteration 1's examples were excluded: no student holds examples written near the first
    # third, so iteration 2 is judged on the first and the third.
    after_excluded = validation_roles(rows, 3, 2, previous_kept=False)
    assert after_excluded.steering == second
    assert after_excluded.judging_step == after_excluded.held_out == first | third
    assert validation_roles(rows, 3, 3, previous_kept=False).judging_step == first | second
    # Iteration 1's previous is the seed-only run: nothing changes.
    assert validation_roles(rows, 3, 1, previous_kept=False) == validation_roles(rows, 3, 1)


def test_many_small_labels_still_cut_the_set_evenly() -> None:
    rows = [(f"v{i}", f"label{i // 2}") for i in range(64 * 5 // 2)]
    sizes = sorted(len(part) for part in validation_thirds(rows, seed=4))
    assert sizes[-1] - sizes[0] <= 1


# --------------------------------------------------------------------------- budget


def test_the_budget_is_shared_evenly_by_the_iterations_left() -> None:
    budget = Budget(max_iterations=3, max_examples=640)
    assert examples_for_iteration(budget, iteration=1, accepted_so_far=0, n_labels=64) == 214
    assert examples_for_iteration(budget, iteration=2, accepted_so_far=200, n_labels=64) == 220
    # The last iteration gets all that is left (rejections earlier are made up for).
    assert examples_for_iteration(budget, iteration=3, accepted_so_far=400, n_labels=64) == 240
    assert examples_for_iteration(budget, iteration=3, accepted_so_far=700, n_labels=64) == 0
    # Iterations past max_iterations (a refresh) get what is left.
    assert examples_for_iteration(budget, iteration=5, accepted_so_far=600, n_labels=64) == 40


def test_a_per_iteration_cap_applies_too() -> None:
    budget = Budget(max_iterations=3, max_examples=640, max_examples_per_iteration=100)
    assert examples_for_iteration(budget, iteration=1, accepted_so_far=0, n_labels=64) == 100
    alone = Budget(max_examples_per_iteration=50)
    assert examples_for_iteration(alone, iteration=1, accepted_so_far=0, n_labels=3) == 50


def test_without_a_budget_classification_asks_per_label_qa_keeps_its_defaults() -> None:
    budget = Budget()
    assert examples_for_iteration(budget, iteration=1, accepted_so_far=0, n_labels=64) == (
        DEFAULT_EXAMPLES_PER_LABEL * 64
    )
    assert examples_for_iteration(budget, iteration=1, accepted_so_far=0, n_labels=2) == (
        DEFAULT_MIN_EXAMPLES
    )
    assert examples_for_iteration(budget, iteration=1, accepted_so_far=0, n_labels=None) is None


def test_apportion_sums_to_the_total_and_is_deterministic() -> None:
    assert apportion(10, {"a": 1.0, "b": 1.0, "c": 1.0}) == {"a": 4, "b": 3, "c": 3}
    assert apportion(0, {"a": 1.0}) == {"a": 0}
    assert apportion(5, {"a": 0.0, "b": 0.0}) == {"a": 0, "b": 0}
    shares = apportion(97, {str(i): float(i % 7) for i in range(30)})
    assert sum(shares.values()) == 97


def test_weak_labels_get_more_and_handled_labels_are_not_starved() -> None:
    shares = shares_by_weakness(100, ["good", "bad", "worst"], {"bad": 0.5, "worst": 1.0})
    assert sum(shares.values()) == 100
    assert shares["worst"] > shares["bad"] > shares["good"] > 0
    assert shares["good"] == pytest.approx(100 * 0.25 / 2.25, abs=1)


def test_spread_is_even_first_slots_first() -> None:
    assert spread(7, 3) == [3, 2, 2]
    assert spread(2, 4) == [1, 1, 0, 0]
    assert spread(5, 0) == []
