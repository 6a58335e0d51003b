"""Error classification, Retry-After parsing and backoff bounds of the teacher gateway."""

from __future__ import annotations

import email.utils
import random
from typing import Any

import httpx2
import openai
import pytest

from workers.teacher.retry import (
    BackoffPolicy,
    classify_error,
    parse_duration,
    parse_retry_after,
    spent_budget_wait,
)

URL = "http://teacher.test/v1/chat/completions"


def status_error(
    status: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> openai.APIStatusError:
    """The exception the SDK raises for this response (through its own mapping)."""
    request = httpx2.Request("POST", URL)
    response = httpx2.Response(status, json=body or {}, headers=headers or {}, request=request)
    client = openai.OpenAI(api_key="k", base_url="http://teacher.test/v1")
    try:
        data = body.get("error", body) if body else None
        return client._make_status_error(f"Error code: {status}", body=data, response=response)
    finally:
        client.close()


def openai_error(message: str, code: str | None = None, kind: str = "invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("250ms", 0.25),
        ("1h2m3.5s", 3723.5),
        ("0.5", 0.5),
        ("17", 17.0),
        ("20us", 20e-6),
    ],
)
def test_parse_duration_reads_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "1x", "s1", "1s junk", "-1s"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    assert parse_duration(text) is None


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert parse_retry_after({"Retry-After": "3", "retry-after-ms": "1500"}) == 1.5


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after({"retry-after": "2.5"}) == 2.5
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"Retry-After": past}, now=now) == 0.0


def test_ratelimit_reset_headers_take_the_later_reset() -> None:
    headers = {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}
    assert parse_retry_after(headers) == 360.0
    assert parse_retry_after({"x-ratelimit-reset-tokens": "250ms"}) == 0.25


def test_unusable_retry_headers_are_ignored() -> None:
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon", "retry-after-ms": "nan"}) is None
    assert parse_retry_after({"retry-after": "-4"}) is None


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retryable(status: int) -> None:
    verdict = classify_error(status_error(status, openai_error("busy"), {"retry-after": "2"}))
    assert verdict.retryable
    assert not verdict.permanent
    assert verdict.error_code == f"http_{status}"
    assert verdict.retry_after_s == 2.0
    assert verdict.message == "busy"


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_unknown_model_fail_the_job(status: int) -> None:
    verdict = classify_error(status_error(status, openai_error("Incorrect API key provided.")))
    assert not verdict.retryable
    assert verdict.permanent
    assert verdict.error_code == f"http_{status}"
    assert verdict.message == "Incorrect API key provided."


def test_insufficient_quota_429_is_permanent() -> None:
    body = openai_error(
        "You exceeded your current quota.", "insufficient_quota", "insufficient_quota"
    )
    verdict = classify_error(status_error(429, body, {"retry-after": "1"}))
    assert (verdict.retryable, verdict.permanent) == (False, True)
    assert verdict.error_code == "insufficient_quota"


@pytest.mark.parametrize(
    ("message", "headers"),
    [
        # OpenAI: requests and tokens per minute, with its bucket headers.
        (
            "Rate limit reached for gpt-4o-mini in organization org-x on requests per min "
            "(RPM): Limit 500, Used 500, Requested 1. Please try again in 120ms.",
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "120ms"},
        ),
        (
            "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): "
            "Limit 30000, Used 29000, Requested 2400. Please try again in 2.8s.",
            {},
        ),
        # Gemini's OpenAI-compatible endpoint, OpenRouter.
        ("Quota exceeded for quota metric 'Generate Content API requests per minute'", {}),
        ("Rate limit exceeded: limit_rpm/google/gemini-2.0-flash-exp", {}),
        # Only the headers say it.
        ("Too Many Requests", {"X-RateLimit-Remaining-Tokens": "0"}),
        ("Too Many Requests", {"anthropic-ratelimit-requests-remaining": "0"}),
    ],
)
def test_a_429_for_a_spent_budget_per_window_is_rate_limited(
    message: str, headers: dict[str, str]
) -> None:
    body = openai_error(message, "rate_limit_exceeded", "requests")
    verdict = classify_error(status_error(429, body, headers))
    assert (verdict.retryable, verdict.permanent, verdict.rate_limited) == (True, False, True)
    assert verdict.error_code == "http_429"


@pytest.mark.parametrize(
    ("message", "seconds"),
    [
        ("on tokens per min (TPM): Limit 6000, Used 5800. Please try again in 7.0s.", 7.0),
        ("on requests per min (RPM): Limit 3, Used 3. Please try again in 120ms.", 0.12),
        ("on tokens per day (TPD). Please try again in 1m2.5s.", 62.5),
        (
            "Requests to the deployment have exceeded the RPM limit. Please retry after 6 seconds.",
            6,
        ),
        ("Rate limit reached on requests per min (RPM). Please try again later.", None),
    ],
)
def test_a_spent_budgets_wait_is_read_from_its_words_when_no_header_says_it(
    message: str, seconds: float | None
) -> None:
    body = openai_error(message, "rate_limit_exceeded", "requests")
    verdict = classify_error(status_error(429, body))
    assert verdict.rate_limited
    assert verdict.retry_after_s == seconds
    # A header, when there is one, has the last word.
    with_header = classify_error(status_error(429, body, {"retry-after": "2"}))
    assert with_header.retry_after_s == 2.0


@pytest.mark.parametrize(
    ("message", "headers"),
    [
        # A full server: our fake teacher's cap, LiteLLM's parallel limit, TGI, a bare 429.
        ("Rate limit reached for fake-teacher: more than 4 concurrent requests.", {}),
        ("Max parallel request limit reached 8", {"x-ratelimit-remaining-requests": "0"}),
        ("Model is overloaded", {}),
        ("Too Many Requests", {"x-ratelimit-remaining-requests": "12"}),
    ],
)
def test_a_429_for_a_full_server_is_not_rate_limited(message: str, headers: dict[str, str]) -> None:
    body = openai_error(message, "rate_limit_exceeded", "requests")
    verdict = classify_error(status_error(429, body, headers))
    assert (verdict.retryable, verdict.rate_limited) == (True, False)


def test_context_length_is_a_permanent_request_error_not_a_job_error() -> None:
    by_code = openai_error("too long", "context_length_exceeded")
    by_text = openai_error("This model's maximum context length is 4096 tokens. However, ...")
    for body in (by_code, by_text):
        verdict = classify_error(status_error(400, body))
        assert (verdict.retryable, verdict.permanent) == (False, False)
        assert verdict.error_code == "context_length"


def test_other_client_errors_are_not_retried() -> None:
    verdict = classify_error(status_error(422, openai_error("bad field")))
    assert (verdict.retryable, verdict.permanent, verdict.error_code) == (False, False, "http_422")


def test_network_errors_are_retryable() -> None:
    request = httpx2.Request("POST", URL)
    assert classify_error(openai.APITimeoutError(request=request)).error_code == "timeout"
    assert classify_error(TimeoutError()).error_code == "timeout"
    verdict = classify_error(openai.APIConnectionError(request=request))
    assert (verdict.retryable, verdict.error_code) == (True, "connection")


def test_unexpected_exceptions_are_not_retried() -> None:
    verdict = classify_error(KeyError("choices"))
    assert (verdict.retryable, verdict.error_code) == (False, "internal_error")


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    policy = BackoffPolicy(base_s=0.5, cap_s=4.0)
    rng = random.Random(7)
    for retry in range(1, 10):
        ceiling = min(4.0, 0.5 * 2 ** (retry - 1))
        delays = [policy.delay(retry, None, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # it does use the whole range


def test_backoff_never_waits_less_than_retry_after() -> None:
    policy = BackoffPolicy(retry_after_jitter=0.1, max_retry_after_s=60.0)
    rng = random.Random(3)
    delays = [policy.delay(1, 2.0, rng) for _ in range(200)]
    assert all(2.0 <= d <= 2.2 for d in delays)
    assert policy.delay(1, 3600.0, rng) <= 66.0  # an absurd Retry-After is capped


def test_a_refused_connection_reported_as_a_timeout_is_a_connection_error() -> None:
    # openai's aiohttp transport wraps ConnectionRefusedError in a ConnectTimeout.
    from workers.teacher.retry import classify_error

    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")
    try:
        try:
            raise refused
        except ConnectionRefusedError as inner:
            raise TimeoutError("Cannot connect to host") from inner
    except TimeoutError as wrapped:
        verdict = classify_error(wrapped)
    assert verdict.error_code == "connection"
    assert verdict.retryable
    assert classify_error(TimeoutError("slow")).error_code == "timeout"


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}, 1.0),
        ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "120ms",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "2s",
            },
            2.0,
        ),
        # Something left, no reset given, or nothing said: no wait.
        ({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "1s"}, None),
        ({"x-ratelimit-remaining-requests": "0"}, None),
        ({}, None),
    ],
)
def test_an_answers_headers_say_when_a_spent_budget_comes_back(
    headers: dict[str, str], wait: float | None
) -> None:
    assert spent_budget_wait(httpx2.Headers(headers)) == wait
