"""Keep or exclude an iteration's data: two students compared on the same validation rows, with
the validation noise in view.

Each iteration trains the student on the seed set plus every example kept so far plus its own
new examples. Whether those new examples stay in the dataset is decided by comparing that
student with the one trained without them (the previous kept iteration), and with the seed-only
student, on the same validation rows. A plain "the number went down" rule throws away useful
data on a small validation set: 385 rows move by 0.5 points when two predictions flip. So the
difference is measured with a paired bootstrap (rows resampled with replacement, both students
scored on each resample), and an iteration is excluded only when the whole interval lies below
zero, i.e. when it made the student *measurably* worse. A difference within the noise keeps
the data: the teacher's examples are more likely to help than to hurt (the loop exists because
they do), and a guard that excludes on noise exports the bare seed set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel

MetricName = Literal["accuracy", "macro_f1"]


class ValidationRoles(BaseModel):
    """Which validation rows steer an iteration and which judge it (`validation_roles`)."""

    steering: frozenset[str]
    # Rows neither this iteration's prompts nor the previous iteration's showed: the step from
    # the previous kept iteration is judged on them.
    judging_step: frozenset[str]
    # Rows the comparison with the seed-only student, and the metric the iteration reports, are
    # computed on: the same rows (every row in iteration 0).
    held_out: frozenset[str]


def validation_thirds(
    rows: Sequence[tuple[str, str]], seed: int
) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The validation rows `(row_id, label)` in three parts that take turns steering,
    stratified by label and drawn with the job seed."""
    by_label: dict[str, list[str]] = {}
    for row_id, label in rows:
        by_label.setdefault(label, []).append(row_id)
    parts: tuple[set[str], set[str], set[str]] = (set(), set(), set())
    turn = 0
    for label in sorted(by_label):
        ranked = sorted(
            by_label[label],
            key=lambda row_id: hashlib.sha256(f"{seed}:part:{row_id}".encode()).hexdigest(),
        )
        for row_id in ranked:
            parts[turn % 3].add(row_id)
            turn += 1  # continues across labels, so small labels even out the parts
    return frozenset(parts[0]), frozenset(parts[1]), frozenset(parts[2])


def validation_roles(
    rows: Sequence[tuple[str, str]], seed: int, iteration: int, *, previous_kept: bool = True
) -> ValidationRoles:
    """The roles of the validation rows in iteration `iteration`, for a strategy that shows
    validation rows to the teacher.

    The rows are cut in three parts (`validation_thirds`) that steer in rotation: iteration 1
    shows the teacher the student's mistakes in the first third, iteration 2 in the second,
    iteration 3 in the third, iteration 4 in the first again. Each iteration aims at mistakes
    the loop has not aimed at lately, and in three iterations every validation row has steered
    once: a teacher writes near what it is shown, so the rows shown are the loop's reach.

    A row that steered the teacher flatters that data (the student is fixed exactly where the
    teacher was shown it fails), so an iteration is judged on the rows that neither its own
    prompts nor the previous iteration's showed: in iteration 1 two thirds, later one third.
    Its step from the previous kept iteration (the two students differ by this iteration's
    examples only), its comparison with the seed-only student and the metric it reports all use
    those rows. Rows the previous iteration was steered by are left out of the step on purpose:
    the reference student already holds examples written near them, so new examples could only
    look worse there (measured: the step read 1 to 3 points below zero on such rows while the
    test accuracy rose). From iteration 3 on, the judging third steered an earlier iteration,
    so the reported metric leans optimistic (a test split, when given, is the unbiased one), and
    the step would read low for the same reason; a built-in student's step is then judged by
    two students without that iteration's examples
    (`workers/steps/evaluate.py::_step_without_nearby_examples`).

    When the previous iteration's examples were excluded (`previous_kept` False), no student
    compared holds examples written near the rows it was steered by, so those rows judge too:
    twice the rows, and a harmful iteration after an excluded one is told with more power.

    Measured with bench/selection_study.py (docs/loops.md): thirds in rotation closed 8 more
    points of the gap on HWU64 than two alternating thirds with one never shown.
    """
    every = frozenset(row_id for row_id, _ in rows)
    if iteration <= 0:
        return ValidationRoles(steering=frozenset(), judging_step=every, held_out=every)
    parts = validation_thirds(rows, seed)
    steering = parts[(iteration - 1) % 3]
    previous = parts[(iteration - 2) % 3] if iteration >= 2 and previous_kept else frozenset()
    judging = every - steering - previous
    return ValidationRoles(steering=steering, judging_step=judging, held_out=judging)


# 90% two-sided interval: "measurably worse" is a one-sided 95% call.
CONFIDENCE = 0.90
RESAMPLES = 2000


class Comparison(BaseModel):
    """metric(candidate) - metric(reference) on the same rows, with a bootstrap interval."""

    reference: int
    measure: str = "metric"  # or "gold_log_probability"
    delta: float
    low: float
    high: float
    n: int
    # The share of resamples in which the candidate is worse: how sure "worse" is.
    p_worse: float = 0.0


# Measurably lower certainty excludes unless the metric is measurably *better*. It used to need
# the metric probably lower too (in 80% of the resamples or more), on the view that a truthful
# teacher's examples can make a student a little less sure without making it any less right.
# Measured with bench.efficacy, that view cost more than it saved. Against a truthful teacher
# the wider rule excluded one iteration in 24 jobs (TREC, SST-2, HWU64 and TREC's 50 fine
# labels; LLM2LLM and PGKD; 3 seeds), and that one had lowered the judge's test accuracy
# (70.6% without it, 68.8% with). Against a teacher that mislabels half its rows
# (--mislabel 0.5) it caught iterations whose accuracy read flat or up (+0.0, +1.4, +1.5
# points) while the gold label's mean log-probability fell by 0.07-0.10. Gap closed with that teacher (2 seeds, LLM2LLM / PGKD):
# TREC -1.1 / -4.2% -> +0.5 / +2.4%, SST-2 11.2 / -20.1% -> 11.2 / -9.8%, HWU64 0.0 / -18.9%
# -> 0.0 / 0.0% (the seed set exported, as it should be). Switched off once the filter rejected
# labels other than asked (2026-12-04, 3 seeds, LLM2LLM / PGKD / random): a truthful teacher's
# SST-2 fell from 36.7 / 34.1 / 22.1% to 33.7 / 32.2 / 16.2% (the other sets unchanged), and
# against another label's text under the asked label TREC went -0.2 / -12.0% -> -0.2 / -7.8%,
# SST-2 14.7 / -14.1% -> 10.4 / -14.1% (docs/loops.md, "Keep or exclude").


# --- the teacher's labels -------------------------------------------------------------------
# A teacher that writes wrong labels can pass every comparison above. Measured with
# `bench.efficacy --mislabel 0.5` (half the rows relabelled at random) on HWU64, 4 seeds: in
# half the jobs an iteration of lies was kept, its step within the noise (-0.5 points, 90%
# interval -4.2 to +3.8) while the judge lost 5-7 points of test accuracy. What does tell a
# liar is how often the student, trained without the iteration's examples, predicts the
# teacher's labels for them, against how often it predicts the gold label of held-out rows
# no example it trains on was written near: on many classes a right label is agreed with
# about as often, a wrong one is almost never the student's guess. Measured in the product's
# own jobs (`bench.efficacy`, HWU64 and TREC's 50 fine labels): truthful, LLM2LLM and PGKD
# 0.81-1.27 (3 seeds, every upper bound 0.97 or more), ARTE 0.68-1.09 (upper bounds down to
# 0.84); half the labels wrong 0.28-0.64 (4 seeds, upper bounds up to 0.81; with this floor
# every lying job exported the seed set, with 0.7 five LLM2LLM iterations of lies were kept).
# On few classes there is no such signal: a wrong label among two is the other class, which is
# what the student predicts near its own mistakes, where the loops ask for examples (a
# throwaway measurement, seed-only student: SST-2 truthful labels read 0.34 and 0.76 of the
# held-out accuracy, half of them wrong 0.76 and 1.0; TREC's 6 classes 0.76-0.94 against
# 0.55-0.76). So the check runs from this many classes on, and excludes only when the whole
# interval lies below the floor.
LABEL_CHECK_MIN_CLASSES = 10
LABEL_AGREEMENT_FLOOR = 0.75


def label_agreement(
    agrees: Sequence[bool],
    held_out_correct: Sequence[bool],
    *,
    reference_iteration: int,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Comparison:
    """How often a student agrees with the teacher's labels of new examples (`agrees`, one per
    example), as a share of how often it is right on held-out rows (`held_out_correct`), with
    a bootstrap interval (the two sets resampled independently). 1.0 when either set is empty
    or the student is never right on held-out rows: then nothing can be told."""
    n_new, n_held = len(agrees), len(held_out_correct)
    nothing = Comparison(
        reference=reference_iteration,
        measure="teacher_label_agreement",
        delta=1.0,
        low=1.0,
        high=1.0,
        n=n_new,
    )
    if n_new == 0 or n_held == 0 or not any(held_out_correct):
        return nothing
    agreement = (
        _resample_weights(n_new, resamples, seed) @ np.asarray(agrees, dtype=np.float64)
    ) / n_new
    accuracy = (
        _resample_weights(n_held, resamples, seed + 1)
        @ np.asarray(held_out_correct, dtype=np.float64)
    ) / n_held
    # A resample with no right held-out row says nothing: it counts as agreeing fully.
    ratio = np.divide(agreement, accuracy, out=np.ones_like(agreement), where=accuracy > 0)
    # p_worse: the share of resamples below the floor.
    return _comparison(ratio, reference_iteration, n_new, confidence).model_copy(
        update={
            "measure": "teacher_label_agreement",
            "p_worse": float(np.mean(ratio[1:] < LABEL_AGREEMENT_FLOOR)),
        }
    )


class Selection(BaseModel):
    """Whether an iteration's examples stay in the dataset, and why, in words."""

    included: bool
    improved: bool
    reason: str
    comparisons: list[Comparison]


def _metric_per_resample(
    weights: np.ndarray, gold: np.ndarray, predicted: np.ndarray, n_classes: int, metric: str
) -> np.ndarray:
    """The metric on every resample; `weights` (resamples x rows) counts each row's copies."""
    correct = (predicted == gold).astype(np.float64)
    n = weights.sum(axis=1)
    if metric == "accuracy":
        accuracy: np.ndarray = (weights @ correct) / n
        return accuracy
    gold_onehot = np.eye(n_classes)[gold]
    # A missing prediction (-1) is wrong and predicts no class.
    predicted_onehot = np.zeros((len(predicted), n_classes))
    known = predicted >= 0
    predicted_onehot[np.flatnonzero(known), predicted[known]] = 1.0
    true_positive = weights @ (gold_onehot * correct[:, None])
    support = weights @ gold_onehot
    predicted_count = weights @ predicted_onehot
    denominator = support + predicted_count
    f1 = np.divide(
        2 * true_positive, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    macro: np.ndarray = f1.mean(axis=1)
    return macro


def paired_bootstrap(
    gold: Sequence[str],
    candidate: Sequence[str | None],
    reference: Sequence[str | None],
    *,
    reference_iteration: int,
    metric: MetricName = "accuracy",
    labels: Sequence[str] | None = None,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Comparison:
    """The candidate's metric minus the reference's on the same rows, and a percentile interval
    from `resamples` paired bootstrap resamples (seeded: the same inputs give the same answer).

    Macro-F1 is averaged over `labels` plus every label seen, as `metrics.classification_report`
    does, so the point estimate equals the difference of the two reports' numbers.
    """
    n = len(gold)
    if len(candidate) != n or len(reference) != n:
        raise ValueError("gold, candidate and reference must cover the same rows")
    if n == 0:
        return Comparison(reference=reference_iteration, delta=0.0, low=0.0, high=0.0, n=0)
    classes = sorted(
        set(labels or ()) | set(gold) | {p for p in (*candidate, *reference) if p is not None}
    )
    index = {label: i for i, label in enumerate(classes)}

    def encode(values: Sequence[str | None]) -> np.ndarray:
        return np.array([-1 if v is None else index[v] for v in values], dtype=np.int64)

    gold_ids = encode(gold)
    candidate_ids, reference_ids = encode(candidate), encode(reference)
    weights = _resample_weights(n, resamples, seed)
    deltas = _metric_per_resample(
        weights, gold_ids, candidate_ids, len(classes), metric
    ) - _metric_per_resample(weights, gold_ids, reference_ids, len(classes), metric)
    return _comparison(deltas, reference_iteration, n, confidence)


def paired_bootstrap_correct(
    candidate: Sequence[bool],
    reference: Sequence[bool],
    *,
    reference_iteration: int,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Comparison:
    """`paired_bootstrap` of accuracy from each row's correctness (QA answers are checked by
    `answers.answers_match`, not by equality, so their rows come as verdicts)."""
    return paired_bootstrap_scores(
        [float(c) for c in candidate],
        [float(r) for r in reference],
        reference_iteration=reference_iteration,
        resamples=resamples,
        confidence=confidence,
        seed=seed,
    )


def paired_bootstrap_scores(
    candidate: Sequence[float],
    reference: Sequence[float],
    *,
    reference_iteration: int,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Comparison:
    """The mean of a per-row score (1/0 for a right/wrong answer, the log-probability of the
    gold label, ...) of the candidate minus the reference's, with a paired bootstrap interval."""
    n = len(candidate)
    if len(reference) != n:
        raise ValueError("candidate and reference must cover the same rows")
    if n == 0:
        return Comparison(reference=reference_iteration, delta=0.0, low=0.0, high=0.0, n=0)
    difference = np.asarray(candidate, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    weights = _resample_weights(n, resamples, seed)
    return _comparison((weights @ difference) / n, reference_iteration, n, confidence)


def _resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """Row 0 is the data as observed; each other row counts every row's copies in a resample."""
    rng = np.random.default_rng(seed)
    return np.vstack([np.ones(n), rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)]).astype(
        np.float64
    )


def _comparison(
    deltas: np.ndarray, reference_iteration: int, n: int, confidence: float
) -> Comparison:
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(deltas[1:], [tail, 1.0 - tail])
    return Comparison(
        reference=reference_iteration,
        delta=float(deltas[0]),
        low=float(low),
        high=float(high),
        n=n,
        p_worse=float(np.mean(deltas[1:] < 0)),
    )


def exclusion_note(reason: str | None) -> str:
    """A few words for an excluded iteration's reason (`select_iteration`), for a table cell:
    which of the rules excluded it."""
    reason = reason or ""
    if reason.startswith("excluded: the teacher's labels look wrong"):
        return "excluded: the teacher's labels look wrong"
    if "less sure of the right labels" in reason:
        return "excluded: less sure of the right labels"
    return "excluded: measurably worse"


def select_iteration(
    comparisons: Sequence[Comparison],
    *,
    metric: MetricName = "accuracy",
    min_delta: float = 0.0,
    new_examples: int = 1,
    certainty: Sequence[Comparison] = (),
    labels: Comparison | None = None,
) -> Selection:
    """Keep the iteration's examples unless a comparison shows it measurably worse: the whole
    metric interval below `-min_delta`, or, where the student gives probabilities, a mean
    log-probability of the gold label whose whole interval is below zero (`certainty`, one per
    reference) while the metric is not measurably better (its interval reaches `min_delta` or
    below). The second test has more power on a small validation set, because a wrong label
    teaches the student doubt on many rows before it flips their predictions; a metric that
    rose measurably keeps the data, whatever the certainty. With `labels`
    (`label_agreement`), the teacher's labels are judged too: agreed with measurably less than
    `LABEL_AGREEMENT_FLOOR` as often as held-out gold labels, the examples are excluded unless
    the metric rose measurably against the previous kept iteration.
    The iteration *improved* when the metric interval against the previous kept iteration (the
    first comparison) lies wholly above `min_delta`."""
    name = "macro-F1" if metric == "macro_f1" else "accuracy"
    if new_examples == 0:
        return Selection(
            included=True,
            improved=False,
            reason="kept: no new examples (the student is the previous one)",
            comparisons=[*comparisons, *certainty],
        )
    if not comparisons:
        return Selection(
            included=True, improved=False, reason="kept: nothing to compare with", comparisons=[]
        )
    doubt = {c.reference: c for c in certainty}
    every = [*comparisons, *certainty, *([labels] if labels is not None else [])]
    for c in comparisons:
        less_sure = doubt.get(c.reference)
        if c.high < -min_delta:
            why = (
                f"validation {name} {_points(c.delta)} (90% interval {_points(c.low)} to "
                f"{_points(c.high)}, {c.n} rows)"
            )
        elif less_sure is not None and less_sure.high < 0 and c.low <= min_delta:
            why = (
                f"less sure of the right labels (mean log-probability of the gold label "
                f"{less_sure.delta:+.3f}, 90% interval {less_sure.low:+.3f} to "
                f"{less_sure.high:+.3f}) and validation {name} not measurably better "
                f"({_points(c.delta)}, 90% interval {_points(c.low)} to {_points(c.high)}), "
                f"{c.n} rows"
            )
        else:
            continue
        return Selection(
            included=False,
            improved=False,
            reason=f"excluded: measurably worse than iteration {c.reference} — {why}",
            comparisons=every,
        )
    first = comparisons[0]
    improved = first.low > min_delta
    if labels is not None and labels.high < LABEL_AGREEMENT_FLOOR and not improved:
        return Selection(
            included=False,
            improved=False,
            reason=(
                "excluded: the teacher's labels look wrong — a built-in student trained "
                f"without these {labels.n} examples agrees with their labels "
                f"{labels.delta:.2f} times as "
                f"often as with held-out rows' gold labels (90% interval {labels.low:.2f} to "
                f"{labels.high:.2f}; right labels are agreed with about as often), and "
                f"validation {name} is not measurably better than iteration {first.reference} "
                f"({_points(first.delta)}, 90% interval {_points(first.low)} to "
                f"{_points(first.high)}, {first.n} rows)"
            ),
            comparisons=every,
        )
    verdict = "better than" if improved else "within the noise of"
    return Selection(
        included=True,
        improved=improved,
        reason=(
            f"kept: {verdict} iteration {first.reference} — validation {name} "
            f"{_points(first.delta)} (90% interval {_points(first.low)} to "
            f"{_points(first.high)}, {first.n} rows)"
        ),
        comparisons=every,
    )


def _points(value: float) -> str:
    return f"{100 * value:+.1f} pts"
