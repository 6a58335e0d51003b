"""Prometheus collectors for teacher calls, labelled by teacher (its limiter key)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "distill_teacher_requests",
    "Teacher requests finished, by final outcome (succeeded, invalid, failed).",
    ["teacher", "outcome"],
)
ATTEMPTS = Counter(
    "distill_teacher_http_attempts",
    "HTTP attempts sent to the teacher, by result (HTTP status, timeout, connection).",
    ["teacher", "result"],
)
TOKENS = Counter(
    "distill_teacher_tokens",
    "Tokens reported by the teacher's usage, by direction (input, output).",
    ["teacher", "direction"],
)
COST = Counter("distill_teacher_cost_usd", "Spend on the teacher in USD.", ["teacher"])
LATENCY = Histogram(
    "distill_teacher_request_duration_seconds",
    "Time from the first attempt to the final result of a request, retries included.",
    ["teacher"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
RETRIES = Counter(
    "distill_teacher_retries",
    "Retried attempts, by cause (timeout, connection, http_429, http_500, ...).",
    ["teacher", "cause"],
)
REASKS = Counter(
    "distill_teacher_reasks",
    "Re-asks after invalid output, by reason (invalid_json, schema_invalid, truncated, ...).",
    ["teacher", "reason"],
)
IN_FLIGHT = Gauge("distill_teacher_in_flight", "Requests in flight from this process.", ["teacher"])
WINDOW = Gauge(
    "distill_teacher_concurrency_window",
    "Current adaptive concurrency limit of this process for the teacher.",
    ["teacher"],
)
LIMITER_WAIT = Histogram(
    "distill_teacher_limiter_wait_seconds",
    "Time spent waiting for a slot and rate budget before an attempt.",
    ["teacher"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0),
)


@dataclass(slots=True)
class TeacherMetrics:
    """The children of every collector for one teacher, looked up once (labels() is not free)."""

    teacher: str
    in_flight: Gauge
    window: Gauge
    latency: Histogram
    limiter_wait: Histogram
    cost: Counter
    tokens_in: Counter
    tokens_out: Counter
    _children: dict[tuple[str, str], Counter] = field(default_factory=dict)

    @classmethod
    def for_teacher(cls, teacher: str) -> TeacherMetrics:
        return cls(
            teacher=teacher,
            in_flight=IN_FLIGHT.labels(teacher),
            window=WINDOW.labels(teacher),
            latency=LATENCY.labels(teacher),
            limiter_wait=LIMITER_WAIT.labels(teacher),
            cost=COST.labels(teacher),
            tokens_in=TOKENS.labels(teacher, "input"),
            tokens_out=TOKENS.labels(teacher, "output"),
        )

    def _inc(self, family: Counter, name: str, label: str) -> None:
        child = self._children.get((name, label))
        if child is None:
            child = family.labels(self.teacher, label)
            self._children[(name, label)] = child
        child.inc()

    def outcome(self, outcome: str) -> None:
        self._inc(REQUESTS, "outcome", outcome)

    def attempt(self, result: str) -> None:
        self._inc(ATTEMPTS, "attempt", result)

    def retry(self, cause: str) -> None:
        self._inc(RETRIES, "retry", cause)

    def reask(self, reason: str) -> None:
        self._inc(REASKS, "reask", reason)
