"""Spec and teacher envelopes: limits, where an adaptive window reads load, label sets."""

from __future__ import annotations


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
