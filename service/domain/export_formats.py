"""Export formats: turn a job's dataset rows into JSONL lines for fine-tuning the student."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from service.domain.spec import TaskSpec


@dataclass(frozen=True)
class ExportRow:
    input: str
    output: str
    kind: str  # seed, augmented, hard_negative, rationale
    rationale: str | None = None
    example_id: str | None = None
    iteration: int | None = None
    source_row_id: str | None = None
    typed_output: Any = None  # the label as the data wrote it (1, true), when not a string


def _fields(task: TaskSpec, row: ExportRow) -> dict[str, Any]:
    """The task's own field names, so the file drops into the user's training script; a
    label the data wrote as a number or a boolean is written back the same way."""
    output = row.output if row.typed_output is None else row.typed_output
    out: dict[str, Any] = {task.input_field: row.input, task.output_field: output}
    if row.rationale:
        out["rationale"] = row.rationale
    return out


def _lineage(task: TaskSpec, row: ExportRow) -> dict[str, Any]:
    return {
        **_fields(task, row),
        "kind": row.kind,
        "example_id": row.example_id,
        "iteration": row.iteration,
        "source_row_id": row.source_row_id,
    }


def _chat(task: TaskSpec, row: ExportRow) -> dict[str, Any]:
    answer = f"{row.rationale}\n#### {row.output}" if row.rationale else row.output
    return {
        "messages": [
            {"role": "system", "content": task.instructions},
            {"role": "user", "content": row.input},
            {"role": "assistant", "content": answer},
        ]
    }


FORMATS: dict[str, Callable[[TaskSpec, ExportRow], dict[str, Any]]] = {
    "jsonl": _fields,  # {input_field, output_field[, rationale]}
    "lineage": _lineage,  # plus kind, example id, iteration and source row
    "chat": _chat,  # OpenAI fine-tuning messages
}


def render_lines(task: TaskSpec, rows: Iterable[ExportRow], fmt: str) -> Iterable[str]:
    try:
        render = FORMATS[fmt]
    except KeyError as exc:
        raise ValueError(f"unknown export format {fmt!r}; one of {sorted(FORMATS)}") from exc
    for row in rows:
        yield json.dumps(render(task, row), ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class PreferencePair:
    """ARTE: two drafts the teacher wrote for one prompt, ranked by the student's preference."""

    prompt: list[dict[str, str]]
    chosen: dict[str, Any]
    rejected: dict[str, Any]


def render_preference_lines(pairs: Iterable[PreferencePair]) -> Iterable[str]:
    """TRL-style conversational DPO rows: the teacher's prompt, its preferred and its rejected
    answer (each draft as the JSON the teacher wrote), for DPO-tuning an open teacher."""
    for pair in pairs:
        row = {
            "prompt": pair.prompt,
            "chosen": [{"role": "assistant", "content": _draft_json(pair.chosen)}],
            "rejected": [{"role": "assistant", "content": _draft_json(pair.rejected)}],
            "score_chosen": pair.chosen.get("score"),
            "score_rejected": pair.rejected.get("score"),
        }
        yield json.dumps(row, ensure_ascii=False) + "\n"


def _draft_json(draft: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in draft.items() if k != "score"}, ensure_ascii=False)


PREFERENCE_FORMATS = frozenset({"dpo"})
ALL_FORMATS = frozenset(FORMATS) | PREFERENCE_FORMATS
