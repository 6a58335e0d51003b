"""The strategy interface: plan teacher prompts from student feedback, parse answers, decide."""

from __future__ import annotations

import json
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from service.domain.metrics import ClassificationReport, QAReport
from service.domain.prompts import build_request, examples_schema, item_fields
from service.domain.spec import Budget, Stopping, TaskKind, TaskSpec
from service.domain.teacher import TeacherRequest

P = TypeVar("P", bound=BaseModel)

# Identical prompts get distinct sample indices (part of the request fingerprint), so the teacher
# cache answers a prompt repeated in a later iteration (a seed row still wrong) with a fresh
# sample instead of the examples it already gave. No plan has this many targets: every strategy
# bounds its per-iteration target count well below it.
SAMPLES_PER_ITERATION = 10_000

# The last iteration of a budget asks the teacher again for what its rejections left of its
# share (workers/steps/evaluate.py::_plan_top_up), under phases "top-up-1", "top-up-2", planned
# as the strategy's only phase. Their sample indices start past every iteration's
# (1,000 iterations x SAMPLES_PER_ITERATION), so a prompt asked again is a new sample.
TOP_UP_PHASE = "top-up"
TOP_UP_ROUNDS = 2
TOP_UP_SAMPLES = 1_000_000_000


class ExampleKind(StrEnum):
    seed = "seed"
    augmented = "augmented"
    hard_negative = "hard_negative"
    rationale = "rationale"
    preference_pair = "preference_pair"


class LabelledRow(BaseModel):
    """A seed or validation row; `output` is its label or gold answer."""

    row_id: str
    input: str
    output: str


class EvaluatedRow(BaseModel):
    """One row of the student's last evaluation."""

    row_id: str
    split: Literal["train", "validation"]
    input: str
    gold: str
    predicted: str | None = None
    confidence: float | None = Field(None, ge=0, le=1)
    correct: bool


class ScoredDraft(BaseModel):
    """An ARTE draft with its score: the student's accuracy with the draft as demonstration.

    `target_id` names the draft prompt that produced it; preference pairs are formed within one
    prompt, because a DPO pair is two answers to the same prompt.
    """

    draft_id: str
    input: str
    output: str
    rationale: str | None = None
    score: float
    target_id: str | None = None


class PhaseResult(BaseModel):
    """What the filters made of one target's candidates in an earlier phase."""

    target_id: str
    source_row_id: str | None = None
    accepted: int = Field(0, ge=0)
    rejected: int = Field(0, ge=0)
    reasons: dict[str, int] = Field(default_factory=dict)


class PlanContext(BaseModel):
    """Everything a strategy may look at to plan one phase of one iteration."""

    task: TaskSpec
    # The strategy's params model; a plain dict (a context rebuilt from JSON) is accepted too,
    # because a dict validated as a bare BaseModel would silently lose every field.
    params: dict[str, Any] | SerializeAsAny[BaseModel] = Field(..., union_mode="left_to_right")
    iteration: int = Field(..., ge=0, description="1-based; 0 is the seed-only baseline.")
    phase: str
    seed: int = 0
    labels: list[str] | None = None
    train_rows: list[LabelledRow] = Field(default_factory=list)
    evaluated: list[EvaluatedRow] = Field(default_factory=list)
    report: ClassificationReport | QAReport | None = None
    drafts: list[ScoredDraft] = Field(default_factory=list)
    previous_phase: list[PhaseResult] = Field(default_factory=list)
    max_examples: int | None = Field(None, ge=0)

    def resolved_labels(self) -> list[str] | None:
        """The label set: given with the context, else the task's."""
        return self.labels if self.labels is not None else self.task.labels


class GenerationTarget(BaseModel):
    """One teacher prompt, with why it exists and what its answer becomes."""

    target_id: str
    reason: str
    source_row_id: str | None = None
    expected_label: str | None = None
    request: TeacherRequest
    n_examples: int = Field(..., ge=1)
    kind: ExampleKind
    meta: dict[str, Any] = Field(default_factory=dict)


class CandidateExample(BaseModel):
    """A parsed, unfiltered example."""

    input: str
    output: str
    rationale: str | None = None
    kind: ExampleKind
    meta: dict[str, Any] = Field(default_factory=dict)


class IterationOutcome(BaseModel):
    """One finished iteration as the stopping rule sees it (iteration 0: the seed-only run)."""

    iteration: int = Field(..., ge=0)
    metric: float | None = None
    accepted: int = Field(0, ge=0)
    targets: int = Field(0, ge=0)
    included: bool = True


class Decision(BaseModel):
    stop: bool
    reason: str | None = None
    best_iteration: int | None = None


class StrategyParams(BaseModel):
    """Base of every strategy's parameters: unknown keys are errors, so typos surface."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Strategy(ABC):
    """A loop method as pure code; the orchestration does every I/O around it."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    mining_split: ClassVar[Literal["train", "validation"]]
    phases: ClassVar[tuple[str, ...]] = ("generate",)
    task_kinds: ClassVar[frozenset[TaskKind]]
    # Whether the strategy shows validation rows to the teacher (its prompts are aimed at the
    # student's mistakes there). Then each iteration sees a third of the validation set, the
    # thirds in rotation, and is judged on rows that neither it nor the iteration before saw
    # (`selection.validation_roles`); otherwise all of it judges.
    steers_with_validation: ClassVar[bool] = False

    @classmethod
    def validate_params(cls, raw: Mapping[str, Any]) -> BaseModel:
        """The job's raw `params` as this strategy's model; ValueError names each bad field."""
        try:
            return cls.Params.model_validate(dict(raw))
        except ValidationError as exc:
            problems = "; ".join(
                f"params.{'.'.join(str(part) for part in error['loc']) or '<root>'}: {error['msg']}"
                for error in exc.errors()
            )
            raise ValueError(f"invalid {cls.name} params: {problems}") from None

    @classmethod
    def check_task(cls, task: TaskSpec) -> None:
        if task.kind not in cls.task_kinds:
            supported = ", ".join(sorted(cls.task_kinds))
            raise ValueError(
                f"task.kind: strategy {cls.name} supports {supported}, not {task.kind}"
            )

    def check_context(self, ctx: PlanContext) -> None:
        """Reject a context this strategy cannot plan from (caller bugs, not teacher content)."""
        self.check_task(ctx.task)
        if ctx.phase not in self.phases:
            raise ValueError(f"{self.name}: unknown phase {ctx.phase!r}, expected {self.phases}")

    @abstractmethod
    def plan(self, ctx: PlanContext) -> list[GenerationTarget]:
        """The teacher prompts for this phase of this iteration; deterministic in `ctx`."""

    @abstractmethod
    def parse(
        self, target: GenerationTarget, output: Any, ctx: PlanContext
    ) -> list[CandidateExample]:
        """Candidates from the teacher's validated JSON; malformed items are skipped.

        Raises ValueError only when the top-level shape is wrong.
        """

    def decide(
        self,
        history: Sequence[IterationOutcome],
        *,
        stopping: Stopping,
        budget: Budget,
        ctx: PlanContext | None,
    ) -> Decision:
        """Continue or stop after an iteration; see `decide_by_metric`."""
        return decide_by_metric(history, stopping=stopping, budget=budget)


# --------------------------------------------------------------------------- shared helpers


def params_as(ctx: PlanContext, model: type[P]) -> P:
    """The context's params as the strategy's own model (validated when given as a dict)."""
    if isinstance(ctx.params, model):
        return ctx.params
    raw = ctx.params if isinstance(ctx.params, dict) else ctx.params.model_dump()
    return model.model_validate(raw)


def rng_for(ctx: PlanContext, *salt: str) -> random.Random:
    """A generator seeded by the job seed, iteration, phase and salt.

    A string seed is hashed with SHA-512 by `random`, so the draw is the same in every process
    (it does not depend on PYTHONHASHSEED).
    """
    return random.Random(":".join([str(ctx.seed), str(ctx.iteration), ctx.phase, *salt]))


def fit_to_budget(wanted: Sequence[int], max_examples: int | None) -> list[int]:
    """Per-target example counts, in plan order, trimmed so their sum stays within the budget.

    Targets past the budget are dropped; the last kept one may ask for fewer examples.
    """
    if max_examples is None:
        return list(wanted)
    counts: list[int] = []
    left = max_examples
    for n in wanted:
        if left <= 0:
            break
        counts.append(min(n, left))
        left -= counts[-1]
    return counts


# Without an example budget, a classification iteration asks for this many examples per label,
# and at least DEFAULT_MIN_EXAMPLES: three iterations then add about a dozen rows a class, as
# many as a few-shot seed set holds: enough to move a student, little enough to stay cheap.
DEFAULT_EXAMPLES_PER_LABEL = 4
DEFAULT_MIN_EXAMPLES = 32


def examples_for_iteration(
    budget: Budget, *, iteration: int, accepted_so_far: int, n_labels: int | None
) -> int | None:
    """How many examples iteration `iteration` asks the teacher for.

    With an example budget, the budget left shared evenly by the iterations left (the last one
    gets all that is left), so the budget is spent across the loop and never overspent; capped
    by `max_examples_per_iteration`. Without one, a classification iteration asks for
    DEFAULT_EXAMPLES_PER_LABEL per label; QA and generation tasks (None) keep their strategy's
    own per-target defaults.
    """
    caps: list[int] = []
    if budget.max_examples is not None:
        left = max(budget.max_examples - accepted_so_far, 0)
        iterations_left = max(budget.max_iterations - max(iteration, 1) + 1, 1)
        caps.append(math.ceil(left / iterations_left))
    if budget.max_examples_per_iteration is not None:
        caps.append(budget.max_examples_per_iteration)
    if caps:
        return min(caps)
    if n_labels:
        return max(DEFAULT_MIN_EXAMPLES, DEFAULT_EXAMPLES_PER_LABEL * n_labels)
    return None


def apportion(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """`total` split in proportion to `weights` by largest remainders: whole numbers summing to
    `total` (0 when every weight is 0), ties broken by key order, so the split is deterministic."""
    positive = {key: max(weight, 0.0) for key, weight in weights.items()}
    mass = sum(positive.values())
    if total <= 0 or mass <= 0:
        return dict.fromkeys(weights, 0)
    exact = {key: total * weight / mass for key, weight in positive.items()}
    shares = {key: math.floor(value) for key, value in exact.items()}
    left = total - sum(shares.values())
    for key in sorted(exact, key=lambda k: (-(exact[k] - shares[k]), list(exact).index(k)))[:left]:
        shares[key] += 1
    return shares


# A class the student already handles still gets WEAKNESS_FLOOR / (1 + WEAKNESS_FLOOR) of the
# share of a class it gets all wrong: targeting weakness must not starve the rest, or the
# student loses on the classes that got nothing while it gains on the weak ones.
WEAKNESS_FLOOR = 0.25


def shares_by_weakness(
    total: int, labels: Sequence[str], weakness: Mapping[str, float]
) -> dict[str, int]:
    """`total` examples over `labels` in proportion to `weakness` (0 = handled, 1 = all wrong)
    plus WEAKNESS_FLOOR, in label order."""
    return apportion(
        total,
        {label: WEAKNESS_FLOOR + min(max(weakness.get(label, 0.0), 0.0), 1.0) for label in labels},
    )


def split_in_chunks(total: int, size: int) -> list[int]:
    """`total` as chunks of `size`, the last one smaller: split_in_chunks(10, 4) == [4, 4, 2]."""
    return [min(size, total - start) for start in range(0, total, size)]


def spread(total: int, n_slots: int) -> list[int]:
    """`total` over `n_slots` as evenly as possible, the first slots taking the remainder."""
    if n_slots <= 0:
        return []
    base, extra = divmod(total, n_slots)
    return [base + (1 if i < extra else 0) for i in range(n_slots)]


# Of the examples asked for about a classification mistake (a row of label L the student
# predicted as P), this share (rounded half up: none of one example, at least one of two) are
# *contrast* examples: of P, resembling the mistaken text (`contrast.j2`). The examples of L
# teach the student what L also looks like; the contrast ones what P looks like near the same
# texts, so the line between the two is drawn from both sides. Measured with the selection
# study (docs/loops.md): 1/3 closed 3.7 more points of the gap than none on HWU64 and 1.5 more
# on TREC; 1/2 less than 1/3.
CONTRAST_SHARE = 1 / 3


def contrast_count(n: int) -> int:
    """How many of `n` examples asked for about one mistake are contrast examples."""
    return int(n * CONTRAST_SHARE + 0.5)


def contrast_target(
    ctx: PlanContext,
    shown: Sequence[tuple[str, str]],
    *,
    predicted: str,
    true_label: str,
    n: int,
    target_id: str,
    source_row_id: str | None,
) -> GenerationTarget:
    """A prompt for `n` examples of `predicted`, the class the student wrongly gave the `shown`
    texts (each with its true label, `true_label`), that resemble them (reason "contrast", kind
    hard_negative)."""
    labels = ctx.resolved_labels()
    request = build_request(
        "contrast",
        params={
            "instructions": ctx.task.instructions,
            "labels": labels,
            "n_examples": n,
            "expected_label": predicted,
            "true_label": true_label,
        },
        data={
            "example": [
                example_item(TaskKind.classification, text, gold, student_prediction=predicted)
                for text, gold in shown
            ]
        },
        response_schema=examples_schema(TaskKind.classification, labels, n),
        schema_name="examples",
    )
    return GenerationTarget(
        target_id=target_id,
        reason="contrast",
        source_row_id=source_row_id,
        expected_label=predicted,
        request=request,
        n_examples=n,
        kind=ExampleKind.hard_negative,
        meta={"contrast_of": true_label},
    )


def top_up_phase(round_: int) -> str:
    """The stored phase of top-up `round_` (1, 2, ...)."""
    return f"{TOP_UP_PHASE}-{round_}"


def top_up_round(phase: str | None) -> int:
    """Which top-up a stored phase is (1, 2, ...), or 0 for a strategy's own phase."""
    prefix = f"{TOP_UP_PHASE}-"
    if phase and phase.startswith(prefix) and phase[len(prefix) :].isdigit():
        return int(phase[len(prefix) :])
    return 0


def strategy_phase(phase: str, phases: Sequence[str]) -> str:
    """The strategy's phase a stored phase was planned as and is parsed as."""
    return phases[0] if top_up_round(phase) else phase


def as_top_up(targets: Sequence[GenerationTarget], round_: int) -> list[GenerationTarget]:
    """Targets planned again for top-up `round_`: their ids name it, and their sample indices
    are its own, so that a prompt the iteration already asked is a new sample (its fingerprint
    and the seed sent with it differ) and not the cached answer."""
    phase = top_up_phase(round_)
    return [
        target.model_copy(
            update={
                "target_id": f"{phase}:{target.target_id}",
                "request": target.request.model_copy(
                    update={"sample_index": target.request.sample_index + round_ * TOP_UP_SAMPLES}
                ),
            }
        )
        for target in targets
    ]


def with_sample_indices(targets: list[GenerationTarget], iteration: int) -> list[GenerationTarget]:
    """Give each target a sample index unique among identical requests of the job."""
    if len(targets) > SAMPLES_PER_ITERATION:
        raise ValueError(f"a plan may hold at most {SAMPLES_PER_ITERATION} targets")
    seen: dict[str, int] = {}
    out: list[GenerationTarget] = []
    for target in targets:
        request = target.request
        key = json.dumps(
            [
                request.template_id,
                request.template_version,
                [m.model_dump() for m in request.messages],
                request.response_schema,
            ],
            sort_keys=True,
        )
        ordinal = seen.get(key, 0)
        seen[key] = ordinal + 1
        index = max(iteration - 1, 0) * SAMPLES_PER_ITERATION + ordinal
        out.append(
            target.model_copy(
                update={"request": request.model_copy(update={"sample_index": index})}
            )
        )
    return out


def as_text(value: Any) -> str | None:
    """A teacher field as text: strings as they are, numbers (a QA answer of 72) as digits."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def top_level(output: Any, key: str) -> Any:
    """`output[key]` from a JSON object; ValueError when the top-level shape is wrong."""
    if not isinstance(output, Mapping):
        raise ValueError(f"expected a JSON object, got {type(output).__name__}")
    if key not in output:
        raise ValueError(f"expected a JSON object with {key!r}")
    return output[key]


def parse_examples(
    target: GenerationTarget, output: Any, task_kind: TaskKind
) -> list[CandidateExample]:
    """Candidates from an `{"examples": [...]}` answer.

    Items that are not objects or lack their input or output are skipped; at most
    `target.n_examples` candidates are kept, because that is what the budget paid for. Labels are
    kept as written, even outside the label set or different from the expected label: the filter
    rejects them with a visible reason, which shows how often the teacher strays.
    """
    items = top_level(output, "examples")
    if not isinstance(items, list):
        raise ValueError(f"expected 'examples' to be a list, got {type(items).__name__}")
    input_field, output_field = item_fields(task_kind)
    candidates: list[CandidateExample] = []
    for index, item in enumerate(items):
        if len(candidates) >= target.n_examples:
            break
        if not isinstance(item, Mapping):
            continue
        text, answer = as_text(item.get(input_field)), as_text(item.get(output_field))
        if text is None or answer is None:
            continue
        meta: dict[str, Any] = {"item_index": index}
        if target.expected_label is not None:
            meta["expected_label"] = target.expected_label
        candidates.append(
            CandidateExample(
                input=text.strip(),
                output=answer.strip(),
                rationale=_rationale_of(item),
                kind=target.kind,
                meta=meta,
            )
        )
    return candidates


def _rationale_of(item: Mapping[str, Any]) -> str | None:
    rationale = item.get("rationale")
    return rationale.strip() if isinstance(rationale, str) and rationale.strip() else None


def example_item(kind: TaskKind, text: str, output: str, **extra: Any) -> dict[str, Any]:
    """A row as shown to the teacher, with the same field names as the output schema."""
    input_field, output_field = item_fields(kind)
    return {input_field: text, output_field: output, **extra}


# --------------------------------------------------------------------------- stopping


def best_iteration(history: Sequence[IterationOutcome]) -> int | None:
    """The iteration whose dataset the export holds: the latest one whose examples were kept.

    Training sets are cumulative (seed rows plus every kept iteration's examples), so the latest
    kept iteration holds all the data that did not make the student measurably worse
    (`service.domain.selection`). Iteration 0, the seed-only run, is always kept: a loop whose
    every iteration was excluded exports the seed set.
    """
    kept = [o for o in history if o.included and o.metric is not None]
    if not kept:
        return None
    return max(kept, key=lambda o: o.iteration).iteration


def excluded_in_a_row(history: Sequence[IterationOutcome]) -> int:
    """How many of the latest scored iterations were excluded, counting back from the last."""
    count = 0
    for outcome in sorted(history, key=lambda o: o.iteration, reverse=True):
        if outcome.metric is None:
            continue
        if outcome.included:
            break
        count += 1
    return count


def decide_by_metric(
    history: Sequence[IterationOutcome], *, stopping: Stopping, budget: Budget
) -> Decision:
    """The shared stopping rule, checked after each iteration, first match wins:

    target metric reached by the kept student; the last iteration planned nothing (the same
    student would plan nothing again); the job's example budget is spent; the last `patience`
    iterations were all excluded (their data made the student measurably worse, so more of the
    same is not worth paying for); `max_iterations` done. An iteration within the validation
    noise is not a reason to stop: its data is kept, and the budget is spent as planned. Token
    and money budgets are enforced by the orchestration, which sees the spend.
    """
    outcomes = sorted(history, key=lambda o: o.iteration)
    if not outcomes:
        return Decision(stop=False)
    best = best_iteration(outcomes)
    kept = next((o for o in outcomes if o.iteration == best), None)
    last = outcomes[-1]
    reason: str | None = None
    if stopping.target is not None and kept is not None and (kept.metric or 0) >= stopping.target:
        reason = "target_reached"
    elif last.iteration >= 1 and last.targets == 0:
        reason = "no_targets"
    elif budget.max_examples is not None and (
        sum(o.accepted for o in outcomes if o.iteration >= 1) >= budget.max_examples
    ):
        reason = "max_examples"
    elif excluded_in_a_row(outcomes) >= stopping.patience:
        reason = "patience"
    elif last.iteration >= budget.max_iterations:
        reason = "max_iterations"
    return Decision(stop=reason is not None, reason=reason, best_iteration=best)
