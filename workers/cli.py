"""The `distill` entry point: the service's commands plus serve, worker, beat and run."""

from __future__ import annotations

import contextlib
import shlex
import sys
import threading
import uuid
from pathlib import Path
from typing import Annotated, Any, NoReturn

import structlog
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from service import cli as service_cli
from service.auth import get_or_create_tenant
from service.cli_style import TenantOpt
from service.datasets import create_dataset, parse_jsonl
from service.domain.selection import exclusion_note
from service.domain.spec import TeacherSpec
from service.domain.statuses import ExportStatus, JobStatus
from service.errors import BadRequest, DistillError, NotFound
from service.jobs import create_job, parse_spec, request_transition
from service.models import Dataset, Iteration, Job
from service.settings import Settings, get_settings
from service.tasks import ALL_QUEUES
from workers.progress import IterationProgress, JobProgress

app = service_cli.app
console = service_cli.console


def _register_teacher_commands() -> None:
    """`distill teachers local` serves the local teacher beside the teachers' other commands;
    `distill teacher local`, its first name, still works (hidden from the help)."""
    from service.cli_style import DistillTyper
    from workers.local_teacher_cli import local

    service_cli.teachers_app.command("local")(local)
    alias = DistillTyper(help="Same as `distill teachers local`.", hidden=True)
    alias.command("local")(local)
    app.add_typer(alias, name="teacher", hidden=True)


_register_teacher_commands()


def _configure_sender() -> None:
    from workers.composition import build_task_sender
    from workers.runtime import set_sender

    sender = build_task_sender(get_settings())
    set_sender(sender)
    service_cli.set_task_sender(sender)


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="API processes (production mode).")] = 1,
) -> None:
    """Run the API. Embedded mode (no REDIS_URL) also runs the job steps in this process."""
    import uvicorn

    from service.api.app import create_app

    settings = get_settings()
    # log_config=None everywhere below: uvicorn's loggers reach the handler main() installed
    # (service/logging.py), so its lines come out in the same format as distill's own.
    if not settings.embedded:
        if workers > 1:
            uvicorn.run(
                "workers.cli:production_app",
                host=host,
                port=port,
                workers=workers,
                factory=True,
                log_config=None,
            )
        else:
            uvicorn.run(production_app(), host=host, port=port, log_config=None)
        return
    from workers.inline import inline_sender
    from workers.runtime import set_sender

    service_cli.upgrade_database(quiet=True)
    sender = inline_sender()
    set_sender(sender)
    _resume_embedded_work(sender)
    stop = threading.Event()
    executor = threading.Thread(target=sender.run_forever, args=(stop,), daemon=True)
    executor.start()
    reconciler = threading.Thread(target=_reconcile_loop, args=(stop,), daemon=True)
    reconciler.start()
    webhooks = threading.Thread(target=_webhook_loop, args=(stop,), daemon=True)
    webhooks.start()
    try:
        app = create_app(settings, task_sender=sender, local_teacher=local_teacher_spec(settings))
        uvicorn.run(app, host=host, port=port, log_config=None)
    finally:
        stop.set()


def _resume_embedded_work(sender: Any) -> None:
    """This process is the only executor in embedded mode, so nothing can be running when it
    starts: put interrupted batches back and (re)start every queued or running job now,
    rather than after the reconcile's stuck deadline."""
    from service.tasks import SENDER
    from workers.steps.job import reconcile

    worker = get_settings().worker.model_copy(
        update={"lease_s": 0.0, "stuck_after_s": 0, "requeue_after_s": 0.0}
    )
    with service_cli.sessions()() as session:
        session.info[SENDER] = sender
        reconcile(session, worker)
        session.commit()


def production_app() -> Any:
    from service.api.app import create_app
    from service.logging import configure_logging

    settings = get_settings()
    # uvicorn's worker processes start here, not in main(): the same one log format for them.
    configure_logging(settings.log_level)
    return create_app(settings, local_teacher=local_teacher_spec(settings))


def local_teacher_spec(settings: Settings) -> TeacherSpec | None:
    """The inline teacher a REST job's `teacher: local` becomes: the local teacher's defaults
    (the ones `distill run` uses) at DISTILL_API__LOCAL_TEACHER_URL; None when it is unset."""
    url = settings.api.local_teacher_url
    if not url:
        return None
    from workers.teacher.local import LOCAL_TEACHER_DEFAULTS

    return LOCAL_TEACHER_DEFAULTS.teacher_spec(url)


def _reconcile_loop(stop: threading.Event) -> None:
    from service.tasks import JOB_RECONCILE, TaskMessage
    from workers.inline import inline_sender

    interval = get_settings().worker.reconcile_interval_s
    while not stop.wait(interval):
        inline_sender().send(TaskMessage(JOB_RECONCILE, ()))


def _webhook_loop(stop: threading.Event) -> None:
    """Embedded mode's beat for webhooks: its own thread, so a slow receiver never holds up
    the steps the in-process executor runs."""
    from workers.runtime import run_step
    from workers.steps.webhooks import deliver_due

    interval = get_settings().webhooks.interval_s
    while not stop.wait(interval):
        try:
            run_step(deliver_due, with_ports=False)
        except Exception:  # a bad row or a database hiccup must not end the deliveries
            structlog.get_logger().exception("webhook.delivery_run_failed")


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues.")] = ",".join(ALL_QUEUES),
    concurrency: Annotated[int, typer.Option(help="Processes in the worker's pool.")] = 2,
    beat: Annotated[
        bool, typer.Option(help="Also run the periodic reconcile (one per site).")
    ] = False,
    loglevel: Annotated[str, typer.Option(help="Celery's log level.")] = "INFO",
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus metrics of all pool processes on this port."),
    ] = None,
) -> None:
    """Run a Celery worker (production mode: needs REDIS_URL and DATABASE_URL)."""
    settings = get_settings()
    if settings.embedded:
        service_cli.fail(
            BadRequest(
                "distill worker needs REDIS_URL (the broker); embedded mode "
                "runs steps inside `distill serve` or `distill run`"
            )
        )
    if metrics_port is not None:
        _serve_pool_metrics(metrics_port)
    _configure_sender()
    from workers.celery_app import celery_app

    args = [
        "worker",
        "-Q",
        queues,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    if beat:
        args.append("--beat")
    celery_app.worker_main(args)


def _serve_pool_metrics(port: int) -> None:
    """Teacher calls run in the prefork pool's children, so their metrics are aggregated
    with prometheus_client's multiprocess mode: the environment variable must be set before
    any child imports prometheus_client (they fork from this process afterwards)."""
    import os
    import tempfile

    directory = os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="distill-metrics-")
    )
    os.makedirs(directory, exist_ok=True)
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, registry=registry)


@app.command("beat")
def beat_cmd(
    loglevel: Annotated[str, typer.Option(help="Celery's log level.")] = "INFO",
) -> None:
    """Run Celery beat (the periodic reconcile of stuck work)."""
    from workers.celery_app import celery_app

    celery_app.start(["beat", "--loglevel", loglevel])


def _dataset_id(session: Any, tenant_id: uuid.UUID, field: str, ref: str, base: Path) -> str:
    """A dataset id as is; a JSONL path (relative paths from the spec's directory) uploaded
    once (reused by content hash)."""
    with contextlib.suppress(ValueError):
        return str(uuid.UUID(ref))
    given = Path(ref)
    with contextlib.suppress(RuntimeError):  # `~user` of an unknown user: taken literally
        given = given.expanduser()
    path = given if given.is_absolute() else base / given
    if not path.exists():
        where = "" if given.is_absolute() else f" (relative to the spec's directory {base})"
        service_cli.fail(NotFound(f"{field}: dataset {ref}: no such file{where}"))
    data = service_cli.read_input_file(path, f"{field}: dataset")
    rows = parse_jsonl(data)
    from service.datasets import content_hash

    digest = content_hash(rows)
    existing = session.scalar(
        select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.content_hash == digest)
    )
    if existing is not None:
        return str(existing.id)
    return str(create_dataset(session, tenant_id, path.name, rows, size_bytes=len(data)).id)


@app.command()
def run(
    spec_path: Annotated[
        Path,
        typer.Argument(
            help="The job spec (YAML); datasets as JSONL paths (relative to the spec) or ids."
        ),
    ],
    tenant: TenantOpt = "default",
    export_dir: Annotated[Path | None, typer.Option(help="Where to write the export.")] = None,
) -> None:
    """Run a whole job in this process (the embedded default), with progress, then export.

    Exit code 0: the job succeeded and its export is written. 1: the job failed,
    was cancelled or could not finish (nothing is exported). 2: a bad spec or
    file. 130: interrupted (Ctrl-C): the job is paused, what it stored kept; `distill jobs
    resume` then `distill serve` continue it."""
    from workers.inline import InlineTaskSender
    from workers.runtime import set_sender

    _log_beside_the_bars()
    raw = service_cli.load_spec_file(spec_path)
    local_teacher = raw.get("teacher", "local") == "local"
    _check_spec(raw, local_teacher)
    service_cli.upgrade_database(quiet=True)
    sender = InlineTaskSender()
    set_sender(sender)
    service_cli.set_task_sender(sender)
    base = spec_path.resolve().parent
    with contextlib.ExitStack() as stack:
        if local_teacher:
            raw["teacher"] = _start_local_teacher(stack)
        _run_spec(raw, base, tenant, sender, export_dir)


def _log_beside_the_bars() -> None:
    """Log events go to a file while the bars are drawn (one line per teacher call would
    scroll them away); warnings still reach the terminal, printed above the bars."""
    import os

    from service.logging import configure_run_logging

    # Libraries' own progress bars (model loading) would draw through ours.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    settings = get_settings()
    path = settings.home / "logs" / "run.log"
    configure_run_logging(settings.log_level, path)
    console.print(escape(f"log: {path}"), soft_wrap=True)


def _check_spec(raw: dict[str, Any], local_teacher: bool) -> None:
    """Validate the spec before any database, upload or local teacher start (the first start
    of the local teacher takes minutes): a typo fails at once."""
    probe = dict(raw)
    if local_teacher:
        probe["teacher"] = {"base_url": "http://127.0.0.1/v1", "model": "local"}
    try:
        parse_spec(probe)
    except DistillError as exc:
        service_cli.fail(exc)


def _start_local_teacher(stack: contextlib.ExitStack) -> dict[str, Any]:
    """`teacher: local` (or none): the zero-configuration llama.cpp teacher, for this run."""
    from workers.teacher.local import LocalTeacherError, LocalTeacherServer

    console.print("starting the local teacher (llama.cpp, gemma-3-270m) …")
    try:
        server = stack.enter_context(LocalTeacherServer(get_settings().home))
    except LocalTeacherError as exc:
        service_cli.err_console.print(f"[red]error[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(code=2) from exc
    console.print(
        escape(f"local teacher at {server.base_url} ({server.backend}; log {server.log_path})"),
        soft_wrap=True,
    )
    return server.defaults.teacher_spec(server.base_url).model_dump(mode="json")


def _run_spec(
    raw: dict[str, Any], base: Path, tenant: str, sender: Any, export_dir: Path | None
) -> None:
    try:
        with service_cli.open_session() as session:
            t = get_or_create_tenant(session, tenant)
            datasets = raw.get("datasets")
            if isinstance(datasets, dict):  # anything else: parse_spec says what is wrong
                datasets = dict(datasets)
                for key in ("train", "validation", "test"):
                    if datasets.get(key):
                        datasets[key] = _dataset_id(
                            session, t.id, f"datasets.{key}", str(datasets[key]), base
                        )
                raw["datasets"] = datasets
            spec = parse_spec(raw)
            job, _ = create_job(
                session, t.id, spec, allow_private_teacher=True, allow_trainer_command=True
            )
            session.commit()
            job_id = job.id
    except DistillError as exc:
        service_cli.fail(exc)
    console.print(f"job {job_id} ({spec.strategy}) created")
    try:
        _drive(sender, job_id)
    except KeyboardInterrupt:
        _interrupted(job_id, tenant)
    status, reason = _final_table(job_id)
    if status is not JobStatus.succeeded:
        _did_not_succeed(job_id, tenant, status, reason)
    from workers.steps.export import export_job

    with service_cli.open_session() as session:
        export = export_job(session, job_id, out_dir=export_dir)
        session.commit()
    if export.status is not ExportStatus.succeeded:
        service_cli.fail(
            DistillError(
                f"job {job_id} succeeded but its export could not be written: {export.error}",
                code="export_failed",
            ),
            exit_code=1,
        )
    console.print(escape(f"export: {export.path} ({export.row_count} rows)"), soft_wrap=True)
    holds = (export.manifest or {}).get("holds")
    if holds:
        console.print(escape(f"the export holds {holds}"), soft_wrap=True)


def _interrupted(job_id: uuid.UUID, tenant: str) -> NoReturn:
    """Ctrl-C: the job is paused, not left running, so that nothing continues it unasked (a
    later `distill serve` restarts every running job); what it stored is kept."""
    suffix = f" --tenant {shlex.quote(tenant)}" if tenant != "default" else ""
    status = "unknown"
    with contextlib.suppress(DistillError, DBAPIError), service_cli.open_session() as session:
        job = session.get(Job, job_id)
        if job is not None and job.status in (JobStatus.queued, JobStatus.running):
            request_transition(session, job, JobStatus.paused)
            session.commit()
        status = job.status.value if job is not None else "deleted"
    console.print(
        escape(
            f"interrupted: job {job_id} is {status}; what it stored is kept (an answer the "
            f"teacher gave is not asked for again). Continue it: distill jobs resume "
            f"{job_id}{suffix}, then distill serve; end it: distill jobs cancel {job_id}{suffix}"
        ),
        soft_wrap=True,
    )
    raise typer.Exit(130)


def _did_not_succeed(
    job_id: uuid.UUID, tenant: str, status: JobStatus, reason: str | None
) -> NoReturn:
    """A job that failed, was cancelled or stopped unfinished writes no export (it would be
    mostly, or only, the seed set) and exits 1; its rows stay in the database."""
    because = f": {reason}" if reason else ""
    if status is JobStatus.failed:
        message = f"job {job_id} failed{because}"
    elif status is JobStatus.cancelled:
        message = f"job {job_id} was cancelled{because}"
    else:
        message = f"job {job_id} did not finish: it is {status.value}{because}"
    show = f"distill jobs show {job_id}"
    if tenant != "default":
        show += f" --tenant {shlex.quote(tenant)}"
    service_cli.fail(
        DistillError(
            f"{message}\nno export written; its iterations and examples are kept: {show}",
            code=f"job_{status.value}",
        ),
        exit_code=1,
    )


PROGRESS_POLL_S = 0.5


def _drive(sender: Any, job_id: uuid.UUID) -> None:
    """Run the job's steps in this process under one bar per iteration. The bars move per
    teacher call: a thread reads the progress every PROGRESS_POLL_S while a step runs (a
    generation step makes all of a phase's calls in one task), and again after each task."""
    reader = JobProgress(service_cli.sessions(), job_id)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bars: dict[int, Any] = {}
        lock = threading.Lock()  # the poller and the task hook both refresh

        def refresh(_: Any = None) -> None:
            with lock:
                for it in reader.read():
                    _show_iteration(progress, bars, it)

        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(PROGRESS_POLL_S):
                try:
                    refresh()
                except Exception:  # a read that lost a race with a write: the next one shows it
                    structlog.get_logger().debug("run.progress_read_failed", exc_info=True)

        poller = threading.Thread(target=poll, name="run-progress", daemon=True)
        sender.on_task_done = refresh
        poller.start()
        try:
            sender.run_until_idle()
        finally:
            stop.set()
            poller.join()
        refresh()


def _show_iteration(progress: Progress, bars: dict[int, Any], it: IterationProgress) -> None:
    """One iteration's bar: the baseline is one step (its evaluation); a later iteration
    counts its teacher calls, and is whole once completed."""
    if it.number == 0:
        label, total = "baseline", 1
        done = 1 if it.metric is not None else 0
        info = it.status.value
    else:
        label, total = f"iteration {it.number}", max(it.calls_planned, 1)
        done = it.calls_done
        info = f"teacher calls · {it.status.value} · {it.accepted} accepted {it.rejected} rejected"
    if it.status.value == "completed":
        done = total
    if it.metric is not None:
        info += f" · metric={it.metric:.4f}"
    if it.number not in bars:
        bars[it.number] = progress.add_task(label, total=total, info="")
    progress.update(bars[it.number], total=total, completed=done, info=escape(info))


def _final_table(job_id: uuid.UUID) -> tuple[JobStatus, str | None]:
    with service_cli.open_session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        table = Table(
            "iteration",
            "metric",
            "accepted",
            "rejected",
            "tokens",
            "cost",
            "note",
            title=escape(  # names and reasons are user and teacher text, never markup
                f"{job.name}: {job.status.value}"
                + (f" ({job.status_reason})" if job.status_reason else "")
            ),
        )
        # Why examples were rejected goes under the table, a line per iteration: in a table
        # cell of an 80-column terminal "label_not_asked=4" was cut to "label_not_…".
        rejections: list[str] = []
        for it in session.scalars(
            select(Iteration).where(Iteration.job_id == job_id).order_by(Iteration.number)
        ):
            if it.rejected_by_reason:
                reasons = ", ".join(f"{k}={v}" for k, v in sorted(it.rejected_by_reason.items()))
                rejections.append(f"  iteration {it.number}: {reasons}")
            note = "exported" if job.best_iteration == it.number else ""
            if it.number and not it.included:
                note = exclusion_note(it.selection_reason)
            elif (
                it.number and it.selection_reason and it.selection_reason.startswith("kept: better")
            ):
                note = (note + ", " if note else "") + "better"
            table.add_row(
                str(it.number),
                "-" if it.metric is None else f"{it.metric:.4f}",
                str(it.examples_accepted),
                str(it.examples_rejected),
                str(it.tokens_in + it.tokens_out),
                f"${it.cost_usd:.4f}",
                note,
            )
        console.print(table)
        if rejections:
            console.print("rejected, by reason:")
            for line in rejections:  # reasons are the filters' words, never markup
                console.print(escape(line), soft_wrap=True)
        return job.status, job.status_reason


def main() -> None:
    from pydantic import ValidationError
    from sqlalchemy.exc import ArgumentError

    from service.logging import configure_logging

    try:
        settings = get_settings()
        if settings.database_url:
            from sqlalchemy.engine import make_url

            make_url(settings.database_url)
    except (ValidationError, ArgumentError) as exc:
        _bad_settings(exc)
    configure_logging(settings.log_level)
    _configure_sender()
    try:
        app()
    except (OperationalError, ProgrammingError) as exc:
        if isinstance(exc, ProgrammingError) and getattr(exc.orig, "sqlstate", None) != "42P01":
            raise  # only a missing table (not migrated) is the operator's to fix here
        _database_unavailable(exc)


def _bad_settings(exc: Exception) -> NoReturn:
    """A setting from the environment or .env that cannot be used: name it, no traceback."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        lines = [
            f"DISTILL_{'__'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors(include_url=False)
        ]
        message = "invalid settings:\n  " + "\n  ".join(lines)
    else:
        message = f"DATABASE_URL (DISTILL_DATABASE__URL) is not a database URL: {exc}"
    print(f"error settings_invalid: {message}", file=sys.stderr)
    raise SystemExit(2)


def _database_unavailable(exc: DBAPIError) -> NoReturn:
    """The database is down, unreachable, misnamed or not migrated: say so, no traceback."""
    url = get_settings().database_url
    problem = str(exc.orig).strip() or type(exc.orig).__name__
    hint = ""
    if "no such table" in problem or getattr(exc.orig, "sqlstate", None) == "42P01":
        hint = "\nthe database has no schema yet: run `distill db upgrade` first"
    error = DistillError(
        f"database {service_cli._redact(url)}: {problem}{hint}", code="database_unavailable"
    )
    try:
        service_cli.fail(error, exit_code=1)
    except typer.Exit as done:  # raised after click returned: make it the exit code here
        raise SystemExit(done.exit_code) from None
