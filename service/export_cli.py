"""`distill export JOB --format F --out DIR`: a job's dataset as files and a manifest.json,
read from the configured database (the operator's view, like `distill jobs show`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.markup import escape

from service.cli_style import JobArg, TenantOpt
from service.domain.export_formats import FORMAT_HELP, ExportSelection, Split
from service.errors import BadRequest, DistillError, ValidationFailed
from service.export_files import begin_snapshot, write_files
from service.export_rows import plan_export
from service.jobs import get_job


def _selection(
    iteration: str,
    kinds: list[str] | None,
    labels: list[str] | None,
    status: str,
    validation_fraction: float,
    split_seed: int | None,
) -> ExportSelection:
    """The options as a selection; a bad one is a ValidationFailed naming its option."""
    raw: dict[str, object] = {
        "iteration": int(iteration) if iteration.strip().isdigit() else iteration.strip(),
        "kinds": kinds or None,
        "labels": labels or None,
        "status": status,
        "validation_fraction": validation_fraction,
        "split_seed": split_seed,
    }
    try:
        return ExportSelection.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = str(err["loc"][0])
        option = {"kinds": "--kind", "labels": "--label"}.get(field, "--" + field.replace("_", "-"))
        if option == "--iteration":
            message = f"{iteration!r} is not best, all or an iteration number"
        else:
            message = err["msg"]
        raise ValidationFailed(
            f"{option}: {message}", details=[{"field": option, "message": message}]
        ) from exc


def export_command(
    job_id: JobArg,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Directory to write into: train.jsonl (and validation.jsonl with "
            "--validation-fraction) and manifest.json. Created if missing; files of an earlier "
            "export there are replaced.",
        ),
    ],
    format_: Annotated[str, typer.Option("--format", "-f", help=FORMAT_HELP + ".")] = "jsonl",
    iteration: Annotated[
        str,
        typer.Option(
            help="best: the best dataset; N: the included iterations up to N; all: every "
            "included iteration."
        ),
    ] = "best",
    kind: Annotated[
        list[str] | None,
        typer.Option(help="Only this kind (seed, augmented, hard_negative, rationale); repeat."),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="Only rows with this label; repeat.")
    ] = None,
    status: Annotated[
        str, typer.Option(help="accepted; rejected or all with --format lineage.")
    ] = "accepted",
    validation_fraction: Annotated[
        float,
        typer.Option(help="Hold out this share (at most 0.5) as validation.jsonl, stratified."),
    ] = 0.0,
    split_seed: Annotated[
        int | None, typer.Option(help="Seed of the split (default: the job spec's seed).")
    ] = None,
    gzip: Annotated[bool, typer.Option("--gzip", help="Write .jsonl.gz files.")] = False,
    tenant: TenantOpt = "default",
) -> None:
    """Write a job's dataset in a format, with a manifest.json: counts per kind, label and
    iteration, the sha256 of each file, the spec hash, the teacher model and the student's
    metric. The same selection of the same data writes the same bytes."""
    from service.cli import console, fail, open_session, tenant_holding
    from service.models import Job

    suffix = ".jsonl.gz" if gzip else ".jsonl"

    def name(split: Split | None) -> str:
        return f"{split or 'train'}{suffix}"

    try:
        selection = _selection(iteration, kind, label, status, validation_fraction, split_seed)
        with open_session() as session:
            tenant_id = tenant_holding(session, tenant, Job, job_id, "job").id
            job = get_job(session, tenant_id, job_id)
            session.commit()  # the export reads from a snapshot of its own
            begin_snapshot(session)
            job = get_job(session, job.tenant_id, job_id)
            plan = plan_export(session, job, format_, selection)
            try:
                result = write_files(session, plan, out, name, "manifest.json", gzip=gzip)
            except OSError as exc:
                raise BadRequest(f"--out {out}: cannot write there: {exc.strerror or exc}") from exc
    except DistillError as exc:
        fail(exc)
    for split, path in result.files.items():
        entry = result.manifest["files"][split]
        console.print(
            escape(f"{path} ({entry['rows']} rows, sha256 {entry['sha256'][:12]})"),
            soft_wrap=True,
        )
    console.print(escape(f"{out / 'manifest.json'}"), soft_wrap=True)
