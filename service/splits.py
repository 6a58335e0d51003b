"""A job's rows split into seed-train, validation and test, with content-stable row ids.

Both sides need it: the workers plan and evaluate on these splits, the API checks posted
feedback against them.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from service.datasets import StoredRow, load_rows
from service.domain.spec import JobSpec, TaskKind
from service.domain.strategies.base import LabelledRow
from service.models import Job

# When a job has no validation set, this share of the train set (stratified, seeded) is held out.
HELD_OUT_FRACTION = 0.2
# Only classes with at least this many rows give any (the rest stay whole in train).
MIN_CLASS_ROWS_TO_HOLD_OUT = 3


def held_out_count(class_rows: int) -> int:
    """How many of a class's train rows `hold_out` moves to validation."""
    if class_rows < MIN_CLASS_ROWS_TO_HOLD_OUT:
        return 0
    return int(class_rows * HELD_OUT_FRACTION)


def min_class_rows_for_validation() -> int:
    """The smallest class that gives at least one validation row when none is uploaded."""
    n = MIN_CLASS_ROWS_TO_HOLD_OUT
    while held_out_count(n) < 1:
        n += 1
    return n


def label_text(value: Any) -> str:
    """A label or answer as the text the loop compares: 1 → "1", True → "True", "x" → "x".

    Job creation and the splits both use it, so the label set checked when a job is created is
    the one its rows carry when it runs.
    """
    return value if isinstance(value, str) else str(value)


@dataclass
class JobRows:
    train: list[LabelledRow]
    validation: list[LabelledRow]
    test: list[LabelledRow]
    # Strategies see content-stable ids ("train:17"); the database keys rows by UUID. Stable
    # ids keep planning identical for the same spec and data, whatever database it runs on.
    row_uuid: dict[str, uuid.UUID] = field(default_factory=dict)
    _by_uuid: dict[uuid.UUID, str] = field(default_factory=dict, repr=False)

    def stable_id(self, row_uuid: uuid.UUID) -> str | None:
        if not self._by_uuid:
            self._by_uuid = {v: k for k, v in self.row_uuid.items()}
        return self._by_uuid.get(row_uuid)

    def split(self, name: str) -> list[LabelledRow]:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def without_private_keys(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored spec (or refresh student) without the service's own keys, which start with an
    underscore (`_hash`, `service.jobs.STUDENT_PRIVATE_KEY`): what a tenant wrote and sees."""
    return {k: v for k, v in stored.items() if not k.startswith("_")}


def job_spec(job: Job) -> JobSpec:
    return JobSpec.model_validate(without_private_keys(job.spec))


def labelled(
    rows: list[StoredRow], spec: JobSpec, role: str, ids: dict[str, uuid.UUID] | None = None
) -> list[LabelledRow]:
    """A dataset's rows as the loop sees them (job creation rejects rows this would skip)."""
    out: list[LabelledRow] = []
    for row in rows:
        text = row.data.get(spec.task.input_field)
        gold = row.data.get(spec.task.output_field)
        if text is None or gold is None:
            continue  # rows without the task's fields cannot be used
        stable = f"{role}:{row.index}"
        if ids is not None:
            ids[stable] = row.id
        out.append(LabelledRow(row_id=stable, input=str(text), output=label_text(gold)))
    return out


def _stable_key(seed: int, row_id: str) -> str:
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


def hold_out(
    rows: list[LabelledRow], seed: int, *, stratified: bool = True
) -> tuple[list[LabelledRow], list[LabelledRow]]:
    """Deterministic split of train into (train, validation): stratified by label for
    classification; for QA and generation, whose answers are nearly all distinct, one slice of
    all rows (grouping by answer would hold out nothing)."""
    by_label: dict[str, list[LabelledRow]] = {}
    for row in rows:
        by_label.setdefault(row.output if stratified else "", []).append(row)
    train: list[LabelledRow] = []
    validation: list[LabelledRow] = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda r: _stable_key(seed, r.row_id))
        n_val = held_out_count(len(group))
        validation.extend(group[:n_val])
        train.extend(group[n_val:])
    order = {r.row_id: i for i, r in enumerate(rows)}
    train.sort(key=lambda r: order[r.row_id])  # keep dataset order within each split
    validation.sort(key=lambda r: order[r.row_id])
    return train, validation


def load_job_rows(session: Session, job: Job, spec: JobSpec | None = None) -> JobRows:
    spec = spec or job_spec(job)
    ids: dict[str, uuid.UUID] = {}
    train = labelled(load_rows(session, job.train_dataset_id), spec, "train", ids)
    if job.validation_dataset_id is not None:
        validation = labelled(
            load_rows(session, job.validation_dataset_id), spec, "validation", ids
        )
    else:
        train, validation = hold_out(
            train, spec.seed, stratified=spec.task.kind is TaskKind.classification
        )
    test = (
        labelled(load_rows(session, job.test_dataset_id), spec, "test", ids)
        if job.test_dataset_id
        else []
    )
    return JobRows(train=train, validation=validation, test=test, row_uuid=ids)
