"""PGKD: labelled examples aimed at the classes and class pairs the student gets wrong.

Paper: "Performance-Guided LLM Knowledge Distillation for Efficient Text Classification at
Scale" (Di Palo, Singhi, Fadlallah; EMNLP 2024).

1. Train a small classifier on the seed set: the orchestration.
2. Evaluate it on held-out rows, a per-class report and the confusions: the seed rows, each
   predicted by a student that did not train on it (out of fold, for the built-in students;
   `mining_split` "train" asks for those), and the third of the validation set that steers this
   iteration (the orchestration hands the strategy only those rows: rows the iteration never
   saw decide whether its examples are kept, because rows that steer the teacher would flatter
   its data; see `service.domain.selection.validation_roles`). `mining_report` builds the
   report from those rows.
3. Hard-negative mining, the held-out rows it got wrong with high confidence paired with the class
   it confused them with: `hard_negatives` (`metrics.confident_mistakes`, `min_confidence`).
4. Prompt the teacher with the report, some correct and some wrong examples and the hard
   negatives, for new labelled examples aimed at the weak classes and the confused pairs. The
   iteration's share of the budget (`ctx.max_examples`) goes to the labels in proportion to
   their weakness (1 - F1) plus a floor (`shares_by_weakness`), so no class the student handles
   is starved; a label's share goes half to its confused pairs (by how often each confusion
   happens; reason "confused_pair", kind hard_negative) and the rest to the class itself
   (reason "weak_class", kind augmented), at most `examples_per_target` per prompt. Each prompt
   (`pgkd.j2`) shows the compact report table, then the examples: hard negatives and wrong rows
   that involve the target's classes first, and rows the student gets right from the classes
   it confuses with the target, preceded, for a class's own prompt, by held-out rows of that
   class the student gets right. `parse` keeps the teacher's labels.
5. Retrain, re-evaluate, early stopping with patience, keep the best iteration: the
   orchestration and the shared `decide` (`service.domain.selection` decides, with the
   validation noise in view, whether an iteration's data stays).

Showing validation texts to the teacher is the method; the filters' decontamination against
validation and test rows keeps near-copies of them out of the training set.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from service.domain.metrics import (
    ClassificationReport,
    ConfusionPair,
    ScoredPrediction,
    classification_report,
    confident_mistakes,
)
from service.domain.prompts import build_request, examples_schema
from service.domain.spec import TaskKind
from service.domain.strategies.base import (
    DEFAULT_EXAMPLES_PER_LABEL,
    DEFAULT_MIN_EXAMPLES,
    CandidateExample,
    EvaluatedRow,
    ExampleKind,
    GenerationTarget,
    PlanContext,
    Strategy,
    StrategyParams,
    apportion,
    params_as,
    parse_examples,
    rng_for,
    shares_by_weakness,
    split_in_chunks,
    with_sample_indices,
)


class PGKDParams(StrategyParams):
    examples_per_target: int = Field(5, ge=1, le=50, description="Examples asked for per prompt.")
    max_weak_classes: int | None = Field(
        None,
        ge=0,
        le=1000,
        description="Aim at only this many of the weakest classes per iteration; default: every "
        "class, in proportion to its weakness.",
    )
    max_confused_pairs: int | None = Field(
        None,
        ge=0,
        le=1000,
        description="Aim at only this many of the most frequent confusions per iteration; "
        "default: every confused pair.",
    )
    n_correct_shown: int = Field(4, ge=0, le=50, description="Correct mined rows per prompt.")
    n_wrong_shown: int = Field(4, ge=0, le=50, description="Wrong mined rows per prompt.")
    n_hard_negatives: int = Field(6, ge=0, le=50, description="Confident mistakes per prompt.")
    min_confidence: float = Field(
        0.5, ge=0, le=1, description="A mistake at least this confident is a hard negative."
    )
    max_report_classes: int = Field(
        50, ge=1, le=2000, description="Rows of the per-class table shown, weakest first."
    )

    @model_validator(mode="after")
    def _some_targets(self) -> PGKDParams:
        if self.max_weak_classes == 0 and self.max_confused_pairs == 0:
            raise ValueError("max_weak_classes and max_confused_pairs cannot both be 0")
        return self


def mining_report(rows: Sequence[EvaluatedRow], labels: Sequence[str]) -> ClassificationReport:
    """The per-class report of the student's predictions on the mined rows."""
    return classification_report([r.gold for r in rows], [r.predicted for r in rows], labels)


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


def _held_out_first(rows: list[EvaluatedRow], rng: random.Random) -> list[EvaluatedRow]:
    validation = [r for r in rows if r.split == "validation"]
    train = [r for r in rows if r.split != "validation"]
    rng.shuffle(validation)
    rng.shuffle(train)
    return validation + train


def _relevant_first(
    rows: Sequence[EvaluatedRow], relevant: Callable[[EvaluatedRow], bool], n: int, part: int = 0
) -> list[EvaluatedRow]:
    """Up to n rows, those about the target's classes first, each group in the given order.

    The `part`-th prompt of one target starts `part * n` rows further into the relevant ones, so
    prompts that split a large share show different rows rather than the same ones again."""
    chosen = [r for r in rows if relevant(r)]
    if chosen and part:
        start = (part * n) % len(chosen)
        chosen = chosen[start:] + chosen[:start]
    ordered = chosen + [r for r in rows if not relevant(r)]
    return ordered[:n]


class PGKD(Strategy):
    name: ClassVar[str] = "pgkd"
    Params = PGKDParams
    mining_split: ClassVar[Literal["train", "validation"]] = "train"
    steers_with_validation: ClassVar[bool] = True
    task_kinds: ClassVar[frozenset[TaskKind]] = frozenset({TaskKind.classification})

    def plan(self, ctx: PlanContext) -> list[GenerationTarget]:
        self.check_context(ctx)
        params = params_as(ctx, PGKDParams)
        # Held-out rows: the seed rows (out of fold) and the validation rows the orchestration
        # lets this iteration see.
        mined = sorted(ctx.evaluated, key=lambda r: (r.split, r.row_id))
        labels = ctx.resolved_labels() or sorted({r.gold for r in mined})
        if not mined:
            raise ValueError("pgkd: planning needs the student's predictions on held-out rows")
        report = mining_report(mined, labels)
        negatives = hard_negatives(mined, params.min_confidence)
        rng = rng_for(ctx, self.name)
        # Shuffled once per plan with the job seed, so prompts show varied rows reproducibly;
        # validation rows first: the student never trained on them, while a seed row (scored
        # out of fold) is in its training set already.
        correct = _held_out_first([r for r in mined if r.correct], rng)
        wrong = _held_out_first([r for r in mined if not r.correct], rng)
        if not wrong:
            return []  # no mistake to learn from: the loop has nothing to aim at

        total = ctx.max_examples
        if total is None:
            total = max(DEFAULT_MIN_EXAMPLES, DEFAULT_EXAMPLES_PER_LABEL * len(labels))
        pairs = confused_pairs(
            report,
            labels,
            len(report.confusion_pairs)
            if params.max_confused_pairs is None
            else params.max_confused_pairs,
        )
        only_pairs = params.max_weak_classes == 0
        aimed = labels
        if params.max_weak_classes:
            aimed = weak_classes(report, labels, params.max_weak_classes)
        elif only_pairs:
            aimed = [label for label in labels if any(p.gold == label for p in pairs)]
        weakness = {
            label: 1.0 - report.per_class[label].f1 if label in report.per_class else 0.0
            for label in aimed
        }
        slots: list[tuple[dict[str, Any], int]] = []
        for label, n in shares_by_weakness(total, aimed, weakness).items():
            own = [p for p in pairs if p.gold == label]
            to_pairs = n if only_pairs else (n // 2 if own else 0)
            by_pair = apportion(to_pairs, {p.predicted: float(p.count) for p in own})
            for other, m in by_pair.items():
                if m:
                    slots.append(({"focus": "confused_pair", "gold": label, "other": other}, m))
            if n - to_pairs:
                slots.append(({"focus": "weak_class", "gold": label, "other": None}, n - to_pairs))
        targets = [
            self._target(ctx, params, report, labels, slot, m, correct, wrong, negatives, part)
            for slot, n in slots
            for part, m in enumerate(split_in_chunks(n, params.examples_per_target))
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
        part: int = 0,
    ) -> GenerationTarget:
        gold: str = slot["gold"]
        other: str | None = slot["other"]
        focus = {gold} if other is None else {gold, other}
        is_pair = other is not None

        def involves(row: EvaluatedRow) -> bool:
            return row.gold in focus or row.predicted in focus

        # The rows the student already gets right: for a pair, from the class it confuses the
        # target with, never the target itself (the pair's own rows are its mistakes and hard
        # negatives). For the class itself, its own held-out rows the student classifies right
        # come first (validation rows only: it trained on the seed rows), then the classes it
        # confuses with the target. A teacher writes near what it is shown, and a prompt about
        # a class that shows few texts of it leaves the teacher to write near the other
        # classes' texts, where the class's examples are the ambiguous ones. Measured with
        # bench.efficacy (3 seeds, gap closed, TREC / SST-2 / HWU64): without them 29.5 /
        # 19.1 / 38.3, with them 34.3 / 34.1 / 40.3; on TREC's 50 fine labels, which it was not
        # chosen on, 47.9 and 47.4 (flat).
        neighbours = {p.predicted for p in report.confusion_pairs if p.gold == gold} | {
            p.gold for p in report.confusion_pairs if p.predicted == gold
        }
        contrast = ({other} if other is not None else neighbours) - {gold}

        def contrasting(row: EvaluatedRow) -> bool:
            return row.gold in contrast

        def exact_pair(row: EvaluatedRow) -> bool:
            return row.gold == gold and (row.predicted == other if is_pair else True)

        shown_negatives = _relevant_first(
            _relevant_first(negatives, exact_pair, len(negatives)),
            involves,
            params.n_hard_negatives,
            part,
        )
        # Lineage: the most confident mistake that this target answers, when there is one.
        source = next((row.row_id for row in negatives if exact_pair(row)), None)
        # A row already shown as a hard negative would only repeat itself among the wrong ones.
        shown_ids = {row.row_id for row in shown_negatives}
        wrong_pool = [row for row in wrong if row.row_id not in shown_ids]
        shown_correct = _relevant_first(
            [r for r in correct if r.gold != gold], contrasting, params.n_correct_shown, part
        )
        if not is_pair:
            own = [r for r in correct if r.gold == gold and r.split == "validation"]
            own = _relevant_first(own, lambda _: True, params.n_correct_shown, part)
            shown_correct = (own + shown_correct)[: params.n_correct_shown]
        request = build_request(
            "pgkd",
            params={
                "instructions": ctx.task.instructions,
                "labels": labels,
                "n_examples": n,
                "focus": slot["focus"],
                "expected_label": gold,
                "confused_with": other,
                "n_evaluated": report.n,
                "accuracy": f"{report.accuracy:.3f}",
                "macro_f1": f"{report.macro_f1:.3f}",
            },
            data={
                "report": _report_table(report, labels, focus, params.max_report_classes),
                "correct": [{"text": r.input, "label": r.gold} for r in shown_correct],
                "wrong": [
                    {"text": r.input, "gold": r.gold, "predicted": r.predicted}
                    for r in _relevant_first(wrong_pool, involves, params.n_wrong_shown, part)
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
            target_id=(f"pair:{gold}->{other}" if is_pair else f"weak:{gold}")
            + (f"#{part + 1}" if part else ""),
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
