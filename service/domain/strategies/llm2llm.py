"""LLM2LLM: new examples like each seed example the student still gets wrong.

Paper: "LLM2LLM: Boosting LLMs with Novel Iterative Data Enhancement" (Lee et al., 2024).

1. Train the student on the seed set: the orchestration (iteration 0 is the seed-only run).
2. Run the student on the seed train examples and collect the wrong ones: `mining_split` is
   "train"; `wrong_seed_rows` keeps evaluated rows that are wrong *and* are seed rows, taking the
   input and gold from `ctx.train_rows`, which holds only the seed set, so an earlier synthetic
   example can never seed new data (the paper's guard against drift). Capped per iteration by
   `max_errors_per_iteration`, sampled with the job seed.
3. For each wrong example ask the teacher for `examples_per_error` similar-but-different examples
   with the same label (classification) or exercising the same skill with their own answers (QA,
   generation): `plan`, one target per wrong row, prompt `llm2llm.j2`; `parse`.
4. Add them and go to 1: the orchestration. Stop after T iterations or when no seed example is
   wrong: `decide`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field

from service.domain.prompts import build_request, examples_schema
from service.domain.spec import Budget, Stopping, TaskKind
from service.domain.strategies.base import (
    CandidateExample,
    Decision,
    EvaluatedRow,
    ExampleKind,
    GenerationTarget,
    IterationOutcome,
    LabelledRow,
    PlanContext,
    Strategy,
    StrategyParams,
    decide_by_metric,
    example_item,
    fit_to_budget,
    params_as,
    parse_examples,
    rng_for,
    with_sample_indices,
)


class LLM2LLMParams(StrategyParams):
    examples_per_error: int = Field(3, ge=1, le=20, description="New examples per wrong seed row.")
    max_errors_per_iteration: int = Field(
        64, ge=1, le=5000, description="Wrong seed rows turned into prompts per iteration."
    )


def wrong_seed_rows(
    train_rows: Sequence[LabelledRow], evaluated: Sequence[EvaluatedRow]
) -> list[tuple[LabelledRow, EvaluatedRow]]:
    """Seed rows the student got wrong, in seed order, with their evaluation."""
    verdicts = {row.row_id: row for row in evaluated if row.split == "train"}
    return [
        (seed, verdicts[seed.row_id])
        for seed in train_rows
        if seed.row_id in verdicts and not verdicts[seed.row_id].correct
    ]


class LLM2LLM(Strategy):
    name: ClassVar[str] = "llm2llm"
    Params = LLM2LLMParams
    mining_split: ClassVar[Literal["train", "validation"]] = "train"
    task_kinds: ClassVar[frozenset[TaskKind]] = frozenset(TaskKind)

    def plan(self, ctx: PlanContext) -> list[GenerationTarget]:
        self.check_context(ctx)
        params = params_as(ctx, LLM2LLMParams)
        wrong = wrong_seed_rows(ctx.train_rows, ctx.evaluated)
        if len(wrong) > params.max_errors_per_iteration:
            # Sample rather than take the first rows, so every wrong row gets its turn over the
            # iterations; the sample is drawn from the seed order, not from `evaluated`'s order,
            # so the plan does not depend on how the caller loaded the rows.
            position = {seed.row_id: i for i, (seed, _) in enumerate(wrong)}
            picked = rng_for(ctx, self.name).sample(wrong, params.max_errors_per_iteration)
            wrong = sorted(picked, key=lambda pair: position[pair[0].row_id])
        counts = fit_to_budget([params.examples_per_error] * len(wrong), ctx.max_examples)
        targets = [
            self.target_for(ctx, seed, verdict, n)
            for (seed, verdict), n in zip(wrong, counts, strict=False)
        ]
        return with_sample_indices(targets, ctx.iteration)

    def target_for(
        self, ctx: PlanContext, seed: LabelledRow, verdict: EvaluatedRow, n: int
    ) -> GenerationTarget:
        kind = ctx.task.kind
        labels = ctx.resolved_labels()
        expected = seed.output if kind is TaskKind.classification else None
        request = build_request(
            "llm2llm",
            params={
                "kind": str(kind),
                "instructions": ctx.task.instructions,
                "labels": labels,
                "n_examples": n,
                "expected_label": expected,
            },
            data={
                "example": [
                    example_item(
                        kind, seed.input, seed.output, student_prediction=verdict.predicted
                    )
                ]
            },
            response_schema=examples_schema(kind, labels, n),
            schema_name="examples",
        )
        return GenerationTarget(
            target_id=f"err:{seed.row_id}",
            reason="wrong_seed",
            source_row_id=seed.row_id,
            expected_label=expected,
            request=request,
            n_examples=n,
            kind=ExampleKind.augmented,
        )

    def parse(
        self, target: GenerationTarget, output: Any, ctx: PlanContext
    ) -> list[CandidateExample]:
        return parse_examples(target, output, ctx.task.kind)

    def decide(
        self,
        history: Sequence[IterationOutcome],
        *,
        stopping: Stopping,
        budget: Budget,
        ctx: PlanContext | None,
    ) -> Decision:
        """The shared rule, and LLM2LLM's own: stop once the student gets every seed row right."""
        decision = decide_by_metric(history, stopping=stopping, budget=budget)
        if ctx is not None and not decision.stop:
            seed_ids = {row.row_id for row in ctx.train_rows}
            judged = [r for r in ctx.evaluated if r.split == "train" and r.row_id in seed_ids]
            # With no evaluated seed rows there is no evidence either way: keep going.
            if judged and all(r.correct for r in judged):
                return decision.model_copy(update={"stop": True, "reason": "no_errors"})
        return decision
