"""In-process limiter semantics: concurrency slots, request and token buckets, refunds, and the
capacity a 429 teaches."""

from __future__ import annotations

import asyncio
import time

import pytest

from workers.teacher import LocalLimiter, TeacherQuota, run_sync
from workers.teacher.limits import GROW_EVERY_S, HOLD_S, LearnedCapacity


def test_concurrency_slots_are_granted_in_order_and_given_back() -> None:
    async def scenario() -> list[int]:
        limiter = LocalLimiter()
        quota = TeacherQuota("t", max_concurrency=2)
        first = await limiter.acquire(quota, input_tokens=1, output_tokens=1)
        await limiter.acquire(quota, input_tokens=1, output_tokens=1)
        order: list[int] = []

        async def wait(i: int) -> None:
            await limiter.acquire(quota, input_tokens=1, output_tokens=1)
            order.append(i)

        waiters = [asyncio.create_task(wait(i)) for i in range(2)]
        await asyncio.sleep(0.02)
        assert order == []  # both slots are taken
        await limiter.release(first)
        await asyncio.wait_for(waiters[0], 1)
        assert order == [0]
        assert not waiters[1].done()
        waiters[1].cancel()
        return order

    assert run_sync(scenario()) == [0]


def test_requests_per_minute_bucket_makes_the_next_request_wait() -> None:
    async def scenario() -> float:
        limiter = LocalLimiter()
        quota = TeacherQuota("t", max_concurrency=100, requests_per_minute=120)  # 2 a second
        for _ in range(120):  # the bucket starts full: a minute's worth at once
            await limiter.release(await limiter.acquire(quota, input_tokens=0, output_tokens=0))
        started = time.perf_counter()
        await limiter.acquire(quota, input_tokens=0, output_tokens=0)
        return time.perf_counter() - started

    # Half a second for the next token, less what came back while draining (a busy machine
    # drains slowly).
    assert 0.2 <= run_sync(scenario()) <= 1.0


def test_unused_output_reservation_is_refunded() -> None:
    async def scenario() -> tuple[float, float]:
        limiter = LocalLimiter()
        quota = TeacherQuota("t", max_concurrency=10, output_tokens_per_minute=6000)
        # Reserve the whole minute (max_tokens), generate nothing: all of it comes back.
        lease = await limiter.acquire(quota, input_tokens=0, output_tokens=6000)
        await limiter.release(lease, input_tokens=0, output_tokens=0)
        started = time.perf_counter()
        lease = await limiter.acquire(quota, input_tokens=0, output_tokens=6000)
        refunded = time.perf_counter() - started
        # This time all of it is used: the next 60 tokens must wait for the refill (100/s).
        await limiter.release(lease, input_tokens=0, output_tokens=6000)
        started = time.perf_counter()
        await limiter.acquire(quota, input_tokens=0, output_tokens=60)
        return refunded, time.perf_counter() - started

    refunded, waited = run_sync(scenario())
    assert refunded < 0.05
    assert 0.5 <= waited <= 1.2


def test_input_underestimate_is_charged_afterwards() -> None:
    async def scenario() -> float:
        limiter = LocalLimiter()
        quota = TeacherQuota("t", max_concurrency=10, input_tokens_per_minute=6000)
        lease = await limiter.acquire(quota, input_tokens=100, output_tokens=0)
        await limiter.release(lease, input_tokens=5950, output_tokens=0)  # far more than guessed
        started = time.perf_counter()
        await limiter.acquire(quota, input_tokens=60, output_tokens=0)
        return time.perf_counter() - started

    assert 0.05 <= run_sync(scenario()) <= 1.0


def test_a_reservation_larger_than_the_budget_is_capped_so_it_can_ever_pass() -> None:
    quota = TeacherQuota("t", max_concurrency=1, output_tokens_per_minute=500)
    assert quota.clamp(10, 4096) == (10, 500)

    async def scenario() -> int:
        limiter = LocalLimiter()
        lease = await asyncio.wait_for(
            limiter.acquire(quota, input_tokens=10, output_tokens=4096), 1
        )
        return lease.output_tokens

    assert run_sync(scenario()) == 500


def test_a_limiter_outlives_its_event_loop() -> None:
    limiter = LocalLimiter()
    quota = TeacherQuota("t", max_concurrency=1)

    async def cycle() -> None:
        lease = await limiter.acquire(quota, input_tokens=0, output_tokens=0)
        await limiter.release(lease)

    run_sync(cycle())
    run_sync(cycle())  # a second run_sync: new loop, same limits


@pytest.mark.parametrize("concurrency", [1, 3])
def test_many_waiters_never_exceed_the_cap(concurrency: int) -> None:
    async def scenario() -> int:
        limiter = LocalLimiter()
        quota = TeacherQuota("t", max_concurrency=concurrency)
        running = peak = 0

        async def work() -> None:
            nonlocal running, peak
            lease = await limiter.acquire(quota, input_tokens=0, output_tokens=0)
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.001)
            running -= 1
            await limiter.release(lease)

        await asyncio.gather(*(work() for _ in range(30)))
        return peak

    assert run_sync(scenario()) == concurrency


# --------------------------------------------------------------------------- 429s


def test_a_refusal_teaches_what_the_server_held_and_never_raises_it() -> None:
    learned = LearnedCapacity()
    assert learned.cap(128) == 128
    assert learned.refused(128, others=99, now=0.0) == 99  # refused while 99 others ran
    assert learned.refused(128, others=120, now=0.0) == 99  # never raised by a refusal
    assert learned.refused(128, others=0, now=0.0) == 1  # never below one


def test_the_learned_capacity_is_held_then_grows_back_one_slot_at_a_time() -> None:
    learned = LearnedCapacity()
    learned.refused(8, others=5, now=100.0)
    learned.grow_if_due(8, now=100.0 + HOLD_S - 0.01)
    assert learned.cap(8) == 5  # no probing past the server so soon after it refused
    learned.grow_if_due(8, now=100.0 + HOLD_S)
    learned.grow_if_due(8, now=100.0 + HOLD_S + GROW_EVERY_S / 2)
    assert learned.cap(8) == 6  # one slot per GROW_EVERY_S
    learned.grow_if_due(8, now=100.0 + HOLD_S + GROW_EVERY_S)
    assert learned.cap(8) == 7
    learned.grow_if_due(8, now=100.0 + HOLD_S + 2 * GROW_EVERY_S)
    assert learned.limit is None and learned.cap(8) == 8  # back at the configured cap


def test_a_local_limiter_grants_only_what_a_refusal_showed_the_server_holds() -> None:
    now = [1000.0]
    quota = TeacherQuota("t", max_concurrency=8)

    async def scenario() -> None:
        limiter = LocalLimiter(clock=lambda: now[0])
        leases = [await limiter.acquire(quota, input_tokens=0, output_tokens=0) for _ in range(6)]
        await limiter.release(leases.pop(), overloaded=True)  # refused while 5 others ran
        assert limiter.capacity(quota) == 5
        waiting = asyncio.create_task(limiter.acquire(quota, input_tokens=0, output_tokens=0))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # 5 in use: the configured 8 is not what the server holds
        await limiter.release(leases.pop())
        leases.append(await asyncio.wait_for(waiting, 1))
        # Once the hold is over, a request the learned capacity keeps waiting probes one more.
        now[0] += HOLD_S
        leases.append(
            await asyncio.wait_for(limiter.acquire(quota, input_tokens=0, output_tokens=0), 1)
        )
        assert limiter.capacity(quota) == 6

    run_sync(scenario())
