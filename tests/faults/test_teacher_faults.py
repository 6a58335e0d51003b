"""Teacher faults that must end on their own: a teacher that hangs fails the batch (and, when
nothing got through, the job) after the retry deadline, with every attempt recorded; a Redis
restart under the limiter loses no answer."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from sqlalchemy import func, select

from service.domain.teacher import (
    ChatMessage,
    GenerationParams,
    TeacherCallStatus,
    TeacherEndpoint,
    TeacherLimits,
    TeacherRequest,
    TeacherResult,
)
from service.models import Example, GenerationBatch, TeacherCall
from service.settings import BrokerSettings, DatabaseSettings, Settings, WorkerSettings
from tests.e2e.conftest import wait_for
from tests.fake_teacher.client import FakeTeacherProcess
from tests.faults.conftest import OwnRedis
from tests.integration.conftest import InlineStack
from workers import runtime
from workers.composition import build_ports
from workers.teacher import CapabilityCache, OpenAITeacher, RedisLimiter, run_sync


def test_a_hanging_teacher_fails_the_job_after_the_deadline_with_every_attempt_counted(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    deadline_s = 4.0
    runtime.configure(
        ports=build_ports(
            Settings(
                database=DatabaseSettings(url=None),
                broker=BrokerSettings(url=None),
                worker=WorkerSettings(teacher_retry_deadline_s=deadline_s),
            )
        )
    )
    st.teacher.configure(hang_rate=1.0, hang_s=60.0)
    job_id = st.create_job(
        st.job_spec(
            teacher={
                "base_url": st.teacher.base_url,
                "model": "fake-teacher",
                "timeout_s": 0.3,
                "max_attempts": 2,
                "limits": {"max_concurrency": 8},
            },
            batch_size=8,
        )
    )
    started = time.monotonic()
    with st.executing_in_background():
        job = wait_for(
            lambda: (j := st.job(job_id))["status"] in ("failed", "succeeded") and j,
            60,
            "the job to end on its own",
        )
    assert job["status"] == "failed", job
    assert "teacher unavailable" in job["status_reason"]
    assert "retry deadline" in job["status_reason"]
    assert time.monotonic() - started < deadline_s + 40
    time.sleep(0.5)  # the last timed-out requests are cut off at the server too
    with st.sessions() as session:
        batches = session.scalars(select(GenerationBatch)).all()
        assert batches and all(b.status == "failed" for b in batches)
        assert all(b.attempts >= 2 for b in batches)  # retried before giving up
        attempts = session.scalar(select(func.sum(TeacherCall.attempts)))
        calls = session.scalars(select(TeacherCall)).all()
        assert {c.error_code for c in calls} == {"timeout"}
        assert all(c.retry_causes.get("batch_retry", 0) >= 1 for c in calls)
        targets = sum(len(b.targets) for b in batches)
        rejected = session.scalar(
            select(func.count())
            .select_from(Example)
            .where(Example.rejection_reason == "teacher_timeout")
        )
    assert rejected == targets  # every target is accounted for, with the reason
    # Every request the teacher received is an attempt on the rows: nothing paid invisibly.
    assert attempts == st.teacher.stats()["requests_total"]


def _requests(n: int) -> list[TeacherRequest]:
    tag = uuid.uuid4().hex[:6]
    return [
        TeacherRequest(
            template_id="t",
            template_version="1",
            messages=[ChatMessage(role="user", content=f"item {i} {tag}")],
            params=GenerationParams(max_tokens=300),
            response_schema={
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"],
            },
            sample_index=i,
        )
        for i in range(n)
    ]


def test_a_redis_restart_under_the_limiter_loses_no_answer(
    own_redis: OwnRedis, tmp_path: Any
) -> None:
    with FakeTeacherProcess(latency_ms=400) as fake:
        endpoint = TeacherEndpoint(
            base_url=fake.base_url,
            model="fake-teacher",
            limits=TeacherLimits(max_concurrency=8),
            timeout_s=10,
            limiter_key=f"faults-{uuid.uuid4().hex[:6]}",
        )
        limiter = RedisLimiter(own_redis.url, lease_ttl_s=3)

        def restart() -> None:
            time.sleep(0.6)  # eight requests are in flight, the rest wait for a slot
            own_redis.kill()
            time.sleep(2.0)
            own_redis.start()

        async def scenario() -> list[TeacherResult]:
            teacher = OpenAITeacher(endpoint, limiter=limiter, capabilities_cache=CapabilityCache())
            try:
                return await teacher.generate(_requests(32))
            finally:
                await teacher.aclose()
                await limiter.aclose()

        restarter = threading.Thread(target=restart)
        restarter.start()
        try:
            results = run_sync(scenario())
        finally:
            restarter.join()
        assert len(results) == 32
        assert {r.status for r in results} == {TeacherCallStatus.succeeded}, {
            (r.status, r.error_code) for r in results
        }
        assert fake.stats()["requests_total"] == 32  # nothing asked twice


def test_the_limiter_waits_out_a_short_redis_outage_then_gives_up(own_redis: OwnRedis) -> None:
    from workers.teacher import TeacherQuota

    limiter = RedisLimiter(own_redis.url, unreachable_s=1.0)
    quota = TeacherQuota(key="outage", max_concurrency=2)

    async def scenario() -> None:
        # Both slots taken, so the next acquire must ask Redis (a free slot of this process
        # would serve it without Redis).
        leases = [await limiter.acquire(quota, input_tokens=1, output_tokens=1) for _ in "ab"]
        own_redis.kill()
        started = time.monotonic()
        try:
            await limiter.acquire(quota, input_tokens=1, output_tokens=1)
        except Exception as exc:
            assert "onnect" in str(exc) or isinstance(exc, OSError)
        else:
            raise AssertionError("acquire succeeded with Redis down")
        assert 0.5 <= time.monotonic() - started < 5  # it waited, then gave up
        for lease in leases:
            await limiter.release(lease)  # never raises: the slot expires by itself
        await asyncio.sleep(0.2)  # nor does giving it back to the Redis that is down
        await limiter.aclose()

    asyncio.run(scenario())
