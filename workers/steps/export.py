"""Export: the best dataset (seed rows + accepted examples of included iterations up to the
best one) written as JSONL with a manifest."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.domain.export_formats import (
    PREFERENCE_FORMATS,
    ExportRow,
    PreferencePair,
    render_lines,
    render_preference_lines,
)
from service.domain.spec import TaskKind
from service.domain.statuses import JOB_TERMINAL, ExampleStatus, ExportStatus
from service.models import DatasetRow, Example, Export, Iteration, Job, utcnow
from service.settings import get_settings
from workers.steps.context import JobContext, load_job_context


def _typed_labels(session: Session, ctx: JobContext) -> dict[str, Any]:
    """Labels the train data wrote as numbers or booleans, by their text ("1" → 1)."""
    if ctx.spec.task.kind is not TaskKind.classification:
        return {}
    field = ctx.spec.task.output_field
    uuids = list(ctx.row_uuid.values())
    typed: dict[str, Any] = {}
    for start in range(0, len(uuids), 1000):
        for data in session.scalars(
            select(DatasetRow.data).where(DatasetRow.id.in_(uuids[start : start + 1000]))
        ):
            value = data.get(field) if isinstance(data, dict) else None
            if value is not None and not isinstance(value, str):
                typed.setdefault(str(value), value)
    return typed


def _file_stem(name: str) -> str:
    """A job name as a safe file name part: no path separators, no leading dot, not empty."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:80]
    return stem or "job"


def best_dataset(session: Session, job: Job, through: int | None = None) -> list[ExportRow]:
    """Seed rows + accepted examples of the included iterations up to the best one (or up to
    `through`: a refresh's new iteration, before a student trained outside the loop is judged
    on it)."""
    ctx = load_job_context(session, job)
    typed = _typed_labels(session, ctx)
    rows = [
        ExportRow(
            input=r.input,
            output=r.output,
            kind="seed",
            source_row_id=str(ctx.row_uuid[r.row_id]),
            typed_output=typed.get(r.output),
        )
        for r in ctx.train
    ]
    best = job.best_iteration if job.best_iteration is not None else job.current_iteration
    if through is not None:
        best = through
    stmt = (
        select(Example, Iteration.number)
        .join(Iteration, Iteration.id == Example.iteration_id)
        .where(
            Example.job_id == job.id,
            Example.status == ExampleStatus.accepted,
            Example.kind != "preference_pair",
            Iteration.included.is_(True),
            Iteration.number <= best,
        )
        .order_by(Iteration.number, Example.created_at, Example.id)
    )
    for example, number in session.execute(stmt):
        rows.append(
            ExportRow(
                input=example.input,
                output=example.output or "",
                kind=example.kind,
                rationale=example.rationale,
                example_id=str(example.id),
                iteration=number,
                source_row_id=str(example.source_row_id) if example.source_row_id else None,
                typed_output=typed.get(example.output or ""),
            )
        )
    return rows


def preference_pairs(session: Session, job: Job) -> list[PreferencePair]:
    """Every (chosen, rejected) draft pair ARTE stored for this job, in creation order."""
    stmt = (
        select(Example)
        .where(Example.job_id == job.id, Example.kind == "preference_pair")
        .order_by(Example.created_at, Example.dedup_key)
    )
    return [
        PreferencePair(
            prompt=list(ex.meta.get("prompt", [])),
            chosen=dict(ex.meta.get("chosen", {})),
            rejected=dict(ex.meta.get("rejected", {})),
        )
        for ex in session.scalars(stmt)
    ]


def _selection_summary(session: Session, job: Job) -> dict[str, Any]:
    """Which iterations' examples the dataset holds, and why each was kept or excluded."""
    iterations = list(
        session.scalars(
            select(Iteration)
            .where(Iteration.job_id == job.id, Iteration.metric.is_not(None))
            .order_by(Iteration.number)
        )
    )
    best = job.best_iteration if job.best_iteration is not None else 0
    kept = [it.number for it in iterations if it.number and it.included and it.number <= best]
    holds = (
        f"the seed rows and the examples of iteration(s) {', '.join(map(str, kept))}"
        if kept
        else "the seed rows only: no iteration's examples were kept"
    )
    return {
        "holds": holds,
        "iterations": [
            {
                "number": it.number,
                "metric": it.metric,
                "examples_accepted": it.examples_accepted,
                "included": it.included,
                "selection_reason": it.selection_reason,
            }
            for it in iterations
        ],
    }


def write_export(session: Session, export_id: uuid.UUID, out_dir: Path | None = None) -> None:
    """Write the file of a pending export; a second delivery of a finished one is a no-op."""
    export = session.get(Export, export_id)
    if export is None or export.status is ExportStatus.succeeded:
        return
    job = session.get(Job, export.job_id)
    assert job is not None
    export.status = ExportStatus.running
    session.flush()
    try:
        ctx = load_job_context(session, job)
        if export.format in PREFERENCE_FORMATS:
            pairs = preference_pairs(session, job)
            lines = render_preference_lines(pairs)
            counts = {"preference_pair": len(pairs)}
        else:
            rows = best_dataset(session, job, export.iteration)
            lines = render_lines(ctx.spec.task, rows, export.format)
            counts = dict(Counter(r.kind for r in rows))
        directory = out_dir or get_settings().exports_dir / str(job.id)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{_file_stem(job.name)}-{export.format}-{export.id.hex[:8]}.jsonl"
        digest = hashlib.sha256()
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line)
                digest.update(line.encode())
        tmp.replace(path)  # readers never see a half-written export
    except (OSError, ValueError) as exc:
        export.status = ExportStatus.failed
        export.error = f"{type(exc).__name__}: {exc}"
        session.flush()
        return
    manifest = {
        "job_id": str(job.id),
        "job_name": job.name,
        "strategy": job.strategy,
        "format": export.format,
        "rows": sum(counts.values()),
        "by_kind": counts,
        "best_iteration": job.best_iteration,
        **_selection_summary(session, job),
        "through_iteration": export.iteration,
        # An export may be taken while the job runs (the best data so far): say so.
        "job_status": job.status.value,
        "job_finished": job.status in JOB_TERMINAL,
        "sha256": digest.hexdigest(),
        "created_at": utcnow().isoformat(),
        "spec_hash": job.spec.get("_hash"),
    }
    path.with_suffix(".manifest.json").write_text(json.dumps(manifest, indent=2))
    export.status = ExportStatus.succeeded
    export.path = str(path)
    export.row_count = sum(counts.values())
    export.manifest = manifest
    session.flush()


def export_job(
    session: Session, job_id: uuid.UUID, *, fmt: str = "jsonl", out_dir: Path | None = None
) -> Export:
    """Export in this process (the CLI's `distill run`)."""
    export = Export(job_id=job_id, format=fmt, status=ExportStatus.pending)
    session.add(export)
    session.flush()
    write_export(session, export.id, out_dir)
    return export
