"""Statuses of the durable rows and their allowed transitions, in one place."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    paused = "paused"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class IterationStatus(StrEnum):
    pending = "pending"
    evaluating = "evaluating"
    generating = "generating"
    scoring = "scoring"  # ARTE: drafts scored by the student between phases
    training = "training"
    awaiting_feedback = "awaiting_feedback"  # external student: waits for posted predictions
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


class BatchStatus(StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class ExampleStatus(StrEnum):
    accepted = "accepted"
    rejected = "rejected"


class ExportStatus(StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class RefreshStatus(StrEnum):
    """A refresh waits for the loop's next decision point, then starts its iteration(s)."""

    pending = "pending"  # recorded; the loop starts it when the iteration under way completes
    evaluating = "evaluating"  # an endpoint student's revision is being evaluated first
    started = "started"  # its first generation iteration is planned


class DeliveryStatus(StrEnum):
    pending = "pending"  # waiting for its next attempt
    succeeded = "succeeded"
    failed = "failed"  # every attempt failed; kept in the delivery log


JOB_TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset(
        {JobStatus.running, JobStatus.paused, JobStatus.cancelled, JobStatus.failed}
    ),
    JobStatus.running: frozenset(
        {JobStatus.paused, JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}
    ),
    JobStatus.paused: frozenset({JobStatus.running, JobStatus.queued, JobStatus.cancelled}),
    # A refresh (POST /v1/jobs/{id}/refresh, service/refreshes.py) reopens a finished job.
    JobStatus.succeeded: frozenset({JobStatus.running}),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}

ITERATION_TERMINAL = frozenset(
    {IterationStatus.completed, IterationStatus.failed, IterationStatus.cancelled}
)


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    return target in JOB_TRANSITIONS[current]
