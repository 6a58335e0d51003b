"""Structured output: response_format per backend capability, tolerant JSON extraction, re-asks."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import jsonschema
import jsonschema_rs
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator

from service.domain.teacher import StructuredMode, TeacherEndpoint, TeacherRequest

# Fallback order in `auto` mode: constrained decoding first, then weaker forms of it.
_NEXT_MODE: Final = {
    StructuredMode.json_schema: StructuredMode.json_object,
    StructuredMode.json_object: StructuredMode.text,
}
_MODE_RANK: Final = {
    StructuredMode.json_schema: 0,
    StructuredMode.json_object: 1,
    StructuredMode.text: 2,
}
# How backends phrase "I do not support this response_format" (llama.cpp answers 500 with
# "response_format type must be one of ...", OpenAI 400 with "Invalid parameter: response_format").
_FORMAT_REFUSAL_RE: Final = re.compile(
    r"response_format|json_schema|json schema|json_object|guided|grammar|structured output",
    re.IGNORECASE,
)
_FORMAT_REFUSAL_STATUSES: Final = frozenset({400, 422, 500, 501})
# Body fields a request can do without. A backend that refuses one gets requests without it from
# then on (max_tokens is renamed, as OpenAI's reasoning models ask: "Use 'max_completion_tokens'
# instead"); model, messages and response_format are never dropped here.
OPTIONAL_PARAMS: Final = ("seed", "top_p", "temperature", "max_tokens", "max_completion_tokens")
_PARAM_REPLACEMENT: Final = {"max_tokens": "max_completion_tokens"}
# How servers say "I do not take this field": OpenAI ("Unrecognized request argument supplied",
# "Unsupported parameter", "Unsupported value: 'temperature' does not support 0.2"), pydantic
# servers (422 "Extra inputs are not permitted", "extra_forbidden"), others ("unknown field").
_PARAM_REFUSAL_RE: Final = re.compile(
    r"unrecogni[sz]ed|unsupported|not supported|does not support|unknown (?:parameter|field|"
    r"argument|key|name)|extra[ _](?:inputs?|fields?|forbidden)|not permitted|not allowed|"
    r"unexpected (?:keyword|parameter|field|argument)",
    re.IGNORECASE,
)
_PARAM_REFUSAL_STATUSES: Final = frozenset({400, 422})
_FENCE_RE: Final = re.compile(r"```(?:json|JSON|json5)?[ \t]*\n?(.*?)```", re.DOTALL)
_THINK_RE: Final = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_SCHEMA_NAME_RE: Final = re.compile(r"[^a-zA-Z0-9_-]")
_MAX_CANDIDATES: Final = 64
_MAX_ECHO_CHARS: Final = 8000  # the invalid answer quoted back in a re-ask, at most


class CapabilityCache:
    """Which structured mode works for each (base_url, model), learnt within this process.

    Shared by every OpenAITeacher in the process (module-level default), so one refusal of
    json_schema by a llama.cpp server downgrades all later requests to it at once.
    """

    def __init__(self) -> None:
        self._modes: dict[tuple[str, str], StructuredMode] = {}
        self._refused: dict[tuple[str, str], frozenset[str]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(endpoint: TeacherEndpoint) -> tuple[str, str]:
        return endpoint.base_url.rstrip("/"), endpoint.model

    def mode_for(self, endpoint: TeacherEndpoint) -> StructuredMode:
        if endpoint.structured_mode is not StructuredMode.auto:
            return endpoint.structured_mode
        return self._modes.get(self._key(endpoint), StructuredMode.json_schema)

    def downgrade(
        self, endpoint: TeacherEndpoint, refused: StructuredMode
    ) -> StructuredMode | None:
        """The mode to use after `refused` was refused; None when there is nothing weaker."""
        if endpoint.structured_mode is not StructuredMode.auto:
            return None
        key = self._key(endpoint)
        with self._lock:
            current = self._modes.get(key, StructuredMode.json_schema)
            if _MODE_RANK[current] > _MODE_RANK[refused]:
                return current  # another request already stepped down past it
            weaker = _NEXT_MODE.get(refused)
            if weaker is not None:
                self._modes[key] = weaker
            return weaker

    def refuse_param(self, endpoint: TeacherEndpoint, name: str) -> None:
        """Remember that this backend refuses the optional body field `name`."""
        key = self._key(endpoint)
        with self._lock:
            self._refused[key] = self._refused.get(key, frozenset()) | {name}

    def adapt_params(self, endpoint: TeacherEndpoint, body: dict[str, Any]) -> None:
        """Drop (or rename) in place the optional fields this backend is known to refuse."""
        refused = self._refused.get(self._key(endpoint))
        if not refused:
            return
        for name in OPTIONAL_PARAMS:
            if name in refused and name in body:
                value = body.pop(name)
                replacement = _PARAM_REPLACEMENT.get(name)
                if replacement is not None and replacement not in refused:
                    body.setdefault(replacement, value)

    def clear(self) -> None:
        with self._lock:
            self._modes.clear()
            self._refused.clear()


DEFAULT_CAPABILITIES: Final = CapabilityCache()


def is_format_refusal(status: int | None, message: str, mode: StructuredMode) -> bool:
    """Whether an HTTP error means "this backend does not do this response_format"."""
    return (
        mode is not StructuredMode.text
        and status in _FORMAT_REFUSAL_STATUSES
        and _FORMAT_REFUSAL_RE.search(message) is not None
    )


def refused_param(
    status: int | None, message: str, param: str | None, body: dict[str, Any]
) -> str | None:
    """The optional body field an HTTP error says the backend does not take, if it says so.

    Only fields that were sent count, and only a refusal ("unsupported", "unrecognized", "extra
    inputs are not permitted"...): "Invalid 'max_tokens': must be at least 1" is our own bad
    value and stays an error. When the server names the field (OpenAI's `param`) that wins;
    otherwise the first sent field the message names.
    """
    if status not in _PARAM_REFUSAL_STATUSES or not _PARAM_REFUSAL_RE.search(message):
        return None
    sent = [name for name in OPTIONAL_PARAMS if name in body]
    if param in sent:
        return param
    named = [
        (match.start(), name)
        for name in sent
        if (match := re.search(rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])", message))
    ]
    return min(named)[1] if named else None


# --------------------------------------------------------------------------- request side


def _strict_compatible(schema: Any) -> bool:
    """OpenAI's strict mode needs closed objects with every property required."""
    if isinstance(schema, list):
        return all(_strict_compatible(item) for item in schema)
    if not isinstance(schema, dict):
        return True
    properties = schema.get("properties")
    if isinstance(properties, dict) and (
        schema.get("additionalProperties") is not False
        or set(schema.get("required", ())) != set(properties)
    ):
        return False
    return all(_strict_compatible(value) for value in schema.values())


def response_format(request: TeacherRequest, mode: StructuredMode) -> dict[str, Any] | None:
    """The `response_format` body field for this mode, or None to send none."""
    schema = request.response_schema
    if schema is None or mode is StructuredMode.text:
        return None
    if mode is StructuredMode.json_object:
        # llama.cpp compiles `schema` into a grammar; OpenAI and vLLM ignore it and rely on
        # the schema we also put in the prompt.
        return {"type": "json_object", "schema": schema}
    spec: dict[str, Any] = {
        "name": _SCHEMA_NAME_RE.sub("_", request.schema_name)[:64] or "output",
        "schema": schema,
    }
    if schema_info(schema).strict:
        spec["strict"] = True
    return {"type": "json_schema", "json_schema": spec}


@dataclass(frozen=True, slots=True)
class Reask:
    """What was wrong with the previous answer, to be corrected by the next one."""

    answer: str | None
    reason: str  # OutputVerdict.error_code
    detail: str


def render_messages(
    request: TeacherRequest, mode: StructuredMode, reask: Reask | None = None
) -> list[dict[str, str]]:
    """The chat messages for one ask: a pure function of (request, mode, last correction)."""
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    schema = request.response_schema
    # json_schema constrains decoding by itself; weaker modes need the schema in the prompt.
    # It goes into the last user message: some chat templates (Gemma) drop system messages.
    instruction = (
        schema_info(schema).instruction
        if schema is not None and mode is not StructuredMode.json_schema
        else None
    )
    if instruction is not None:
        _append_to_last_user(messages, instruction)
    if reask is None:
        return messages
    correction = _correction_text(reask, request.response_schema is not None)
    if instruction is not None:
        correction += "\n\n" + instruction
    if reask.answer and reask.reason != "truncated":
        messages.append({"role": "assistant", "content": reask.answer[:_MAX_ECHO_CHARS]})
        messages.append({"role": "user", "content": correction})
    else:
        # No answer worth quoting: extend the user turn, keeping roles alternating (Mistral's
        # and Gemma's templates reject two user turns in a row).
        _append_to_last_user(messages, correction)
    return messages


def _append_to_last_user(messages: list[dict[str, str]], text: str) -> None:
    for message in reversed(messages):
        if message["role"] == "user":
            message["content"] = f"{message['content']}\n\n{text}"
            return
    messages.append({"role": "user", "content": text})


def _correction_text(reask: Reask, structured: bool) -> str:
    if reask.reason == "truncated":
        return (
            "Your previous answer was cut off at the length limit. Answer again, complete and "
            "more concise."
        )
    if reask.reason in ("empty", "content_filter"):
        return "Your previous answer was empty. Answer the request above."
    target = "a single valid JSON value matching the schema" if structured else "a valid answer"
    return f"Your previous answer was invalid ({reask.detail}). Reply again with {target} only."


# --------------------------------------------------------------------------- answer side


class ExtractionError(ValueError):
    """No JSON value could be found in the text."""


def _json_type_for(schema: dict[str, Any] | None) -> type | None:
    kind = None if schema is None else schema.get("type")
    return {"object": dict, "array": list}.get(kind) if isinstance(kind, str) else None


def extract_json(text: str, *, expect: type | None = None) -> Any:
    """The JSON value in a model's answer: the whole text, a fenced block, or the first
    balanced object/array in it (prose around it, a <think> block before it, are ignored).

    `expect` (dict or list) skips candidates of the other kind.
    """
    cleaned = _THINK_RE.sub("", text).strip()
    for candidate in (cleaned, *(block.strip() for block in _FENCE_RE.findall(cleaned))):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if expect is None or isinstance(value, expect):
            return value
    openers = "{" if expect is dict else "[" if expect is list else "{["
    decoder = json.JSONDecoder()
    tried = 0
    for index, char in enumerate(cleaned):
        if char not in openers:
            continue
        tried += 1
        if tried > _MAX_CANDIDATES:
            break
        try:
            value, _ = decoder.raw_decode(cleaned, index)
        except ValueError:
            continue
        if expect is None or isinstance(value, expect):
            return value
    raise ExtractionError("no JSON value found in the answer")


# What an answer is checked against locally is the schema's *shape* (types, required keys,
# nesting). Value rules are left to the per-item filters, which reject one bad item with its
# reason instead of the whole answer: a label in the wrong case or wrapped in punctuation is
# mapped to the label set, an extra key is ignored, a sixth example beyond maxItems is not
# paid for. Constrained decoding still gets the full schema.
_VALUE_KEYWORDS: Final = frozenset(
    {
        "enum",
        "const",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "uniqueItems",
        "minProperties",
        "maxProperties",
    }
)
_SCHEMA_MAPS: Final = frozenset({"properties", "patternProperties", "$defs", "definitions"})


def shape_schema(schema: Any) -> Any:
    """`schema` without its value rules and without `additionalProperties: false`."""
    if isinstance(schema, list):
        return [shape_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    shaped: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _VALUE_KEYWORDS or (key == "additionalProperties" and value is False):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            shaped[key] = {name: shape_schema(sub) for name, sub in value.items()}
        else:
            shaped[key] = shape_schema(value)
    return shaped


def _fold(name: str) -> str:
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def align_keys(value: Any, schema: Any) -> Any:
    """Rename keys that name a schema property in another case or spelling ("Label",
    "input_text" for "inputText"), when exactly one key matches; nested objects and arrays too."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [align_keys(item, schema["items"]) for item in value]
    properties = schema.get("properties")
    if not isinstance(value, dict) or not isinstance(properties, dict):
        return value
    aligned = dict(value)
    for name in properties:
        if name in aligned:
            continue
        matches = [key for key in aligned if key not in properties and _fold(key) == _fold(name)]
        if len(matches) == 1:
            aligned[name] = aligned.pop(matches[0])
    return {
        key: align_keys(item, properties[key]) if key in properties else item
        for key, item in aligned.items()
    }


@dataclass(frozen=True, slots=True)
class SchemaInfo:
    """Everything derived from one response schema, computed once per distinct schema."""

    validator: Validator  # the answer's shape (see `shape_schema`)
    # The same check compiled by jsonschema-rs: a valid answer (nearly every one) is told in
    # under a microsecond, where the Python validator took 30-50 per answer, about 2% of a
    # generation worker's CPU per teacher call. None when it cannot compile the schema. An
    # answer it refuses is checked again by `validator`, which words the error and has the
    # last say, so a difference between the two can only cost time.
    fast: Callable[[Any], bool] | None
    strict: bool  # usable with OpenAI's strict structured outputs
    instruction: str  # the schema as a prompt instruction, for modes without constrained decoding
    size_chars: int  # its serialized length, for estimating prompt tokens
    expect: type | None  # dict or list when the schema pins the top-level type


_SCHEMAS: dict[str, SchemaInfo] = {}
_SCHEMAS_LOCK = threading.Lock()
_SCHEMAS_MAX = 1024  # a long-lived worker sees many templates over time


# The same dict asks again (a request's check before sending, its size, its answer's check):
# found by identity, without serializing it again. Each entry keeps its dict alive, so an id is
# never reused while cached; schemas are not changed in place once in a request.
_BY_ID: dict[int, tuple[dict[str, Any], SchemaInfo]] = {}
_BY_ID_MAX = 4096


def schema_info(schema: dict[str, Any]) -> SchemaInfo:
    """Cached facts about `schema`; raises jsonschema.SchemaError if it is not a schema."""
    known = _BY_ID.get(id(schema))
    if known is not None and known[0] is schema:
        return known[1]
    key = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    info = _SCHEMAS.get(key)
    if info is None:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        shaped = shape_schema(schema)
        info = SchemaInfo(
            validator=cls(shaped),
            fast=_compiled(shaped),
            strict=_strict_compatible(schema),
            instruction=(
                "Reply with one JSON value that conforms to this JSON schema, and nothing "
                "else:\n```json\n" + key + "\n```"
            ),
            size_chars=len(key),
            expect=_json_type_for(schema),
        )
        with _SCHEMAS_LOCK:
            if len(_SCHEMAS) >= _SCHEMAS_MAX:
                _SCHEMAS.clear()
            _SCHEMAS[key] = info
    with _SCHEMAS_LOCK:
        if len(_BY_ID) >= _BY_ID_MAX:
            _BY_ID.clear()
        _BY_ID[id(schema)] = (schema, info)
    return info


def _compiled(schema: dict[str, Any]) -> Callable[[Any], bool] | None:
    """jsonschema-rs's `is_valid` for `schema`, with the Python validator's defaults: formats
    are annotations, and nothing is fetched over the network (a remote `$ref` fails here, and
    the Python validator alone judges)."""
    try:
        compiled = jsonschema_rs.validator_for(schema, validate_formats=False, offline=True)
    except (jsonschema_rs.ValidationError, ValueError, TypeError):
        return None
    is_valid: Callable[[Any], bool] = compiled.is_valid
    return is_valid


@dataclass(frozen=True, slots=True)
class OutputVerdict:
    """Whether one answer is usable; `error_code` None means valid."""

    parsed: Any = None
    error_code: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None


def check_output(
    text: str | None, finish_reason: str | None, schema: dict[str, Any] | None
) -> OutputVerdict:
    """Judge one answer: truncated, filtered, empty, unparseable or schema-invalid is invalid."""
    if finish_reason == "length":
        return OutputVerdict(None, "truncated", "the answer hit max_tokens (finish_reason=length)")
    if finish_reason == "content_filter":
        return OutputVerdict(None, "content_filter", "the answer was withheld by a content filter")
    if text is None or not text.strip():
        return OutputVerdict(None, "empty", "the answer was empty")
    if schema is None:
        return OutputVerdict()
    info = schema_info(schema)
    try:
        value = extract_json(text, expect=info.expect)
    except ExtractionError as exc:
        return OutputVerdict(None, "invalid_json", str(exc))
    value = align_keys(value, schema)
    if info.fast is not None and info.fast(value):
        return OutputVerdict(value)
    if info.fast is None and info.validator.is_valid(value):
        return OutputVerdict(value)
    error = best_match(info.validator.iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return OutputVerdict(value, "schema_invalid", f"at {where}: {error.message}")
    return OutputVerdict(value)
