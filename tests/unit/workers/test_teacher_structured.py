"""Structured output: response_format per mode, JSON extraction, validation, re-ask messages."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.domain.teacher import (
    ChatMessage,
    StructuredMode,
    TeacherEndpoint,
    TeacherRequest,
)
from workers.teacher.structured import (
    CapabilityCache,
    ExtractionError,
    Reask,
    check_output,
    extract_json,
    is_format_refusal,
    refused_param,
    render_messages,
    response_format,
    schema_info,
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["pos", "neg"]},
        "score": {"type": "number"},
    },
    "required": ["label", "score"],
    "additionalProperties": False,
}


def make_request(schema: dict[str, Any] | None = SCHEMA, **kw: Any) -> TeacherRequest:
    return TeacherRequest(
        template_id="review",
        template_version="3",
        messages=[
            ChatMessage(role="system", content="You write reviews."),
            ChatMessage(role="user", content="Write one."),
        ],
        response_schema=schema,
        schema_name="review output",
        **kw,
    )


def endpoint(mode: StructuredMode = StructuredMode.auto) -> TeacherEndpoint:
    return TeacherEndpoint(
        base_url="http://llama.test/v1", model="m", structured_mode=mode, limiter_key="t"
    )


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text",
    [
        '{"label": "pos", "score": 1}',
        '  {"label": "pos", "score": 1}\n',
        'Sure! ```json\n{"label": "pos", "score": 1}\n``` Hope that helps.',
        '```\n{"label": "pos", "score": 1}\n```',
        'Here it is: {"label": "pos", "score": 1} -- done',
        '<think>maybe {"label": "neg"}</think>{"label": "pos", "score": 1}',
        'Note {not json} then {"label": "pos", "score": 1}',
    ],
)
def test_extract_json_finds_the_object(text: str) -> None:
    assert extract_json(text, expect=dict) == {"label": "pos", "score": 1}


def test_extract_json_handles_braces_inside_strings() -> None:
    text = 'Answer: {"label": "pos", "note": "a } and a { inside", "score": 2} trailing }'
    assert extract_json(text)["note"] == "a } and a { inside"


def test_extract_json_respects_the_expected_kind() -> None:
    text = 'Items [1, 2] and then {"a": 1}'
    assert extract_json(text) == [1, 2]
    assert extract_json(text, expect=dict) == {"a": 1}
    assert extract_json('{"a": 1} [3]', expect=list) == [3]


@pytest.mark.parametrize("text", ["", "no json here", '{"label": "pos", "score"', "{{{"])
def test_extract_json_raises_when_there_is_none(text: str) -> None:
    with pytest.raises(ExtractionError):
        extract_json(text, expect=dict)


# --------------------------------------------------------------------------- verdicts


def test_check_output_accepts_a_valid_answer() -> None:
    verdict = check_output('{"label": "neg", "score": 0.2}', "stop", SCHEMA)
    assert verdict.ok
    assert verdict.parsed == {"label": "neg", "score": 0.2}


@pytest.mark.parametrize(
    ("text", "finish", "code"),
    [
        ('{"label": "neg", "score": 0.2}', "length", "truncated"),
        ('{"label": "neg", "sc', "length", "truncated"),
        ("", "stop", "empty"),
        (None, "stop", "empty"),
        ("whatever", "content_filter", "content_filter"),
        ('{"label": "neg", "score": ', "stop", "invalid_json"),
        ('{"label": "pos", "score": "high"}', "stop", "schema_invalid"),
        ('{"score": 1}', "stop", "schema_invalid"),
        ('{"label": "pos"}', "stop", "schema_invalid"),
    ],
)
def test_check_output_rejects(text: str | None, finish: str, code: str) -> None:
    verdict = check_output(text, finish, SCHEMA)
    assert not verdict.ok
    assert verdict.error_code == code
    assert verdict.error


def test_schema_errors_name_the_place() -> None:
    verdict = check_output('{"label": 3, "score": 1}', "stop", SCHEMA)
    assert verdict.error is not None and verdict.error.startswith("at label:")


def test_only_the_shape_is_checked_and_keys_are_aligned() -> None:
    # A label outside the enum, an extra key, a key in another case: the answer is usable, and
    # the per-item filters judge the label (with its reason) instead of losing the whole answer.
    verdict = check_output('{"Label": "MAYBE", "score": 1, "note": "x"}', "stop", SCHEMA)
    assert verdict.ok
    assert verdict.parsed == {"label": "MAYBE", "score": 1, "note": "x"}
    nested = {
        "type": "object",
        "properties": {
            "examples": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {"text": {"type": "string", "maxLength": 5}},
                    "required": ["text"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["examples"],
    }
    answer = '{"Examples": [{"TEXT": "a long text"}, {"text": "b"}, {"text": "c", "x": 1}]}'
    verdict = check_output(answer, "stop", nested)
    assert verdict.ok, verdict.error
    assert [item["text"] for item in verdict.parsed["examples"]] == ["a long text", "b", "c"]
    # Two keys that could both be "text": neither is guessed.
    assert not check_output('{"examples": [{"Text": "a", "TEXT": "b"}]}', "stop", nested).ok


class _NoPythonValidation:
    """A Python validator that must not be asked whether an answer is valid."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.asked = 0

    def is_valid(self, value: Any) -> bool:
        self.asked += 1
        return bool(self.real.is_valid(value))

    def iter_errors(self, value: Any) -> Any:
        self.asked += 1
        return self.real.iter_errors(value)


def test_a_valid_answer_is_told_by_the_compiled_schema_and_an_invalid_one_worded_by_jsonschema(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses

    from workers.teacher import structured

    info = schema_info(SCHEMA)
    assert info.fast is not None
    spy = _NoPythonValidation(info.validator)
    patched = dataclasses.replace(info, validator=spy)  # type: ignore[arg-type]
    monkeypatch.setattr(structured, "schema_info", lambda schema: patched)
    assert check_output('{"label": "neg", "score": 0.2}', "stop", SCHEMA).ok
    assert spy.asked == 0
    verdict = check_output('{"label": 3, "score": 1}', "stop", SCHEMA)
    assert verdict.error_code == "schema_invalid"
    assert verdict.error is not None and verdict.error.startswith("at label:")
    assert spy.asked == 1


def test_the_compiled_schema_keeps_formats_as_annotations_and_fetches_nothing() -> None:
    # As the Python validator does by default: a format is not checked...
    email = {"type": "object", "properties": {"to": {"type": "string", "format": "email"}}}
    assert check_output('{"to": "not an address"}', "stop", email).ok
    # ...and a schema whose $ref lies on another server is not fetched: jsonschema-rs declines
    # it, and the Python validator alone judges.
    remote = {"type": "object", "properties": {"x": {"$ref": "http://127.0.0.1:9/x.json"}}}
    assert schema_info(remote).fast is None


def test_free_text_needs_no_json() -> None:
    assert check_output("just prose", "stop", None).ok
    assert check_output("cut mid-senten", "length", None).error_code == "truncated"


def test_invalid_schema_is_refused() -> None:
    import jsonschema

    with pytest.raises(jsonschema.SchemaError):
        schema_info({"type": "no-such-type"})


# --------------------------------------------------------------------------- request side


def test_response_format_per_mode() -> None:
    request = make_request()
    fmt = response_format(request, StructuredMode.json_schema)
    assert fmt == {
        "type": "json_schema",
        "json_schema": {"name": "review_output", "schema": SCHEMA, "strict": True},
    }
    assert response_format(request, StructuredMode.json_object) == {
        "type": "json_object",
        "schema": SCHEMA,
    }
    assert response_format(request, StructuredMode.text) is None
    assert response_format(make_request(None), StructuredMode.json_schema) is None


def test_strict_only_for_closed_schemas() -> None:
    open_schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    fmt = response_format(make_request(open_schema), StructuredMode.json_schema)
    assert fmt is not None and "strict" not in fmt["json_schema"]


def test_schema_goes_into_the_prompt_only_without_constrained_decoding() -> None:
    request = make_request()
    plain = render_messages(request, StructuredMode.json_schema)
    assert plain == [
        {"role": "system", "content": "You write reviews."},
        {"role": "user", "content": "Write one."},
    ]
    for mode in (StructuredMode.json_object, StructuredMode.text):
        messages = render_messages(request, mode)
        assert len(messages) == 2
        assert messages[-1]["content"].startswith("Write one.\n\n")
        assert "JSON schema" in messages[-1]["content"]
        assert json.dumps(SCHEMA, sort_keys=True, separators=(",", ":")) in messages[-1]["content"]
    assert request.messages[-1].content == "Write one."  # the request itself is untouched


def test_reask_quotes_the_bad_answer_and_corrects_it() -> None:
    request = make_request()
    reask = Reask('{"label": "maybe"}', "schema_invalid", "at label: 'maybe' is not one of")
    messages = render_messages(request, StructuredMode.json_schema, reask)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == '{"label": "maybe"}'
    assert "invalid (at label: 'maybe' is not one of)" in messages[3]["content"]
    # Deterministic: the same failure gives the same re-ask, so it is cacheable and repeatable.
    assert messages == render_messages(request, StructuredMode.json_schema, reask)


def test_reask_after_truncation_keeps_roles_alternating() -> None:
    request = make_request()
    reask = Reask('{"label": "po', "truncated", "hit max_tokens")
    messages = render_messages(request, StructuredMode.text, reask)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "cut off" in messages[-1]["content"]
    assert messages[-1]["content"].count("JSON schema") == 2  # prompt and correction


# --------------------------------------------------------------------------- capabilities


def test_auto_mode_steps_down_one_level_at_a_time() -> None:
    cache = CapabilityCache()
    ep = endpoint()
    assert cache.mode_for(ep) is StructuredMode.json_schema
    assert cache.downgrade(ep, StructuredMode.json_schema) is StructuredMode.json_object
    assert cache.mode_for(ep) is StructuredMode.json_object
    # A request that was still in json_schema learns where the others already are.
    assert cache.downgrade(ep, StructuredMode.json_schema) is StructuredMode.json_object
    assert cache.downgrade(ep, StructuredMode.json_object) is StructuredMode.text
    assert cache.downgrade(ep, StructuredMode.text) is None
    other_model = ep.model_copy(update={"model": "other"})
    assert cache.mode_for(other_model) is StructuredMode.json_schema


def test_a_fixed_mode_never_changes() -> None:
    cache = CapabilityCache()
    ep = endpoint(StructuredMode.json_object)
    assert cache.mode_for(ep) is StructuredMode.json_object
    assert cache.downgrade(ep, StructuredMode.json_object) is None


def test_format_refusals_are_recognised() -> None:
    llama = 'response_format type must be one of "text" or "json_object", but got: json_schema'
    assert is_format_refusal(500, llama, StructuredMode.json_schema)
    assert is_format_refusal(400, "Invalid parameter: response_format", StructuredMode.json_object)
    assert not is_format_refusal(500, "The server had an error", StructuredMode.json_schema)
    assert not is_format_refusal(429, "response_format", StructuredMode.json_schema)
    assert not is_format_refusal(500, "response_format", StructuredMode.text)


_SENT = {"model": "m", "messages": [], "temperature": 0.2, "max_tokens": 64, "seed": 7}


@pytest.mark.parametrize(
    ("status", "message", "param", "expected"),
    [
        # OpenAI, reasoning models
        (
            400,
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "max_tokens",
            "max_tokens",
        ),
        (
            400,
            "Unsupported value: 'temperature' does not support 0.2 with this model. "
            "Only the default (1) value is supported.",
            "temperature",
            "temperature",
        ),
        # Azure OpenAI, older API versions: no `param`, the name in the text
        (400, "Unrecognized request argument supplied: seed", None, "seed"),
        # a pydantic (FastAPI) server that forbids extra fields, as the SDK words its 422
        (
            422,
            "Error code: 422 - {'detail': [{'type': 'extra_forbidden', 'loc': ['body', 'seed'], "
            "'msg': 'Extra inputs are not permitted', 'input': 7}]}",
            None,
            "seed",
        ),
        (400, "unknown field `seed`, expected one of `model`, `messages`", None, "seed"),
        # not refusals: our own bad values, other errors, fields we did not send
        (400, "Invalid 'max_tokens': integer below minimum value.", "max_tokens", None),
        (400, "temperature must be between 0 and 2", None, None),
        (500, "Unrecognized request argument supplied: seed", None, None),
        (400, "Unrecognized request argument supplied: top_p", None, None),
        (400, "Unrecognized request argument supplied: response_format", None, None),
    ],
)
def test_refused_parameters_are_recognised(
    status: int, message: str, param: str | None, expected: str | None
) -> None:
    assert refused_param(status, message, param, dict(_SENT)) == expected


def test_refused_parameters_are_dropped_or_renamed_per_backend() -> None:
    cache = CapabilityCache()
    ep = TeacherEndpoint(base_url="http://a/v1", model="m", limiter_key="a")
    other = TeacherEndpoint(base_url="http://b/v1", model="m", limiter_key="b")
    cache.refuse_param(ep, "seed")
    cache.refuse_param(ep, "max_tokens")
    body = dict(_SENT)
    cache.adapt_params(ep, body)
    assert "seed" not in body and "max_tokens" not in body
    assert body["max_completion_tokens"] == 64 and body["temperature"] == 0.2
    untouched = dict(_SENT)
    cache.adapt_params(other, untouched)
    assert untouched == _SENT
    cache.refuse_param(ep, "max_completion_tokens")
    body = dict(_SENT)
    cache.adapt_params(ep, body)
    assert "max_tokens" not in body and "max_completion_tokens" not in body
