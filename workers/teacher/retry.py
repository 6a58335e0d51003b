"""Classification of teacher errors into retryable or permanent, and backoff honouring Retry-After."""

from __future__ import annotations

import contextlib
import email.utils
import math
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import openai

from workers.teacher.network import cause_of_type, private_address_error

# Statuses a server uses for "try again": timeout, conflict, rate limit, and any 5xx.
RETRYABLE_STATUSES: Final = frozenset({408, 409, 429})
# The teacher itself refuses us: the whole job should fail fast rather than retry later.
JOB_PERMANENT_STATUSES: Final = frozenset({401, 403, 404})

_CONTEXT_LENGTH_RE: Final = re.compile(
    r"context[ _]length|context window|maximum context|too many tokens|prompt is too long",
    re.IGNORECASE,
)
_DURATION_PART_RE: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_BARE_NUMBER_RE: Final = re.compile(r"\d+(?:\.\d+)?")
_DURATION_UNITS: Final = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}


@dataclass(frozen=True, slots=True)
class ErrorVerdict:
    """What a failed attempt means for the request and for the job."""

    retryable: bool
    error_code: str  # stable short code: "timeout", "connection", "http_429", "context_length", ...
    message: str
    permanent: bool = False  # the teacher refuses this job (bad key, unknown model, no quota)
    status: int | None = None
    retry_after_s: float | None = None  # what the server asked us to wait, if it said so
    param: str | None = None  # the request parameter the server named, if it named one
    # A 429 for a spent request or token budget of a time window (a hosted API's RPM, TPM,
    # daily quota), not for a full server: it teaches nothing about the concurrency the
    # server holds (`rate_limited_429`).
    rate_limited: bool = False


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration ("1s", "6m0s", "250ms", "1h2m3.5s") or a bare number."""
    text = text.strip()
    if not text:
        return None
    if _BARE_NUMBER_RE.fullmatch(text):
        return float(text)
    total = 0.0
    position = 0
    for match in _DURATION_PART_RE.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    return total if position == len(text) else None


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from the headers OpenAI-compatible servers send.

    Precedence: `retry-after-ms` (most precise), `Retry-After` (seconds or an HTTP date), then the
    later of `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens` (OpenAI's bucket resets).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value / 1000.0
    raw = lowered.get("retry-after")
    if raw is not None:
        seconds = _parse_retry_after_value(raw, now=now)
        if seconds is not None:
            return seconds
    resets = [
        parsed
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if (value_text := lowered.get(name)) is not None
        and (parsed := parse_duration(value_text)) is not None
    ]
    return max(resets) if resets else None


# A 429's words for a budget per time window: OpenAI's and Groq's "on requests per min (RPM)",
# "tokens per minute (TPM)", Gemini's "requests per minute" quota, OpenRouter's "limit_rpm".
_WINDOW_LIMIT_RE: Final = re.compile(
    r"(?<![a-z])(rpm|tpm|rpd|tpd|ipm)(?![a-z])|per[ _-]?(min|minute|second|sec|hour|day)\b"
    r"|quota",
    re.IGNORECASE,
)
# ... and when it comes back, in words, for a 429 without a Retry-After header: OpenAI's and
# Groq's "Please try again in 7.0s" / "in 120ms" / "in 1m2.5s", Azure's "Please retry after 6
# seconds".
_TRY_AGAIN_RE: Final = re.compile(
    r"(?:try again|retry) (?:in|after) ((?:\d+(?:\.\d+)?(?:ms|h|m|s))+|\d+(?:\.\d+)?)"
    r"(?: ?(seconds?|secs?))?",
    re.IGNORECASE,
)
# ... and for one request larger than the whole budget, which waiting never lets through.
_TOO_LARGE_RE: Final = re.compile(r"request too large|must be reduced", re.IGNORECASE)
# ... and for a full server: LiteLLM's "Max parallel request limit reached", a proxy's
# "too many concurrent requests", TGI's "Model is overloaded".
_CONCURRENCY_LIMIT_RE: Final = re.compile(r"concurren|parallel|overloaded", re.IGNORECASE)


def rate_limited_429(headers: Mapping[str, str], message: str) -> bool:
    """Whether a 429 says a budget per time window is spent (requests or tokens per minute,
    a daily quota) rather than that the server is full.

    The two need different answers: a full server holds fewer requests than we sent, which
    the limiter learns (`LearnedCapacity`); a spent budget comes back when its window moves
    on, whatever the concurrency, and learning a lower one from it would leave the teacher
    under-used once it does. Told apart by what hosted APIs send: a `x-ratelimit-remaining-*`
    header (OpenAI, Azure, Groq, Together; `anthropic-ratelimit-*-remaining`) at 0, or the
    message naming a window (RPM, TPM, "per minute", a quota). A message about concurrent or
    parallel requests, or an overloaded model, is a full server whatever the headers say;
    so is a bare 429."""
    if _CONCURRENCY_LIMIT_RE.search(message):
        return False
    for name, value in headers.items():
        lowered = name.lower()
        if "ratelimit" in lowered and "remaining" in lowered:
            with contextlib.suppress(ValueError):
                if float(value) <= 0:
                    return True
    return bool(_WINDOW_LIMIT_RE.search(message))


# (what is left, when it is whole again) of each budget an answer's headers tell.
_BUDGET_HEADERS: Final = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
)


def spent_budget_wait(headers: Mapping[str, str]) -> float | None:
    """Seconds until a budget an answer's headers say is spent comes back: OpenAI's (and
    Azure's, Groq's) `x-ratelimit-remaining-requests` / `-tokens` at 0, with their
    `x-ratelimit-reset-*`. None when nothing is spent or no reset is given. Read on every
    answer, so the next request waits instead of being refused."""
    waits: list[float] = []
    for remaining_header, reset_header in _BUDGET_HEADERS:
        remaining = headers.get(remaining_header)
        if remaining is None:
            continue
        try:
            spent = float(remaining) <= 0
        except ValueError:
            continue
        reset = headers.get(reset_header)
        wait = None if reset is None else parse_duration(reset)
        if spent and wait is not None:
            waits.append(wait)
    return max(waits) if waits else None


def _said_retry_after(message: str) -> float | None:
    """Seconds a rate-limit message says to wait ("try again in 7.0s", "retry after 6
    seconds"), for a server that sends no Retry-After header."""
    match = _TRY_AGAIN_RE.search(message)
    return None if match is None else parse_duration(match.group(1))


def _parse_retry_after_value(raw: str, *, now: float | None) -> float | None:
    raw = raw.strip()
    with contextlib.suppress(ValueError):  # delta-seconds, else an HTTP date below
        seconds = float(raw)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    reference = time.time() if now is None else now
    return max(0.0, when.timestamp() - reference)


def _error_fields(exc: openai.APIStatusError) -> tuple[str, str | None, str | None]:
    """(message, code, type) from an OpenAI-style error body, tolerant of other shapes."""
    body: Any = exc.body
    message: str | None = None
    if isinstance(body, Mapping):
        raw_message = body.get("message") or body.get("detail") or body.get("error")
        if isinstance(raw_message, str):
            message = raw_message
        elif isinstance(raw_message, list) and raw_message:
            # FastAPI/pydantic servers: {"detail": [{"loc": [...], "msg": ..., "type": ...}]}
            message = "; ".join(
                f"{'.'.join(str(p) for p in item.get('loc', ()))}: {item.get('msg', item)}"
                if isinstance(item, Mapping)
                else str(item)
                for item in raw_message[:5]
            )
    elif isinstance(body, str) and body:
        message = body
    code = exc.code if isinstance(exc.code, str) else None
    kind = exc.type if isinstance(exc.type, str) else None
    return message or exc.message, code, kind


def _refused_connection(exc: BaseException) -> BaseException | None:
    """The ConnectionError (refused, reset) behind an exception, if any. The SDK's aiohttp
    transport reports a refused connection as a connect *timeout*; the cause chain tells."""
    return cause_of_type(exc, ConnectionError)


def classify_error(exc: BaseException) -> ErrorVerdict:
    """Map an exception raised by one attempt to a retry decision and a result error code."""
    private = private_address_error(exc)
    if private is not None:  # the job's teacher points inside: no retry will change that
        return ErrorVerdict(False, "private_address", str(private), True)
    refused = _refused_connection(exc)
    if refused is not None:
        return ErrorVerdict(True, "connection", f"connection error: {refused}")
    if isinstance(exc, openai.APITimeoutError | TimeoutError):
        return ErrorVerdict(True, "timeout", "the teacher did not answer within the timeout")
    if isinstance(exc, openai.APIConnectionError):
        return ErrorVerdict(True, "connection", f"connection error: {exc.__cause__ or exc}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message, code, kind = _error_fields(exc)
        retry_after = parse_retry_after(exc.response.headers)
        if "insufficient_quota" in (code, kind):
            # OpenAI answers 429 for an empty account too; waiting does not refill it.
            return ErrorVerdict(False, "insufficient_quota", message, True, status)
        if status == 429 and _TOO_LARGE_RE.search(message):
            # One request over the whole budget (OpenAI: "Request too large ... on tokens per
            # min (TPM) ... must be reduced"): no window lets it through.
            return ErrorVerdict(False, "request_too_large", message, False, status)
        if status == 429:
            rate_limited = rate_limited_429(exc.response.headers, message)
            if rate_limited and retry_after is None:
                retry_after = _said_retry_after(message)
            return ErrorVerdict(
                True, "http_429", message, False, status, retry_after, rate_limited=rate_limited
            )
        if status in RETRYABLE_STATUSES or status >= 500:
            return ErrorVerdict(True, f"http_{status}", message, False, status, retry_after)
        if status in JOB_PERMANENT_STATUSES:
            return ErrorVerdict(False, f"http_{status}", message, True, status)
        if code == "context_length_exceeded" or _CONTEXT_LENGTH_RE.search(message):
            return ErrorVerdict(False, "context_length", message, False, status)
        param = exc.param if isinstance(getattr(exc, "param", None), str) else None
        return ErrorVerdict(False, f"http_{status}", message, False, status, param=param)
    if isinstance(exc, openai.APIResponseValidationError):
        return ErrorVerdict(True, "bad_response", str(exc))
    return ErrorVerdict(False, "internal_error", f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Exponential backoff with full jitter; a server's Retry-After is a floor, never shortened.

    Full jitter (AWS architecture blog, "Exponential Backoff And Jitter") spreads retries of a
    burst that failed together, so they do not hit the teacher together again.

    The first ceiling is 0.1 s: a lone 5xx or dropped connection is retried almost at once.
    The wait between attempts holds no slot (the next request takes it), so a longer one buys
    the teacher nothing and only delays the answer; at a job's end it is the job's tail
    (bench/job_throughput.py, 6% HTTP 500: the tail after the teacher was last full went from
    0.5-0.6 s with 0.25 s to under 0.4 s); a first retry when no request waits for a slot
    skips it (`OpenAITeacher._draining_retry`). A teacher that keeps failing is left to the
    batch's retries (2 s, 4 s, ... with the slots given back) once `max_attempts` run out, and
    to replica cool-downs; a 429 waits its Retry-After, and the window narrows.
    """

    base_s: float = 0.1
    cap_s: float = 20.0
    max_retry_after_s: float = 300.0  # a server asking for longer is treated as asking for this
    retry_after_jitter: float = 0.1  # fraction of Retry-After added at random on top of it

    def delay(self, retry_number: int, retry_after_s: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry `retry_number` (1 for the first retry)."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** max(0, retry_number - 1))
        backoff = rng.uniform(0.0, ceiling)
        if retry_after_s is None:
            return backoff
        floor = min(max(0.0, retry_after_s), self.max_retry_after_s)
        return floor + rng.uniform(0.0, floor * self.retry_after_jitter)
