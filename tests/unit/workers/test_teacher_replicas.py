"""One teacher served by several replicas: balanced by load, each under its own limits, a
failing one cooled down while its requests go to the others."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter

import httpx2

from service.domain.teacher import (
    ChatMessage,
    GenerationParams,
    TeacherCallStatus,
    TeacherEndpoint,
    TeacherLimits,
    TeacherRequest,
    TeacherResult,
)
from workers.teacher import BackoffPolicy, CapabilityCache, LocalLimiter, OpenAITeacher, run_sync

URLS = ["http://r0.test/v1", "http://r1.test/v1", "http://r2.test/v1"]


class Replicas:
    """Answers as each host would: after its latency, or with its status; counts what each
    host received and held at once."""

    def __init__(self, latency_s: dict[str, float], status: dict[str, int] | None = None) -> None:
        self.latency_s = latency_s
        self.status = status or {}
        self.received: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        host = request.url.host
        self.received[host] += 1
        self.in_flight[host] += 1
        self.max_in_flight[host] = max(self.max_in_flight[host], self.in_flight[host])
        try:
            await asyncio.sleep(self.latency_s.get(host, 0.01))
        finally:
            self.in_flight[host] -= 1
        status = self.status.get(host, 200)
        if status != 200:
            return httpx2.Response(status, json={"error": {"message": "down", "type": "x"}})
        payload = {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
        return httpx2.Response(200, content=json.dumps(payload).encode())


def run(server: Replicas, n: int, *, cap: int, urls: list[str] = URLS) -> list[TeacherResult]:
    endpoint = TeacherEndpoint(
        base_url=urls[0],
        replica_urls=urls[1:],
        model="m",
        limits=TeacherLimits(max_concurrency=cap),
        max_attempts=6,
        limiter_key=f"replicas-{uuid.uuid4().hex[:8]}",
    )
    requests = [
        TeacherRequest(
            template_id="t",
            template_version="1",
            messages=[ChatMessage(role="user", content=f"item {i}")],
            params=GenerationParams(max_tokens=8),
            sample_index=i,
        )
        for i in range(n)
    ]

    async def scenario() -> list[TeacherResult]:
        teacher = OpenAITeacher(
            endpoint,
            limiter=LocalLimiter(),
            capabilities_cache=CapabilityCache(),
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(server)),
            backoff=BackoffPolicy(base_s=0.001, cap_s=0.005),
        )
        try:
            return await teacher.generate(requests)
        finally:
            await teacher.aclose()

    return run_sync(scenario())


def hosts(urls: list[str]) -> list[str]:
    return [httpx2.URL(u).host for u in urls]


def test_requests_are_spread_over_the_replicas_each_under_its_own_cap() -> None:
    server = Replicas(dict.fromkeys(hosts(URLS), 0.02))
    results = run(server, 90, cap=4)
    assert Counter(r.status for r in results) == {TeacherCallStatus.succeeded: 90}
    assert set(server.received) == set(hosts(URLS))
    assert all(20 <= count <= 40 for count in server.received.values()), server.received
    # Each replica has the teacher's limits: 4 at once each, so 12 together.
    assert all(peak <= 4 for peak in server.max_in_flight.values())
    assert sum(server.max_in_flight.values()) > 4


def test_the_least_loaded_replica_gets_the_next_request() -> None:
    fast, slow, slower = hosts(URLS)
    server = Replicas({fast: 0.005, slow: 0.05, slower: 0.1})
    run(server, 120, cap=4)
    # A replica that answers sooner has fewer requests outstanding, so it is picked more.
    assert server.received[fast] > server.received[slow] > server.received[slower]


def test_a_failing_replica_is_cooled_down_and_its_requests_answered_elsewhere() -> None:
    good, down, other = hosts(URLS)
    server = Replicas(dict.fromkeys(hosts(URLS), 0.01), status={down: 503})
    results = run(server, 80, cap=4)
    assert Counter(r.status for r in results) == {TeacherCallStatus.succeeded: 80}
    # The requests it refused were retried on the others; after a few failures in a row it
    # got none for a while (with 4 of ours in flight there, a few more were already on the way).
    assert server.received[down] <= 12, server.received
    assert server.received[good] + server.received[other] >= 80


def test_one_base_url_keeps_the_teachers_own_limiter_key() -> None:
    endpoint = TeacherEndpoint(
        base_url="http://a.test/v1",
        replica_urls=["http://b.test/v1/", "http://a.test/v1"],  # a repeat is dropped
        model="m",
        limiter_key="teacher-1",
    )
    teacher = OpenAITeacher(endpoint, limiter=LocalLimiter())
    keys = [r.quota.key for r in teacher._replicas]
    assert keys == ["teacher-1", "teacher-1@http://b.test/v1"]
