"""Writing an export: its lines split into train and validation, cut into chunks (gzip when
asked), written as files with a manifest, or sent as an HTTP body.

The files and the body come from the same chunks, so a selection streamed over HTTP and the
same selection written by `distill export` are the same bytes; and the same selection of the
same data always gives the same bytes (rows in a fixed order, a seeded split, gzip without a
timestamp).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import uuid
import zlib
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from service.domain.export_formats import (
    ROW_FORMATS,
    SPLITS,
    ExportCounts,
    ExportSelection,
    Split,
    StratifiedSplit,
    encode_line,
    render_pair,
)
from service.domain.statuses import JOB_TERMINAL
from service.errors import NotFound, ValidationFailed
from service.export_rows import (
    ExportPlan,
    iter_pairs,
    iter_rows,
    pair_group_sizes,
    plan_export,
    selection_summary,
    stratum_sizes_of_rows,
)
from service.models import Job, utcnow

# Bytes of JSONL per chunk handed to a file or a socket: few system calls and thread hops per
# megabyte, and a first chunk that leaves soon.
CHUNK_BYTES = 64 * 1024


class Unit(NamedTuple):
    """One line of an export and what the split and the manifest need to know about it."""

    line: str
    group: str | int  # units of one group (a DPO prompt) always share a split
    stratum: str
    kind: str
    label: str | None
    iteration: int | None


def begin_snapshot(session: Session) -> None:
    """On Postgres, read the whole export from one snapshot (REPEATABLE READ), so the counts
    behind the split and the rows streamed after them agree while a job is still writing. A
    session already in a transaction (or bound to one, as in tests) keeps its own."""
    bind = session.get_bind()
    if session.in_transaction() or isinstance(bind, Connection):
        return
    if bind.dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


def iter_units(session: Session, plan: ExportPlan) -> Iterator[Unit]:
    task = plan.spec.task
    if plan.dpo_source is not None:
        for pair in iter_pairs(session, plan):
            yield Unit(
                render_pair(pair),
                pair.group,
                plan.stratum(pair.kind, pair.label),
                pair.kind,
                pair.label,
                pair.iteration,
            )
        return
    render = ROW_FORMATS[plan.fmt]
    classification = plan.classification
    for n, row in enumerate(iter_rows(session, plan)):
        label = row.output if classification else None
        yield Unit(
            encode_line(render(task, row)),
            n,
            label if label is not None else row.kind,
            row.kind,
            label,
            row.iteration,
        )


def stratum_sizes(session: Session, plan: ExportPlan) -> dict[str, int]:
    """Units per stratum (a unit is a row, or for `dpo` the pairs of one prompt)."""
    if plan.dpo_source is not None:
        return pair_group_sizes(iter_pairs(session, plan), plan)
    return stratum_sizes_of_rows(session, plan)


def iter_assigned(session: Session, plan: ExportPlan) -> Iterator[tuple[Split, Unit]]:
    """Every unit with the file it goes to."""
    fraction = plan.selection.validation_fraction
    if fraction <= 0:
        for unit in iter_units(session, plan):
            yield "train", unit
        return
    splitter = StratifiedSplit(stratum_sizes(session, plan), fraction, plan.split_seed)
    group: str | int | None = None
    split: Split = "train"
    for unit in iter_units(session, plan):
        if unit.group != group:
            group, split = unit.group, splitter.assign(unit.stratum)
        yield split, unit


class _Encoder:
    """Lines in, chunks of about CHUNK_BYTES out, gzip-compressed when asked."""

    def __init__(self, gzip: bool) -> None:
        self._parts: list[str] = []
        self._size = 0  # characters: a chunk is cut at the same line whatever the text
        # wbits=31: a gzip member whose header has no file name and mtime 0, so the same
        # lines always compress to the same bytes.
        self._zip = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None

    def feed(self, line: str) -> bytes:
        self._parts.append(line)
        self._size += len(line)
        return self._flush() if self._size >= CHUNK_BYTES else b""

    def _flush(self) -> bytes:
        data = "".join(self._parts).encode("utf-8")
        self._parts, self._size = [], 0
        return self._zip.compress(data) if self._zip is not None else data

    def finish(self) -> bytes:
        data = self._flush()
        return data + self._zip.flush() if self._zip is not None else data


def check_stream_split(selection: ExportSelection, split: Split | None) -> Split:
    """The file a streamed export sends: `split` names it when the export is split."""
    if selection.validation_fraction > 0 and split is None:
        raise ValidationFailed(
            "split: a split export is two files; name the one to stream",
            details=[{"field": "split", "message": "train or validation"}],
        )
    if selection.validation_fraction <= 0 and split == "validation":
        raise ValidationFailed(
            "split: there is no validation file without a validation_fraction",
            details=[{"field": "split", "message": "set validation_fraction, or stream train"}],
        )
    return split or "train"


def iter_chunks(
    session: Session, plan: ExportPlan, split: Split, *, gzip: bool
) -> Generator[bytes, None, None]:
    """The bytes of one file of the export, in chunks."""
    encoder = _Encoder(gzip)
    for assigned, unit in iter_assigned(session, plan):
        if assigned == split and (chunk := encoder.feed(unit.line)):
            yield chunk
    if tail := encoder.finish():
        yield tail


def file_stem(name: str) -> str:
    """A job name as a safe file name part: no path separators, no leading dot, not empty."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:80]
    return stem or "job"


@dataclass
class WrittenFile:
    path: Path
    rows: int = 0
    bytes: int = 0
    digest: Any = field(default_factory=hashlib.sha256)


@dataclass
class ExportResult:
    manifest: dict[str, Any]
    files: dict[Split, Path]
    rows: int


def write_files(
    session: Session,
    plan: ExportPlan,
    directory: Path,
    names: Callable[[Split | None], str],
    manifest_name: str,
    *,
    gzip: bool = False,
) -> ExportResult:
    """Write the export's file (or its train and validation files) and its manifest into
    `directory`; `names(split)` names a file (split None: the only one). Readers never see a
    half-written file: each is written beside its place and moved there when complete."""
    splits: tuple[Split, ...] = SPLITS if plan.selection.validation_fraction > 0 else ("train",)
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        split: WrittenFile(directory / names(split if len(splits) > 1 else None))
        for split in splits
    }
    counts = ExportCounts()
    try:
        with contextlib.ExitStack() as stack:
            handles = {
                split: stack.enter_context(_partial(f.path).open("wb"))
                for split, f in files.items()
            }
            encoders = {split: _Encoder(gzip) for split in splits}

            def write(split: Split, data: bytes) -> None:
                if data:
                    handles[split].write(data)
                    files[split].digest.update(data)
                    files[split].bytes += len(data)

            for split, unit in iter_assigned(session, plan):
                files[split].rows += 1
                counts.add(unit.kind, unit.label, unit.iteration, split)
                write(split, encoders[split].feed(unit.line))
            for split in splits:
                write(split, encoders[split].finish())
    except BaseException:
        for f in files.values():  # no half-written file is left behind
            _partial(f.path).unlink(missing_ok=True)
        raise
    for f in files.values():
        _partial(f.path).replace(f.path)
    manifest = build_manifest(session, plan, counts, files, gzip=gzip)
    manifest_path = directory / manifest_name
    partial = _partial(manifest_path)
    partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    partial.replace(manifest_path)
    return ExportResult(manifest, {s: f.path for s, f in files.items()}, counts.rows)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def build_manifest(
    session: Session,
    plan: ExportPlan,
    counts: ExportCounts,
    files: Mapping[Split, WrittenFile],
    *,
    gzip: bool,
) -> dict[str, Any]:
    job = plan.job
    summary = selection_summary(session, plan)
    teacher = plan.teacher
    return {
        "job_id": str(job.id),
        "job_name": job.name,
        "strategy": job.strategy,
        "format": plan.fmt,
        "gzip": gzip,
        "selection": {
            **plan.selection.model_dump(mode="json"),
            "split_seed": plan.split_seed,
        },
        "rows": counts.rows,
        "counts": counts.as_dict(),
        "files": {
            split: {
                "file": f.path.name,
                "rows": f.rows,
                "bytes": f.bytes,
                "sha256": f.digest.hexdigest(),
            }
            for split, f in files.items()
        },
        # kept for readers of earlier manifests
        "by_kind": dict(sorted(counts.kind.items())),
        "sha256": files["train"].digest.hexdigest() if len(files) == 1 else None,
        "best_iteration": job.best_iteration,
        "through_iteration": plan.bound,
        **summary,
        "spec_hash": job.spec.get("_hash"),
        "teacher_models": [teacher.model] if teacher is not None else [],
        # An export may be taken while the job runs (the best data so far): say so.
        "job_status": job.status.value,
        "job_finished": job.status in JOB_TERMINAL,
        "created_at": utcnow().isoformat(),
    }


class ExportStream:
    """One file of an export as an iterator of chunks, read in a session of its own that
    `close()` ends (the route calls it when the body is sent or the client went away), so a
    disconnect stops the query and leaves no transaction open."""

    def __init__(
        self,
        sessions: Callable[[], contextlib.AbstractContextManager[Session]],
        job_id: uuid.UUID,
        fmt: str,
        selection: ExportSelection,
        *,
        split: Split | None = None,
        gzip: bool = False,
    ) -> None:
        self._stack = contextlib.ExitStack()
        try:
            self._session = self._stack.enter_context(sessions())
            begin_snapshot(self._session)
            job = self._session.get(Job, job_id)
            if job is None:
                raise NotFound(f"job {job_id} not found")
            self.plan = plan_export(self._session, job, fmt, selection)
            self.split = check_stream_split(selection, split)
        except BaseException:
            self._stack.close()
            raise
        self.file_name = stream_file_name(job.name, fmt, split, gzip=gzip)
        self._chunks = iter_chunks(self._session, self.plan, self.split, gzip=gzip)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        try:
            self._chunks.close()  # closes the open cursor, if any
        finally:
            self._stack.close()  # closing the session ends its read transaction


def stream_file_name(job_name: str, fmt: str, split: Split | None, *, gzip: bool) -> str:
    part = f".{split}" if split else ""
    return f"{file_stem(job_name)}-{fmt}{part}.jsonl" + (".gz" if gzip else "")
