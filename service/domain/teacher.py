"""Typed envelopes for teacher requests and results, shared by the API and the gateway."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, HttpUrl, PrivateAttr


class StructuredMode(StrEnum):
    """How the gateway asks a backend for structured output."""

    auto = "auto"  # json_schema, falling back to json_object, then text, per backend capability
    json_schema = "json_schema"  # OpenAI structured outputs, vLLM guided decoding
    json_object = "json_object"  # llama.cpp: {"type": "json_object", "schema": ...}
    text = "text"  # schema in the prompt, JSON extracted from plain text


class TeacherLimits(BaseModel):
    """Limits enforced across every worker process that talks to this teacher."""

    # strict numbers: a JSON or YAML true is not 1 (pydantic's lax mode would take it).
    max_concurrency: int = Field(
        16, ge=1, le=4096, strict=True, description="Requests in flight at once."
    )
    requests_per_minute: int | None = Field(None, ge=1, strict=True)
    input_tokens_per_minute: int | None = Field(None, ge=1, strict=True)
    output_tokens_per_minute: int | None = Field(None, ge=1, strict=True)
    adaptive: bool = Field(
        False,
        description="Adapt concurrency (AIMD) to the server's own queue, read from its "
        "Prometheus /metrics (vLLM never answers 429).",
    )
    metrics_url: str | None = Field(
        None,
        max_length=2000,
        # No NUL (JSONB cannot store it); a constrained str also refuses lone surrogates.
        pattern=r"^[^\x00]*$",
        description="Where `adaptive` reads the server's load; default: the base URL's server "
        "root + /metrics (where vLLM serves it).",
    )

    def load_metrics_url(self, base_url: str) -> str | None:
        """The URL `adaptive` polls, or None when the window is not adaptive."""
        if not self.adaptive:
            return None
        if self.metrics_url:
            return self.metrics_url
        parts = urlsplit(base_url)
        path = parts.path.rstrip("/")
        if path.endswith("/v1"):
            path = path[: -len("/v1")]
        return f"{parts.scheme}://{parts.netloc}{path}/metrics"


class TeacherPrices(BaseModel):
    """USD per one million tokens."""

    input_per_million: float = Field(0.0, ge=0, allow_inf_nan=False, strict=True)
    output_per_million: float = Field(0.0, ge=0, allow_inf_nan=False, strict=True)

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input_per_million + tokens_out * self.output_per_million) / 1e6


class GenerationParams(BaseModel):
    """Sampling parameters sent with every request (part of the fingerprint)."""

    temperature: float = Field(0.7, ge=0, le=2, allow_inf_nan=False, strict=True)
    max_tokens: int = Field(1024, ge=1, le=131072, strict=True)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, strict=True)
    seed: int | None = Field(None, strict=True)


class TeacherEndpoint(BaseModel):
    """Everything the gateway needs to talk to one teacher; the API key is already resolved."""

    base_url: str
    replica_urls: list[str] = Field(
        default_factory=list, description="More servers of the same model (balanced by load)."
    )
    model: str
    api_key: str | None = Field(None, repr=False)
    limits: TeacherLimits = Field(default_factory=TeacherLimits)
    prices: TeacherPrices = Field(default_factory=TeacherPrices)
    structured_mode: StructuredMode = StructuredMode.auto
    timeout_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(6, ge=1, le=50)
    max_reasks: int = Field(2, ge=0, le=10)
    metrics_url: HttpUrl | None = None
    limiter_key: str = Field(..., description="Key under which limits are shared (the teacher id).")
    public_only: bool = Field(
        False, description="Connect only to public addresses (a tenant's teacher; SSRF guard)."
    )


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class TeacherRequest(BaseModel):
    """One generation request: a rendered prompt plus what the answer must look like."""

    template_id: str
    template_version: str
    messages: list[ChatMessage]
    params: GenerationParams = Field(default_factory=GenerationParams)
    response_schema: dict[str, Any] | None = None
    schema_name: str = "output"
    sample_index: int = 0
    # Fingerprints by model, computed once: the worker needs a request's fingerprint to look
    # it up in the cache and again to send it. A request is not changed in place once built
    # (callers derive new ones with model_copy, which starts a fresh cache).
    _fingerprints: dict[str, str] = PrivateAttr(default_factory=dict)

    def fingerprint(self, model: str) -> str:
        """Content hash identifying this request for caching: a redelivery never pays twice.

        The sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) of {"messages",
        "model", "params", "sample", "schema", "template"}; the JSON is written part by part,
        in key order, so that the response schema, the same dict for a whole batch, is
        serialized once (`_canonical_schema`), not once per request."""
        known = self._fingerprints.get(model)
        if known is not None:
            return known
        blob = "".join(
            (
                '{"messages":',
                _canonical([{"role": m.role, "content": m.content} for m in self.messages]),
                ',"model":',
                _canonical(model),
                ',"params":',
                _canonical(self.params.model_dump()),
                ',"sample":',
                _canonical(self.sample_index),
                ',"schema":',
                _canonical_schema(self.response_schema),
                ',"template":',
                _canonical([self.template_id, self.template_version]),
                "}",
            )
        )
        known = hashlib.sha256(blob.encode()).hexdigest()
        self._fingerprints[model] = known
        return known

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copy = super().model_copy(update=update, deep=deep)
        copy._fingerprints = {}
        return copy

    def __eq__(self, other: object) -> bool:
        """Equal fields: the fingerprint cache is not part of a request's value."""
        if not isinstance(other, TeacherRequest):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, as pydantic's models are


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# Canonical JSON of response schemas by identity: a batch's requests share one schema dict
# (workers/steps/generate.py interns them), so each is serialized once. Each entry keeps its
# dict alive, so an id is not reused while cached; schemas are not changed in place.
_SCHEMA_JSON: dict[int, tuple[dict[str, Any], str]] = {}
_SCHEMA_JSON_MAX = 1024


def _canonical_schema(schema: dict[str, Any] | None) -> str:
    if schema is None:
        return "null"
    known = _SCHEMA_JSON.get(id(schema))
    if known is not None and known[0] is schema:
        return known[1]
    text = _canonical(schema)
    if len(_SCHEMA_JSON) >= _SCHEMA_JSON_MAX:
        _SCHEMA_JSON.clear()
    _SCHEMA_JSON[id(schema)] = (schema, text)
    return text


class TeacherCallStatus(StrEnum):
    succeeded = "succeeded"  # valid (parsed) output
    invalid = "invalid"  # answered, but the output stayed invalid after re-asks; raw text kept
    failed = "failed"  # no usable answer: permanent error or attempts exhausted


# Failures that say nothing about the request itself (the teacher was slow, down, overloaded,
# or answered garbage): worth asking again later. Any other failure (context length exceeded,
# a 400 about this request) is this request's final outcome, recorded with its reason.
_TRANSIENT_CODES = frozenset({"timeout", "connection", "bad_response", "http_408", "http_409"})


def is_transient_failure(error_code: str | None) -> bool:
    """Whether a failed call is worth calling again (see `_TRANSIENT_CODES`; 429 and 5xx too)."""
    if error_code is None:
        return True
    if error_code in _TRANSIENT_CODES or error_code == "http_429":
        return True
    return error_code.startswith("http_5")


class TeacherResult(BaseModel):
    """What came back for one request, with its accounting."""

    fingerprint: str
    status: TeacherCallStatus
    text: str | None = None
    parsed: Any = None
    error_code: str | None = None  # e.g. "http_401", "context_length", "timeout", "schema_invalid"
    error: str | None = None
    permanent: bool = False  # a permanent failure (bad key, unknown model): do not retry the job
    finish_reason: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    attempts: int = 0
    reasks: int = 0
    cost_usd: float = 0.0
    retry_causes: dict[str, int] = Field(default_factory=dict)
