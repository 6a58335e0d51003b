"""PGKD: labelled examples aimed at the classes and class pairs the student gets wrong.

Paper: "Performance-Guided LLM Knowledge Distillation for Efficient Text Classification at
Scale" (Di Palo, Singhi, Fadlallah; EMNLP 2024).

1. Train a small classifier on the seed set: the orchestration.
2. Evaluate it on the validation set, a per-class report and the confusions: `mining_split` is
   "validation"; `ctx.report` is `metrics.classification_report` of that evaluation.
3. Hard-negative mining, the validation rows it got wrong with high confidence paired with the
   class it confused them with: `hard_negatives` (`metrics.confident_mistakes`,
   `min_confidence`).
4. Prompt the teacher with the report, some correct and some wrong examples and the hard
   negatives, for new labelled examples aimed at the weak classes and the confused pairs:
   `plan` makes one target per confused pair (`confused_pairs`, reason "confused_pair", kind
   hard_negative, expected label the pair's gold class) and one per weak class (`weak_classes`,
   lowest F1, reason "weak_class", kind augmented), interleaved so a tight budget still covers
   both; each prompt (`pgkd.j2`) shows the compact report table, then the examples, hard
   negatives first that involve the target's classes. `parse` keeps the teacher's labels.
5. Retrain, re-evaluate, early stopping on the validation metric with patience, keep the best
   iteration: the orchestration and the shared `decide`.

Showing validation texts to the teacher is the method; the filters' decontamination against
validation and test rows keeps near-copies of them out of the training set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import zip_longest
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from service.domain.metrics import (
    ClassificationReport,
    ConfusionPair,
    ScoredPrediction,
    confident_mistakes,
)
from service.domain.prompts import build_request, examples_schema
from service.domain.spec import TaskKind
from service.domain.strategies.base import (
    CandidateExample,
    EvaluatedRow,
    ExampleKind,
    GenerationTarget,
    PlanContext,
    Strategy,
    StrategyParams,
    fit_to_budget,
    params_as,
    parse_examples,
    rng_for,
    with_sample_indices,
)


class PGKDParams(StrategyParams):
    examples_per_target: int = Field(5, ge=1, le=50)
    max_weak_classes: int = Field(3, ge=0, le=1000, description="Weak-class targets per iteration.")
    max_confused_pairs: int = Field(
        3, ge=0, le=1000, description="Confused-pair targets per iteration."
    )
    n_correct_shown: int = Field(4, ge=0, le=50, description="Correct validation rows per prompt.")
    n_wrong_shown: int = Field(4, ge=0, le=50, description="Wrong validation rows per prompt.")
    n_hard_negatives: int = Field(6, ge=0, le=50, description="Confident mistakes per prompt.")
    min_confidence: float = Field(
        0.5, ge=0, le=1, description="A mistake at least this confident is a hard negative."
    )
    max_report_classes: int = Field(
        50, ge=1, le=2000, description="Rows of the per-class table shown, weakest first."
    )

    @model_validator(mode="after")
    def _some_targets(self) -> PGKDParams:
        if self.max_weak_classes + self.max_confused_pairs == 0:
            raise ValueError("max_weak_classes and max_confused_pairs cannot both be 0")
        return self


def weak_classes(report: ClassificationReport, labels: Sequence[str], limit: int) -> list[str]:
    """Labels by ascending F1, excluding perfect ones; classes absent from validation go last
    because their zero F1 is a lack of evidence, not a measured weakness."""
    candidates = [
        label for label in labels if label in report.per_class and report.per_class[label].f1 < 1
    ]
    candidates.sort(
        key=lambda label: (
            report.per_class[label].support == 0,
            report.per_class[label].f1,
            label,
        )
    )
    return candidates[:limit]


def confused_pairs(
    report: ClassificationReport, labels: Sequence[str], limit: int
) -> list[ConfusionPair]:
    """The most frequent (gold, predicted) confusions between two real labels.

    A missing prediction is no class to contrast with, so its pairs are left out.
    """
    known = set(labels)
    pairs = [p for p in report.confusion_pairs if p.gold in known and p.predicted in known]
    pairs.sort(key=lambda p: (-p.count, p.gold, p.predicted))
    return pairs[:limit]


def hard_negatives(rows: Sequence[EvaluatedRow], min_confidence: float) -> list[EvaluatedRow]:
    """Validation rows wrong with at least `min_confidence`, most confident first."""
    by_id = {row.row_id: row for row in rows if row.predicted is not None}
    scored = [
        ScoredPrediction(
            row_id=row.row_id, gold=row.gold, predicted=row.predicted, confidence=row.confidence
        )
        for row in by_id.values()
        if not row.correct
    ]
    return [by_id[s.row_id] for s in confident_mistakes(scored, min_confidence=min_confidence)]


def _relevant_first(
    rows: Sequence[EvaluatedRow], relevant: Callable[[EvaluatedRow], bool], n: int
) -> list[EvaluatedRow]:
    """Up to n rows, those about the target's classes first, each group in the given order."""
    ordered = [r for r in rows if relevant(r)] + [r for r in rows if not relevant(r)]
    return ordered[:n]


class PGKD(Strategy):
    name: ClassVar[str] = "pgkd"
    Params = PGKDParams
    mining_split: ClassVar[Literal["train", "validation"]] = "validation"
    task_kinds: ClassVar[frozenset[TaskKind]] = frozenset({TaskKind.classification})

    def plan(self, ctx: PlanContext) -> list[GenerationTarget]:
        self.check_context(ctx)
        params = params_as(ctx, PGKDParams)
        report = ctx.report
        if not isinstance(report, ClassificationReport):
            raise ValueError("pgkd: planning needs the student's classification report")
        labels = ctx.resolved_labels() or sorted(report.per_class)
        validation = sorted(
            (r for r in ctx.evaluated if r.split == "validation"), key=lambda r: r.row_id
        )
        negatives = hard_negatives(validation, params.min_confidence)
        rng = rng_for(ctx, self.name)
        # Shuffled once per plan with the job seed: prompts show varied rows, reproducibly.
        correct = [r for r in validation if r.correct]
        wrong = [r for r in validation if not r.correct]
        rng.shuffle(correct)
        rng.shuffle(wrong)

        slots: list[dict[str, Any]] = []
        pairs = confused_pairs(report, labels, params.max_confused_pairs)
        weak = weak_classes(report, labels, params.max_weak_classes)
        for pair, label in zip_longest(pairs, weak):
            if pair is not None:
                slots.append({"focus": "confused_pair", "gold": pair.gold, "other": pair.predicted})
            if label is not None:
                slots.append({"focus": "weak_class", "gold": label, "other": None})
        counts = fit_to_budget([params.examples_per_target] * len(slots), ctx.max_examples)
        targets = [
            self._target(ctx, params, report, labels, slot, n, correct, wrong, negatives)
            for slot, n in zip(slots, counts, strict=False)
        ]
        return with_sample_indices(targets, ctx.iteration)

    def _target(
        self,
        ctx: PlanContext,
        params: PGKDParams,
        report: ClassificationReport,
        labels: list[str],
        slot: dict[str, Any],
        n: int,
        correct: list[EvaluatedRow],
        wrong: list[EvaluatedRow],
        negatives: list[EvaluatedRow],
    ) -> GenerationTarget:
        gold: str = slot["gold"]
        other: str | None = slot["other"]
        focus = {gold} if other is None else {gold, other}
        is_pair = other is not None

        def involves(row: EvaluatedRow) -> bool:
            return row.gold in focus or row.predicted in focus

        def exact_pair(row: EvaluatedRow) -> bool:
            return row.gold == gold and (row.predicted == other if is_pair else True)

        shown_negatives = _relevant_first(
            _relevant_first(negatives, exact_pair, len(negatives)),
            involves,
            params.n_hard_negatives,
        )
        # Lineage: the most confident mistake that this target answers, when there is one.
        source = next((row.row_id for row in negatives if exact_pair(row)), None)
        # A row already shown as a hard negative would only repeat itself among the wrong ones.
        shown_ids = {row.row_id for row in shown_negatives}
        wrong_pool = [row for row in wrong if row.row_id not in shown_ids]
        request = build_request(
            "pgkd",
            params={
                "instructions": ctx.task.instructions,
                "labels": labels,
                "n_examples": n,
                "focus": slot["focus"],
                "expected_label": gold,
                "confused_with": other,
                "n_validation": report.n,
                "accuracy": f"{report.accuracy:.3f}",
                "macro_f1": f"{report.macro_f1:.3f}",
            },
            data={
                "report": _report_table(report, labels, focus, params.max_report_classes),
                "correct": [
                    {"text": r.input, "label": r.gold}
                    for r in _relevant_first(correct, involves, params.n_correct_shown)
                ],
                "wrong": [
                    {"text": r.input, "gold": r.gold, "predicted": r.predicted}
                    for r in _relevant_first(wrong_pool, involves, params.n_wrong_shown)
                ],
                "hard_negatives": [
                    {
                        "text": r.input,
                        "gold": r.gold,
                        "confused_with": r.predicted,
                        "confidence": None if r.confidence is None else round(r.confidence, 3),
                    }
                    for r in shown_negatives
                ],
            },
            response_schema=examples_schema(TaskKind.classification, labels, n),
            schema_name="examples",
        )
        metrics = report.per_class.get(gold)
        meta: dict[str, Any] = {"f1": metrics.f1 if metrics else None}
        if is_pair:
            meta["confused_with"] = other
        return GenerationTarget(
            target_id=f"pair:{gold}->{other}" if is_pair else f"weak:{gold}",
            reason="confused_pair" if is_pair else "weak_class",
            source_row_id=source,
            expected_label=gold,
            request=request,
            n_examples=n,
            kind=ExampleKind.hard_negative if is_pair else ExampleKind.augmented,
            meta=meta,
        )

    def parse(
        self, target: GenerationTarget, output: Any, ctx: PlanContext
    ) -> list[CandidateExample]:
        return parse_examples(target, output, TaskKind.classification)


def _report_table(
    report: ClassificationReport, labels: Sequence[str], focus: set[str], limit: int
) -> list[dict[str, Any]]:
    """The per-class report as compact rows, weakest first, always including the focus classes.

    A 300-class report would crowd out everything else in the prompt, hence the limit.
    """
    known = [label for label in labels if label in report.per_class]
    known.sort(key=lambda label: (report.per_class[label].f1, label))
    shown = known[:limit]
    shown += [label for label in known[limit:] if label in focus]
    return [
        {
            "class": label,
            "precision": round(report.per_class[label].precision, 3),
            "recall": round(report.per_class[label].recall, 3),
            "f1": round(report.per_class[label].f1, 3),
            "support": report.per_class[label].support,
        }
        for label in shown
    ]
