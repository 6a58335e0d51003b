"""Teacher verification: the teacher labels a candidate's input on its own; keep on agreement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.domain.prompts import build_request, item_fields
from service.domain.prompts.schemas import rationale_schema
from service.domain.spec import TaskSpec
from service.domain.strategies.rationales import answer_matches
from service.domain.teacher import TeacherRequest


def verification_request(task: TaskSpec, labels: Sequence[str] | None, text: str) -> TeacherRequest:
    """The teacher is not shown the proposed answer, so agreement is not mere sycophancy."""
    input_field, _ = item_fields(task.kind)
    return build_request(
        "verify",
        params={"kind": str(task.kind), "instructions": task.instructions, "labels": labels},
        data={"row": [{input_field: text}]},
        response_schema=rationale_schema(task.kind, labels),
        schema_name="verification",
    )


def verification_agrees(task: TaskSpec, parsed: Any, proposed: str) -> bool:
    if not isinstance(parsed, dict) or not isinstance(parsed.get("answer"), str):
        return False
    return answer_matches(task, parsed["answer"], proposed)
