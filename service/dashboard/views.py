"""What the dashboard's pages show, assembled from the same service functions as the REST API.

Every read starts from a job found for the session's tenant (`service.jobs.get_job`,
`list_jobs`), so another tenant's job is a 404 here exactly as it is over REST.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.dashboard import charts
from service.domain.export_formats import ALL_FORMATS, DPO_SOURCES, PREFERENCE_FORMATS
from service.domain.statuses import (
    ITERATION_TERMINAL,
    JOB_TERMINAL,
    ExportStatus,
    IterationStatus,
    JobStatus,
)
from service.jobs import list_iterations
from service.models import Export, Iteration, Job, Teacher
from service.splits import without_private_keys

# The stopping rule's reasons (service/domain/strategies/base.py) in words.
_STOP_REASONS = {
    "max_iterations": "the iteration budget was used up",
    "patience": "the metric stopped improving (patience ran out)",
    "target_reached": "the student reached the target metric",
    "no_targets": "the strategy found nothing left to ask the teacher for",
    "max_examples": "the example budget was reached",
    "stopping rule": "the stopping rule ended it",
}

# Why a generation target exists (GenerationTarget.reason), in words.
TARGET_REASONS = {
    "wrong_seed": "the student got this seed row wrong (LLM2LLM)",
    "weak_class": "the student's F1 on this class was among the weakest (PGKD)",
    "confused_pair": "the student confused these two classes (PGKD)",
    "rationale": "a seed row that needs a rationale",
    "rationale_hint": "a seed row the student got wrong, rationale with the answer as a hint",
    "draft": "ARTE draft: candidate demonstrations to score with the student",
    "aligned": "ARTE: written after the student scored the drafts",
}

# The export formats in the order the form offers them (the first is the default).
EXPORT_FORMAT_ORDER = ("jsonl", "lineage", "chat", "dpo")

ACTIVE_ITERATION = frozenset(set(IterationStatus) - set(ITERATION_TERMINAL))


def words_for_reason(reason: str | None) -> str | None:
    if not reason:
        return None
    head, sep, rest = reason.partition(";")
    return _STOP_REASONS.get(head.strip(), head) + (sep + rest if sep else "")


def _budget(job: Job) -> dict[str, Any]:
    budget = job.spec.get("budget")
    return budget if isinstance(budget, dict) else {}


def max_iterations(job: Job) -> int | None:
    value = _budget(job).get("max_iterations")
    return value if isinstance(value, int) else None


def status_sentence(job: Job, iterations: Sequence[Iteration]) -> str:
    """The job's state and why, as a sentence a user reads first."""
    reason = words_for_reason(job.status_reason)
    current = next((it for it in reversed(iterations) if it.status in ACTIVE_ITERATION), None)
    if job.status is JobStatus.queued:
        return "Queued: waiting for a worker to start it." + (f" ({reason})" if reason else "")
    if job.status is JobStatus.running:
        if current is None:
            text = "Running: planning the next iteration."
        elif current.number == 0:
            text = "Running: training and evaluating the student on the seed set alone."
        else:
            text = f"Running iteration {current.number}: {_phase_words(current)}."
        return text + (f" Note: {reason}." if reason else "")
    if job.status is JobStatus.paused:
        return "Paused: no new teacher calls are made. Resume to continue where it stopped."
    if job.status is JobStatus.succeeded:
        text = f"Finished: {reason}." if reason else "Finished."
        if job.best_iteration is not None:
            text += f" The export holds the dataset of iteration {job.best_iteration}."
        return text
    if job.status is JobStatus.failed:
        return f"Failed: {reason}." if reason else "Failed."
    return f"Cancelled: {reason}." if reason else "Cancelled by a user."


def _phase_words(it: Iteration) -> str:
    status = it.status
    if status is IterationStatus.generating:
        done, total = it.batches_done, it.batches_total
        phase = f" ({it.phase} phase)" if it.phase and it.phase != "generate" else ""
        return f"the teacher is writing examples{phase}, {done} of {total} batches done"
    if status is IterationStatus.evaluating:
        return "training and evaluating the student"
    if status is IterationStatus.training:
        return "training the student"
    if status is IterationStatus.scoring:
        return "the student is scoring the teacher's drafts"
    if status is IterationStatus.awaiting_feedback:
        return "waiting for your trainer to post the student's predictions"
    return status.value.replace("_", " ")


def selection(it: Iteration) -> tuple[bool, str]:
    """(excluded, why): whether the iteration's data is out of the exported dataset, in words.

    The decision rule's own sentence (`selection_reason`) when the row has one; otherwise what
    the flags say."""
    reason = it.selection_reason
    excluded = not it.included
    if isinstance(reason, str) and reason.strip():
        return excluded, reason.strip()
    if it.number == 0:
        return False, "seed-only baseline"
    if excluded:
        if it.regressed:
            return True, "excluded: its data lowered the metric below the best before it"
        return True, "excluded from the exported dataset"
    if it.status is not IterationStatus.completed:
        return False, "in progress" if it.status in ACTIVE_ITERATION else it.status.value
    return False, "included"


# --- jobs list -------------------------------------------------------------------------------


@dataclass
class JobSummary:
    job: Job
    teacher: str
    best_metric: float | None
    max_iterations: int | None

    @property
    def active(self) -> bool:
        return self.job.status not in JOB_TERMINAL


def summarize_jobs(session: Session, jobs: Sequence[Job]) -> list[JobSummary]:
    """Each listed job with its teacher and best metric (read by the ids of jobs already found
    for the tenant, two queries for the whole page)."""
    teacher_ids = {j.teacher_id for j in jobs}
    teachers = {
        t.id: t for t in session.scalars(select(Teacher).where(Teacher.id.in_(teacher_ids)))
    }
    best: dict[uuid.UUID, float | None] = {}
    wanted = {(j.id, j.best_iteration) for j in jobs if j.best_iteration is not None}
    if wanted:
        rows = session.execute(
            select(Iteration.job_id, Iteration.number, Iteration.metric).where(
                Iteration.job_id.in_({job_id for job_id, _ in wanted})
            )
        )
        best = {job_id: metric for job_id, number, metric in rows if (job_id, number) in wanted}
    out = []
    for job in jobs:
        teacher = teachers.get(job.teacher_id)
        out.append(
            JobSummary(
                job=job,
                teacher=f"{teacher.model}" if teacher is not None else "?",
                best_metric=best.get(job.id),
                max_iterations=max_iterations(job),
            )
        )
    return out


def list_signature(summaries: Sequence[JobSummary]) -> str:
    return _digest(
        [
            (
                str(s.job.id),
                s.job.status.value,
                s.job.current_iteration,
                s.job.examples_accepted,
                s.job.examples_rejected,
                s.job.tokens_in + s.job.tokens_out,
                s.best_metric,
            )
            for s in summaries
        ]
    )


# --- one job -------------------------------------------------------------------------------


@dataclass
class IterationView:
    it: Iteration
    best: bool
    excluded: bool
    selection: str

    @property
    def number(self) -> int:
        return self.it.number

    @property
    def duration_s(self) -> float | None:
        start, end = self.it.started_at, self.it.finished_at
        if start is None or end is None:
            return None
        return max((_aware(end) - _aware(start)).total_seconds(), 0.0)


@dataclass
class ExportView:
    export: Export

    @property
    def ready(self) -> bool:
        return self.export.status is ExportStatus.succeeded and bool(self.export.path)

    @property
    def pending(self) -> bool:
        return self.export.status in (ExportStatus.pending, ExportStatus.running)


@dataclass
class JobPage:
    job: Job
    teacher: Teacher | None
    iterations: list[IterationView]
    metric_name: str
    metric_chart: charts.LineChart | None
    outcome_chart: charts.BarChart | None
    token_chart: charts.BarChart | None
    heatmap: charts.Heatmap | None
    confused_pairs: list[dict[str, Any]]
    confused_at: int | None
    current: Iteration | None
    exports: list[ExportView]
    export_formats: list[str]
    spec_yaml: str
    sentence: str

    @property
    def active(self) -> bool:
        return self.job.status not in JOB_TERMINAL

    @property
    def live(self) -> bool:
        """Whether the page keeps polling: the job or an export is still moving."""
        return self.active or any(e.pending for e in self.exports)

    @property
    def signature(self) -> str:
        return job_signature(self.job, [v.it for v in self.iterations], self.exports)

    @property
    def can_pause(self) -> bool:
        return self.job.status in (JobStatus.queued, JobStatus.running)

    @property
    def can_resume(self) -> bool:
        return self.job.status is JobStatus.paused

    @property
    def can_cancel(self) -> bool:
        return self.job.status not in JOB_TERMINAL

    @property
    def can_delete(self) -> bool:
        return self.job.status in JOB_TERMINAL


def job_exports(session: Session, job: Job) -> list[ExportView]:
    stmt = select(Export).where(Export.job_id == job.id).order_by(Export.created_at.desc())
    return [ExportView(e) for e in session.scalars(stmt)]


def job_signature(job: Job, iterations: Sequence[Iteration], exports: Sequence[ExportView]) -> str:
    """A short digest of everything the job page shows that can change while it is open."""
    return _digest(
        [
            job.status.value,
            job.status_reason,
            job.best_iteration,
            job.examples_accepted,
            job.examples_rejected,
            job.tokens_in + job.tokens_out,
            [
                (
                    it.number,
                    it.status.value,
                    it.phase,
                    it.metric,
                    it.batches_done,
                    it.batches_total,
                    it.examples_accepted,
                    it.examples_rejected,
                    it.tokens_in + it.tokens_out,
                    it.included,
                    it.selection_reason,
                )
                for it in iterations
            ],
            [(str(e.export.id), e.export.status.value) for e in exports],
        ]
    )


def _digest(value: Any) -> str:
    blob = json.dumps(value, default=str, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _metric_name(job: Job) -> str:
    stopping = job.spec.get("stopping")
    metric = stopping.get("metric") if isinstance(stopping, dict) else None
    return str(metric or "accuracy").replace("_", " ")


def _test_metric(it: Iteration, metric: str) -> float | None:
    report = it.test_metrics or {}
    key = metric.replace(" ", "_")
    value = report.get(key, report.get("accuracy"))
    return float(value) if isinstance(value, int | float) else None


def job_page(session: Session, job: Job) -> JobPage:
    iterations = list_iterations(session, job)
    views = []
    for it in iterations:
        excluded, why = selection(it)
        views.append(
            IterationView(
                it=it, best=it.number == job.best_iteration, excluded=excluded, selection=why
            )
        )
    metric_name = _metric_name(job)
    points = [
        charts.MetricPoint(
            iteration=v.number,
            value=v.it.metric,
            best=v.best,
            excluded=v.excluded,
            note=v.selection,
        )
        for v in views
    ]
    tests = {v.number: t for v in views if (t := _test_metric(v.it, metric_name)) is not None}
    measured = [p for p in points if p.value is not None]
    metric_chart = charts.metric_chart(points, secondary=tests) if measured else None

    generated = [v for v in views if v.number > 0]
    reasons = sorted(
        {r for v in generated for r in (v.it.rejected_by_reason or {})},
        key=lambda r: (-sum(int((v.it.rejected_by_reason or {}).get(r, 0)) for v in generated), r),
    )
    outcome_chart = None
    if any(v.it.examples_accepted or v.it.examples_rejected for v in generated):
        outcome_chart = charts.stacked_bars(
            [
                (
                    v.number,
                    {
                        "accepted": float(v.it.examples_accepted),
                        **{
                            f"rejected: {r}": float(n)
                            for r, n in (v.it.rejected_by_reason or {}).items()
                        },
                    },
                )
                for v in generated
            ],
            ["accepted", *[f"rejected: {r}" for r in reasons]],
            colors={"accepted": charts.ACCEPTED_COLOR},
        )
    token_chart = None
    if any(v.it.tokens_in or v.it.tokens_out for v in generated):
        token_chart = charts.stacked_bars(
            [
                (
                    v.number,
                    {
                        "input tokens": float(v.it.tokens_in),
                        "output tokens": float(v.it.tokens_out),
                    },
                )
                for v in generated
            ],
            ["input tokens", "output tokens"],
            colors={"input tokens": "#56B4E9", "output tokens": "#0072B2"},
        )

    heat, pairs, pairs_at = _per_class(views)
    current = next((it for it in reversed(iterations) if it.status in ACTIVE_ITERATION), None)
    formats = [f for f in EXPORT_FORMAT_ORDER if f in ALL_FORMATS]
    formats += sorted(ALL_FORMATS - set(formats))
    if job.strategy not in DPO_SOURCES:  # no preference pairs to export
        formats = [f for f in formats if f not in PREFERENCE_FORMATS]
    return JobPage(
        job=job,
        teacher=session.get(Teacher, job.teacher_id),
        iterations=views,
        metric_name=metric_name,
        metric_chart=metric_chart,
        outcome_chart=outcome_chart,
        token_chart=token_chart,
        heatmap=heat,
        confused_pairs=pairs,
        confused_at=pairs_at,
        current=current,
        exports=job_exports(session, job),
        export_formats=formats,
        spec_yaml=spec_yaml(job),
        sentence=status_sentence(job, iterations),
    )


MAX_CONFUSED_PAIRS = 10


def _per_class(
    views: Sequence[IterationView],
) -> tuple[charts.Heatmap | None, list[dict[str, Any]], int | None]:
    """The per-class F1 heatmap across iterations, and the most confused pairs of the latest
    evaluated iteration (classification jobs: `Iteration.metrics` holds the report)."""
    evaluated = [v for v in views if isinstance((v.it.metrics or {}).get("per_class"), dict)]
    if not evaluated:
        return None, [], None
    classes = sorted({c for v in evaluated for c in v.it.metrics["per_class"]})  # type: ignore[index]
    values: dict[tuple[str, int], float] = {}
    for v in evaluated:
        for cls, m in (v.it.metrics or {})["per_class"].items():
            f1 = m.get("f1") if isinstance(m, dict) else None
            if isinstance(f1, int | float):
                values[(cls, v.number)] = float(f1)
    heat = charts.heatmap(classes, [v.number for v in evaluated], values)
    latest = evaluated[-1]
    pairs_raw = (latest.it.metrics or {}).get("confusion_pairs") or []
    pairs = [p for p in pairs_raw if isinstance(p, dict)][:MAX_CONFUSED_PAIRS]
    return heat, pairs, latest.number


def job_labels(job: Job) -> list[str]:
    """A classification job's label set, as its spec stores it."""
    task = job.spec.get("task")
    labels = task.get("labels") if isinstance(task, dict) else None
    return [str(label) for label in labels] if isinstance(labels, list) else []


def spec_yaml(job: Job) -> str:
    """The job spec as the user wrote it (YAML), without the service's private keys."""
    spec = without_private_keys(job.spec)
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100)
