"""Random augmentation: the open-loop baseline the closed loops are measured against.

Not a paper's method but the control every one of them reports: examples like seed rows drawn
at random instead of the student's mistakes, at the same budget. Run beside a loop, it tells
whether targeting by errors is what helped.

1. Take the iteration's share of the budget (`ctx.max_examples`); for classification split it
   evenly over the labels (`apportion`), then over each label's seed rows in a seeded random
   order; otherwise over all seed rows in that order. `rows_per_iteration`, when given, instead
   picks that many rows at random with `examples_per_row` each (the iteration's share still caps
   the total).
2. Ask for similar-but-different examples of each row (prompt `augment.j2`, which presents the
   row as a training example and says nothing of the student), at most `examples_per_row` per
   prompt.
3. Stop by the shared rule (iterations, patience, target, budgets).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from service.domain.spec import TaskKind
from service.domain.strategies.base import (
    DEFAULT_MIN_EXAMPLES,
    CandidateExample,
    EvaluatedRow,
    GenerationTarget,
    LabelledRow,
    PlanContext,
    Strategy,
    StrategyParams,
    apportion,
    fit_to_budget,
    params_as,
    parse_examples,
    rng_for,
    with_sample_indices,
)
from service.domain.strategies.llm2llm import augment_target, row_targets


class RandomAugmentParams(StrategyParams):
    examples_per_row: int = Field(3, ge=1, le=20, description="New examples per prompt (one row).")
    rows_per_iteration: int | None = Field(
        None,
        ge=1,
        le=5000,
        description="Seed rows picked at random per iteration, examples_per_row each; default: "
        "the iteration's share of the budget, spread evenly over the labels.",
    )


class RandomAugment(Strategy):
    name: ClassVar[str] = "random"
    Params = RandomAugmentParams
    mining_split: ClassVar[Literal["train", "validation"]] = "validation"
    task_kinds: ClassVar[frozenset[TaskKind]] = frozenset(TaskKind)

    def plan(self, ctx: PlanContext) -> list[GenerationTarget]:
        self.check_context(ctx)
        params = params_as(ctx, RandomAugmentParams)
        rng = rng_for(ctx, self.name)
        rows = list(ctx.train_rows)
        per_prompt = params.examples_per_row
        if params.rows_per_iteration is not None:
            picked = rng.sample(rows, min(params.rows_per_iteration, len(rows)))
            counts = fit_to_budget([per_prompt] * len(picked), ctx.max_examples)
            targets = [
                augment_target(ctx, seed, n, reason="random", target_id=f"rand:{seed.row_id}")
                for seed, n in zip(picked, counts, strict=False)
            ]
            return with_sample_indices(targets, ctx.iteration)
        total = ctx.max_examples if ctx.max_examples is not None else DEFAULT_MIN_EXAMPLES
        labels = ctx.resolved_labels()
        groups: dict[str, list[LabelledRow]] = {}
        for seed in rows:
            key = seed.output if ctx.task.kind is TaskKind.classification and labels else ""
            groups.setdefault(key, []).append(seed)
        shares = apportion(total, dict.fromkeys(groups, 1.0))
        targets = []
        for key, group in groups.items():
            rng.shuffle(group)
            slots: list[tuple[LabelledRow, EvaluatedRow | None]] = [(s, None) for s in group]
            targets += row_targets(
                ctx, slots, shares[key], per_prompt, reason="random", prefix="rand"
            )
        return with_sample_indices(targets, ctx.iteration)

    def parse(
        self, target: GenerationTarget, output: Any, ctx: PlanContext
    ) -> list[CandidateExample]:
        return parse_examples(target, output, ctx.task.kind)
