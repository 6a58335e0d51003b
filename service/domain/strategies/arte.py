"""ARTE: the teacher drafts, the student scores the drafts, the teacher writes more like the best.

Paper: "Aligning Teacher with Student Preferences for Tailored Training Data Generation" (2024).

1. The teacher drafts examples with rationales: phase "draft", `plan` makes
   ceil(`n_drafts` / `drafts_per_target`) targets (reason "draft", kind augmented, prompt
   `arte_draft.j2`) each showing a few seed rows (`n_shots`); for classification each target asks
   for one label, rotating through the label set so the drafts cover it.
2. Student preference: the orchestration uses each parsed draft as an in-context demonstration
   for the student on `score_rows` validation rows of the third that steers this iteration
   (rows it never showed judge whether its examples are kept); the accuracy is the draft's
   score (`ScoredDraft.score`). Only student inference is needed.
3. Align the teacher with those preferences. With a black-box teacher this is in-context: phase
   "final", `plan` shows every target the `n_best` highest-scored drafts and the `n_worst`
   lowest-scored ones (only drafts that scored strictly below the best shown, so equal scores
   never pose as a preference) and asks for more like the best (prompt `arte_final.j2`).
   For an open teacher, `preference_pairs` forms (chosen, rejected) pairs of drafts answering the
   same prompt, which the orchestration stores as kind preference_pair for DPO export.
4. Generate the final tailored set with the aligned prompt: the final targets (reason "aligned",
   kind augmented), `examples_final` examples in all (default: the iteration's share of the
   budget); `parse`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field

from service.domain.prompts import build_request, examples_schema, item_fields
from service.domain.spec import TaskKind
from service.domain.strategies.base import (
    DEFAULT_MIN_EXAMPLES,
    CandidateExample,
    ExampleKind,
    GenerationTarget,
    LabelledRow,
    PlanContext,
    ScoredDraft,
    Strategy,
    StrategyParams,
    fit_to_budget,
    params_as,
    parse_examples,
    rng_for,
    split_in_chunks,
    with_sample_indices,
)

DRAFT = "draft"
FINAL = "final"


class ARTEParams(StrategyParams):
    n_drafts: int = Field(12, ge=2, le=1000, description="Drafts the student scores per iteration.")
    drafts_per_target: int = Field(4, ge=1, le=20, description="Drafts asked for per prompt.")
    n_shots: int = Field(3, ge=0, le=20, description="Seed rows shown per prompt.")
    n_best: int = Field(3, ge=1, le=20, description="Highest-scored drafts shown when aligning.")
    n_worst: int = Field(3, ge=0, le=20, description="Lowest-scored drafts shown when aligning.")
    examples_final: int | None = Field(
        None,
        ge=1,
        le=5000,
        description="Tailored examples per iteration; default: the iteration's share of the "
        "budget.",
    )
    examples_per_target: int = Field(8, ge=1, le=50, description="Tailored examples per prompt.")
    score_rows: int = Field(
        32,
        ge=1,
        le=10000,
        description="Validation rows each draft is scored on, from the third that steers the "
        "iteration (rows it never showed decide whether its examples are kept).",
    )
    n_preference_pairs: int = Field(
        8, ge=0, le=1000, description="(chosen, rejected) draft pairs exported per iteration."
    )


def best_and_worst(
    drafts: Sequence[ScoredDraft], n_best: int, n_worst: int
) -> tuple[list[ScoredDraft], list[ScoredDraft]]:
    """The highest-scored drafts, and the lowest-scored ones that score below all of those."""
    ranked = sorted(drafts, key=lambda d: (-d.score, d.draft_id))
    best = ranked[:n_best]
    if not best:
        return [], []
    floor = min(d.score for d in best)
    worst = [d for d in sorted(drafts, key=lambda d: (d.score, d.draft_id)) if d.score < floor]
    return best, worst[:n_worst]


def preference_pairs(
    drafts: Sequence[ScoredDraft], n_pairs: int
) -> list[tuple[ScoredDraft, ScoredDraft]]:
    """(chosen, rejected) pairs for DPO of an open teacher, widest score margin first.

    Drafts are paired within the prompt that produced them (`target_id`), because a DPO pair is
    two answers to one prompt; within it the best is paired with the worst, the second best with
    the second worst, and so on while the chosen one scores strictly higher, so no draft is in
    two pairs. Deterministic: ties break on draft ids.
    """
    groups: dict[str | None, list[ScoredDraft]] = {}
    for draft in drafts:
        groups.setdefault(draft.target_id, []).append(draft)
    pairs: list[tuple[ScoredDraft, ScoredDraft]] = []
    for group in groups.values():
        descending = sorted(group, key=lambda d: (-d.score, d.draft_id))
        ascending = sorted(group, key=lambda d: (d.score, d.draft_id))
        for chosen, rejected in zip(descending, ascending, strict=True):
            if chosen.score <= rejected.score:
                break
            pairs.append((chosen, rejected))
    pairs.sort(key=lambda p: (-(p[0].score - p[1].score), p[0].draft_id, p[1].draft_id))
    return pairs[:n_pairs]


def _draft_item(kind: TaskKind, draft: ScoredDraft) -> dict[str, Any]:
    input_field, output_field = item_fields(kind)
    return {
        input_field: draft.input,
        "rationale": draft.rationale,
        output_field: draft.output,
        "score": round(draft.score, 3),
    }


class ARTE(Strategy):
    name: ClassVar[str] = "arte"
    Params = ARTEParams
    mining_split: ClassVar[Literal["train", "validation"]] = "validation"
    steers_with_validation: ClassVar[bool] = True
    phases: ClassVar[tuple[str, ...]] = (DRAFT, FINAL)
    # The in-context score needs a checkable answer, so free-form generation is not supported.
    task_kinds: ClassVar[frozenset[TaskKind]] = frozenset({TaskKind.classification, TaskKind.qa})

    def plan(self, ctx: PlanContext) -> list[GenerationTarget]:
        self.check_context(ctx)
        params = params_as(ctx, ARTEParams)
        if ctx.phase == DRAFT:
            wanted = split_in_chunks(params.n_drafts, params.drafts_per_target)
        elif not ctx.drafts:
            # Every draft was rejected or none was scored: there is no preference to align with,
            # and unaligned examples are not what this strategy promises.
            return []
        else:
            total = params.examples_final or ctx.max_examples or DEFAULT_MIN_EXAMPLES
            wanted = split_in_chunks(total, params.examples_per_target)
        counts = fit_to_budget(wanted, ctx.max_examples)
        rng = rng_for(ctx, self.name)
        shots = list(ctx.train_rows)
        rng.shuffle(shots)
        labels = ctx.resolved_labels()
        label_offset = rng.randrange(len(labels)) if labels else 0
        best, worst = best_and_worst(ctx.drafts, params.n_best, params.n_worst)
        targets: list[GenerationTarget] = []
        for index, n in enumerate(counts):
            expected = (
                labels[(label_offset + index) % len(labels)]
                if ctx.task.kind is TaskKind.classification and labels
                else None
            )
            target_shots = _window(shots, index * params.n_shots, params.n_shots)
            targets.append(self._target(ctx, index, n, expected, target_shots, best, worst, labels))
        return with_sample_indices(targets, ctx.iteration)

    def _target(
        self,
        ctx: PlanContext,
        index: int,
        n: int,
        expected: str | None,
        shots: list[LabelledRow],
        best: list[ScoredDraft],
        worst: list[ScoredDraft],
        labels: list[str] | None,
    ) -> GenerationTarget:
        kind = ctx.task.kind
        input_field, output_field = item_fields(kind)
        data: dict[str, list[dict[str, Any]]] = {
            "shots": [{input_field: row.input, output_field: row.output} for row in shots]
        }
        meta: dict[str, Any] = {"shot_row_ids": [row.row_id for row in shots]}
        if ctx.phase == FINAL:
            data["best"] = [_draft_item(kind, d) for d in best]
            data["worst"] = [_draft_item(kind, d) for d in worst]
            meta["best_draft_ids"] = [d.draft_id for d in best]
            meta["worst_draft_ids"] = [d.draft_id for d in worst]
        request = build_request(
            "arte_draft" if ctx.phase == DRAFT else "arte_final",
            params={
                "kind": str(kind),
                "instructions": ctx.task.instructions,
                "labels": labels,
                "n_examples": n,
                "expected_label": expected,
            },
            data=data,
            response_schema=examples_schema(kind, labels, n, with_rationale=True),
            schema_name="examples",
        )
        return GenerationTarget(
            target_id=f"{ctx.phase}:{index}",
            reason="draft" if ctx.phase == DRAFT else "aligned",
            source_row_id=None,
            expected_label=expected,
            request=request,
            n_examples=n,
            kind=ExampleKind.augmented,
            meta=meta,
        )

    def parse(
        self, target: GenerationTarget, output: Any, ctx: PlanContext
    ) -> list[CandidateExample]:
        return parse_examples(target, output, ctx.task.kind)


def _window(rows: Sequence[LabelledRow], start: int, size: int) -> list[LabelledRow]:
    """`size` rows from `start`, wrapping around, without repeating a row within the window."""
    if not rows:
        return []
    return [rows[(start + offset) % len(rows)] for offset in range(min(size, len(rows)))]
