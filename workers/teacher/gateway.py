"""The Teacher port and its OpenAI-compatible adapter: many requests in flight under shared limits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar

import httpx2
import jsonschema
import openai
import structlog

from service.domain.teacher import (
    StructuredMode,
    TeacherCallStatus,
    TeacherEndpoint,
    TeacherRequest,
    TeacherResult,
)
from workers.teacher.adaptive import AimdController, ConcurrencyWindow, VllmLoadMonitor
from workers.teacher.limits import Lease, Limiter, TeacherQuota
from workers.teacher.metrics import TeacherMetrics
from workers.teacher.network import PrivateAddressError, literal_private_host
from workers.teacher.retry import BackoffPolicy, ErrorVerdict, classify_error, spent_budget_wait
from workers.teacher.structured import (
    DEFAULT_CAPABILITIES,
    CapabilityCache,
    OutputVerdict,
    Reask,
    check_output,
    is_format_refusal,
    refused_param,
    render_messages,
    response_format,
    schema_info,
)
from workers.teacher.transport import (
    AiohttpTransport,
    ChatTransport,
    HttpxTransport,
    status_error,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")
_MODE_RANK = {StructuredMode.json_schema: 0, StructuredMode.json_object: 1, StructuredMode.text: 2}


def _always() -> bool:
    return True


Requests = Sequence[TeacherRequest] | AsyncIterator[TeacherRequest]


async def _each(requests: Requests) -> AsyncGenerator[TeacherRequest, None]:
    if isinstance(requests, Sequence):
        for request in requests:
            yield request
    else:
        async for request in requests:
            yield request


class Teacher(Protocol):
    """Sends generation requests to a teacher LLM and reports each one's final result."""

    def stream(
        self,
        requests: Requests,
        *,
        should_continue: Callable[[], bool] = _always,
    ) -> AsyncIterator[TeacherResult]:
        """Yield each result as soon as it is final, in completion order.

        `requests` may be an async iterator: it is pulled one request at a time, as slots
        free up, so a caller can feed the window from work it claims on the way (the next
        batch) and the teacher never waits between batches.

        Stops dispatching once `should_continue()` is False (budget reached, job paused);
        requests already sent finish and are yielded, the others are not yielded at all.
        """
        ...

    async def generate(
        self,
        requests: Requests,
        *,
        should_continue: Callable[[], bool] = _always,
    ) -> list[TeacherResult]:
        """All results in input order (requests never dispatched are omitted)."""
        ...

    async def aclose(self) -> None: ...


class BadResponseError(Exception):
    """A 2xx answer that is not a chat completion (a proxy's HTML page, a cut-off body)."""


@dataclass(slots=True)
class _Call:
    """One request's journey through attempts and re-asks."""

    index: int
    request: TeacherRequest
    fingerprint: str
    mode: StructuredMode
    started: float
    body: dict[str, Any] = field(default_factory=dict)
    estimated_input: int = 0
    reask: Reask | None = None
    reasks: int = 0
    attempts: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    retry_causes: dict[str, int] = field(default_factory=dict)
    # Seconds this call was asked to wait by 429s for a spent budget (see RATE_WINDOW_S).
    rate_limited_s: float = 0.0
    # The lease this call holds right now (and its replica); whoever gives it back clears it.
    lease: Lease | None = None
    replica: _Replica | None = None

    def count(self, cause: str) -> None:
        self.retry_causes[cause] = self.retry_causes.get(cause, 0) + 1


@dataclass(frozen=True, slots=True)
class _DispatchEnd:
    dispatched: int
    error: BaseException | None = None


# A replica that failed COOL_AFTER times in a row (no answer, a 5xx: a server that is down, not
# one unlucky request) gets no new request for COOL_DOWN_S, doubled for each further failure up
# to COOL_DOWN_MAX_S, unless every replica is cooling down; an answer ends it.
COOL_AFTER = 3
COOL_DOWN_S = 1.0
COOL_DOWN_MAX_S = 30.0


@dataclass(slots=True)
class _Replica:
    """One server of a teacher: its URL, its limits' key and this process's window onto it."""

    base_url: str
    completions_url: str
    quota: TeacherQuota
    window: ConcurrencyWindow
    refused_host: str | None
    failures: int = 0  # in a row
    cool_until: float = 0.0

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.failures >= COOL_AFTER:
            backoff = COOL_DOWN_S * 2 ** min(self.failures - COOL_AFTER, 10)
            self.cool_until = now + min(COOL_DOWN_MAX_S, backoff)

    def answered(self) -> None:
        self.failures = 0
        self.cool_until = 0.0


def _sample_seed(fingerprint: str, reasks: int) -> int:
    """The seed sent with a request: distinct per sample index and per re-ask, and reproducible.

    The fingerprint covers the sample index and the caller's own seed, so sample k of a prompt
    always gets the same seed (a resumed job asks the same question) while samples differ.
    """
    return (int(fingerprint[:8], 16) + 7919 * reasks) & 0x7FFFFFFF


def _estimate_tokens(messages: list[dict[str, str]], schema_chars: int) -> int:
    """Prompt tokens, estimated before sending (about 4 characters a token, plus framing)."""
    chars = sum(len(m["content"]) for m in messages) + schema_chars
    return chars // 4 + 4 * len(messages) + 3


def _message_text(message: Any) -> str | None:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # content parts, as some servers send them
        return "".join(p.get("text", "") for p in content if isinstance(p, dict)) or None
    return content if isinstance(content, str) else None


def _reasoning_text(message: Any) -> str | None:
    """A reasoning model's thinking, where servers put it (vLLM, DeepSeek, OpenRouter)."""
    if not isinstance(message, dict):
        return None
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


# The longest wait a rate-limited 429 may ask without it counting as one of a request's
# attempts: a per-minute budget (RPM, TPM) comes back within it.
RATE_WINDOW_S: Final = 60.0
# ... and how long one request may wait on such 429s before each counts again.
RATE_LIMITED_MAX_S: Final = 900.0


class OpenAITeacher:
    """Teacher over any OpenAI-compatible server: vLLM, llama.cpp, hosted APIs.

    Transport: a plain aiohttp POST (`workers.teacher.transport`: the `openai` SDK's own
    transport cost the workers several times the CPU per request; its error classes and error
    semantics are kept). Retries are ours, so that the wait between attempts happens after the
    concurrency slot is given back.
    """

    def __init__(
        self,
        endpoint: TeacherEndpoint,
        *,
        limiter: Limiter,
        capabilities_cache: CapabilityCache | None = None,
        http_client: httpx2.AsyncClient | None = None,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        """`http_client` replaces the aiohttp transport (tests pass an httpx2 MockTransport)."""
        self.endpoint = endpoint
        self._limiter = limiter
        self._capabilities = capabilities_cache or DEFAULT_CAPABILITIES
        self._replicas = [
            self._replica(endpoint, url, index)
            for index, url in enumerate(_unique([endpoint.base_url, *endpoint.replica_urls]))
        ]
        self._window = self._replicas[0].window
        self._freed = asyncio.Event()  # a replica's window has room again
        self._turn = 0  # breaks ties between equally loaded replicas in turn
        self._waiting_for_slot = 0  # requests in `_acquire`: none at a job's drain
        # Monotonic time before which no request is sent: a 429 for a spent request or token
        # budget (RPM, TPM) says when it comes back; every request sent before then is refused.
        self._rate_limited_until = 0.0
        self._metrics = TeacherMetrics.for_teacher(endpoint.limiter_key)
        self._metrics.window.set(self._window_total())
        self._http_client = http_client
        self._backoff = backoff or BackoffPolicy()
        self._rng = random.Random()
        self._client: ChatTransport | None = None
        self._monitor: VllmLoadMonitor | None = None

    @staticmethod
    def _replica(endpoint: TeacherEndpoint, base_url: str, index: int) -> _Replica:
        """The first server keeps the teacher's own limiter key; each other one has its own
        (a replica is a server with the teacher's limits)."""
        quota = TeacherQuota.for_endpoint(endpoint)
        if index:
            quota = dataclasses.replace(quota, key=f"{endpoint.limiter_key}@{base_url}")
        return _Replica(
            base_url=base_url,
            # What the SDK builds from base_url + "/chat/completions".
            completions_url=base_url.rstrip("/") + "/chat/completions",
            quota=quota,
            window=ConcurrencyWindow(endpoint.limits.max_concurrency),
            # aiohttp does not resolve an IP literal, so the public-only resolver never sees it.
            refused_host=literal_private_host(base_url) if endpoint.public_only else None,
        )

    def _window_total(self) -> int:
        """The requests the teacher's servers are granted now: each one's window, under the
        capacity its limiter learnt from 429s."""
        return sum(min(r.window.limit, self._limiter.capacity(r.quota)) for r in self._replicas)

    @property
    def window(self) -> ConcurrencyWindow:
        """The first server's local adaptive concurrency window (below or at max_concurrency)."""
        return self._window

    # ---------------------------------------------------------------- lifecycle

    def _transport(self) -> ChatTransport:
        if self._client is None:
            endpoint = self.endpoint
            self._client = (
                HttpxTransport(self._http_client, endpoint.api_key)
                if self._http_client is not None
                else AiohttpTransport(endpoint.api_key, public_only=endpoint.public_only)
            )
        return self._client

    def _start_monitor(self) -> None:
        endpoint = self.endpoint
        if self._monitor is None and endpoint.limits.adaptive and endpoint.metrics_url:
            url = str(endpoint.metrics_url)
            if endpoint.public_only and literal_private_host(url) is not None:
                log.warning("teacher.metrics_url_refused", teacher=endpoint.limiter_key, url=url)
                return
            self._monitor = VllmLoadMonitor(
                url,
                AimdController(self._window),
                model=endpoint.model,
                public_only=endpoint.public_only,
            )
            self._monitor.start()

    async def aclose(self) -> None:
        """Close connections and stop the load monitor; the limiter belongs to the caller."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            await monitor.aclose()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        elif self._http_client is not None:
            await self._http_client.aclose()

    # ---------------------------------------------------------------- public API

    async def stream(
        self,
        requests: Requests,
        *,
        should_continue: Callable[[], bool] = _always,
    ) -> AsyncIterator[TeacherResult]:
        async with contextlib.aclosing(self._stream_indexed(requests, should_continue)) as items:
            async for _, result in items:
                yield result

    async def generate(
        self,
        requests: Requests,
        *,
        should_continue: Callable[[], bool] = _always,
    ) -> list[TeacherResult]:
        results: dict[int, TeacherResult] = {}
        async with contextlib.aclosing(self._stream_indexed(requests, should_continue)) as items:
            async for index, result in items:
                results[index] = result
        return [results[i] for i in sorted(results)]

    # ---------------------------------------------------------------- orchestration

    async def _stream_indexed(
        self, requests: Requests, should_continue: Callable[[], bool]
    ) -> AsyncGenerator[tuple[int, TeacherResult], None]:
        self._transport()
        self._start_monitor()
        queue: asyncio.Queue[tuple[int, TeacherResult] | _DispatchEnd] = asyncio.Queue()
        tasks: dict[asyncio.Task[None], _Call] = {}
        dispatcher = asyncio.create_task(self._dispatch(requests, should_continue, queue, tasks))
        expected: int | None = None
        error: BaseException | None = None
        received = 0
        try:
            while expected is None or received < expected:
                item = await queue.get()
                if isinstance(item, _DispatchEnd):
                    expected, error = item.dispatched, item.error
                    continue
                received += 1
                yield item
            if error is not None:
                # Everything that was sent has been yielded (and can be stored); now say why
                # the rest was not sent.
                raise error
        finally:
            dispatcher.cancel()
            running = dict(tasks)
            for task in running:
                task.cancel()
            await asyncio.gather(dispatcher, *running, return_exceptions=True)
            # A task cancelled before its first step never ran its own cleanup.
            for call in running.values():
                await self._give_back(call)

    async def _dispatch(
        self,
        requests: Requests,
        should_continue: Callable[[], bool],
        queue: asyncio.Queue[tuple[int, TeacherResult] | _DispatchEnd],
        tasks: dict[asyncio.Task[None], _Call],
    ) -> None:
        dispatched = 0
        index = -1
        try:
            async with contextlib.aclosing(_each(requests)) as each:
                async for request in each:
                    index += 1
                    if not should_continue():
                        break
                    if await self._send(index, request, should_continue, queue, tasks):
                        dispatched += 1
                    else:
                        break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the limiter (Redis) or the feed failed: report the rest
            log.error("teacher.dispatch_failed", error=str(exc), dispatched=dispatched)
            queue.put_nowait(_DispatchEnd(dispatched, exc))
            return
        queue.put_nowait(_DispatchEnd(dispatched))

    async def _send(
        self,
        index: int,
        request: TeacherRequest,
        should_continue: Callable[[], bool],
        queue: asyncio.Queue[tuple[int, TeacherResult] | _DispatchEnd],
        tasks: dict[asyncio.Task[None], _Call],
    ) -> bool:
        """Start one request once a slot is free; False when it was not sent (stopped)."""
        call = self._new_call(index, request)
        rejected = self._reject_before_sending(call)
        if rejected is not None:
            queue.put_nowait((index, rejected))
            return True
        self._prepare(call)
        replica, lease = await self._acquire(call)
        if not should_continue():  # the budget may have run out while we waited
            await self._release(replica, lease, input_tokens=0, output_tokens=0)
            return False
        call.replica, call.lease = replica, lease
        task = asyncio.create_task(self._run_and_report(call, queue))
        tasks[task] = call
        task.add_done_callback(tasks.pop)
        return True

    def _new_call(self, index: int, request: TeacherRequest) -> _Call:
        call = _Call(
            index=index,
            request=request,
            fingerprint=request.fingerprint(self.endpoint.model),
            mode=self._capabilities.mode_for(self.endpoint),
            started=time.perf_counter(),
        )
        return call

    def _reject_before_sending(self, call: _Call) -> TeacherResult | None:
        schema = call.request.response_schema
        if schema is None:
            return None
        try:
            schema_info(schema)
        except jsonschema.SchemaError as exc:
            return self._finish(
                call,
                TeacherCallStatus.failed,
                error_code="invalid_schema",
                error=f"response_schema is not a valid JSON schema: {exc.message}",
            )
        return None

    def _prepare(self, call: _Call) -> None:
        """(Re)build the body for the call's current mode and correction."""
        request = call.request
        params = request.params
        messages = render_messages(request, call.mode, call.reask)
        fmt = response_format(request, call.mode)
        body: dict[str, Any] = {
            "model": self.endpoint.model,
            "messages": messages,
            "temperature": params.temperature,
            "max_tokens": params.max_tokens,
            "seed": _sample_seed(call.fingerprint, call.reasks),
        }
        if params.top_p is not None:
            body["top_p"] = params.top_p
        if fmt is not None:
            body["response_format"] = fmt
        self._capabilities.adapt_params(self.endpoint, body)
        call.body = body
        # Backends that decode under a schema also count it as prompt.
        schema_chars = (
            schema_info(request.response_schema).size_chars
            if fmt is not None and request.response_schema is not None
            else 0
        )
        call.estimated_input = _estimate_tokens(messages, schema_chars)

    def _adopt_current_mode(self, call: _Call) -> None:
        """Another request may have learnt that this backend refuses our mode meanwhile."""
        current = self._capabilities.mode_for(self.endpoint)
        if _MODE_RANK[current] > _MODE_RANK[call.mode]:
            call.mode = current
            self._prepare(call)
        else:
            self._capabilities.adapt_params(self.endpoint, call.body)

    async def _acquire(self, call: _Call) -> tuple[_Replica, Lease]:
        started = time.perf_counter()
        self._waiting_for_slot += 1
        try:
            while True:
                while (paused := self._rate_limited_until - time.monotonic()) > 0:
                    await asyncio.sleep(paused)
                replica = await self._take_window()
                if self._rate_limited_until <= time.monotonic():
                    break
                # A spent budget's 429 came while this request waited for the slot.
                self._free_window(replica)
            try:
                lease = await self._limiter.acquire(
                    replica.quota,
                    input_tokens=call.estimated_input,
                    output_tokens=call.request.params.max_tokens,
                )
            except BaseException:
                self._free_window(replica)
                raise
        finally:
            self._waiting_for_slot -= 1
        self._metrics.limiter_wait.observe(time.perf_counter() - started)
        self._metrics.in_flight.inc()
        return replica, lease

    async def _take_window(self) -> _Replica:
        """A slot of the least loaded replica's window (fewest of our requests outstanding
        there), skipping those cooling down after a failure unless all are."""
        if len(self._replicas) == 1:
            only = self._replicas[0]
            await only.window.acquire()
            return only
        while True:
            now = time.monotonic()
            open_ = [r for r in self._replicas if r.window.in_use < r.window.limit]
            healthy = [r for r in open_ if r.cool_until <= now]
            if not healthy and open_ and all(r.cool_until > now for r in self._replicas):
                healthy = [min(open_, key=lambda r: r.cool_until)]  # all failing: the next due
            if healthy:
                self._turn += 1
                count = len(self._replicas)
                best = min(
                    healthy,
                    key=lambda r: (
                        r.window.in_use / r.window.limit,
                        (self._replicas.index(r) - self._turn) % count,
                    ),
                )
                await best.window.acquire()  # has room: returns at once
                return best
            self._freed.clear()
            # A cooling replica may be the only one with room: look again when it is due.
            due = [r.cool_until - now for r in self._replicas if r.cool_until > now]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(due) if due else None):
                    await self._freed.wait()

    def _pause_for_rate_limit(self, wait_s: float, why: str) -> None:
        """Hold this process's next requests to the teacher for `wait_s`, until its request or
        token budget comes back (a 429's Retry-After or x-ratelimit-reset, or an answer's
        headers saying the budget is spent): each one sent before then would be refused,
        spending a request of the budget on some APIs."""
        until = time.monotonic() + min(wait_s, self._backoff.max_retry_after_s)
        if until <= self._rate_limited_until:
            return
        if self._rate_limited_until <= time.monotonic():
            log.info(
                "teacher.rate_limited",
                teacher=self.endpoint.limiter_key,
                wait_s=round(until - time.monotonic(), 3),
                why=why[:300],
            )
        self._rate_limited_until = until

    def _draining_retry(self, verdict: ErrorVerdict, tries: int) -> bool:
        """A first retry after a lone failure, sent at once when no request waits for a slot.

        Then the job's last requests are out (or the feed is between batches) and the teacher
        has room. The backoff would spread a burst's retries apart, but below the cap they fit
        anyway, and here it only lengthens the job's tail (bench/job_throughput.py, 6% HTTP
        500: the last failures' retries are the tail). A second failure waits its backoff as
        before, and a server's Retry-After (a 429 says it is full) is always waited out.
        """
        return (
            tries == 1
            and self._waiting_for_slot == 0
            and verdict.retry_after_s is None
            and verdict.status != 429
        )

    def _free_window(self, replica: _Replica) -> None:
        replica.window.release()
        self._freed.set()

    async def _release(
        self,
        replica: _Replica,
        lease: Lease,
        *,
        input_tokens: int | None,
        output_tokens: int | None,
        overloaded: bool = False,
    ) -> None:
        self._metrics.in_flight.dec()
        try:
            await self._limiter.release(
                lease,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                overloaded=overloaded,
            )
        except Exception as exc:  # the answer is what matters; the slot expires by itself
            log.warning("teacher.release_failed", teacher=self.endpoint.limiter_key, error=str(exc))
        finally:
            self._free_window(replica)
        if overloaded:
            self._metrics.window.set(self._window_total())

    async def _give_back(self, call: _Call) -> None:
        """Return the lease of a call that was cancelled while holding it."""
        lease, call.lease = call.lease, None
        if lease is not None and call.replica is not None:
            await self._release(call.replica, lease, input_tokens=None, output_tokens=None)

    async def _run_and_report(
        self,
        call: _Call,
        queue: asyncio.Queue[tuple[int, TeacherResult] | _DispatchEnd],
    ) -> None:
        try:
            result = await self._run(call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never lose a request: report why it has no answer
            log.error(
                "teacher.request_crashed",
                fingerprint=call.fingerprint,
                error=f"{type(exc).__name__}: {exc}",
            )
            result = self._finish(
                call,
                TeacherCallStatus.failed,
                error_code="internal_error",
                error=f"{type(exc).__name__}: {exc}",
            )
        queue.put_nowait((call.index, result))

    async def _post(self, replica: _Replica, body: dict[str, Any]) -> dict[str, Any]:
        if replica.refused_host is not None:
            raise PrivateAddressError(
                f"{replica.refused_host} is a private address: refused for a teacher a tenant "
                "configured (an operator can allow it)"
            )
        url = replica.completions_url
        async with asyncio.timeout(self.endpoint.timeout_s):
            answer = await self._transport().post(url, body)
        if not 200 <= answer.status < 300:
            raise status_error(url, answer)
        spent = spent_budget_wait(answer.headers)
        if spent is not None:  # the next request would be refused: it waits instead
            self._pause_for_rate_limit(spent, "the answer says the request budget is spent")
        try:
            data = json.loads(answer.content)
        except ValueError as exc:
            raise BadResponseError(f"the answer is not JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            said = data.get("error") if isinstance(data, dict) else None
            if isinstance(said, dict):
                said = said.get("message") or said
            detail = f"; it says: {str(said)[:500]}" if said else ""
            raise BadResponseError(f"the answer has no choices{detail}")
        if not data["choices"] or not isinstance(data["choices"][0], dict):
            raise BadResponseError("the answer has no choices")
        return data

    async def _run(self, call: _Call) -> TeacherResult:
        endpoint = self.endpoint
        metrics = self._metrics
        schema = call.request.response_schema
        tries = 0  # attempts of the current ask, bounded by max_attempts
        try:
            while True:
                if call.lease is None:
                    call.replica, call.lease = await self._acquire(call)
                replica = call.replica
                assert replica is not None
                # Prepared before its slot came: a refusal meanwhile may have changed the mode.
                self._adopt_current_mode(call)
                call.attempts += 1
                tries += 1
                sent_mode = call.mode
                try:
                    data = await self._post(replica, call.body)
                except (
                    openai.APIError,
                    BadResponseError,
                    TimeoutError,
                    PrivateAddressError,
                ) as exc:
                    verdict = (
                        ErrorVerdict(True, "bad_response", str(exc))
                        if isinstance(exc, BadResponseError)
                        else classify_error(exc)
                    )
                    if verdict.error_code == "timeout":
                        verdict = dataclasses.replace(
                            verdict,
                            message=f"the teacher did not answer within timeout_s="
                            f"{endpoint.timeout_s:g} s",
                        )
                    metrics.attempt(verdict.error_code)
                    answered = verdict.status is not None
                    if verdict.retryable and verdict.status != 429 and len(self._replicas) > 1:
                        # No answer or a 5xx: the next requests go to the other replicas for a
                        # while (a 429 only says this one is full: its limiter learns its capacity).
                        replica.failed(time.monotonic())
                    releasing, call.lease = call.lease, None
                    await self._release(
                        replica,
                        releasing,
                        input_tokens=None,
                        # An HTTP error generated nothing; after a timeout it may have.
                        output_tokens=0 if answered else None,
                        # A full server's 429 teaches its capacity; a spent budget's does not.
                        overloaded=verdict.status == 429
                        and not verdict.permanent
                        and not verdict.rate_limited,
                    )
                    if verdict.rate_limited and verdict.retry_after_s is not None:
                        self._pause_for_rate_limit(verdict.retry_after_s, verdict.message)
                        call.rate_limited_s += verdict.retry_after_s
                        if (
                            verdict.retry_after_s <= RATE_WINDOW_S
                            and call.rate_limited_s <= RATE_LIMITED_MAX_S
                        ):
                            # Refused before it ran, for a budget that comes back within a
                            # minute: not an attempt. A tight budget under a wide window
                            # refuses most of each wave, and counted, a request ran out of
                            # attempts while the budget came back every few seconds. A longer
                            # wait (an hourly or daily quota) counts: those are not waited out;
                            # so does every refusal past RATE_LIMITED_MAX_S of waiting (a
                            # server that says its budget is spent for ever must not hold a
                            # job for ever).
                            tries -= 1
                    refused = refused_param(
                        verdict.status, verdict.message, verdict.param, call.body
                    )
                    if refused is not None:
                        # Bounded: a dropped field is never sent again, and there are few.
                        self._capabilities.refuse_param(endpoint, refused)
                        log.warning(
                            "teacher.parameter_dropped",
                            teacher=endpoint.limiter_key,
                            model=endpoint.model,
                            param=refused,
                            status=verdict.status,
                            message=verdict.message[:300],
                        )
                        self._prepare(call)
                        call.count(f"param_{refused}_refused")
                        continue
                    if schema is not None and is_format_refusal(
                        verdict.status, verdict.message, sent_mode
                    ):
                        weaker = self._capabilities.downgrade(endpoint, sent_mode)
                        if weaker is not None:
                            log.info(
                                "teacher.format_downgraded",
                                teacher=endpoint.limiter_key,
                                model=endpoint.model,
                                refused=sent_mode.value,
                                now=weaker.value,
                                status=verdict.status,
                            )
                            call.mode = weaker
                            self._prepare(call)
                            call.count(f"format_{sent_mode.value}_refused")
                            continue
                    if verdict.retryable and tries < endpoint.max_attempts:
                        call.count(verdict.error_code)
                        metrics.retry(verdict.error_code)
                        delay = (
                            0.0
                            if self._draining_retry(verdict, tries)
                            else self._backoff.delay(tries, verdict.retry_after_s, self._rng)
                        )
                        log.info(
                            "teacher.request_retried",
                            teacher=endpoint.limiter_key,
                            fingerprint=call.fingerprint,
                            cause=verdict.error_code,
                            attempt=tries,
                            delay_s=round(delay, 3),
                        )
                        await asyncio.sleep(delay)
                        continue
                    return self._finish(
                        call,
                        TeacherCallStatus.failed,
                        error_code=verdict.error_code,
                        error=verdict.message,
                        permanent=verdict.permanent,
                    )

                choice = data["choices"][0]
                text = _message_text(choice.get("message"))
                finish_reason = choice.get("finish_reason")
                usage = data.get("usage")
                usage = usage if isinstance(usage, dict) else {}
                used_in = usage.get("prompt_tokens")
                used_out = usage.get("completion_tokens")
                # A server that reports no usage still spends tokens: count our estimates.
                tokens_in = used_in if isinstance(used_in, int) else call.estimated_input
                tokens_out = used_out if isinstance(used_out, int) else len(text or "") // 4
                call.tokens_in += tokens_in
                call.tokens_out += tokens_out
                metrics.attempt("200")
                releasing, call.lease = call.lease, None
                replica.answered()
                await self._release(
                    replica, releasing, input_tokens=tokens_in, output_tokens=tokens_out
                )
                # Let the freed slot's next request go out before this one's validation and
                # bookkeeping: under a burst of answers that keeps the teacher busy.
                await asyncio.sleep(0)

                verdict_out = check_output(text, finish_reason, schema)
                if verdict_out.error_code == "empty":
                    reasoning = _reasoning_text(choice.get("message"))
                    if reasoning:
                        verdict_out = OutputVerdict(
                            None,
                            "empty",
                            f"no content, only reasoning_content ({len(reasoning)} characters): "
                            "a reasoning model that did not reach its answer (raise max_tokens) "
                            "or a server whose reasoning parser kept the answer",
                        )
                if verdict_out.ok:
                    return self._finish(
                        call,
                        TeacherCallStatus.succeeded,
                        text=text,
                        parsed=verdict_out.parsed,
                        finish_reason=finish_reason,
                    )
                reason = verdict_out.error_code or "invalid"
                if call.reasks < endpoint.max_reasks:
                    call.reasks += 1
                    call.count(f"reask_{reason}")
                    metrics.reask(reason)
                    log.info(
                        "teacher.request_reasked",
                        teacher=endpoint.limiter_key,
                        fingerprint=call.fingerprint,
                        reason=reason,
                        reask=call.reasks,
                    )
                    call.reask = Reask(text, reason, verdict_out.error or reason)
                    self._prepare(call)
                    tries = 0
                    continue
                return self._finish(
                    call,
                    TeacherCallStatus.invalid,
                    text=text,
                    error_code=reason,
                    error=verdict_out.error,
                    finish_reason=finish_reason,
                )
        finally:
            await self._give_back(call)

    def _finish(
        self,
        call: _Call,
        status: TeacherCallStatus,
        *,
        text: str | None = None,
        parsed: Any = None,
        error_code: str | None = None,
        error: str | None = None,
        permanent: bool = False,
        finish_reason: str | None = None,
    ) -> TeacherResult:
        latency = time.perf_counter() - call.started
        cost = self.endpoint.prices.cost(call.tokens_in, call.tokens_out)
        metrics = self._metrics
        metrics.outcome(status.value)
        metrics.latency.observe(latency)
        if call.tokens_in:
            metrics.tokens_in.inc(call.tokens_in)
        if call.tokens_out:
            metrics.tokens_out.inc(call.tokens_out)
        if cost:
            metrics.cost.inc(cost)
        if status is TeacherCallStatus.succeeded:
            log.debug(
                "teacher.request_succeeded",
                teacher=self.endpoint.limiter_key,
                fingerprint=call.fingerprint,
                tokens_in=call.tokens_in,
                tokens_out=call.tokens_out,
                latency_s=round(latency, 3),
                attempts=call.attempts,
            )
        else:
            log.warning(
                "teacher.request_failed"
                if status is TeacherCallStatus.failed
                else "teacher.request_invalid",
                teacher=self.endpoint.limiter_key,
                fingerprint=call.fingerprint,
                error_code=error_code,
                permanent=permanent,
                attempts=call.attempts,
                reasks=call.reasks,
            )
        return TeacherResult.model_construct(
            fingerprint=call.fingerprint,
            status=status,
            text=text,
            parsed=parsed,
            error_code=error_code,
            error=error,
            permanent=permanent,
            finish_reason=finish_reason,
            tokens_in=call.tokens_in,
            tokens_out=call.tokens_out,
            latency_s=latency,
            attempts=call.attempts,
            reasks=call.reasks,
            cost_usd=cost,
            retry_causes=dict(call.retry_causes),
        )


def _unique(urls: Sequence[str]) -> list[str]:
    """Each server once, in the order given (base_url first)."""
    return list(dict.fromkeys(url.rstrip("/") for url in urls))


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Drive the async API from synchronous code (a Celery task): a fresh event loop per call."""
    with asyncio.Runner() as runner:
        return runner.run(coro)
