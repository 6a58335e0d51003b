"""The teacher's HTTP transport: POST one chat-completions body, get status, headers and bytes.

Why not the `openai` SDK's transport (it was the transport until issue 14): on two cores its
per-request CPU (request options, header merging, its httpx-on-aiohttp adapter, response
wrappers) was about 4.7 ms of the 7.8-11.3 ms a teacher call cost a worker, against under 1 ms
for a plain aiohttp POST, and it kept the workers, not the teacher, the bottleneck
(bench/job_throughput.py measures both). Everything else the SDK decides stays the SDK's: a
non-2xx answer becomes the SDK's own exception class for its status, built from the answer the
way the SDK builds it (`status_error`), and a transport failure becomes its
`APIConnectionError`/`APITimeoutError`; so `retry.classify_error` reads the same exceptions,
messages, codes and headers as before.

`AiohttpTransport` is the production one (with `PublicOnlyResolver` for a tenant's teacher,
redirects off); `HttpxTransport` runs any `httpx2.AsyncClient`, which is how the unit tests
plug in `httpx2.MockTransport`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import httpx2
import openai

from workers.teacher.network import PublicOnlyResolver

_USER_AGENT = "distill-teacher-gateway"


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: Mapping[str, str]
    content: bytes


class ChatTransport(Protocol):
    async def post(self, url: str, body: dict[str, Any]) -> RawResponse:
        """Send `body` as JSON; raise `openai.APIConnectionError` when no answer came."""
        ...

    async def aclose(self) -> None: ...


def _headers(api_key: str | None) -> dict[str, str]:
    # Local servers (vLLM, llama.cpp) accept any key; hosted ones want theirs.
    return {
        "Authorization": f"Bearer {api_key or 'EMPTY'}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": _USER_AGENT,
    }


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


class AiohttpTransport:
    """One aiohttp session (its connection pool) per event loop that uses it."""

    def __init__(self, api_key: str | None, *, public_only: bool) -> None:
        self._headers = _headers(api_key)
        self._public_only = public_only
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # limit=0: the gateway's own window and the limiter bound what is in flight.
            connector = aiohttp.TCPConnector(
                limit=0, resolver=PublicOnlyResolver() if self._public_only else None
            )
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def post(self, url: str, body: dict[str, Any]) -> RawResponse:
        try:
            async with self._client().post(
                url,
                data=_encode(body),
                headers=self._headers,
                # A tenant's teacher may not redirect us anywhere (the resolver checks only
                # the host we connect to).
                allow_redirects=not self._public_only,
            ) as response:
                content = await response.read()
                return RawResponse(response.status, response.headers, content)
        except aiohttp.ClientError as exc:
            raise openai.APIConnectionError(
                message=f"connection error: {exc}", request=httpx2.Request("POST", url)
            ) from exc

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class HttpxTransport:
    """Any httpx2 client: tests pass one over `httpx2.MockTransport`."""

    def __init__(self, client: httpx2.AsyncClient, api_key: str | None) -> None:
        self._client = client
        self._headers = _headers(api_key)

    async def post(self, url: str, body: dict[str, Any]) -> RawResponse:
        try:
            response = await self._client.post(url, content=_encode(body), headers=self._headers)
        except httpx2.TimeoutException as exc:
            raise openai.APITimeoutError(request=httpx2.Request("POST", url)) from exc
        except httpx2.TransportError as exc:
            raise openai.APIConnectionError(
                message=f"connection error: {exc}", request=httpx2.Request("POST", url)
            ) from exc
        return RawResponse(response.status_code, response.headers, response.content)

    async def aclose(self) -> None:
        await self._client.aclose()


_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


def status_error(url: str, answer: RawResponse) -> openai.APIStatusError:
    """The SDK's exception for a non-2xx answer, built as the SDK builds it
    (`_make_status_error_from_response` / `_make_status_error` in openai 3.x): message
    "Error code: N - <error.message>", body = the JSON's `error` object (else the JSON, else
    the text), the class by status."""
    message = f"Error code: {answer.status}"
    text = answer.content.decode("utf-8", errors="replace").strip()
    body: Any = text
    try:
        body = json.loads(text)
    except ValueError:
        pass
    else:
        error = body.get("error", body) if isinstance(body, Mapping) else None
        said = error.get("message") if isinstance(error, Mapping) else None
        if isinstance(said, str) and said:
            message += f" - {said}"
    data = body.get("error", body) if isinstance(body, Mapping) else body
    response = httpx2.Response(
        answer.status,
        headers=list(answer.headers.items()),
        content=answer.content,
        request=httpx2.Request("POST", url),
    )
    kind = _STATUS_ERRORS.get(answer.status)
    if kind is None:
        kind = openai.InternalServerError if answer.status >= 500 else openai.APIStatusError
    return kind(message, response=response, body=data)
