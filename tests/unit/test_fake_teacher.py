"""Tests of the fake OpenAI-compatible teacher, run as a real process and driven by the openai SDK."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.fake_teacher.client import FakeTeacherProcess
from tests.fake_teacher.server import (
    TOKEN_RE,
    PromptContext,
    count_tokens,
    generate_from_schema,
    truncate_tokens,
)

DEFAULTS: dict[str, Any] = {
    "latency_ms": 0.0,
    "jitter_ms": 0.0,
    "max_concurrency": 0,
    "rate_limit_requests": 0,
    "rate_limit_window_s": 60.0,
    "retry_after_s": 1.0,
    "error_rate": 0.0,
    "malformed_rate": 0.0,
    "truncate_rate": 0.0,
    "hang_rate": 0.0,
    "hang_s": 3600.0,
    "faults_first_attempt_only": False,
    "api_key": None,
    "no_json_schema": False,
    "models": ["fake-teacher"],
    "down": False,
}

LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]

EXAMPLES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "examples": {
            "type": "array",
            "minItems": 1,
            "maxItems": 10,
            "items": {
                "type": "object",
                "properties": {
                    "text": {"type": "string", "minLength": 10},
                    "label": {"type": "string", "enum": LABELS},
                },
                "required": ["text", "label"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["examples"],
    "additionalProperties": False,
}

NUM_PROMPT = (
    "The student got these questions wrong:\n"
    "<data>\n"
    "How many people live in Tokyo? (NUM)\n"
    "Who invented the telephone? (HUM)\n"
    "Where is the tallest mountain of Africa? (LOC)\n"
    "</data>\n"
    f"Allowed labels: {', '.join(LABELS)}.\n"
    "Write 4 new examples whose label is NUM, each a short question."
)

SCHEMAS: dict[str, dict[str, Any]] = {
    "examples": EXAMPLES_SCHEMA,
    "defs_ref_optional": {
        "$defs": {
            "Color": {"type": "string", "enum": ["red", "green", "blue"]},
            "Item": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "color": {"$ref": "#/$defs/Color"},
                    "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
                "required": ["name", "color", "note"],
            },
        },
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 3},
            "best": {"anyOf": [{"$ref": "#/$defs/Item"}, {"type": "null"}]},
        },
        "required": ["items", "best"],
    },
    "string_bounds_and_const": {
        "type": "object",
        "properties": {
            "short": {"type": "string", "minLength": 3, "maxLength": 5},
            "long": {"type": "string", "minLength": 200},
            "tiny": {"type": "string", "maxLength": 1},
            "version": {"const": "v1"},
            "level": {"enum": [1, 2, 3]},
        },
        "required": ["short", "long", "tiny", "version", "level"],
    },
    "numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "positive": {"type": "integer", "exclusiveMinimum": 0},
            "below": {"type": "number", "exclusiveMaximum": -5},
            "step": {"type": "integer", "multipleOf": 5, "minimum": 1, "maximum": 30},
            "flag": {"type": "boolean"},
            "nothing": {"type": "null"},
        },
        "required": ["age", "score", "positive", "below", "step", "flag", "nothing"],
    },
    "one_of_discriminated": {
        "type": "object",
        "properties": {
            "shape": {
                "oneOf": [
                    {
                        "type": "object",
                        "properties": {
                            "kind": {"const": "circle"},
                            "radius": {"type": "number", "minimum": 0},
                        },
                        "required": ["kind", "radius"],
                    },
                    {
                        "type": "object",
                        "properties": {
                            "kind": {"const": "square"},
                            "side": {"type": "integer", "minimum": 1},
                        },
                        "required": ["kind", "side"],
                    },
                ]
            }
        },
        "required": ["shape"],
    },
    "root_array_unique": {
        "type": "array",
        "items": {"type": "string", "enum": ["a", "b", "c", "d"]},
        "minItems": 2,
        "maxItems": 4,
        "uniqueItems": True,
    },
    "nullable_types_nested_arrays": {
        "type": "object",
        "properties": {
            "maybe": {"type": ["string", "null"]},
            "matrix": {
                "type": "array",
                "minItems": 2,
                "items": {"type": "array", "minItems": 3, "items": {"type": "integer"}},
            },
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 0},
        },
        "required": ["maybe", "matrix", "tags"],
    },
    "all_of": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
        ]
    },
    "recursive_tree": {
        "type": "object",
        "properties": {
            "label": {"type": "string"},
            "children": {"type": "array", "items": {"$ref": "#"}},
        },
        "required": ["label", "children"],
    },
    "min_properties": {
        "type": "object",
        "additionalProperties": {"type": "integer"},
        "minProperties": 2,
    },
}


class Example(BaseModel):
    text: str
    label: Literal["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


class Batch(BaseModel):
    examples: list[Example] = Field(min_length=1, max_length=10)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def teacher() -> Iterator[FakeTeacherProcess]:
    with FakeTeacherProcess(seed=7) as proc:
        yield proc


@pytest.fixture(autouse=True)
def fresh(teacher: FakeTeacherProcess) -> Iterator[None]:
    # Every test starts from the default configuration and zeroed counters.
    teacher.configure(**DEFAULTS)
    teacher.reset()
    yield


@pytest.fixture(scope="module")
def client(teacher: FakeTeacherProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=teacher.base_url, api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture
def http(teacher: FakeTeacherProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=teacher.root_url, trust_env=False, timeout=10) as c:
        yield c


def _ask(
    client: openai.OpenAI, prompt: str, schema: dict[str, Any] | None = None, **kwargs: Any
) -> Any:
    if schema is not None:
        kwargs["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "out", "schema": schema, "strict": True},
        }
    return client.chat.completions.create(
        model="fake-teacher", messages=[{"role": "user", "content": prompt}], **kwargs
    )


def _chat_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-teacher", "messages": [{"role": "user", "content": prompt}], **extra}


# --------------------------------------------------------------------------- basics


def test_models_listed(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["fake-teacher"]


def test_response_shape_and_determinism(client: openai.OpenAI) -> None:
    first = _ask(client, "Tell me something about rivers and mountains.", n=3, temperature=0.7)
    second = _ask(client, "Tell me something about rivers and mountains.", n=3, temperature=0.7)
    assert first.object == "chat.completion"
    assert first.model == "fake-teacher"
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" for c in first.choices)
    assert all(c.finish_reason == "stop" for c in first.choices)
    contents = [c.message.content for c in first.choices]
    assert contents == [c.message.content for c in second.choices]
    assert first.usage == second.usage
    assert len(set(contents)) == 3, "choices must differ from each other"
    reseeded = _ask(client, "Tell me something about rivers and mountains.", n=3, seed=1)
    assert [c.message.content for c in reseeded.choices] != contents


def test_server_seed_changes_content(client: openai.OpenAI) -> None:
    with (
        FakeTeacherProcess(seed=8) as other,
        openai.OpenAI(base_url=other.base_url, api_key="x", max_retries=0) as other_client,
    ):
        theirs = _ask(other_client, "Describe a quiet harbour town at dawn.").choices[0]
    ours = _ask(client, "Describe a quiet harbour town at dawn.").choices[0]
    assert ours.message.content != theirs.message.content


def test_usage_counts_tokens_consistently(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You write data, don't chat."},
        {"role": "user", "content": "Give me a sentence about trains, please!"},
    ]
    response = client.chat.completions.create(model="fake-teacher", messages=messages, n=2)
    assert response.usage is not None
    expected_prompt = sum(len(TOKEN_RE.findall(m["content"])) for m in messages)
    expected_completion = sum(count_tokens(c.message.content or "") for c in response.choices)
    assert response.usage.prompt_tokens == expected_prompt
    assert response.usage.completion_tokens == expected_completion
    assert response.usage.total_tokens == expected_prompt + expected_completion


def test_plain_text_is_built_from_prompt_words(client: openai.OpenAI) -> None:
    prompt = "Kangaroos bounce across dusty outback plains under burning skies every summer."
    content = _ask(client, prompt).choices[0].message.content
    assert content is not None and not content.lstrip().startswith("{")
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", content)}
    assert words & {"kangaroos", "outback", "plains", "burning", "dusty"}


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_truncates_with_length(client: openai.OpenAI, key: str) -> None:
    full = _ask(client, "Write a long story about lighthouses.", EXAMPLES_SCHEMA)
    assert full.usage is not None and full.usage.completion_tokens > 7
    cut = _ask(client, "Write a long story about lighthouses.", EXAMPLES_SCHEMA, **{key: 7})
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 7
    assert full.choices[0].message.content.startswith(cut.choices[0].message.content)


def test_truncate_tokens_helper() -> None:
    text = 'He said: "hello, world" twice.'
    for limit in range(count_tokens(text) + 2):
        assert count_tokens(truncate_tokens(text, limit)) == min(limit, count_tokens(text))


# --------------------------------------------------------------------------- structured output


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_validates(client: openai.OpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    response = _ask(client, f"Produce data for the {name} case about harbours.", schema, n=3)
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_generator_validates_across_seeds(name: str) -> None:
    schema = SCHEMAS[name]
    validator = jsonschema.Draft202012Validator(schema)
    ctx = PromptContext.from_messages([{"role": "user", "content": NUM_PROMPT}])
    for seed in range(40):
        document = generate_from_schema(schema, random.Random(seed), ctx)
        errors = list(validator.iter_errors(document))
        assert not errors, f"seed {seed}: {errors[0].message} in {document!r}"


def test_examples_follow_requested_count_and_label(client: openai.OpenAI) -> None:
    response = _ask(client, NUM_PROMPT, EXAMPLES_SCHEMA, n=2)
    for choice in response.choices:
        examples = json.loads(choice.message.content)["examples"]
        assert len(examples) == 4
        assert {e["label"] for e in examples} == {"NUM"}
        assert len({e["text"] for e in examples}) == 4
        # Texts are made from the data block's words and never leak the label itself.
        assert all("NUM" not in e["text"].split() for e in examples)
    assert response.choices[0].message.content != response.choices[1].message.content


def test_a_lying_teacher_gives_other_labels_than_asked(
    teacher: FakeTeacherProcess, client: openai.OpenAI
) -> None:
    truthful = json.loads(_ask(client, NUM_PROMPT, EXAMPLES_SCHEMA).choices[0].message.content)
    teacher.configure(mislabel_rate=1.0)
    try:
        lies = json.loads(_ask(client, NUM_PROMPT, EXAMPLES_SCHEMA).choices[0].message.content)
    finally:
        teacher.configure(mislabel_rate=0.0)
    assert {e["label"] for e in truthful["examples"]} == {"NUM"}
    assert len(lies["examples"]) == 4 and "NUM" not in {e["label"] for e in lies["examples"]}
    assert _ask(client, NUM_PROMPT, EXAMPLES_SCHEMA).choices[0].message.content == json.dumps(
        truthful, ensure_ascii=False
    )


def test_enum_without_mention_varies_across_items(client: openai.OpenAI) -> None:
    prompt = "Write 10 new examples of questions about anything at all."
    examples = json.loads(_ask(client, prompt, EXAMPLES_SCHEMA).choices[0].message.content)
    assert len(examples["examples"]) == 10
    assert len({e["label"] for e in examples["examples"]}) > 1


def test_openai_parse_with_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="fake-teacher",
        messages=[{"role": "user", "content": NUM_PROMPT}],
        response_format=Batch,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Batch)
    assert [e.label for e in parsed.examples] == ["NUM"] * 4


def test_json_object_with_inline_schema_like_llama_cpp(http: httpx.Client) -> None:
    body = _chat_body(
        NUM_PROMPT, response_format={"type": "json_object", "schema": EXAMPLES_SCHEMA}
    )
    content = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"][
        "content"
    ]
    document = json.loads(content)
    jsonschema.validate(document, EXAMPLES_SCHEMA)
    assert [e["label"] for e in document["examples"]] == ["NUM"] * 4


def test_json_object_honours_schema_in_prompt(client: openai.OpenAI) -> None:
    prompt = f"{NUM_PROMPT}\nAnswer as JSON matching:\n```json\n{json.dumps(EXAMPLES_SCHEMA)}\n```"
    fenced = client.chat.completions.create(
        model="fake-teacher",
        messages=[{"role": "user", "content": prompt}],
        response_format={"type": "json_object"},
    )
    jsonschema.validate(json.loads(fenced.choices[0].message.content or ""), EXAMPLES_SCHEMA)
    after_words = client.chat.completions.create(
        model="fake-teacher",
        messages=[
            {
                "role": "system",
                "content": f"Reply with this JSON schema: {json.dumps(SCHEMAS['numbers'])}",
            },
            {"role": "user", "content": "Go."},
        ],
        response_format={"type": "json_object"},
    )
    jsonschema.validate(
        json.loads(after_words.choices[0].message.content or ""), SCHEMAS["numbers"]
    )


def test_json_object_without_schema_is_text_object(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="fake-teacher",
        messages=[{"role": "user", "content": "Say something about owls."}],
        response_format={"type": "json_object"},
    )
    document = json.loads(response.choices[0].message.content or "")
    assert set(document) == {"text"} and isinstance(document["text"], str)


def test_plain_request_asking_for_json_gets_json(client: openai.OpenAI) -> None:
    prompt = (
        f"{NUM_PROMPT}\nReturn JSON for this schema:\n```json\n{json.dumps(EXAMPLES_SCHEMA)}\n```"
    )
    content = _ask(client, prompt).choices[0].message.content
    jsonschema.validate(json.loads(content), EXAMPLES_SCHEMA)


# --------------------------------------------------------------------------- errors and auth


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model="gpt-nope", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.code == "model_not_found"


def test_api_key_enforced(teacher: FakeTeacherProcess, client: openai.OpenAI) -> None:
    teacher.configure(api_key="sekrit")
    with pytest.raises(openai.AuthenticationError) as info:
        _ask(client, "hello")
    assert info.value.code == "invalid_api_key"
    with openai.OpenAI(base_url=teacher.base_url, api_key="sekrit", max_retries=0) as authed:
        assert _ask(authed, "hello").choices[0].message.content
        assert [m.id for m in authed.models.list()] == ["fake-teacher"]
    assert teacher.stats()["by_status"] == {"200": 1, "401": 1}


def test_no_json_schema_mode_rejects_json_schema(
    teacher: FakeTeacherProcess, client: openai.OpenAI, http: httpx.Client
) -> None:
    teacher.configure(no_json_schema=True)
    with pytest.raises(openai.InternalServerError) as info:
        _ask(client, NUM_PROMPT, EXAMPLES_SCHEMA)
    assert "json_schema" in str(info.value)
    body = _chat_body(
        NUM_PROMPT, response_format={"type": "json_object", "schema": EXAMPLES_SCHEMA}
    )
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    jsonschema.validate(
        json.loads(response.json()["choices"][0]["message"]["content"]), EXAMPLES_SCHEMA
    )


def test_cli_flags_apply() -> None:
    with FakeTeacherProcess(
        api_key="k", no_json_schema=True, models=("small", "large"), retry_after_s=0.25
    ) as proc:
        config = proc.config()
        assert config["models"] == ["small", "large"]
        assert config["api_key"] == "k" and config["no_json_schema"] is True
        assert config["retry_after_s"] == 0.25
        with openai.OpenAI(base_url=proc.base_url, api_key="k", max_retries=0) as c:
            assert [m.id for m in c.models.list()] == ["small", "large"]
            reply = c.chat.completions.create(
                model="large", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.model == "large"
            with pytest.raises(openai.InternalServerError):
                c.chat.completions.create(
                    model="small",
                    messages=[{"role": "user", "content": "hi"}],
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "x", "schema": {"type": "object"}},
                    },
                )


def test_down_answers_503(teacher: FakeTeacherProcess, client: openai.OpenAI) -> None:
    teacher.configure(down=True)
    with pytest.raises(openai.InternalServerError) as info:
        _ask(client, "hello")
    assert info.value.status_code == 503
    teacher.configure(down=False)
    assert _ask(client, "hello").choices
    assert teacher.stats()["by_status"] == {"200": 1, "503": 1}


def test_admin_config_rejects_bad_values(http: httpx.Client) -> None:
    bad_values: list[dict[str, Any]] = [
        {"error_rate": 1.5},
        {"nope": 1},
        {"models": []},
        {"down": "yes"},
        {"max_concurrency": -1},
    ]
    for bad in bad_values:
        assert http.post("/admin/config", json=bad).status_code == 400
    assert http.get("/admin/config").json()["error_rate"] == 0.0


# --------------------------------------------------------------------------- faults


def test_concurrency_cap_answers_429_with_retry_after(teacher: FakeTeacherProcess) -> None:
    teacher.configure(max_concurrency=2, latency_ms=400, retry_after_s=0.2)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=teacher.root_url, trust_env=False, timeout=10) as c:
            return await asyncio.gather(
                *(c.post("/v1/chat/completions", json=_chat_body(f"q{i}")) for i in range(8))
            )

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 2 and statuses.count(429) == 6
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["Retry-After"] == "0.2"
    assert limited.headers["retry-after-ms"] == "200"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    stats = teacher.stats()
    assert stats["max_in_flight"] == 2 and stats["in_flight"] == 0
    assert stats["by_status"] == {"200": 2, "429": 6}
    assert stats["requests_total"] == 8 and stats["completions_ok"] == 2
    # Rejected requests never reached admission, so only two fingerprints were recorded.
    assert stats["unique_fingerprints"] == 2


def test_a_request_budget_answers_openais_rpm_429_until_the_window_moves_on(
    teacher: FakeTeacherProcess, http: httpx.Client
) -> None:
    teacher.configure(rate_limit_requests=2, rate_limit_window_s=0.3)
    first = [http.post("/v1/chat/completions", json=_chat_body(f"q{i}")) for i in range(3)]
    assert [r.status_code for r in first] == [200, 200, 429]
    # Every answer says what is left of the budget, as OpenAI's do.
    assert [r.headers["x-ratelimit-remaining-requests"] for r in first[:2]] == ["1", "0"]
    refused = first[2]
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    wait = float(refused.headers["x-ratelimit-reset-requests"].rstrip("s"))
    assert 0 < wait <= 0.3
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "requests per min (RPM)" in error["message"]
    time.sleep(wait + 0.05)
    assert http.post("/v1/chat/completions", json=_chat_body("q3")).status_code == 200


def test_latency_and_metrics_while_in_flight(
    teacher: FakeTeacherProcess, http: httpx.Client
) -> None:
    teacher.configure(latency_ms=600)
    with ThreadPoolExecutor(max_workers=3) as pool:
        started = time.monotonic()
        futures = [
            pool.submit(http.post, "/v1/chat/completions", json=_chat_body(f"slow {i}"))
            for i in range(3)
        ]
        time.sleep(0.3)
        metrics = teacher.metrics()
        results = [f.result() for f in futures]
    assert time.monotonic() - started >= 0.6
    assert all(r.status_code == 200 for r in results)
    assert "# TYPE vllm:num_requests_running gauge" in metrics
    assert "# TYPE vllm:num_requests_waiting gauge" in metrics
    assert 'vllm:num_requests_running{model_name="fake-teacher"} 3.0' in metrics
    assert 'vllm:num_requests_waiting{model_name="fake-teacher"} 0.0' in metrics
    assert 'vllm:num_requests_running{model_name="fake-teacher"} 0.0' in teacher.metrics()
    assert teacher.stats()["max_in_flight"] == 3


def test_timeline_records_requests_in_flight_at_each_admission_and_answer(
    teacher: FakeTeacherProcess, http: httpx.Client
) -> None:
    teacher.configure(latency_ms=300)
    teacher.reset()
    before = time.time()
    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(
            pool.map(
                lambda i: http.post("/v1/chat/completions", json=_chat_body(f"timeline {i}")),
                range(3),
            )
        )
    after = time.time()
    assert all(r.status_code == 200 for r in answers)
    events = teacher.timeline()
    times = [t for t, _ in events]
    levels = [n for _, n in events]
    assert len(events) == 6 and times == sorted(times)
    assert before <= times[0] and times[-1] <= after
    assert max(levels) == 3 and levels[-1] == 0
    # Each answer came after the latency (asyncio's clock is monotonic, the timeline's is
    # the wall clock: 1 ms of slack, as one run read 0.29999 s).
    assert times[-1] - times[0] >= 0.299
    teacher.reset()
    assert teacher.timeline() == []


def test_error_rate_is_roughly_honoured_and_reproducible(
    teacher: FakeTeacherProcess, http: httpx.Client
) -> None:
    teacher.configure(error_rate=0.3)

    def run() -> list[int]:
        return [
            http.post("/v1/chat/completions", json=_chat_body(f"question {i}")).status_code
            for i in range(200)
        ]

    first = run()
    assert set(first) == {200, 500}
    assert 35 <= first.count(500) <= 85
    teacher.reset()
    assert run() == first, "fault decisions must be reproducible after a reset"
    assert teacher.stats()["faults_injected"]["error"] == first.count(500)


def test_error_rate_one_fails_every_attempt(
    teacher: FakeTeacherProcess, client: openai.OpenAI
) -> None:
    teacher.configure(error_rate=1.0)
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            _ask(client, "same question")
    assert teacher.stats()["by_status"] == {"500": 3}


def test_malformed_json(teacher: FakeTeacherProcess, client: openai.OpenAI) -> None:
    teacher.configure(malformed_rate=1.0)
    for i in range(10):
        response = _ask(client, f"{NUM_PROMPT} {i}", EXAMPLES_SCHEMA)
        assert response.choices[0].finish_reason == "stop"
        with pytest.raises(json.JSONDecodeError):
            json.loads(response.choices[0].message.content)
    assert teacher.stats()["faults_injected"]["malformed"] == 10


def test_truncate_rate(teacher: FakeTeacherProcess, client: openai.OpenAI) -> None:
    full = _ask(client, NUM_PROMPT, EXAMPLES_SCHEMA)
    teacher.configure(truncate_rate=1.0)
    cut = _ask(client, NUM_PROMPT, EXAMPLES_SCHEMA)
    assert cut.choices[0].finish_reason == "length"
    assert full.usage is not None and cut.usage is not None
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    assert full.choices[0].message.content.startswith(cut.choices[0].message.content)


def test_first_attempt_only_faults_succeed_on_retry(
    teacher: FakeTeacherProcess, client: openai.OpenAI
) -> None:
    teacher.configure(error_rate=1.0, faults_first_attempt_only=True)
    with pytest.raises(openai.InternalServerError):
        _ask(client, NUM_PROMPT, EXAMPLES_SCHEMA)
    retried = _ask(client, NUM_PROMPT, EXAMPLES_SCHEMA)
    jsonschema.validate(json.loads(retried.choices[0].message.content), EXAMPLES_SCHEMA)
    stats = teacher.stats()
    assert stats["unique_fingerprints"] == 1 and stats["duplicate_successes"] == 0
    _ask(client, NUM_PROMPT, EXAMPLES_SCHEMA)
    assert teacher.stats()["duplicate_successes"] == 1


def test_hang_first_attempt_then_retry(teacher: FakeTeacherProcess, client: openai.OpenAI) -> None:
    teacher.configure(hang_rate=1.0, hang_s=60, faults_first_attempt_only=True)
    impatient = client.with_options(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        _ask(impatient, "will this hang?")
    assert _ask(impatient, "will this hang?").choices[0].message.content
    # The server cancels the abandoned handler, so the hung request leaves in_flight.
    deadline = time.monotonic() + 5
    while teacher.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = teacher.stats()
    assert stats["in_flight"] == 0
    assert stats["client_disconnects"] == 1
    assert stats["faults_injected"]["hang"] == 1


def test_stats_and_reset(teacher: FakeTeacherProcess, client: openai.OpenAI) -> None:
    for prompt in ("a", "b", "a"):
        _ask(client, prompt)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "a"}])
    stats = teacher.stats()
    assert stats["requests_total"] == 4
    assert stats["completions_ok"] == 3
    assert stats["by_status"] == {"200": 3, "404": 1}
    assert stats["unique_fingerprints"] == 2
    assert stats["duplicate_successes"] == 1
    assert stats["max_in_flight"] == 1 and stats["in_flight"] == 0
    teacher.reset()
    stats = teacher.stats()
    assert stats["requests_total"] == 0 and stats["by_status"] == {}
    assert stats["unique_fingerprints"] == 0 and stats["duplicate_successes"] == 0
