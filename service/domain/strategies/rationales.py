"""Rationale distillation: a rationale + answer per train row, kept only when the answer is right.

Papers: "Distilling Step-by-Step! Outperforming Larger Language Models with Less Training Data
and Smaller Model Sizes" (Hsieh et al., 2023) for the rationale-and-label targets, and "STaR:
Bootstrapping Reasoning With Reasoning" (Zelikman et al., 2022) for rationalisation.

1. Ask the teacher for a rationale and an answer for each training row: phase "rationale",
   `plan` makes one target per train row (reason "rationale", kind rationale, prompt
   `rationale.j2`), at most `max_rows_per_iteration`: the rows the student still gets wrong
   first, then the others in a seeded order that moves on each iteration, so every row is
   covered over the iterations. `parse` returns the row's input with the teacher's answer and
   rationale.
2. Keep a rationale only if its answer matches the gold label or answer: the orchestration's
   filter, through `answer_matches` (label equality for classification; `answers.py`'s
   extraction and numeric comparison for QA and generation), rejecting with "answer_mismatch".
3. Rationalisation: phase "retry", `plan` makes one target (reason "rationale_hint", prompt
   `rationale_hint.j2`) for each row whose target in phase "rationale" was rejected for
   "answer_mismatch", with the gold answer given as a hint; when `retry_with_hint` is set.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar, Literal

from pydantic import Field

from service.domain.answers import answers_match, extract_answer, gold_answer
from service.domain.filters import canonical_label
from service.domain.prompts import build_request, item_fields, rationale_schema
from service.domain.spec import TaskKind, TaskSpec
from service.domain.strategies.base import (
    CandidateExample,
    ExampleKind,
    GenerationTarget,
    LabelledRow,
    PlanContext,
    Strategy,
    StrategyParams,
    as_text,
    fit_to_budget,
    params_as,
    top_level,
    with_sample_indices,
)

RATIONALE = "rationale"
RETRY = "retry"
ANSWER_MISMATCH = "answer_mismatch"


class RationalesParams(StrategyParams):
    max_rows_per_iteration: int = Field(
        64, ge=1, le=5000, description="Train rows given a rationale prompt per iteration."
    )
    retry_with_hint: bool = Field(
        True, description="Retry rows whose rationale reached a wrong answer, with the gold hint."
    )


def final_answer(task: TaskSpec, gold: str) -> str:
    """The answer part of a gold output: the label, GSM8K's `#### N`, or the pattern's group."""
    if task.kind is TaskKind.classification:
        return gold.strip()
    if task.answer_pattern is not None:
        extracted = extract_answer(gold, task.answer_pattern)
        if extracted is not None:
            return extracted
    return gold_answer(gold) if task.kind is TaskKind.qa else gold.strip()


def answer_matches(task: TaskSpec, candidate_output: str, gold: str) -> bool:
    """Whether a rationale's answer agrees with the gold label or answer.

    Classification: the same label. QA and generation: the answer as written, else the answer
    extracted from it (a teacher may write "#### 72" or "The answer is 72"), compared with
    `answers_match` (numbers numerically, text ignoring case and whitespace) to the gold's final
    answer.
    """
    expected = final_answer(task, gold)
    if task.kind is TaskKind.classification:
        # The filter maps an answer to its canonical label first; verification answers arrive
        # as written ("Positive", "positive."), so they are mapped the same way here.
        return canonical_label(candidate_output, task.labels or [expected]) == expected
    if answers_match(candidate_output.strip(), expected):
        return True
    if task.kind is TaskKind.qa or task.answer_pattern is not None:
        return answers_match(extract_answer(candidate_output, task.answer_pattern), expected)
    return False


class Rationales(Strategy):
    name: ClassVar[str] = "rationales"
    Params = RationalesParams
    mining_split: ClassVar[Literal["train", "validation"]] = "train"
    phases: ClassVar[tuple[str, ...]] = (RATIONALE, RETRY)
    task_kinds: ClassVar[frozenset[TaskKind]] = frozenset(TaskKind)

    def plan(self, ctx: PlanContext) -> list[GenerationTarget]:
        self.check_context(ctx)
        params = params_as(ctx, RationalesParams)
        if ctx.phase == RATIONALE:
            rows = self._rows_to_explain(ctx, params.max_rows_per_iteration)
            hinted = False
        elif params.retry_with_hint:
            rows = self._rows_to_retry(ctx)
            hinted = True
        else:
            return []
        counts = fit_to_budget([1] * len(rows), ctx.max_examples)
        targets = [self._target(ctx, row, hinted) for row, _ in zip(rows, counts, strict=False)]
        return with_sample_indices(targets, ctx.iteration)

    def _rows_to_explain(self, ctx: PlanContext, limit: int) -> list[LabelledRow]:
        rows = list(ctx.train_rows)
        # One shuffle per job (not per iteration), walked in windows: iteration i starts where
        # iteration i-1 stopped, so rows are covered before any is explained twice.
        random.Random(f"{ctx.seed}:{self.name}").shuffle(rows)
        if rows:
            start = (max(ctx.iteration, 1) - 1) * limit % len(rows)
            rows = rows[start:] + rows[:start]
        wrong = {r.row_id for r in ctx.evaluated if r.split == "train" and not r.correct}
        # The student's own mistakes decide first: rows it still gets wrong lead the window.
        ordered = [r for r in rows if r.row_id in wrong] + [
            r for r in rows if r.row_id not in wrong
        ]
        return ordered[:limit]

    def _rows_to_retry(self, ctx: PlanContext) -> list[LabelledRow]:
        mismatched = {
            result.source_row_id
            for result in ctx.previous_phase
            if result.accepted == 0 and result.reasons.get(ANSWER_MISMATCH, 0) > 0
        }
        return [row for row in ctx.train_rows if row.row_id in mismatched]

    def _target(self, ctx: PlanContext, row: LabelledRow, hinted: bool) -> GenerationTarget:
        kind = ctx.task.kind
        labels = ctx.resolved_labels()
        input_field, output_field = item_fields(kind)
        data: dict[str, list[dict[str, Any]]] = {"row": [{input_field: row.input}]}
        if hinted:
            # The hint is the final answer only, never the gold worked solution: the teacher must
            # still write the reasoning itself (STaR's rationalisation).
            data["hint"] = [{output_field: final_answer(ctx.task, row.output)}]
        request = build_request(
            "rationale_hint" if hinted else "rationale",
            params={"kind": str(kind), "instructions": ctx.task.instructions, "labels": labels},
            data=data,
            response_schema=rationale_schema(kind, labels),
            schema_name="rationale",
        )
        return GenerationTarget(
            target_id=f"{'hint' if hinted else 'row'}:{row.row_id}",
            reason="rationale_hint" if hinted else "rationale",
            source_row_id=row.row_id,
            expected_label=row.output.strip() if kind is TaskKind.classification else None,
            request=request,
            n_examples=1,
            kind=ExampleKind.rationale,
            meta={"gold": row.output, "hinted": hinted},
        )

    def parse(
        self, target: GenerationTarget, output: Any, ctx: PlanContext
    ) -> list[CandidateExample]:
        """The row's own input with the teacher's rationale and answer.

        The answer is kept even when wrong: the filter rejects it as "answer_mismatch" (see
        `answer_matches`), which is what the retry phase reads.
        """
        rationale, answer = (
            as_text(top_level(output, "rationale")),
            as_text(top_level(output, "answer")),
        )
        row = next((r for r in ctx.train_rows if r.row_id == target.source_row_id), None)
        if row is None:
            raise ValueError(f"rationales: target {target.target_id} names no train row")
        if rationale is None or answer is None or not rationale.strip():
            return []
        return [
            CandidateExample(
                input=row.input,
                output=answer.strip(),
                rationale=rationale.strip(),
                kind=ExampleKind.rationale,
                meta=dict(target.meta),
            )
        ]
