"""Output JSON schemas the teacher must follow, strict-mode friendly (closed objects, all required)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.domain.spec import TaskKind

# The teacher's field names per task kind: (input field, output field). They are fixed, not the
# task's own input_field/output_field, so that the schema (and so the prompt fingerprint) does not
# depend on how a user named the columns of an upload; parsing maps them back.
_ITEM_FIELDS: dict[TaskKind, tuple[str, str]] = {
    TaskKind.classification: ("text", "label"),
    TaskKind.qa: ("question", "answer"),
    TaskKind.generation: ("input", "output"),
}


def item_fields(kind: TaskKind) -> tuple[str, str]:
    """The (input, output) field names of one example item for a task kind."""
    return _ITEM_FIELDS[kind]


def _answer_schema(kind: TaskKind, labels: Sequence[str] | None) -> dict[str, Any]:
    if kind is TaskKind.classification and labels:
        return {"type": "string", "enum": list(labels)}
    return {"type": "string"}


def _closed_object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def example_item_schema(
    kind: TaskKind, labels: Sequence[str] | None, *, with_rationale: bool
) -> dict[str, Any]:
    """One example: input, optional rationale, output (a label enum for classification).

    The rationale comes before the answer on purpose: decoders that follow the schema's property
    order (vLLM guided decoding, OpenAI structured outputs) then reason before they answer.
    """
    input_field, output_field = item_fields(kind)
    properties: dict[str, Any] = {input_field: {"type": "string"}}
    # A QA example without its worked solution teaches the student nothing about the skill.
    if with_rationale or kind is TaskKind.qa:
        properties["rationale"] = {"type": "string"}
    properties[output_field] = _answer_schema(kind, labels)
    return _closed_object(properties)


def examples_schema(
    kind: TaskKind, labels: Sequence[str] | None, n: int, *, with_rationale: bool = False
) -> dict[str, Any]:
    """`{"examples": [item, ...]}` with exactly `n` items."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    items = example_item_schema(kind, labels, with_rationale=with_rationale)
    return _closed_object(
        {"examples": {"type": "array", "items": items, "minItems": n, "maxItems": n}}
    )


def rationale_schema(kind: TaskKind, labels: Sequence[str] | None) -> dict[str, Any]:
    """`{"rationale": str, "answer": str}`; for classification the answer is one of the labels."""
    return _closed_object({"rationale": {"type": "string"}, "answer": _answer_schema(kind, labels)})
