"""Feedback from an external student: predictions posted by the user's own trainer.

An iteration of a job whose student is `external` waits in `awaiting_feedback`; the trainer
posts one prediction per evaluation row; complete and valid feedback is stored and the loop
continues. Anything wrong is a 422 with details, and nothing is stored.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service import tasks
from service.db import insert_ignore
from service.domain.answers import answers_match, gold_answer
from service.domain.spec import TaskKind
from service.domain.statuses import IterationStatus
from service.errors import Conflict, NotFound, ValidationFailed
from service.models import Iteration, Job, Prediction, utcnow
from service.splits import job_spec, load_job_rows

MAX_REPORTED = 50


class FeedbackItem(BaseModel):
    # Unknown keys are typos (e.g. "prediction"), not data to drop; numbers are finite.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    row_id: uuid.UUID
    predicted: str | None = Field(
        None, description="Label or answer; null when the student gave none."
    )
    confidence: float | None = Field(None, ge=0, le=1)
    raw: str | None = None

    @field_validator("predicted", "raw")
    @classmethod
    def _storable(cls, value: str | None) -> str | None:
        # Postgres text cannot hold NUL, and a lone surrogate cannot be encoded at all.
        if value is not None:
            if "\x00" in value:
                raise ValueError("contains a NUL character")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("contains an unpaired surrogate") from None
        return value


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    predictions: list[FeedbackItem]


def parse_feedback(body: bytes, content_type: str) -> list[FeedbackItem]:
    """JSON `{"predictions": [...]}` or JSONL, one prediction per line."""
    if "ndjson" in content_type or "jsonl" in content_type:
        items: list[FeedbackItem] = []
        errors: list[dict[str, Any]] = []
        try:
            text = body.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValidationFailed(
                f"the body is not UTF-8 (byte {exc.start})",
                details=[{"field": "body", "message": str(exc)}],
            ) from None
        # "\n" only: a JSON string may hold U+2028 and the like, which splitlines() breaks at.
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                items.append(FeedbackItem.model_validate_json(line))
            except ValidationError as exc:
                errors.append({"line": number, "message": exc.errors(include_url=False)[0]["msg"]})
        if errors:
            raise ValidationFailed(
                f"line {errors[0]['line']}: {errors[0]['message']}", details=errors[:MAX_REPORTED]
            )
        return items
    try:
        return FeedbackBody.model_validate_json(body).predictions
    except ValidationError as exc:
        details = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
            for e in exc.errors(include_url=False)
        ]
        raise ValidationFailed(
            f"{details[0]['field']}: {details[0]['message']}", details=details[:MAX_REPORTED]
        ) from exc


def required_splits(job: Job) -> list[str]:
    """Validation always (the metric); train too when the strategy mines the seed set."""
    from service.domain.strategies import get_strategy

    splits = ["validation"]
    if get_strategy(job.strategy).mining_split == "train":
        splits.append("train")
    return splits


def evaluation_rows(session: Session, job: Job) -> list[dict[str, Any]]:
    """The rows an external student must predict, with the ids to post back."""
    rows = load_job_rows(session, job)
    out = []
    for split in [*required_splits(job), *(["test"] if rows.test else [])]:
        for row in rows.split(split):
            out.append(
                {
                    "row_id": str(rows.row_uuid[row.row_id]),
                    "split": split,
                    "input": row.input,
                    "required": split != "test",
                }
            )
    return out


def post_feedback(session: Session, job: Job, number: int, items: list[FeedbackItem]) -> Iteration:
    iteration = _iteration(session, job, number)
    if iteration.status is not IterationStatus.awaiting_feedback:
        raise Conflict(
            f"iteration {number} is {iteration.status.value}, not awaiting_feedback",
            details={"status": iteration.status.value},
        )
    spec = job_spec(job)
    rows = load_job_rows(session, job, spec)
    split_of: dict[uuid.UUID, str] = {}
    gold_of: dict[uuid.UUID, str] = {}
    needed = required_splits(job)
    for split in [*needed, "test"]:
        for row in rows.split(split):
            split_of[rows.row_uuid[row.row_id]] = split
            gold_of[rows.row_uuid[row.row_id]] = row.output
    errors: list[dict[str, Any]] = []
    seen: set[uuid.UUID] = set()
    labels = set(spec.task.labels or [])
    for index, item in enumerate(items):
        if item.row_id not in split_of:
            errors.append({"index": index, "row_id": str(item.row_id), "message": "unknown row id"})
        elif item.row_id in seen:
            errors.append(
                {"index": index, "row_id": str(item.row_id), "message": "duplicate row id"}
            )
        elif (
            spec.task.kind is TaskKind.classification
            and item.predicted is not None
            and item.predicted not in labels
        ):
            errors.append(
                {
                    "index": index,
                    "row_id": str(item.row_id),
                    "message": f"label {item.predicted!r} is not in the label set",
                }
            )
        seen.add(item.row_id)
    missing = [rid for rid, split in split_of.items() if split in needed and rid not in seen]
    if missing:
        errors.append(
            {
                "message": f"{len(missing)} required rows have no prediction",
                "missing_row_ids": [str(m) for m in missing[:MAX_REPORTED]],
            }
        )
    if errors:
        raise ValidationFailed(
            f"feedback rejected: {errors[0]['message']}",
            details=errors[:MAX_REPORTED],
            code="invalid_feedback",
        )
    insert_ignore(
        session,
        Prediction,
        [
            {
                "id": uuid.uuid4(),
                "job_id": job.id,
                "iteration_id": iteration.id,
                "split": split_of[item.row_id],
                "row_id": item.row_id,
                "gold": gold_of[item.row_id],
                "predicted": item.predicted,
                "confidence": item.confidence,
                "correct": _correct(spec.task.kind, item.predicted, gold_of[item.row_id]),
                "probabilities": None,
                "raw": item.raw,
                "error": None if item.predicted is not None else "no prediction",
                "source": "external",
                "created_at": utcnow(),
            }
            for item in items
        ],
        ["iteration_id", "split", "row_id"],
    )
    # Compare-and-set: a second, concurrent post of the same feedback changes nothing.
    result = session.execute(
        update(Iteration)
        .where(Iteration.id == iteration.id, Iteration.status == IterationStatus.awaiting_feedback)
        .values(status=IterationStatus.pending, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0):
        tasks.enqueue(session, tasks.ITERATION_EVALUATE, str(iteration.id))
    session.refresh(iteration)
    return iteration


def _iteration(session: Session, job: Job, number: int) -> Iteration:
    iteration = session.scalar(
        select(Iteration).where(Iteration.job_id == job.id, Iteration.number == number)
    )
    if iteration is None:
        raise NotFound(f"iteration {number} of job {job.id} not found")
    return iteration


def _correct(kind: TaskKind, predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    if kind is TaskKind.classification:
        return predicted == gold
    return answers_match(predicted, gold_answer(gold))
