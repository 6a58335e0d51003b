"""Spec and teacher envelopes: limits, where an adaptive window reads load, label sets."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def test_adaptive_limits_read_the_server_roots_metrics() -> None:
    from service.domain.teacher import TeacherLimits

    adaptive = TeacherLimits(adaptive=True)
    assert adaptive.load_metrics_url("http://vllm:8000/v1") == "http://vllm:8000/metrics"
    assert adaptive.load_metrics_url("https://h/proxy/v1/") == "https://h/proxy/metrics"
    assert adaptive.load_metrics_url("http://h:1") == "http://h:1/metrics"
    explicit = TeacherLimits(adaptive=True, metrics_url="http://h:9/m")
    assert explicit.load_metrics_url("http://h/v1") == "http://h:9/m"
    assert TeacherLimits().load_metrics_url("http://h/v1") is None


def test_spec_labels_may_be_written_as_in_the_data() -> None:
    from service.domain.spec import TaskSpec

    assert TaskSpec(instructions="x", labels=[0, 1]).labels == ["0", "1"]
    assert TaskSpec(instructions="x", labels=[True, False]).labels == ["True", "False"]
    assert TaskSpec(instructions="x", labels=["a", 2]).labels == ["a", "2"]


def _fingerprint_as_specified(request: Any, model: str) -> str:
    """The fingerprint's definition: sha256 of the canonical JSON of the whole payload. Stored
    calls are looked up by it, so it must never change for the same request."""
    payload = {
        "template": [request.template_id, request.template_version],
        "messages": [m.model_dump() for m in request.messages],
        "model": model,
        "params": request.params.model_dump(),
        "schema": request.response_schema,
        "sample": request.sample_index,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def test_a_request_fingerprint_is_the_canonical_json_hash_computed_once_per_copy() -> None:
    from service.domain.teacher import GenerationParams, TeacherRequest

    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"enum": ["é"]}}}
    requests = [
        TeacherRequest(
            template_id="t",
            template_version="2",
            messages=[
                {"role": "system", "content": 'Ünïcode \u2028 and "quotes"'},
                {"role": "user", "content": f"question {i}"},
            ],
            params=GenerationParams(temperature=0.5, seed=i),
            response_schema=schema if i % 2 else None,
            sample_index=i,
        )
        for i in range(4)
    ]
    for request in requests:
        assert request.fingerprint("m") == _fingerprint_as_specified(request, "m")
        assert request.fingerprint("other") == _fingerprint_as_specified(request, "other")
        assert request.fingerprint("m") == request.fingerprint("m")
        # A copy with changes is fingerprinted afresh, never with its original's cached value.
        changed = request.model_copy(update={"sample_index": 9, "response_schema": {}})
        assert changed.fingerprint("m") == _fingerprint_as_specified(changed, "m")
        assert changed.fingerprint("m") != request.fingerprint("m")
        # The cache is not part of the value: a request equals its fresh twin.
        assert request == TeacherRequest.model_validate(request.model_dump())
