"""The operator's CLI over the configured database: migrations, keys, datasets, jobs.

`workers.cli` adds the commands that need worker code (serve, worker, run) and is the
`distill` entry point; these commands only need the service package.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.auth import create_api_key, get_or_create_tenant, list_api_keys, revoke_api_key
from service.datasets import create_dataset, parse_jsonl
from service.db import get_engine, session_factory
from service.domain.statuses import JobStatus
from service.errors import BadRequest, DistillError, NotFound, ValidationFailed
from service.export_cli import export_command
from service.jobs import create_job, get_job, parse_spec, request_transition
from service.models import Job, Tenant, utcnow
from service.refresh_cli import refresh_command
from service.settings import get_settings
from service.tasks import SENDER, RecordingTaskSender, TaskSender

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(help="distill: closed-loop distillation service.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
datasets_app = typer.Typer(help="Datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
# The CI step: a client of a (remote) server, no database of its own (service/refresh_cli.py).
app.command("refresh")(refresh_command)
# A job's dataset as files and a manifest (service/export_cli.py).
app.command("export")(export_command)

TenantOpt = Annotated[str, typer.Option("--tenant", help="Tenant name.")]

# The composition root (workers.cli) replaces this with the real sender for the mode.
_task_sender: TaskSender = RecordingTaskSender()


def set_task_sender(sender: TaskSender) -> None:
    global _task_sender
    _task_sender = sender


def sessions() -> sessionmaker[Session]:
    return session_factory(get_engine())


def open_session() -> Session:
    session = sessions()()
    session.info[SENDER] = _task_sender
    return session


def fail(exc: DistillError, exit_code: int = 2) -> NoReturn:
    """Print the error on stderr (user text is never read as markup, paths are not wrapped)
    and exit: 2 for a bad command line, spec or file, 1 for a job that did not succeed."""
    err_console.print(f"[red]error[/red] {exc.code}: {escape(exc.message)}", soft_wrap=True)
    if exc.details:
        err_console.print(escape(json.dumps(exc.details, indent=2, default=str)), soft_wrap=True)
    raise typer.Exit(code=exit_code)


def read_input_file(path: Path, what: str = "file") -> bytes:
    """The bytes of a file the user named, or a clean error (exit 2) saying why not."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        fail(NotFound(f"{what} {path}: no such file"))
    except IsADirectoryError:
        fail(BadRequest(f"{what} {path}: is a directory, not a file"))
    except PermissionError:
        fail(BadRequest(f"{what} {path}: permission denied"))
    except OSError as exc:
        fail(BadRequest(f"{what} {path}: cannot be read: {exc.strerror or exc}"))


def upgrade_database(url: str | None = None, *, quiet: bool = False) -> None:
    """Alembic upgrade head on the configured (or given) database. `quiet` keeps Alembic's
    INFO lines out of commands that only make sure the schema is there (run, serve)."""
    import logging

    from alembic import command
    from alembic.config import Config

    root = Path(__file__).resolve().parent.parent
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    config.attributes["url"] = url or get_settings().database_url
    logger = logging.getLogger("alembic")
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        command.upgrade(config, "head")
    finally:
        logger.setLevel(level)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply all migrations (creates the embedded SQLite database when none is set)."""
    upgrade_database()
    console.print(f"database at head: {_redact(get_settings().database_url)}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '12h', '30d', '2w' → a timedelta (exit 2 on anything else)."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        fail(
            ValidationFailed(
                f"--expires-in: {text!r} is not a duration like 90s, 15m, 12h, 30d or 2w"
            )
        )
    return timedelta(seconds=int(match.group(1)) * _UNIT_S[match.group(2)])


@keys_app.command("create")
def keys_create(
    tenant: TenantOpt = "default",
    name: str = "default",
    job: Annotated[
        uuid.UUID | None,
        typer.Option(help="Scope the key to this job: read it and refresh it, nothing else."),
    ] = None,
    expires_in: Annotated[
        str | None, typer.Option(help="Expire after this long: 90s, 15m, 12h, 30d, 2w.")
    ] = None,
) -> None:
    """Create an API key; it is printed once and only its hash is stored."""
    expires_at = utcnow() + parse_duration(expires_in) if expires_in else None
    try:
        with open_session() as session:
            t = _existing_tenant(session, tenant) if job else get_or_create_tenant(session, tenant)
            row, plain = create_api_key(session, t, name, job_id=job, expires_at=expires_at)
            session.commit()
    except DistillError as exc:
        fail(exc)
    scope = f", job {job}" if job else ""
    until = f", expires {expires_at.isoformat(timespec='seconds')}" if expires_at else ""
    console.print(f"tenant {escape(tenant)}, key {row.prefix}… (id {row.id}){scope}{until}")
    typer.echo(plain)


@keys_app.command("list")
def keys_list(tenant: TenantOpt = "default") -> None:
    """The tenant's keys (never the keys themselves): scope, expiry, revocation, last use."""
    with open_session() as session:
        try:
            t = _existing_tenant(session, tenant)
        except NotFound as exc:
            fail(exc)
        table = Table("name", "prefix", "job", "expires", "revoked", "created")
        table.add_column("id", no_wrap=True, min_width=36)

        def when(moment: Any) -> str:
            return moment.isoformat(timespec="seconds") if moment else "-"

        for key in list_api_keys(session, t.id):
            table.add_row(
                escape(key.name),
                key.prefix + "…",
                str(key.job_id) if key.job_id else "(tenant)",
                when(key.expires_at),
                when(key.revoked_at),
                when(key.created_at),
                str(key.id),
            )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: uuid.UUID, tenant: TenantOpt = "default") -> None:
    """Revoke a key: refused from the next request on."""
    try:
        with open_session() as session:
            t = _existing_tenant(session, tenant)
            row = revoke_api_key(session, t.id, key_id)
            session.commit()
    except DistillError as exc:
        fail(exc)
    console.print(f"key {row.prefix}… (id {row.id}) revoked")


@datasets_app.command("upload")
def datasets_upload(path: Path, tenant: TenantOpt = "default", name: str | None = None) -> None:
    """Upload a JSONL file; prints the dataset id."""
    data = read_input_file(path, "dataset")
    try:
        rows = parse_jsonl(data)
        with open_session() as session:
            t = get_or_create_tenant(session, tenant)
            ds = create_dataset(session, t.id, name or path.name, rows, size_bytes=len(data))
            session.commit()
    except DistillError as exc:
        fail(exc)
    console.print(escape(f"{ds.row_count} rows, fields {ds.fields}, sha256 {ds.content_hash[:12]}"))
    typer.echo(str(ds.id))


def load_spec_file(path: Path) -> dict[str, Any]:
    """A job spec file as a mapping; anything else is a clean error (exit 2) naming the file
    and, for a YAML syntax error, the line and column."""
    data = read_input_file(path, "job spec")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        fail(
            ValidationFailed(
                f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                "save the spec as UTF-8"
            )
        )
    try:
        raw = yaml.load(text, Loader=_SpecLoader)
    except yaml.YAMLError as exc:
        fail(ValidationFailed(f"{path}: {_yaml_problem(exc, text)}"))
    if raw is None:
        fail(ValidationFailed(f"{path}: the job spec is empty"))
    if not isinstance(raw, dict):
        kind = "a list" if isinstance(raw, list) else "a single value"
        fail(
            ValidationFailed(
                f"{path}: a job spec must be a YAML mapping (name: ..., strategy: ..., "
                f"task: ...), not {kind}"
            )
        )
    return raw


class _SpecLoader(yaml.SafeLoader):
    """YAML as YAML 1.2 reads it where it matters for specs: only true/false are booleans, so
    `labels: [yes, no]` stays the strings a data set holds (PyYAML's YAML 1.1 would read them,
    and on/off, as booleans); a key given twice is an error instead of the last one winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}{context}"
    if isinstance(exc, yaml.reader.ReaderError):  # e.g. a control character
        line = text[: exc.position].count("\n") + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"invalid YAML at line {line}, column {column}: {exc.reason} (#x{char:04x})"
    return "invalid YAML: " + (str(exc).splitlines() or ["unknown error"])[0]


@jobs_app.command("create")
def jobs_create(
    spec_path: Path,
    tenant: TenantOpt = "default",
    idempotency_key: str | None = None,
) -> None:
    """Create a job from a spec whose datasets/teacher are ids (or an inline teacher)."""
    raw = load_spec_file(spec_path)
    try:
        with open_session() as session:
            t = get_or_create_tenant(session, tenant)
            job, _ = create_job(
                session,
                t.id,
                parse_spec(raw),
                idempotency_key=idempotency_key,
                allow_private_teacher=True,  # the CLI is the operator
                allow_trainer_command=True,
            )
            session.commit()
    except DistillError as exc:
        fail(exc)
    typer.echo(str(job.id))


def _existing_tenant(session: Session, name: str) -> Tenant:
    """The tenant a read or a control command names; a typo must not create one."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound(
            f"no tenant named {name!r} (tenants are created by keys create, "
            "datasets upload, jobs create or run)"
        )
    return tenant


@jobs_app.command("list")
def jobs_list(tenant: TenantOpt = "default", limit: int = 50) -> None:
    with open_session() as session:
        try:
            t = _existing_tenant(session, tenant)
        except NotFound as exc:
            fail(exc)
        jobs = session.scalars(
            select(Job).where(Job.tenant_id == t.id).order_by(Job.created_at.desc()).limit(limit)
        )
        table = Table("name", "strategy", "status", "iteration", "best", "accepted", "cost")
        table.add_column("id", no_wrap=True, min_width=36)
        for job in jobs:
            table.add_row(
                escape(job.name),
                job.strategy,
                job.status.value,
                str(job.current_iteration),
                str(job.best_iteration),
                str(job.examples_accepted),
                f"${job.cost_usd:.4f}",
                str(job.id),
            )
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: uuid.UUID, tenant: TenantOpt = "default") -> None:
    try:
        with open_session() as session:
            t = _existing_tenant(session, tenant)
            job = get_job(session, t.id, job_id)
            console.print(  # names and reasons are user text, never markup
                escape(
                    f"{job.name} [{job.strategy}] {job.status.value}"
                    + (f" — {job.status_reason}" if job.status_reason else "")
                )
            )
            from service.models import Iteration

            table = Table("iter", "status", "metric", "accepted", "rejected", "tokens", "cost")
            for it in session.scalars(
                select(Iteration).where(Iteration.job_id == job.id).order_by(Iteration.number)
            ):
                table.add_row(
                    str(it.number),
                    it.status.value,
                    "-" if it.metric is None else f"{it.metric:.4f}",
                    str(it.examples_accepted),
                    str(it.examples_rejected),
                    str(it.tokens_in + it.tokens_out),
                    f"${it.cost_usd:.4f}",
                )
            console.print(table)
    except DistillError as exc:
        fail(exc)


def _transition_cmd(job_id: uuid.UUID, tenant: str, target: JobStatus) -> None:
    try:
        with open_session() as session:
            t = _existing_tenant(session, tenant)
            job = request_transition(session, get_job(session, t.id, job_id), target)
            session.commit()
    except DistillError as exc:
        fail(exc)
    console.print(f"job {job.id}: {job.status.value}")


@jobs_app.command("cancel")
def jobs_cancel(job_id: uuid.UUID, tenant: TenantOpt = "default") -> None:
    _transition_cmd(job_id, tenant, JobStatus.cancelled)


@jobs_app.command("pause")
def jobs_pause(job_id: uuid.UUID, tenant: TenantOpt = "default") -> None:
    _transition_cmd(job_id, tenant, JobStatus.paused)


@jobs_app.command("resume")
def jobs_resume(job_id: uuid.UUID, tenant: TenantOpt = "default") -> None:
    _transition_cmd(job_id, tenant, JobStatus.running)
