"""Export formats: a job's dataset as the JSONL each fine-tuning stack reads unchanged.

Every format is one JSON object per line (docs/exports.md shows one line of each):

- `jsonl`    the task's own fields, `{input_field, output_field[, rationale]}`
- `chat`     OpenAI chat fine-tuning: `{"messages": [system, user, assistant]}`
- `alpaca`   `{"instruction", "input", "output"}` (Alpaca; axolotl, LLaMA-Factory, Unsloth)
- `sharegpt` `{"conversations": [{"from": "system"|"human"|"gpt", "value"}]}`
- `dpo`      TRL's conversational preference rows: `{"prompt", "chosen", "rejected"}`
- `lineage`  everything: fields, kind, status and reason, iteration, the causing seed row or
             student error, and the teacher call

`chat`, `alpaca`, `sharegpt` and `dpo` write a rationale into the answer with one template,
`ANSWER_WITH_RATIONALE`, so a student learns to reason first and answer last.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict, Field

from service.domain.spec import TaskKind, TaskSpec, Text

# The assistant's answer when the example has a rationale: the reasoning, then the answer on
# its own line after "#### " (GSM8K's convention, which answers.py also extracts), so a chat
# or instruction-tuned student learns to reason first and can be scored on the last line.
ANSWER_WITH_RATIONALE = "{rationale}\n#### {output}"

Split = Literal["train", "validation"]
SPLITS: tuple[Split, ...] = ("train", "validation")

SEED_KIND = "seed"
GENERATED_KINDS = ("augmented", "hard_negative", "rationale")
PAIR_KIND = "preference_pair"
ROW_KINDS = (SEED_KIND, *GENERATED_KINDS)

# Rejections that judge the answer, not the input: a rejected answer to an input that also has
# an accepted one is a preference pair (chosen = accepted, rejected = this one). Duplicates,
# length and contamination say nothing about which answer is better, so they form no pair.
PAIR_REJECTION_REASONS = ("answer_mismatch", "label_invalid")

# Where a `dpo` export's pairs come from, by strategy: ARTE stores the teacher's draft pairs
# ranked by the student (for DPO of an open teacher); rationale distillation writes several
# answers to one seed row, of which the checks accept some and reject others.
DPO_SOURCES: Mapping[str, str] = {"arte": "arte_pairs", "rationales": "outcome_pairs"}


# An iteration number as a Postgres integer column holds it.
IterationNumber = Annotated[int, Field(ge=0, le=2**31 - 1)]


# Every kind a selection may name (which of them an export holds depends on its format and the
# job's strategy: plan_export checks that). The OpenAPI document lists them.
ExportKind = Literal["seed", "augmented", "hard_negative", "rationale", "preference_pair"]
assert set(get_args(ExportKind)) == {*ROW_KINDS, PAIR_KIND}


class ExportSelection(BaseModel):
    """Which rows an export holds. The defaults are the dataset the loop judged best."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    iteration: IterationNumber | Literal["best", "all"] = Field(
        "best",
        description="'best' (default): the seed rows plus the accepted examples of the included "
        "iterations up to the best one; a number N: of the included iterations up to N (e.g. a "
        "refresh's new iteration, before a student trained outside the loop is judged on it); "
        "'all': of every included iteration, the one still running too.",
    )
    kinds: list[ExportKind] | None = Field(
        None,
        min_length=1,
        max_length=8,
        description="Only these kinds: seed, augmented, hard_negative, rationale (dpo: the kind "
        "of the paired examples). Default: all.",
    )
    labels: list[Text] | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="Classification: only rows with these labels (dpo: whose chosen answer has "
        "one). Default: all.",
    )
    status: Literal["accepted", "rejected", "all"] = Field(
        "accepted",
        description="accepted (default); rejected or all only for the lineage format, whose rows "
        "say why each was rejected.",
    )
    validation_fraction: float = Field(
        0.0,
        ge=0.0,
        le=0.5,
        description="Hold out this share of the rows as a validation file, stratified by label "
        "(by kind for QA and generation). 0: one file.",
    )
    split_seed: int | None = Field(
        None,
        ge=-(2**63),
        le=2**63 - 1,
        description="Seed of the train/validation split; default the job spec's seed.",
    )


class ExportRow(NamedTuple):
    """One training row: a seed row or an example, with what the lineage format shows. (A
    tuple: an export builds one per row, and a tuple is built several times faster than a
    frozen dataclass.)"""

    input: str
    output: str
    kind: str  # seed, augmented, hard_negative, rationale
    rationale: str | None = None
    example_id: str | None = None
    iteration: int | None = None  # None for seed rows
    source_row_id: str | None = None
    typed_output: Any = None  # the label as the data wrote it (1, true), when not a string
    status: str = "accepted"
    rejection_reason: str | None = None
    rejection_detail: str | None = None
    # lineage only: why the example exists (the seed row and the student error behind it) and
    # the teacher call that wrote it
    cause: Mapping[str, Any] | None = None
    teacher_call: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class PreferencePair:
    """Two answers to one prompt, the chosen one better (TRL's explicit-prompt preference row).

    `group` identifies the prompt: pairs of one prompt go to the same split.
    """

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    kind: str
    group: str
    label: str | None = None
    iteration: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # e.g. ARTE's draft scores


def answer_text(row: ExportRow) -> str:
    """The assistant's answer: the output alone, or the rationale and the output as
    `ANSWER_WITH_RATIONALE` writes them."""
    if row.rationale:
        return ANSWER_WITH_RATIONALE.format(rationale=row.rationale, output=row.output)
    return row.output


def _fields(task: TaskSpec, row: ExportRow) -> dict[str, Any]:
    """The task's own field names, so the file drops into the user's training script; a
    label the data wrote as a number or a boolean is written back the same way."""
    output = row.output if row.typed_output is None else row.typed_output
    out: dict[str, Any] = {task.input_field: row.input, task.output_field: output}
    if row.rationale:
        out["rationale"] = row.rationale
    return out


def _lineage(task: TaskSpec, row: ExportRow) -> dict[str, Any]:
    out = {
        **_fields(task, row),
        "kind": row.kind,
        "status": row.status,
        "rejection_reason": row.rejection_reason,
        "rejection_detail": row.rejection_detail,
        "example_id": row.example_id,
        "iteration": row.iteration,
        "source_row_id": row.source_row_id,
        "cause": dict(row.cause) if row.cause is not None else None,
        "teacher_call": dict(row.teacher_call) if row.teacher_call is not None else None,
    }
    return out


def _chat(task: TaskSpec, row: ExportRow) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": task.instructions},
            {"role": "user", "content": row.input},
            {"role": "assistant", "content": answer_text(row)},
        ]
    }


def _alpaca(task: TaskSpec, row: ExportRow) -> dict[str, Any]:
    return {"instruction": task.instructions, "input": row.input, "output": answer_text(row)}


def _sharegpt(task: TaskSpec, row: ExportRow) -> dict[str, Any]:
    return {
        "conversations": [
            {"from": "system", "value": task.instructions},
            {"from": "human", "value": row.input},
            {"from": "gpt", "value": answer_text(row)},
        ]
    }


ROW_FORMATS: Mapping[str, Callable[[TaskSpec, ExportRow], dict[str, Any]]] = {
    "jsonl": _fields,
    "chat": _chat,
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "lineage": _lineage,
}
PREFERENCE_FORMATS = frozenset({"dpo"})
ALL_FORMATS = frozenset(ROW_FORMATS) | PREFERENCE_FORMATS
# The order people are offered them in (the first is the default).
FORMAT_ORDER = ("jsonl", "chat", "alpaca", "sharegpt", "dpo", "lineage")
FORMAT_HELP = (
    "jsonl (the task's own fields), chat (OpenAI chat fine-tuning messages), alpaca "
    "(instruction/input/output), sharegpt (conversations from/value), dpo (TRL's "
    "prompt/chosen/rejected: ARTE's draft pairs, or a rationales job's rejected-vs-accepted "
    "answers), or lineage (everything, with the causing seed row or error and the teacher call)"
)


# One encoder for every line: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=False).encode


def encode_line(record: Mapping[str, Any]) -> str:
    """One JSONL line: the record as JSON (UTF-8 text as is, not \\u-escaped), then a newline."""
    return _encode(record) + "\n"


def render_row(task: TaskSpec, row: ExportRow, fmt: str) -> str:
    return encode_line(ROW_FORMATS[fmt](task, row))


def render_pair(pair: PreferencePair) -> str:
    row = {
        "prompt": pair.prompt,
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
        **pair.extra,
    }
    return encode_line(row)


def task_prompt(task: TaskSpec, text: str) -> list[dict[str, str]]:
    """The conversation a student answers: the task's instructions, then the input."""
    return [{"role": "system", "content": task.instructions}, {"role": "user", "content": text}]


def outcome_pair(
    task: TaskSpec, chosen: ExportRow, rejected: ExportRow, group: str
) -> PreferencePair:
    """An accepted and a rejected answer to the same input, as the chat format writes them."""
    return PreferencePair(
        prompt=task_prompt(task, chosen.input),
        chosen=answer_text(chosen),
        rejected=answer_text(rejected),
        kind=chosen.kind,
        group=group,
        label=chosen.output if task.kind is TaskKind.classification else None,
        iteration=chosen.iteration,
    )


def arte_pair(
    prompt: Sequence[Mapping[str, Any]],
    chosen: Mapping[str, Any],
    rejected: Mapping[str, Any],
    *,
    group: str,
    label: str | None,
    iteration: int | None,
) -> PreferencePair:
    """ARTE: two drafts the teacher wrote for one prompt, ranked by the student's preference;
    each draft is the JSON the teacher wrote (for DPO-tuning an open teacher)."""
    return PreferencePair(
        prompt=[{"role": str(m.get("role")), "content": str(m.get("content"))} for m in prompt],
        chosen=_draft_json(chosen),
        rejected=_draft_json(rejected),
        kind=PAIR_KIND,
        group=group,
        label=label,
        iteration=iteration,
        extra={"score_chosen": chosen.get("score"), "score_rejected": rejected.get("score")},
    )


def _draft_json(draft: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in draft.items() if k != "score"}, ensure_ascii=False)


# --- the train/validation split ----------------------------------------------------------------


def validation_target(n: int, fraction: float) -> int:
    """How many of a stratum's `n` units go to validation: the nearest whole share, but a
    stratum keeps at least one unit in train (a class the student never sees cannot be
    learnt), so a single unit always stays in train."""
    if n <= 1 or fraction <= 0:
        return 0
    return min(n - 1, int(n * fraction + 0.5))


class StratifiedSplit:
    """A deterministic stratified train/validation split of a stream whose stratum sizes are
    known up front, in one pass and constant memory per stratum.

    Within each stratum, selection sampling (Knuth, TAOCP vol. 2, 3.4.2, Algorithm S) picks
    exactly `validation_target(n, fraction)` of its `n` units, each subset equally likely: the
    next unit is taken with probability (still needed) / (still to come). Each stratum draws
    from its own generator seeded by (seed, stratum), so the same rows in the same order and
    the same seed give the same split, whatever else the export holds. scikit-learn's
    `train_test_split(stratify=...)` needs every row in memory; an export may not fit there.
    """

    def __init__(self, sizes: Mapping[str, int], fraction: float, seed: int) -> None:
        self._seed = seed
        self._fraction = fraction
        self._left = dict(sizes)
        self._needed = {s: validation_target(n, fraction) for s, n in sizes.items()}
        self._rngs: dict[str, random.Random] = {}

    def assign(self, stratum: str) -> Split:
        left = self._left.get(stratum, 0)
        needed = self._needed.get(stratum, 0)
        rng = self._rngs.get(stratum)
        if rng is None:
            rng = self._rngs[stratum] = random.Random(f"{self._seed}:{stratum}")
        draw = rng.random()  # drawn for every unit, so a unit's fate depends only on its position
        self._left[stratum] = left - 1
        # More units than counted (rows written after the count) stay in train.
        if needed > 0 and left > 0 and draw * left < needed:
            self._needed[stratum] = needed - 1
            return "validation"
        return "train"


# --- what an export holds, counted as it is written ----------------------------------------------


@dataclass
class ExportCounts:
    """Rows per kind, label and iteration (0 = the seed rows), overall and per file."""

    kind: Counter[str] = field(default_factory=Counter)
    label: Counter[str] = field(default_factory=Counter)
    iteration: Counter[str] = field(default_factory=Counter)
    split: Counter[str] = field(default_factory=Counter)

    def add(self, kind: str, label: str | None, iteration: int | None, split: str) -> None:
        self.kind[kind] += 1
        if label is not None:
            self.label[label] += 1
        self.iteration[str(iteration or 0)] += 1
        self.split[split] += 1

    @property
    def rows(self) -> int:
        return sum(self.kind.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "kind": dict(sorted(self.kind.items())),
            "label": dict(sorted(self.label.items())),
            "iteration": dict(sorted(self.iteration.items(), key=lambda kv: int(kv[0]))),
        }
