"""Random augmentation: the open-loop baseline the closed loops are measured against.

Not a paper's method but the control every one of them reports: the same teacher prompt as
LLM2LLM, aimed at seed rows drawn at random instead of at the student's mistakes. Run at the
same teacher budget as a loop, it tells whether targeting by errors is what helped.

1. Pick `rows_per_iteration` seed rows at random (seeded by job seed and iteration).
2. Ask for `examples_per_row` similar-but-different examples of each (prompt `llm2llm.j2`).
3. Stop by the shared rule (iterations, patience, target, budgets).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from service.domain.spec import TaskKind
from service.domain.strategies.base import (
    CandidateExample,
    EvaluatedRow,
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
from service.domain.strategies.llm2llm import LLM2LLM


class RandomAugmentParams(StrategyParams):
    examples_per_row: int = Field(3, ge=1, le=20, description="New examples per picked row.")
    rows_per_iteration: int = Field(
        16, ge=1, le=5000, description="Seed rows picked at random per iteration."
    )


class RandomAugment(Strategy):
    name: ClassVar[str] = "random"
    Params = RandomAugmentParams
    mining_split: ClassVar[Literal["train", "validation"]] = "validation"
    task_kinds: ClassVar[frozenset[TaskKind]] = frozenset(TaskKind)

    def plan(self, ctx: PlanContext) -> list[GenerationTarget]:
        self.check_context(ctx)
        params = params_as(ctx, RandomAugmentParams)
        rows = list(ctx.train_rows)
        picked = rng_for(ctx, self.name).sample(rows, min(params.rows_per_iteration, len(rows)))
        counts = fit_to_budget([params.examples_per_row] * len(picked), ctx.max_examples)
        prompt = LLM2LLM()
        targets = []
        for seed, n in zip(picked, counts, strict=False):
            # No student verdict is shown: the teacher does not know what the student gets wrong.
            blank = EvaluatedRow(
                row_id=seed.row_id,
                split="train",
                input=seed.input,
                gold=seed.output,
                predicted=None,
                confidence=None,
                correct=True,
            )
            target = prompt.target_for(ctx, seed, blank, n)
            targets.append(
                target.model_copy(update={"target_id": f"rand:{seed.row_id}", "reason": "random"})
            )
        return with_sample_indices(targets, ctx.iteration)

    def parse(
        self, target: GenerationTarget, output: Any, ctx: PlanContext
    ) -> list[CandidateExample]:
        return parse_examples(target, output, ctx.task.kind)
