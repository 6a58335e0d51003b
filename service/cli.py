"""The operator's CLI over the configured database: migrations, keys, datasets, jobs.

`workers.cli` adds the commands that need worker code (serve, worker, run) and is the
`distill` entry point; these commands only need the service package.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.auth import create_api_key, get_or_create_tenant, list_api_keys, revoke_api_key
from service.cli_style import DistillTyper, JobArg, TenantOpt
from service.datasets import (
    create_dataset,
    delete_dataset,
    get_dataset,
    parse_jsonl,
    preview_rows,
)
from service.db import get_engine, session_factory
from service.domain.statuses import JobStatus
from service.domain.teacher import StructuredMode
from service.errors import BadRequest, DistillError, NotFound, ValidationFailed
from service.export_cli import export_command
from service.exports import get_export
from service.jobs import create_job, delete_job, get_job, list_jobs, parse_spec, request_transition
from service.models import ApiKey, Dataset, Export, Iteration, Job, Teacher, Tenant, utcnow
from service.pagination import paginate
from service.refresh_cli import refresh_command
from service.settings import get_settings
from service.tasks import SENDER, RecordingTaskSender, TaskSender
from service.teachers import create_teacher, delete_teacher, get_teacher

console = Console()
err_console = Console(stderr=True)

app = DistillTyper(
    help="distill: turn a teacher LLM into training data for a small student, in closed loops. "
    "Commands run against the configured database (DATABASE_URL, or the embedded SQLite "
    "database in DISTILL_HOME); `refresh` is a client of a server."
)
db_app = DistillTyper(help="The database schema: create or migrate it.")
keys_app = DistillTyper(help="API keys of a tenant: create, list, revoke.")
datasets_app = DistillTyper(help="Datasets (JSONL rows): upload, list, show, delete.")
teachers_app = DistillTyper(
    help="Teachers (OpenAI-compatible endpoints jobs can name): create, list, show, delete."
)
jobs_app = DistillTyper(help="Jobs: create, list, show, pause, resume, cancel, delete.")
exports_app = DistillTyper(
    help="Exports that a worker or `distill run` wrote: list, show. `distill export` writes one."
)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(datasets_app, name="datasets")
app.add_typer(teachers_app, name="teachers")
app.add_typer(jobs_app, name="jobs")
app.add_typer(exports_app, name="exports")
# The CI step: a client of a (remote) server, no database of its own (service/refresh_cli.py).
app.command("refresh")(refresh_command)
# A job's dataset as files and a manifest (service/export_cli.py).
app.command("export")(export_command)

LimitOpt = Annotated[
    int, typer.Option(min=1, max=1000, help="Show at most this many, newest first.")
]

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


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else "-"


def _details(rows: Iterable[tuple[str, Any]]) -> None:
    """A record as aligned `field  value` lines (user text is never read as markup)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for field, value in rows:
        grid.add_row(field, escape("-" if value is None else str(value)))
    console.print(grid)


def _existing_tenant(session: Session, name: str) -> Tenant:
    """The tenant a read or a control command names; a typo must not create one. The error
    lists the tenants there are (the CLI is the operator's, so this leaks nothing)."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        names = list(session.scalars(select(Tenant.name).order_by(Tenant.name).limit(20)))
        known = f"; tenants: {', '.join(names)}" if names else "; there are no tenants yet"
        raise NotFound(
            f"no tenant named {name!r} (tenants are created by keys create, "
            f"datasets upload, teachers create, jobs create or run){known}"
        )
    return tenant


_OwnedModel = type[Job] | type[Teacher] | type[Dataset] | type[ApiKey] | type[Export]


def _holder(session: Session, model: _OwnedModel, row_id: uuid.UUID) -> Tenant | None:
    """The tenant a row belongs to, whichever tenant the command named (an export belongs to
    its job's)."""
    if issubclass(model, Export):
        return session.scalar(
            select(Tenant)
            .join(Job, Job.tenant_id == Tenant.id)
            .join(Export, Export.job_id == Job.id)
            .where(Export.id == row_id)
        )
    return session.scalar(
        select(Tenant).join(model, model.tenant_id == Tenant.id).where(model.id == row_id)
    )


def tenant_holding(
    session: Session, tenant: str, model: _OwnedModel, row_id: uuid.UUID, noun: str
) -> Tenant:
    """The named tenant when it holds the row. Otherwise a NotFound that says which tenant
    does and how to name it: the REST API says only "not found" (a tenant must not learn of
    another's rows), but the CLI runs on the database as its operator, who sees them all."""
    holder = _holder(session, model, row_id)
    if holder is not None and holder.name == tenant:
        return holder
    if holder is not None:
        raise NotFound(
            f"no {noun} {row_id} in tenant {tenant!r}; it is in tenant {holder.name!r}: "
            f"add --tenant {shlex.quote(holder.name)}"
        )
    _existing_tenant(session, tenant)  # a mistyped tenant is named as such
    raise NotFound(f"no {noun} {row_id} in tenant {tenant!r}, nor in any other")


@keys_app.command("create")
def keys_create(
    tenant: TenantOpt = "default",
    name: Annotated[
        str, typer.Option(help="A label for the key (who or what uses it), shown by list.")
    ] = "default",
    job: Annotated[
        uuid.UUID | None,
        typer.Option(help="Scope the key to this job: read it and refresh it, nothing else."),
    ] = None,
    expires_in: Annotated[
        str | None, typer.Option(help="Expire after this long: 90s, 15m, 12h, 30d, 2w.")
    ] = None,
) -> None:
    """Create an API key (and the tenant, if new); the key is printed once, on the last line
    of stdout, and only its hash is stored."""
    expires_at = utcnow() + parse_duration(expires_in) if expires_in else None
    try:
        with open_session() as session:
            if job:
                t = tenant_holding(session, tenant, Job, job, "job")
            else:
                t = get_or_create_tenant(session, tenant)
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
        table = Table("name", "prefix", "job", "expires", "revoked", "last used", "created")
        table.add_column("id", no_wrap=True, min_width=36)
        for key in list_api_keys(session, t.id):
            table.add_row(
                escape(key.name),
                key.prefix + "…",
                str(key.job_id) if key.job_id else "(tenant)",
                _when(key.expires_at),
                _when(key.revoked_at),
                _when(key.last_used_at),
                _when(key.created_at),
                str(key.id),
            )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[uuid.UUID, typer.Argument(help="The key's id (see `distill keys list`).")],
    tenant: TenantOpt = "default",
) -> None:
    """Revoke a key: refused from the next request on; it stays listed, with the time."""
    try:
        with open_session() as session:
            t = tenant_holding(session, tenant, ApiKey, key_id, "key")
            row = revoke_api_key(session, t.id, key_id)
            session.commit()
    except DistillError as exc:
        fail(exc)
    console.print(f"key {row.prefix}… (id {row.id}) revoked")


@datasets_app.command("upload")
def datasets_upload(
    path: Annotated[Path, typer.Argument(help="A JSONL file: one JSON object per line.")],
    tenant: TenantOpt = "default",
    name: Annotated[
        str | None, typer.Option(help="The dataset's name (default: the file's name).")
    ] = None,
) -> None:
    """Upload a JSONL file (a bad line is named, and nothing is stored); prints the dataset
    id on the last line of stdout."""
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


DatasetArg = Annotated[
    uuid.UUID, typer.Argument(help="The dataset's id (see `distill datasets list`).")
]


def _newest_first(
    session: Session, tenant: str, model: type[Dataset] | type[Teacher], limit: int
) -> list[Any]:
    """The first `limit` rows of a tenant's datasets or teachers, newest first (the API's own
    pagination); an unknown tenant ends the command with its error."""
    try:
        t = _existing_tenant(session, tenant)
    except NotFound as exc:
        fail(exc)
    rows, _ = paginate(
        session,
        select(model).where(model.tenant_id == t.id),
        created_col=model.created_at,
        id_col=model.id,
        cursor=None,
        limit=limit,
    )
    return list(rows)


@datasets_app.command("list")
def datasets_list(tenant: TenantOpt = "default", limit: LimitOpt = 50) -> None:
    """The tenant's datasets, newest first: name, rows, fields, content hash."""
    with open_session() as session:
        rows = _newest_first(session, tenant, Dataset, limit)
        table = Table("name", "rows", "fields", "sha256", "created")
        table.add_column("id", no_wrap=True, min_width=36)
        for ds in rows:
            table.add_row(
                escape(ds.name),
                str(ds.row_count),
                escape(", ".join(str(f) for f in ds.fields)),
                ds.content_hash[:12],
                _when(ds.created_at),
                str(ds.id),
            )
    console.print(table)


@datasets_app.command("show")
def datasets_show(
    dataset_id: DatasetArg,
    tenant: TenantOpt = "default",
    rows: Annotated[
        int, typer.Option(min=0, max=100, help="Print this many of its first rows as JSONL.")
    ] = 5,
) -> None:
    """A dataset: its name, size, fields and content hash, and its first rows."""
    try:
        with open_session() as session:
            t = tenant_holding(session, tenant, Dataset, dataset_id, "dataset")
            ds = get_dataset(session, t.id, dataset_id)
            _details(
                [
                    ("id", ds.id),
                    ("name", ds.name),
                    ("rows", ds.row_count),
                    ("fields", ", ".join(str(f) for f in ds.fields)),
                    ("bytes", ds.size_bytes),
                    ("sha256", ds.content_hash),
                    ("created", _when(ds.created_at)),
                ]
            )
            for row in preview_rows(session, ds.id, rows):
                typer.echo(json.dumps(row.data, ensure_ascii=False))
    except DistillError as exc:
        fail(exc)


@datasets_app.command("delete")
def datasets_delete(dataset_id: DatasetArg, tenant: TenantOpt = "default") -> None:
    """Delete a dataset and its rows; refused while a job uses it (delete the job first)."""
    try:
        with open_session() as session:
            t = tenant_holding(session, tenant, Dataset, dataset_id, "dataset")
            delete_dataset(session, get_dataset(session, t.id, dataset_id))
            session.commit()
    except DistillError as exc:
        fail(exc)
    console.print(f"dataset {dataset_id} deleted")


TeacherArg = Annotated[
    str, typer.Argument(help="The teacher's name or id (see `distill teachers list`).")
]


def _teacher(session: Session, tenant: str, ref: str) -> Teacher:
    """A teacher by id or by name (names are unique in a tenant), with the tenant hint."""
    try:
        teacher_id = uuid.UUID(ref)
    except ValueError:
        return _teacher_named(session, tenant, ref)
    t = tenant_holding(session, tenant, Teacher, teacher_id, "teacher")
    return get_teacher(session, t.id, teacher_id)


def _teacher_named(session: Session, tenant: str, name: str) -> Teacher:
    found = session.scalar(
        select(Teacher)
        .join(Tenant, Teacher.tenant_id == Tenant.id)
        .where(Tenant.name == tenant, Teacher.name == name)
    )
    if found is not None:
        return found
    holders = list(
        session.scalars(
            select(Tenant.name)
            .join(Teacher, Teacher.tenant_id == Tenant.id)
            .where(Teacher.name == name)
            .order_by(Tenant.name)
        )
    )
    if holders:
        raise NotFound(
            f"no teacher named {name!r} in tenant {tenant!r}; tenant(s) with one: "
            f"{', '.join(holders)}: add --tenant {shlex.quote(holders[0])}"
        )
    _existing_tenant(session, tenant)
    raise NotFound(f"no teacher named {name!r} in tenant {tenant!r}, nor in any other")


def _read_secret() -> str:
    """The teacher's API key from stdin (its first line), so that it is in no shell history
    or process list: prompted for, hidden, on a terminal."""
    if sys.stdin.isatty():
        key = str(typer.prompt("API key", hide_input=True, err=True))
    else:
        key = sys.stdin.readline()
    if not key.strip():
        fail(ValidationFailed("--api-key-stdin: no key on stdin"))
    return key.strip()


@teachers_app.command("create")
def teachers_create(
    name: Annotated[
        str | None,
        typer.Option(help="A name, unique in the tenant; job specs can name the teacher by it."),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(help="The OpenAI-compatible base URL, e.g. http://vllm:8000/v1."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="The model name the server serves.")] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(help="The environment variable of the workers that holds the API key."),
    ] = None,
    api_key_stdin: Annotated[
        bool,
        typer.Option(
            "--api-key-stdin",
            help="Read the API key from stdin (prompted, hidden, on a terminal); stored "
            "encrypted, never shown again.",
        ),
    ] = False,
    structured_mode: Annotated[
        StructuredMode | None,
        typer.Option(help="How to ask for JSON output (default auto: the best the server has)."),
    ] = None,
    timeout_s: Annotated[
        float | None, typer.Option(min=0.001, max=3600, help="Seconds per request (default 120).")
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(min=1, max=50, help="Tries per request, transient errors (default 6)."),
    ] = None,
    replica_url: Annotated[
        list[str] | None,
        typer.Option(
            metavar="URL",
            help="Another server of the same model (repeat for each); requests are balanced "
            "over the base URL and these by their load.",
        ),
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            help="A YAML or JSON file with the body of POST /v1/teachers (limits, prices, "
            "generation, replica_urls, ...); the options above override its fields."
        ),
    ] = None,
    tenant: TenantOpt = "default",
) -> None:
    """Create a teacher (and the tenant, if new); prints its id on the last line of stdout.

    The CLI is the operator: a private or loopback base URL is allowed, as for
    `distill jobs create`."""
    from service.api.schemas import TeacherCreate

    # The fields of POST /v1/teachers, validated by the API's own schema below.
    document = (
        load_document(from_file, "teacher file", "name: ..., base_url: ..., model: ...")
        if from_file
        else {}
    )
    options = {
        "name": name,
        "base_url": base_url,
        "model": model,
        "api_key_env": api_key_env,
        "structured_mode": structured_mode,
        "timeout_s": timeout_s,
        "max_attempts": max_attempts,
        "replica_urls": replica_url or None,
    }
    document.update({k: v for k, v in options.items() if v is not None})
    if api_key_stdin:
        document["api_key"] = _read_secret()
    try:
        body = TeacherCreate.model_validate(document)
    except ValidationError as exc:
        fail(_invalid_teacher(exc))
    try:
        with open_session() as session:
            t = get_or_create_tenant(session, tenant)
            teacher = create_teacher(
                session,
                t.id,
                body.as_spec(),
                name=body.name,
                api_key=body.api_key,
                allow_private=True,  # the CLI is the operator
            )
            session.commit()
    except DistillError as exc:
        fail(exc)
    console.print(escape(f"teacher {teacher.name}: {teacher.model} at {teacher.base_url}"))
    typer.echo(str(teacher.id))


_TEACHER_OPTIONS = {
    "name",
    "base_url",
    "model",
    "api_key_env",
    "structured_mode",
    "timeout_s",
    "max_attempts",
}


def _invalid_teacher(exc: ValidationError) -> ValidationFailed:
    """The first problem, named as the option (or the file's field) that caused it."""
    details = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(p) for p in err["loc"])
        field = "--" + path.replace("_", "-") if path in _TEACHER_OPTIONS else path
        if path == "api_key":
            field = "--api-key-stdin"
        elif err["loc"][0] == "replica_urls":
            index = err["loc"][1] if len(err["loc"]) > 1 else None
            field = "--replica-url" + (f" #{int(index) + 1}" if isinstance(index, int) else "")
        details.append({"field": field, "message": err["msg"]})
    first = details[0]
    message = f"{first['field']}: {first['message']}"
    return ValidationFailed(message, details=details if len(details) > 1 else None)


def _key_source(teacher: Teacher) -> str:
    """Where the teacher's key comes from, never the key."""
    if teacher.api_key_encrypted:
        return "stored (encrypted)"
    if teacher.api_key_env:
        return f"env {teacher.api_key_env}"
    return "none"


@teachers_app.command("list")
def teachers_list(tenant: TenantOpt = "default", limit: LimitOpt = 50) -> None:
    """The tenant's teachers, newest first (teachers written inline in job specs included)."""
    with open_session() as session:
        rows = _newest_first(session, tenant, Teacher, limit)
        table = Table("name", "model", "base url", "api key", "created")
        table.add_column("id", no_wrap=True, min_width=36)
        for teacher in rows:
            table.add_row(
                escape(teacher.name),
                escape(teacher.model),
                escape(teacher.base_url),
                escape(_key_source(teacher)),
                _when(teacher.created_at),
                str(teacher.id),
            )
    console.print(table)


@teachers_app.command("show")
def teachers_show(teacher: TeacherArg, tenant: TenantOpt = "default") -> None:
    """A teacher's settings: endpoint, model, where its key comes from (never the key),
    limits, prices, generation parameters."""
    try:
        with open_session() as session:
            row = _teacher(session, tenant, teacher)
            _details(
                [
                    ("id", row.id),
                    ("name", row.name),
                    ("base url", row.base_url),
                    ("replicas", ", ".join(row.replica_urls or []) or "none"),
                    ("model", row.model),
                    ("api key", _key_source(row)),
                    ("private network", "allowed" if row.allow_private_network else "refused"),
                    ("structured mode", row.structured_mode),
                    ("timeout", f"{row.timeout_s:g} s"),
                    ("max attempts", row.max_attempts),
                    ("limits", json.dumps(row.limits, sort_keys=True)),
                    ("prices", json.dumps(row.prices, sort_keys=True)),
                    ("generation", json.dumps(row.generation, sort_keys=True)),
                    ("created", _when(row.created_at)),
                ]
            )
    except DistillError as exc:
        fail(exc)


@teachers_app.command("delete")
def teachers_delete(teacher: TeacherArg, tenant: TenantOpt = "default") -> None:
    """Delete a teacher and its cached calls; refused while a job uses it (delete the job
    first)."""
    try:
        with open_session() as session:
            row = _teacher(session, tenant, teacher)
            name, teacher_id = row.name, row.id
            delete_teacher(session, row)
            session.commit()
    except DistillError as exc:
        fail(exc)
    console.print(escape(f"teacher {name} ({teacher_id}) deleted"))


def load_spec_file(path: Path) -> dict[str, Any]:
    """A job spec file as a mapping; anything else is a clean error (exit 2) naming the file
    and, for a YAML syntax error, the line and column."""
    return load_document(path, "job spec", "name: ..., strategy: ..., task: ...")


def load_document(path: Path, what: str, example: str) -> dict[str, Any]:
    """A YAML (or JSON) file of a mapping, read as specs are (see `_SpecLoader`); anything
    else exits 2 naming the file and, for a YAML syntax error, the line and column."""
    data = read_input_file(path, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        fail(
            ValidationFailed(
                f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                f"save the {what} as UTF-8"
            )
        )
    try:
        raw = yaml.load(text, Loader=_SpecLoader)
    except yaml.YAMLError as exc:
        fail(ValidationFailed(f"{path}: {_yaml_problem(exc, text)}"))
    if raw is None:
        fail(ValidationFailed(f"{path}: the {what} is empty"))
    if not isinstance(raw, dict):
        kind = "a list" if isinstance(raw, list) else "a single value"
        fail(ValidationFailed(f"{path}: a {what} must be a YAML mapping ({example}), not {kind}"))
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
    spec_path: Annotated[
        Path,
        typer.Argument(
            help="The job spec (YAML or JSON); datasets by id, the teacher by id or inline."
        ),
    ],
    tenant: TenantOpt = "default",
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="The same key again returns the job it created, instead of another."),
    ] = None,
) -> None:
    """Create a job from a spec and queue it for the workers; prints its id on the last line
    of stdout. (`distill run` creates and runs one in this process, with dataset paths.)"""
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


@jobs_app.command("list")
def jobs_list(
    tenant: TenantOpt = "default",
    limit: LimitOpt = 50,
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs with this status.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Only jobs of this strategy.")] = None,
) -> None:
    """The tenant's jobs, newest first: status, iteration, best iteration, examples, cost."""
    with open_session() as session:
        try:
            t = _existing_tenant(session, tenant)
        except NotFound as exc:
            fail(exc)
        jobs, _ = list_jobs(session, t.id, status=status, strategy=strategy, limit=limit)
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


def _tenant_job(session: Session, tenant: str, job_id: uuid.UUID) -> Job:
    """The tenant's job, through the API's own lookup, after the tenant hint."""
    return get_job(session, tenant_holding(session, tenant, Job, job_id, "job").id, job_id)


@jobs_app.command("show")
def jobs_show(job_id: JobArg, tenant: TenantOpt = "default") -> None:
    """A job's status (and why) and each iteration: status, metric, examples accepted and
    rejected, teacher tokens and cost."""
    try:
        with open_session() as session:
            job = _tenant_job(session, tenant, job_id)
            console.print(  # names and reasons are user text, never markup
                escape(
                    f"{job.name} [{job.strategy}] {job.status.value}"
                    + (f" — {job.status_reason}" if job.status_reason else "")
                )
            )
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
            job = request_transition(session, _tenant_job(session, tenant, job_id), target)
            session.commit()
    except DistillError as exc:
        fail(exc)
    console.print(f"job {job.id}: {job.status.value}")


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobArg, tenant: TenantOpt = "default") -> None:
    """Cancel a job: it stops within one generation batch; what it stored is kept."""
    _transition_cmd(job_id, tenant, JobStatus.cancelled)


@jobs_app.command("pause")
def jobs_pause(job_id: JobArg, tenant: TenantOpt = "default") -> None:
    """Pause a queued or running job: its generation stops within one batch (the calls made
    are kept); `resume` continues it."""
    _transition_cmd(job_id, tenant, JobStatus.paused)


@jobs_app.command("resume")
def jobs_resume(job_id: JobArg, tenant: TenantOpt = "default") -> None:
    """Resume a paused job where it stopped."""
    _transition_cmd(job_id, tenant, JobStatus.running)


@jobs_app.command("delete")
def jobs_delete(job_id: JobArg, tenant: TenantOpt = "default") -> None:
    """Delete a finished job (succeeded, failed or cancelled) with its iterations, examples
    and export records; its teacher's cached calls and exported files stay. Cancel a running
    job first."""
    try:
        with open_session() as session:
            delete_job(session, _tenant_job(session, tenant, job_id))
            session.commit()
    except DistillError as exc:
        fail(exc)
    console.print(f"job {job_id} deleted")


@exports_app.command("list")
def exports_list(job_id: JobArg, tenant: TenantOpt = "default") -> None:
    """A job's exports, newest first: format, status, rows, the file written."""
    try:
        with open_session() as session:
            job = _tenant_job(session, tenant, job_id)
            exports = session.scalars(
                select(Export).where(Export.job_id == job.id).order_by(Export.created_at.desc())
            )
            table = Table("format", "status", "iteration", "rows", "created", "path")
            table.add_column("id", no_wrap=True, min_width=36)
            for export in exports:
                table.add_row(
                    export.format,
                    export.status.value,
                    "best" if export.iteration is None else str(export.iteration),
                    str(export.row_count),
                    _when(export.created_at),
                    escape(export.path or "-"),
                    str(export.id),
                )
    except DistillError as exc:
        fail(exc)
    console.print(table)


@exports_app.command("show")
def exports_show(
    export_id: Annotated[
        uuid.UUID, typer.Argument(help="The export's id (see `distill exports list JOB`).")
    ],
    tenant: TenantOpt = "default",
) -> None:
    """An export: its status (or error), the files written with their rows and sha256, and
    what it holds."""
    try:
        with open_session() as session:
            t = tenant_holding(session, tenant, Export, export_id, "export")
            export = get_export(session, t.id, export_id)
            files = (export.manifest or {}).get("files") or {}
            _details(
                [
                    ("id", export.id),
                    ("job", export.job_id),
                    ("format", export.format),
                    ("status", export.status.value),
                    ("error", export.error),
                    ("rows", export.row_count),
                    ("path", export.path),
                    *(
                        (
                            f"file {split}",
                            f"{f.get('file')} ({f.get('rows')} rows, "
                            f"sha256 {str(f.get('sha256'))[:12]})",
                        )
                        for split, f in files.items()
                    ),
                    ("holds", (export.manifest or {}).get("holds")),
                    ("created", _when(export.created_at)),
                ]
            )
    except DistillError as exc:
        fail(exc)
