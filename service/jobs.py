"""Jobs: creation from a spec (validated with the same code the workers run) and state changes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import tasks
from service.datasets import StoredRow, get_dataset, load_rows
from service.domain.spec import JobSpec, StudentSpec, StudentType, TaskKind, TaskSpec, TeacherSpec
from service.domain.statuses import (
    ITERATION_TERMINAL,
    JOB_TERMINAL,
    JOB_TRANSITIONS,
    IterationStatus,
    JobStatus,
)
from service.errors import Conflict, NotFound, ValidationFailed
from service.models import Dataset, Example, Iteration, Job, Teacher, utcnow
from service.pagination import paginate
from service.secrets import KeyEnvPolicy
from service.splits import (
    HELD_OUT_FRACTION,
    hold_out,
    label_text,
    labelled,
    min_class_rows_for_validation,
)
from service.teachers import (
    STUDENT_PRIVATE_HINT,
    TeacherUrlPolicy,
    check_base_url,
    create_teacher,
    find_teacher,
    teacher_not_found,
)
from service.webhooks import record_job_event

# The job spec key that says whether its endpoint student may reach a private address.
STUDENT_PRIVATE_KEY = "_student_allow_private_network"


def spec_errors(exc: ValidationError, prefix: str = "") -> list[dict[str, Any]]:
    return [
        {"field": prefix + ".".join(str(p) for p in err["loc"]), "message": err["msg"]}
        for err in exc.errors(include_url=False)
    ]


def parse_spec(raw: Any) -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        details = spec_errors(exc)
        raise ValidationFailed(
            f"invalid job spec: {details[0]['field']}: {details[0]['message']}", details=details
        ) from exc


def _spec_hash(spec: JobSpec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


def _dataset_ref(session: Session, tenant_id: uuid.UUID, ref: str, field: str) -> Dataset:
    """A job spec's dataset: the tenant's dataset with this id or, failing that, this name.
    A name several datasets share (uploads of different content under one name) is refused
    with their ids, never guessed."""
    with contextlib.suppress(ValueError, NotFound):
        return get_dataset(session, tenant_id, uuid.UUID(ref))
    named = list(
        session.scalars(
            select(Dataset)
            .where(Dataset.tenant_id == tenant_id, Dataset.name == ref)
            .order_by(Dataset.created_at, Dataset.id)
            .limit(MAX_NAME_CANDIDATES + 1)
        )
    )
    if len(named) == 1:
        return named[0]
    if not named:
        raise ValidationFailed(
            f"{field}: no dataset with the id or name {ref!r}; GET /v1/datasets lists yours, "
            "POST /v1/datasets?name=... uploads one",
            details=[{"field": field, "message": f"dataset not found: {ref}"}],
            code="dataset_not_found",
        )
    ids = [str(ds.id) for ds in named[:MAX_NAME_CANDIDATES]]
    more = " and more" if len(named) > MAX_NAME_CANDIDATES else ""
    raise ValidationFailed(
        f"{field}: several datasets are named {ref!r} ({', '.join(ids)}{more}); give one's id",
        details=[{"field": field, "message": f"ambiguous name {ref!r}", "candidates": ids}],
        code="ambiguous_name",
    )


# How many of the datasets sharing an ambiguous name the error lists.
MAX_NAME_CANDIDATES = 10


def _validate_strategy_params(spec: JobSpec) -> dict[str, Any]:
    from service.domain.strategies import validate_params

    try:
        return validate_params(spec.strategy, spec.params, spec.task).model_dump(mode="json")
    except ValueError as exc:
        raise ValidationFailed(
            f"params: {exc}", details=[{"field": "params", "message": str(exc)}]
        ) from exc


MAX_ROW_ERRORS = 20


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _as_written(value: Any) -> str:
    """A value as it is written in the uploaded JSON (1, true, "x"), not as Python shows it."""
    return json.dumps(value, ensure_ascii=False)


def _line(row: StoredRow) -> int:
    return row.index + 1  # rows are stored at their 0-based line of the upload


def _row_problems(task: TaskSpec, row: StoredRow) -> list[str]:
    problems: list[str] = []
    text = row.data.get(task.input_field)
    if text is None:
        problems.append(
            f"{task.input_field!r} is {'null' if task.input_field in row.data else 'missing'}"
        )
    elif not isinstance(text, str):
        problems.append(f"{task.input_field!r} must be a string, got {_json_type(text)}")
    out = row.data.get(task.output_field)
    ok: tuple[type, ...]
    if task.kind is TaskKind.classification:
        wanted, ok = "a label (a string, an integer or true/false)", (str, int)
    else:
        wanted, ok = "a string or a number", (str, int, float)
    if out is None:
        state = "null" if task.output_field in row.data else "missing"
        problems.append(f"{task.output_field!r} is {state}; every row needs {wanted}")
    elif not isinstance(out, ok) or (
        task.kind is not TaskKind.classification and isinstance(out, bool)
    ):
        problems.append(f"{task.output_field!r} must be {wanted}, got {_json_type(out)}")
    return problems


def _check_rows(task: TaskSpec, rows: dict[str, list[StoredRow]]) -> None:
    """Every row must carry the task's input text and output: a row the loop would skip (or a
    class named "None") is a mistake in the upload, named by dataset, line and field."""
    errors: list[dict[str, Any]] = []
    for role, dataset_rows in rows.items():
        for row in dataset_rows:
            for problem in _row_problems(task, row):
                errors.append({"field": f"datasets.{role}", "line": _line(row), "message": problem})
            if len(errors) >= MAX_ROW_ERRORS:
                break
        if len(errors) >= MAX_ROW_ERRORS:
            break
    if errors:
        first = errors[0]
        raise ValidationFailed(
            f"{first['field']} line {first['line']}: {first['message']}",
            details=errors[:MAX_ROW_ERRORS],
        )


def _labels_of(dataset_rows: list[StoredRow], field: str) -> dict[str, tuple[Any, int]]:
    """Each label's text (how the loop compares labels) → (its first value as written, line)."""
    seen: dict[str, tuple[Any, int]] = {}
    for row in dataset_rows:
        value = row.data[field]
        seen.setdefault(label_text(value), (value, _line(row)))
    return seen


def _unknown(seen: dict[str, tuple[Any, int]], known: set[str]) -> str | None:
    missing = sorted(text for text in seen if text not in known)
    if not missing:
        return None
    shown = missing[:20]
    values = ", ".join(_as_written(seen[t][0]) for t in shown)
    lines = ", ".join(str(seen[t][1]) for t in shown)
    more = f" and {len(missing) - len(shown)} more" if len(missing) > len(shown) else ""
    message = f"not listed: [{values}]{more} (first on line{'s' if len(shown) > 1 else ''} {lines})"
    as_text = [
        f"{_as_written(seen[t][0])} is {_as_written(t)}"
        for t in shown
        if not isinstance(seen[t][0], str)
    ]
    if as_text:
        message += f"; labels are compared as text: {', '.join(as_text)}"
    return message


def _label_set(task: TaskSpec, rows: dict[str, list[StoredRow]]) -> TaskSpec:
    """The classification label set (given, or inferred from train); every row's label in it."""
    if task.kind is not TaskKind.classification:
        return task
    seen = _labels_of(rows["train"], task.output_field)
    if task.labels is None:
        if len(seen) < 2:
            raise ValidationFailed(
                "task.labels: the train set has fewer than two labels",
                details=[
                    {
                        "field": "task.labels",
                        "message": f"seen [{', '.join(_as_written(v) for v, _ in seen.values())}]",
                    }
                ],
            )
        task = task.model_copy(update={"labels": sorted(seen)})
        source = "the labels of datasets.train"
    else:
        unknown = _unknown(seen, set(task.labels))
        if unknown:
            raise ValidationFailed(
                "datasets.train: labels outside task.labels",
                details=[{"field": "task.labels", "message": unknown}],
            )
        source = "task.labels"
    known = set(task.labels or ())
    for role in ("validation", "test"):
        if role in rows:
            unknown = _unknown(_labels_of(rows[role], task.output_field), known)
            if unknown:
                raise ValidationFailed(
                    f"datasets.{role}: labels outside {source}",
                    details=[{"field": f"datasets.{role}", "message": unknown}],
                )
    return task


def _check_held_out(spec: JobSpec, train_rows: list[StoredRow]) -> None:
    """Without a validation dataset the loop holds out a slice of train (splits.hold_out, the
    function the workers use); when that slice is empty every evaluation would measure nothing."""
    _, held_out = hold_out(
        labelled(train_rows, spec, "train"),
        spec.seed,
        stratified=spec.task.kind is TaskKind.classification,
    )
    if held_out:
        return
    n = min_class_rows_for_validation()
    share = f"{HELD_OUT_FRACTION:.0%}"
    if spec.task.kind is TaskKind.classification:
        how = (
            f"give datasets.validation, or at least {n} train rows per class ({share} of each "
            f"class with {n} or more rows is held out for validation)"
        )
    else:
        how = (
            f"give datasets.validation, or at least {n} train rows ({share} of them is held "
            "out for validation)"
        )
    raise ValidationFailed(
        f"datasets.validation: no validation rows: {how}",
        details=[
            {
                "field": "datasets.validation",
                "message": f"the held-out split of datasets.train is empty; {how}",
            }
        ],
    )


# The teachers.name column (service/models.py); an inline teacher is "<job name>-<8 hex>".
TEACHER_NAME_MAX = 200


def _inline_teacher_name(job_name: str) -> str:
    suffix = f"-{uuid.uuid4().hex[:8]}"
    return job_name[: TEACHER_NAME_MAX - len(suffix)] + suffix


LOCAL_TEACHER = "local"


def _job_teacher(
    session: Session,
    tenant_id: uuid.UUID,
    spec: JobSpec,
    *,
    allow_private: bool,
    policy: TeacherUrlPolicy | None,
    local_teacher: TeacherSpec | None,
) -> Teacher:
    """The teacher row a job uses: a stored one by id or name, or a new one for an inline
    teacher (or the server's local teacher, whose URL the operator configured)."""
    inline = spec.teacher
    if isinstance(inline, str):
        stored = find_teacher(session, tenant_id, inline)
        if stored is not None:
            return stored
        if inline != LOCAL_TEACHER:
            hint = ", or teacher: local where the server runs a local teacher"
            raise teacher_not_found(inline, local_hint=hint)
        if local_teacher is None:
            raise ValidationFailed(
                "teacher: this server runs no local teacher; give a teacher's name or id "
                "(GET /v1/teachers) or an inline teacher (base_url, model), or have the operator "
                "start one (`distill teachers local --port P`) and set "
                "DISTILL_API__LOCAL_TEACHER_URL to the base_url it prints",
                details=[{"field": "teacher", "message": "no local teacher is configured"}],
                code="no_local_teacher",
            )
        inline, allow_private = local_teacher, True  # configured by the operator
    elif not allow_private and policy is not None:
        allow_private = policy.allows_all([inline.base_url, *inline.replica_urls])
    return create_teacher(
        session,
        tenant_id,
        inline,
        name=_inline_teacher_name(spec.name),
        allow_private=allow_private,
    )


def _check_student_endpoint(
    student: StudentSpec,
    allow_private: bool,
    policy: TeacherUrlPolicy | None,
    key_envs: KeyEnvPolicy,
) -> bool | None:
    """A served student is a model server like a teacher: the workers send it every validation
    row and store what it answers, so a tenant may not point it inside the network (the
    teacher's SSRF guard and operator policy), nor name a variable whose value it must not get.
    Whether its URL may reach a private address (the workers check every connection when not:
    a name can resolve elsewhere later), or None for another kind of student."""
    if student.type is not StudentType.endpoint or student.base_url is None:
        return None
    allowed = allow_private or (policy is not None and policy.allows(student.base_url))
    check_base_url(
        student.base_url,
        allow_private=allowed,
        field="student.base_url",
        private_hint=STUDENT_PRIVATE_HINT + ", or create the job through the CLI",
    )
    key_envs.check(student.api_key_env, [student.base_url], field="student.api_key_env")
    return allowed


def create_job(
    session: Session,
    tenant_id: uuid.UUID,
    spec: JobSpec,
    *,
    idempotency_key: str | None = None,
    allow_private_teacher: bool = False,
    allow_trainer_command: bool = False,
    teacher_policy: TeacherUrlPolicy | None = None,
    key_envs: KeyEnvPolicy | None = None,
    local_teacher: TeacherSpec | None = None,
) -> tuple[Job, bool]:
    """Returns (job, created). A repeated Idempotency-Key with the same spec returns the job.

    `datasets.*` and a `teacher` string are ids or names of the tenant's datasets and
    teachers. `teacher: local` is the tenant's teacher named "local" if there is one, else
    `local_teacher`, the server's own (`DISTILL_API__LOCAL_TEACHER_URL`; `distill run` starts
    one itself). An inline teacher, or an endpoint student, may use a private address when
    `allow_private_teacher` (the CLI: the operator) or `teacher_policy` (the API's settings)
    allows its URL; their `api_key_env` must be one `key_envs` lets tenants send to their URLs
    (default: any for the operator, none otherwise)."""
    if key_envs is None:
        key_envs = KeyEnvPolicy(allow_all=allow_private_teacher)
    if spec.student.trainer_command and not allow_trainer_command:
        raise ValidationFailed(
            "student.trainer_command: only an operator can make the workers run a command "
            "(distill jobs create / distill run, or DISTILL_API__ALLOW_TRAINER_COMMANDS=true)",
            details=[{"field": "student.trainer_command", "message": "not allowed"}],
        )
    student_private = _check_student_endpoint(
        spec.student, allow_private_teacher, teacher_policy, key_envs
    )
    if not isinstance(spec.teacher, str):
        key_envs.check(
            spec.teacher.api_key_env,
            [spec.teacher.base_url, *spec.teacher.replica_urls],
            field="teacher.api_key_env",
        )
    spec_hash = _spec_hash(spec)
    if idempotency_key:
        existing = session.scalar(
            select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
        )
        if existing is not None:
            if existing.spec.get("_hash") != spec_hash:
                raise Conflict(
                    "Idempotency-Key was already used with a different job spec",
                    details=[{"field": "Idempotency-Key", "message": idempotency_key}],
                )
            return existing, False

    train = _dataset_ref(session, tenant_id, spec.datasets.train, "datasets.train")
    validation = (
        _dataset_ref(session, tenant_id, spec.datasets.validation, "datasets.validation")
        if spec.datasets.validation
        else None
    )
    test = (
        _dataset_ref(session, tenant_id, spec.datasets.test, "datasets.test")
        if spec.datasets.test
        else None
    )
    for field_name in (spec.task.input_field, spec.task.output_field):
        for ref_field, ds in (("train", train), ("validation", validation), ("test", test)):
            if ds is not None and field_name not in ds.fields:
                raise ValidationFailed(
                    f"datasets.{ref_field}: rows have no field {field_name!r}",
                    details=[
                        {"field": f"datasets.{ref_field}", "message": f"fields are {ds.fields}"}
                    ],
                )

    datasets = {"train": train, "validation": validation, "test": test}
    rows = {role: load_rows(session, ds.id) for role, ds in datasets.items() if ds is not None}
    _check_rows(spec.task, rows)
    task = _label_set(spec.task, rows)
    if validation is None:
        _check_held_out(spec.model_copy(update={"task": task}), rows["train"])
    params = _validate_strategy_params(spec)

    teacher = _job_teacher(
        session,
        tenant_id,
        spec,
        allow_private=allow_private_teacher,
        policy=teacher_policy,
        local_teacher=local_teacher,
    )

    stored = spec.model_copy(update={"task": task, "params": params}).model_dump(mode="json")
    # What the job runs on, by id: a name may later be reused by another upload or teacher.
    stored["teacher"] = str(teacher.id)
    stored["datasets"] = {role: str(ds.id) if ds else None for role, ds in datasets.items()}
    stored["_hash"] = spec_hash
    if student_private is not None:
        # Read by the workers (JobContext.student_public_only), never by a tenant.
        stored[STUDENT_PRIVATE_KEY] = student_private
    job = Job(
        tenant_id=tenant_id,
        name=spec.name,
        strategy=spec.strategy,
        spec=stored,
        status=JobStatus.queued,
        idempotency_key=idempotency_key,
        teacher_id=teacher.id,
        train_dataset_id=train.id,
        validation_dataset_id=validation.id if validation else None,
        test_dataset_id=test.id if test else None,
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError as exc:  # a concurrent request with the same Idempotency-Key won
        raise Conflict(
            "a job with this Idempotency-Key is being created; retry the request",
            details=[{"field": "Idempotency-Key", "message": idempotency_key}],
        ) from exc
    tasks.enqueue(session, tasks.JOB_START, str(job.id))
    return job, True


def get_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id} not found")
    return job


def list_jobs(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    status: JobStatus | None = None,
    strategy: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[list[Job], str | None]:
    """One page of a tenant's jobs, newest first, and the cursor of the next page (the REST
    list and the dashboard read through this one function, so they see the same jobs)."""
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if strategy is not None:
        stmt = stmt.where(Job.strategy == strategy)
    return paginate(
        session, stmt, created_col=Job.created_at, id_col=Job.id, cursor=cursor, limit=limit
    )


def list_iterations(session: Session, job: Job) -> list[Iteration]:
    stmt = select(Iteration).where(Iteration.job_id == job.id).order_by(Iteration.number)
    return list(session.scalars(stmt))


def get_iteration(session: Session, job: Job, number: int) -> Iteration:
    iteration = session.scalar(
        select(Iteration).where(Iteration.job_id == job.id, Iteration.number == number)
    )
    if iteration is None:
        raise NotFound(f"iteration {number} of job {job.id} not found")
    return iteration


def lock_job(session: Session, job_id: uuid.UUID) -> bool:
    """Lock a job's row for the rest of the transaction; False when there is no such job.

    The lock order of every writer of a job's rows: the job first, then its iterations and
    batches, as a cancel (`transition_job`) takes them. A step that wrote a batch or an
    iteration and then waited for the job deadlocked with a cancel. The lock is FOR NO KEY
    UPDATE, the one an UPDATE of the row takes, not FOR UPDATE: an insert of an example or
    a teacher call takes KEY SHARE locks on the rows its foreign keys name (the job, the
    iteration, the batch), which FOR UPDATE waits for, so a batch closing beside an insert
    deadlocked (the insert held the iteration and waited for the job, the close the
    reverse). Take it before the transaction's first write; changes not flushed yet stay so
    (and are written after it). Objects already loaded are not refreshed.
    """
    with session.no_autoflush:
        locked = session.execute(
            select(Job.id).where(Job.id == job_id).with_for_update(key_share=True)
        ).scalar()
    return locked is not None


def next_example_seq(session: Session, job_id: uuid.UUID) -> int:
    """The number a write of the job's examples gives its rows (`Example.seq`). Call it under
    the job's lock (`lock_job`), which every writer of examples holds until it commits: the
    numbers then follow the commit order, and a reader that saw number n has seen every row
    numbered below it."""
    last = session.scalar(select(func.max(Example.seq)).where(Example.job_id == job_id))
    return int(last or 0) + 1


def transition_job(
    session: Session, job: Job, target: JobStatus, *, reason: str | None = None
) -> bool:
    """Compare-and-set on the status: returns False (no change) when another writer won.
    Its update takes the job's row before the job's iterations (see `lock_job`)."""
    allowed_from = [s for s, targets in JOB_TRANSITIONS.items() if target in targets]
    values: dict[str, Any] = {"status": target, "updated_at": utcnow()}
    if reason is not None or target in (JobStatus.running, JobStatus.queued):
        values["status_reason"] = reason
    if target is JobStatus.running and job.started_at is None:
        values["started_at"] = utcnow()
    if target in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled):
        values["finished_at"] = utcnow()
    elif job.status is JobStatus.succeeded:  # reopened by a refresh
        values["finished_at"] = None
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == job.status, Job.status.in_(allowed_from))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    changed = bool(getattr(result, "rowcount", 0))
    if changed and target in (JobStatus.failed, JobStatus.cancelled):
        # The iteration under way ends with its job, so no row keeps saying "generating".
        ended = IterationStatus.failed if target is JobStatus.failed else IterationStatus.cancelled
        session.execute(
            update(Iteration)
            .where(Iteration.job_id == job.id, Iteration.status.not_in(ITERATION_TERMINAL))
            .values(status=ended, updated_at=utcnow(), finished_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    session.refresh(job)
    if changed:
        record_job_event(session, job)  # job.completed / job.failed webhooks, if subscribed
    return changed


def delete_job(session: Session, job: Job) -> None:
    """Delete a finished job with its iterations, batches, examples, predictions and exports
    (database cascades). Its teacher calls stay in the teacher's cache, detached from the job;
    exported files stay on disk. A job still running, queued or paused must be cancelled
    first, so no worker is writing to what is deleted."""
    if job.status not in JOB_TERMINAL:
        raise Conflict(
            f"cannot delete a job that is {job.status.value}: cancel it first",
            details=[{"field": "status", "message": job.status.value}],
        )
    session.execute(delete(Job).where(Job.id == job.id))


def request_transition(session: Session, job: Job, target: JobStatus) -> Job:
    """A user's cancel/pause/resume; 409 when the current status does not allow it.

    `target` is what the user asked for: cancelled, paused, or running (resume). Only a
    paused job can be resumed: queued → running is a worker starting the job, not a resume.
    """
    requested = target
    if target is JobStatus.running:  # resume: the worker picks up where the job stopped
        allowed = job.status is JobStatus.paused
        target = JobStatus.queued if job.started_at is None else JobStatus.running
    else:
        allowed = target in JOB_TRANSITIONS[job.status]
    if not allowed:
        raise Conflict(
            f"cannot {_verb(requested)} a job that is {job.status.value}",
            details=[{"field": "status", "message": _why_not(requested, job.status)}],
        )
    if not transition_job(session, job, target):
        raise Conflict(
            "the job changed concurrently; retry",
            details=[{"field": "status", "message": f"the job is now {job.status.value}"}],
        )
    if target in (JobStatus.running, JobStatus.queued):
        tasks.enqueue(session, tasks.JOB_START, str(job.id))
    return job


def _verb(target: JobStatus) -> str:
    return {JobStatus.cancelled: "cancel", JobStatus.paused: "pause"}.get(target, "resume")


def _why_not(requested: JobStatus, status: JobStatus) -> str:
    if requested is JobStatus.running:
        return f"the job is {status.value}; only a paused job can be resumed"
    froms = " or ".join(sorted(s.value for s, to in JOB_TRANSITIONS.items() if requested in to))
    return f"the job is {status.value}; only a job that is {froms} can be {requested.value}"
