"""OpenAITeacher over the real openai client and an httpx2 MockTransport: retries, re-asks,
structured fallback, accounting and dispatch control, without a network."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import pytest
from prometheus_client import REGISTRY

from service.domain.teacher import (
    ChatMessage,
    GenerationParams,
    StructuredMode,
    TeacherCallStatus,
    TeacherEndpoint,
    TeacherLimits,
    TeacherPrices,
    TeacherRequest,
    TeacherResult,
)
from workers.teacher import (
    BackoffPolicy,
    CapabilityCache,
    LocalLimiter,
    OpenAITeacher,
    TeacherQuota,
    run_sync,
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["pos", "neg"]}},
    "required": ["label"],
    "additionalProperties": False,
}
VALID = '{"label": "pos"}'
LLAMA_REFUSAL = 'response_format type must be one of "text" or "json_object", but got: json_schema'

Handler = Callable[[dict[str, Any], int], Awaitable[httpx2.Response] | httpx2.Response]


def completion(
    content: str | None = VALID, finish: str = "stop", usage: tuple[int, int] | None = (10, 5)
) -> httpx2.Response:
    payload: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish,
            }
        ],
    }
    if usage is not None:
        payload["usage"] = {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": sum(usage),
        }
    return httpx2.Response(200, json=payload)


def error(
    status: int,
    message: str,
    code: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> httpx2.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return httpx2.Response(status, json=body, headers=headers)


class ScriptedServer:
    """Records every request body (and when it came) and answers through `handler`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[httpx2.Headers] = []
        self.times: list[float] = []

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        self.headers.append(request.headers)
        self.times.append(time.perf_counter())
        answer = self.handler(body, len(self.bodies))
        if not isinstance(answer, httpx2.Response):
            answer = await answer
        return answer

    def prompts(self) -> list[str]:
        return [b["messages"][-1]["content"] for b in self.bodies]


def make_request(i: int = 0, schema: dict[str, Any] | None = SCHEMA) -> TeacherRequest:
    return TeacherRequest(
        template_id="review",
        template_version="1",
        messages=[ChatMessage(role="user", content=f"item {i}")],
        params=GenerationParams(max_tokens=50, temperature=0.5),
        response_schema=schema,
        sample_index=i,
    )


def make_teacher(
    server: ScriptedServer,
    *,
    max_concurrency: int = 4,
    max_attempts: int = 4,
    max_reasks: int = 2,
    mode: StructuredMode = StructuredMode.auto,
    timeout_s: float = 5.0,
    prices: TeacherPrices | None = None,
    capabilities: CapabilityCache | None = None,
    limiter: LocalLimiter | None = None,
    backoff: BackoffPolicy | None = None,
) -> OpenAITeacher:
    endpoint = TeacherEndpoint(
        base_url="http://teacher.test/v1",
        model="m",
        api_key="secret",
        limits=TeacherLimits(max_concurrency=max_concurrency),
        prices=prices or TeacherPrices(),
        structured_mode=mode,
        timeout_s=timeout_s,
        max_attempts=max_attempts,
        max_reasks=max_reasks,
        limiter_key=f"unit-{uuid.uuid4().hex[:8]}",
    )
    return OpenAITeacher(
        endpoint,
        limiter=limiter or LocalLimiter(),
        capabilities_cache=capabilities or CapabilityCache(),
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(server)),
        backoff=backoff or BackoffPolicy(base_s=0.001, cap_s=0.005),
    )


def generate(teacher: OpenAITeacher, requests: list[TeacherRequest]) -> list[TeacherResult]:
    async def scenario() -> list[TeacherResult]:
        try:
            return await teacher.generate(requests)
        finally:
            await teacher.aclose()

    return run_sync(scenario())


def one(teacher: OpenAITeacher, request: TeacherRequest | None = None) -> TeacherResult:
    (result,) = generate(teacher, [request or make_request()])
    return result


# --------------------------------------------------------------------------- the happy path


def test_success_is_parsed_accounted_and_priced() -> None:
    server = ScriptedServer(lambda body, n: completion(VALID, usage=(1000, 500)))
    prices = TeacherPrices(input_per_million=1.0, output_per_million=2.0)
    request = make_request()
    result = one(make_teacher(server, prices=prices), request)
    assert result.status is TeacherCallStatus.succeeded
    assert result.parsed == {"label": "pos"}
    assert result.text == VALID
    assert result.fingerprint == request.fingerprint("m")
    assert (result.tokens_in, result.tokens_out) == (1000, 500)
    assert result.cost_usd == pytest.approx(0.002)
    assert (result.attempts, result.reasks, result.retry_causes) == (1, 0, {})
    assert result.finish_reason == "stop"
    assert result.latency_s > 0


def test_request_body_uses_json_schema_and_a_reproducible_seed() -> None:
    server = ScriptedServer(lambda body, n: completion())
    generate(make_teacher(server), [make_request(0), make_request(1)])
    generate(make_teacher(ScriptedServer(lambda b, n: completion())), [make_request(0)])
    body = next(b for b in server.bodies if b["messages"][0]["content"] == "item 0")
    assert body["model"] == "m"
    assert body["max_tokens"] == 50
    assert body["temperature"] == 0.5
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA
    assert server.headers[0]["authorization"] == "Bearer secret"
    seeds = {b["messages"][0]["content"]: b["seed"] for b in server.bodies}
    assert seeds["item 0"] != seeds["item 1"]  # samples differ
    again = ScriptedServer(lambda body, n: completion())
    generate(make_teacher(again), [make_request(0)])
    assert again.bodies[0]["seed"] == seeds["item 0"]  # and a resumed job asks the same


def test_generate_keeps_input_order_and_stream_yields_in_completion_order() -> None:
    async def slow_first(body: dict[str, Any], n: int) -> httpx2.Response:
        i = int(body["messages"][0]["content"].split()[1])
        await asyncio.sleep(0.01 * (4 - i))
        return completion(f'{{"label": "{"pos" if i % 2 else "neg"}"}}')

    requests = [make_request(i) for i in range(5)]
    results = generate(make_teacher(ScriptedServer(slow_first), max_concurrency=5), requests)
    assert [r.fingerprint for r in results] == [r.fingerprint("m") for r in requests]

    async def streamed() -> list[str]:
        teacher = make_teacher(ScriptedServer(slow_first), max_concurrency=5)
        try:
            return [r.fingerprint async for r in teacher.stream(requests)]
        finally:
            await teacher.aclose()

    order = run_sync(streamed())
    assert order == [r.fingerprint("m") for r in reversed(requests)]


def test_missing_usage_is_estimated_so_budgets_still_count() -> None:
    result = one(make_teacher(ScriptedServer(lambda b, n: completion(VALID, usage=None))))
    assert result.status is TeacherCallStatus.succeeded
    assert result.tokens_in > 0
    assert result.tokens_out == len(VALID) // 4


# --------------------------------------------------------------------------- retries


def test_server_errors_are_retried_and_recorded() -> None:
    server = ScriptedServer(
        lambda b, n: error(500, "boom", kind="server_error") if n == 1 else completion()
    )
    result = one(make_teacher(server))
    assert result.status is TeacherCallStatus.succeeded
    assert result.attempts == 2
    assert result.retry_causes == {"http_500": 1}


def test_attempts_are_bounded() -> None:
    server = ScriptedServer(lambda b, n: error(503, "overloaded", kind="server_error"))
    result = one(make_teacher(server, max_attempts=3))
    assert result.status is TeacherCallStatus.failed
    assert (result.error_code, result.error, result.permanent) == ("http_503", "overloaded", False)
    assert len(server.bodies) == result.attempts == 3
    assert result.retry_causes == {"http_503": 2}


class SteadyBackoff(BackoffPolicy):
    """Waits 0.4 s before every retry (and a Retry-After, when one is given)."""

    def delay(self, retry_number: int, retry_after_s: float | None, rng: Any) -> float:
        return max(0.4, retry_after_s or 0.0)


def test_a_lone_failure_at_the_drain_is_retried_at_once_and_a_second_waits() -> None:
    # No request waits for a slot (the job's last one is out): a backoff would only lengthen
    # the job's tail. A second failure of the same request waits as before.
    server = ScriptedServer(
        lambda b, n: error(500, "boom", kind="server_error") if n <= 2 else completion()
    )
    result = one(make_teacher(server, backoff=SteadyBackoff()))
    assert result.status is TeacherCallStatus.succeeded
    assert result.retry_causes == {"http_500": 2}
    assert server.times[1] - server.times[0] < 0.2
    assert server.times[2] - server.times[1] >= 0.4


def test_a_failure_waits_its_backoff_while_requests_wait_for_a_slot() -> None:
    server = ScriptedServer(
        lambda b, n: error(500, "boom", kind="server_error") if n == 1 else completion()
    )
    teacher = make_teacher(server, max_concurrency=1, backoff=SteadyBackoff())
    results = generate(teacher, [make_request(0), make_request(1)])
    assert [r.status for r in results] == [TeacherCallStatus.succeeded] * 2
    assert server.prompts() == ["item 0", "item 1", "item 0"]
    # Request 1 took the freed slot at once; request 0's retry waited its backoff.
    assert server.times[1] - server.times[0] < 0.2
    assert server.times[2] - server.times[0] >= 0.4


def test_a_429_at_the_drain_waits() -> None:
    server = ScriptedServer(
        lambda b, n: error(429, "slow down", kind="requests") if n == 1 else completion()
    )
    result = one(make_teacher(server, backoff=SteadyBackoff()))
    assert result.retry_causes == {"http_429": 1}
    assert server.times[1] - server.times[0] >= 0.4


def test_retry_after_is_waited_without_holding_the_slot() -> None:
    def handler(body: dict[str, Any], n: int) -> httpx2.Response:
        if n == 1:
            return error(429, "slow down", kind="requests", headers={"retry-after-ms": "150"})
        return completion()

    server = ScriptedServer(handler)
    results = generate(make_teacher(server, max_concurrency=1), [make_request(0), make_request(1)])
    assert [r.status for r in results] == [TeacherCallStatus.succeeded] * 2
    assert server.prompts() == ["item 0", "item 1", "item 0"]
    # Request 1 went out while request 0 waited, and request 0 waited what it was told.
    assert server.times[1] - server.times[0] < 0.1
    assert server.times[2] - server.times[0] >= 0.15
    assert results[0].retry_causes == {"http_429": 1}


def rpm_spent(wait_ms: int) -> httpx2.Response:
    """OpenAI's 429 for a spent requests-per-minute budget, back in `wait_ms`."""
    return error(
        429,
        "Rate limit reached for m in organization org-x on requests per min (RPM): Limit 60, "
        f"Used 60, Requested 1. Please try again in {wait_ms}ms.",
        "rate_limit_exceeded",
        kind="requests",
        headers={"x-ratelimit-remaining-requests": "0", "retry-after-ms": str(wait_ms)},
    )


def test_a_spent_budget_holds_the_next_requests_until_it_comes_back() -> None:
    """A full server's 429 lets the other requests go out meanwhile (above); a spent request
    budget's holds them: each one sent before it comes back would be refused."""

    def handler(body: dict[str, Any], n: int) -> httpx2.Response:
        return rpm_spent(150) if n == 1 else completion()

    server = ScriptedServer(handler)
    teacher = make_teacher(server, max_concurrency=1)
    results = generate(teacher, [make_request(0), make_request(1)])
    assert [r.status for r in results] == [TeacherCallStatus.succeeded] * 2
    assert server.times[1] - server.times[0] >= 0.15
    assert results[0].retry_causes == {"http_429": 1}


def test_an_answer_saying_the_budget_is_spent_holds_the_next_request() -> None:
    """OpenAI says on every answer what is left of the request budget: at 0 the next request
    waits for the reset instead of being refused."""

    def handler(body: dict[str, Any], n: int) -> httpx2.Response:
        answer = completion()
        if n == 1:
            answer.headers["x-ratelimit-remaining-requests"] = "0"
            answer.headers["x-ratelimit-reset-requests"] = "150ms"
        return answer

    server = ScriptedServer(handler)
    results = generate(make_teacher(server, max_concurrency=1), [make_request(0), make_request(1)])
    assert [r.status for r in results] == [TeacherCallStatus.succeeded] * 2
    assert server.times[1] - server.times[0] >= 0.15
    assert all(not r.retry_causes for r in results)


def test_spent_budget_refusals_are_not_attempts_until_a_request_has_waited_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refusals for a per-minute budget do not use up a request's attempts (4 here), up to
    RATE_LIMITED_MAX_S of waiting on them; past it each counts, so a server that says its
    budget is spent for ever fails the request instead of holding it for ever."""
    from workers.teacher import gateway

    monkeypatch.setattr(gateway, "RATE_LIMITED_MAX_S", 0.3)

    server = ScriptedServer(lambda b, n: rpm_spent(20))
    result = one(make_teacher(server, max_attempts=4))
    assert result.status is TeacherCallStatus.failed
    assert result.error_code == "http_429"
    # 0.3 s of 20 ms waits not counted (15 refusals), then 4 attempts' worth.
    assert len(server.bodies) >= 15 + 3


def test_a_request_larger_than_the_whole_budget_is_not_retried() -> None:
    message = (
        "Request too large for gpt-4 in organization org-x on tokens per min (TPM): Limit "
        "10000, Requested 12000. The input or output tokens must be reduced in order to run "
        "successfully."
    )
    server = ScriptedServer(lambda b, n: error(429, message, "rate_limit_exceeded", kind="tokens"))
    result = one(make_teacher(server))
    assert result.status is TeacherCallStatus.failed
    assert result.error_code == "request_too_large"
    assert len(server.bodies) == 1


def test_a_hung_attempt_times_out_and_is_retried() -> None:
    async def handler(body: dict[str, Any], n: int) -> httpx2.Response:
        if n == 1:
            await asyncio.sleep(5)
        return completion()

    result = one(make_teacher(ScriptedServer(handler), timeout_s=0.2))
    assert result.status is TeacherCallStatus.succeeded
    assert result.retry_causes == {"timeout": 1}
    assert result.latency_s < 2


def test_a_timeout_that_lasts_names_the_limit() -> None:
    async def handler(body: dict[str, Any], n: int) -> httpx2.Response:
        await asyncio.sleep(5)
        return completion()

    result = one(make_teacher(ScriptedServer(handler), timeout_s=0.2, max_attempts=2))
    assert result.status is TeacherCallStatus.failed and result.error_code == "timeout"
    assert result.error == "the teacher did not answer within timeout_s=0.2 s"


def test_a_non_json_200_is_retried() -> None:
    server = ScriptedServer(
        lambda b, n: httpx2.Response(200, text="<html>proxy</html>") if n == 1 else completion()
    )
    result = one(make_teacher(server))
    assert result.status is TeacherCallStatus.succeeded
    assert result.retry_causes == {"bad_response": 1}


@pytest.mark.parametrize(
    ("response", "code", "permanent"),
    [
        (error(401, "Incorrect API key provided.", "invalid_api_key"), "http_401", True),
        (error(403, "Forbidden."), "http_403", True),
        (error(404, "The model `m` does not exist.", "model_not_found"), "http_404", True),
        (
            error(
                429, "You exceeded your current quota.", "insufficient_quota", "insufficient_quota"
            ),
            "insufficient_quota",
            True,
        ),
        (error(400, "too long", "context_length_exceeded"), "context_length", False),
        (error(400, "temperature must be <= 2"), "http_400", False),
    ],
)
def test_permanent_errors_fail_at_once(
    response: httpx2.Response, code: str, permanent: bool
) -> None:
    server = ScriptedServer(lambda b, n: response)
    result = one(make_teacher(server))
    assert result.status is TeacherCallStatus.failed
    assert (result.error_code, result.permanent, result.attempts) == (code, permanent, 1)
    assert result.error == json.loads(response.content)["error"]["message"]
    assert len(server.bodies) == 1


# --------------------------------------------------------------------------- structured output


def test_invalid_output_is_reasked_and_tokens_add_up() -> None:
    server = ScriptedServer(lambda b, n: completion('{"label": "po' if n == 1 else VALID))
    result = one(make_teacher(server))
    assert result.status is TeacherCallStatus.succeeded
    assert result.reasks == 1
    assert result.retry_causes == {"reask_invalid_json": 1}
    assert (result.tokens_in, result.tokens_out) == (20, 10)
    first, second = server.bodies
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][1]["content"] == '{"label": "po'
    assert second["seed"] != first["seed"]


def test_output_that_stays_invalid_is_kept_as_invalid_with_its_text() -> None:
    server = ScriptedServer(lambda b, n: completion('{"label": ["pos", "neg"]}'))
    result = one(make_teacher(server, max_reasks=2))
    assert result.status is TeacherCallStatus.invalid
    assert result.error_code == "schema_invalid"
    assert result.error is not None and "at label" in result.error
    assert result.text == '{"label": ["pos", "neg"]}'
    assert result.parsed is None
    assert result.reasks == 2
    assert len(server.bodies) == 3


def test_truncated_output_is_reasked_then_invalid() -> None:
    server = ScriptedServer(lambda b, n: completion(VALID, finish="length"))
    result = one(make_teacher(server, max_reasks=1))
    assert result.status is TeacherCallStatus.invalid
    assert (result.error_code, result.finish_reason, result.reasks) == ("truncated", "length", 1)


def test_free_text_requests_send_no_response_format() -> None:
    server = ScriptedServer(lambda b, n: completion("A fine review."))
    result = one(make_teacher(server), make_request(schema=None))
    assert result.status is TeacherCallStatus.succeeded
    assert result.parsed is None and result.text == "A fine review."
    assert "response_format" not in server.bodies[0]


def test_json_schema_refusal_falls_back_to_json_object_and_is_remembered() -> None:
    def handler(body: dict[str, Any], n: int) -> httpx2.Response:
        if body["response_format"]["type"] == "json_schema":
            return error(500, LLAMA_REFUSAL, kind="server_error")
        assert body["response_format"] == {"type": "json_object", "schema": SCHEMA}
        assert "JSON schema" in body["messages"][-1]["content"]
        return completion()

    server = ScriptedServer(handler)
    capabilities = CapabilityCache()
    first = one(make_teacher(server, capabilities=capabilities))
    second = one(make_teacher(server, capabilities=capabilities))
    assert first.status is second.status is TeacherCallStatus.succeeded
    assert first.retry_causes == {"format_json_schema_refused": 1}
    assert second.retry_causes == {}
    kinds = [b["response_format"]["type"] for b in server.bodies]
    assert kinds == ["json_schema", "json_object", "json_object"]


def test_text_mode_extracts_json_from_prose() -> None:
    def handler(body: dict[str, Any], n: int) -> httpx2.Response:
        fmt = body.get("response_format")
        if fmt is not None:
            return error(400, f"response_format {fmt['type']} is not supported")
        return completion(f"Sure, here you go:\n```json\n{VALID}\n```")

    server = ScriptedServer(handler)
    result = one(make_teacher(server, max_concurrency=1))
    assert result.status is TeacherCallStatus.succeeded
    assert result.parsed == {"label": "pos"}
    assert [b.get("response_format", {}).get("type") for b in server.bodies] == [
        "json_schema",
        "json_object",
        None,
    ]


def test_a_fixed_mode_is_not_downgraded() -> None:
    server = ScriptedServer(lambda b, n: error(500, LLAMA_REFUSAL, kind="server_error"))
    result = one(make_teacher(server, mode=StructuredMode.json_schema, max_attempts=2))
    assert result.status is TeacherCallStatus.failed
    assert result.error_code == "http_500"


def test_an_invalid_schema_fails_without_a_call() -> None:
    server = ScriptedServer(lambda b, n: completion())
    result = one(make_teacher(server), make_request(schema={"type": 12}))
    assert result.status is TeacherCallStatus.failed
    assert result.error_code == "invalid_schema"
    assert server.bodies == []


# --------------------------------------------------------------------------- dispatch control


def test_should_continue_stops_dispatch_and_in_flight_results_are_still_yielded() -> None:
    server = ScriptedServer(lambda b, n: completion())
    teacher = make_teacher(server, max_concurrency=1)
    seen: list[TeacherResult] = []

    async def scenario() -> None:
        try:
            async for result in teacher.stream(
                [make_request(i) for i in range(10)], should_continue=lambda: len(seen) < 3
            ):
                seen.append(result)
        finally:
            await teacher.aclose()

    run_sync(scenario())
    assert 3 <= len(seen) <= 4  # one more may have been sent while the third was reported
    assert len(server.bodies) == len(seen)  # nothing sent is ever left unreported


def test_breaking_out_of_a_stream_gives_every_slot_back() -> None:
    async def slow(body: dict[str, Any], n: int) -> httpx2.Response:
        await asyncio.sleep(0.02 if n == 1 else 5)
        return completion()

    limiter = LocalLimiter()
    teacher = make_teacher(ScriptedServer(slow), max_concurrency=3, limiter=limiter)
    quota = TeacherQuota.for_endpoint(teacher.endpoint)

    async def scenario() -> None:
        async with contextlib.aclosing(
            teacher.stream([make_request(i) for i in range(6)])
        ) as results:
            async for _ in results:
                break
        await teacher.aclose()
        async with asyncio.timeout(1):
            for _ in range(3):
                await limiter.acquire(quota, input_tokens=0, output_tokens=0)

    run_sync(scenario())
    assert teacher.window.in_use == 0


def test_metrics_count_outcomes_tokens_and_retries() -> None:
    server = ScriptedServer(lambda b, n: error(502, "bad gateway") if n == 1 else completion())
    teacher = make_teacher(server)
    key = teacher.endpoint.limiter_key
    one(teacher)

    def sample(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"teacher": key, **labels})

    assert sample("distill_teacher_requests_total", outcome="succeeded") == 1
    assert sample("distill_teacher_retries_total", cause="http_502") == 1
    assert sample("distill_teacher_tokens_total", direction="input") == 10
    assert sample("distill_teacher_tokens_total", direction="output") == 5
    assert sample("distill_teacher_http_attempts_total", result="200") == 1
    assert sample("distill_teacher_in_flight") == 0
    assert sample("distill_teacher_request_duration_seconds_count") == 1


def test_an_answer_only_in_reasoning_content_is_invalid_with_the_reason() -> None:
    def handler(body: dict[str, Any], n: int) -> httpx2.Response:
        response = completion(None)
        payload = json.loads(response.content)
        payload["choices"][0]["message"]["reasoning_content"] = "Let me think... " * 20
        return httpx2.Response(200, json=payload)

    result = one(make_teacher(ScriptedServer(handler), max_reasks=0))
    assert result.status is TeacherCallStatus.invalid
    assert result.error_code == "empty"
    assert result.error is not None and "reasoning_content" in result.error


def test_an_error_in_a_200_is_retried_and_its_words_kept() -> None:
    def handler(body: dict[str, Any], n: int) -> httpx2.Response:
        return httpx2.Response(200, json={"error": {"message": "upstream model overloaded"}})

    result = one(make_teacher(ScriptedServer(handler), max_attempts=2))
    assert result.status is TeacherCallStatus.failed
    assert result.error_code == "bad_response" and result.attempts == 2
    assert result.error is not None and "upstream model overloaded" in result.error


def test_a_pydantic_servers_422_names_the_field_and_the_field_is_dropped() -> None:
    def handler(body: dict[str, Any], n: int) -> httpx2.Response:
        if "seed" in body:
            detail = [
                {
                    "type": "extra_forbidden",
                    "loc": ["body", "seed"],
                    "msg": "Extra inputs are not permitted",
                    "input": body["seed"],
                }
            ]
            return httpx2.Response(422, json={"detail": detail})
        return completion()

    server = ScriptedServer(handler)
    result = one(make_teacher(server))
    assert result.status is TeacherCallStatus.succeeded
    assert result.retry_causes == {"param_seed_refused": 1}
    assert "seed" in server.bodies[0] and "seed" not in server.bodies[1]
