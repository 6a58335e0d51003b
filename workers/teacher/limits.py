"""Per-teacher limits (concurrency leases, request and token buckets): Redis-wide or in-process.

Why no library: `limits` (and `aiolimiter`, `pyrate-limiter`) count hits in windows or buckets,
but none of them has concurrency *leases* that expire when their holder dies, none refunds part
of a reservation afterwards (we reserve `max_tokens` and give back what was not generated), and
checking four limits with them takes four round trips with no atomicity between them, so two
workers could both pass the check for the last slot. One small Lua script per operation gives
all of that atomically in one round trip, with Redis's own clock shared by every machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.domain.teacher import TeacherEndpoint

log = structlog.get_logger(__name__)

_CONCURRENCY: Final = 1  # acquire refused: every slot is leased
_RATE: Final = 2  # acquire refused: a request or token bucket is short


@dataclass(frozen=True, slots=True)
class TeacherQuota:
    """The limits of one teacher, shared by everyone using the same key."""

    key: str
    max_concurrency: int
    requests_per_minute: int | None = None
    input_tokens_per_minute: int | None = None
    output_tokens_per_minute: int | None = None

    @classmethod
    def for_endpoint(cls, endpoint: TeacherEndpoint) -> TeacherQuota:
        limits = endpoint.limits
        return cls(
            key=endpoint.limiter_key,
            max_concurrency=limits.max_concurrency,
            requests_per_minute=limits.requests_per_minute,
            input_tokens_per_minute=limits.input_tokens_per_minute,
            output_tokens_per_minute=limits.output_tokens_per_minute,
        )

    @property
    def concurrency_only(self) -> bool:
        """Limited by concurrency alone (no request or token buckets)."""
        return (
            self.requests_per_minute is None
            and self.input_tokens_per_minute is None
            and self.output_tokens_per_minute is None
        )

    def clamp(self, input_tokens: int, output_tokens: int) -> tuple[int, int]:
        """A reservation larger than a whole minute's budget could never be granted: cap it."""
        if self.input_tokens_per_minute is not None:
            input_tokens = min(input_tokens, self.input_tokens_per_minute)
        if self.output_tokens_per_minute is not None:
            output_tokens = min(output_tokens, self.output_tokens_per_minute)
        return max(0, input_tokens), max(0, output_tokens)


@dataclass(slots=True)
class Lease:
    """One granted request slot plus the tokens reserved for it."""

    quota: TeacherQuota
    id: str
    input_tokens: int
    output_tokens: int
    handoffs: int = 0  # times this slot went straight to another request of this process


class Limiter(Protocol):
    """Grants request slots under a teacher's limits; shared by every gateway that uses it.

    `acquire` waits (without holding anything) until a concurrency slot is free and the request
    and token buckets can pay for the request, then returns a lease. `release` returns the slot
    and corrects the token buckets with what the request really used (None: keep the estimate).
    """

    async def acquire(
        self, quota: TeacherQuota, *, input_tokens: int, output_tokens: int
    ) -> Lease: ...

    async def release(
        self, lease: Lease, *, input_tokens: int | None = None, output_tokens: int | None = None
    ) -> None: ...

    async def aclose(self) -> None: ...


# --------------------------------------------------------------------------- Redis

# KEYS: leases zset, rpm bucket, input tpm bucket, output tpm bucket, "someone waits" marker
# ARGV: lease id, lease ttl ms, max concurrency, rpm, itpm, otpm (0 = no limit), input, output,
# marker ttl ms. Returns {1} granted, or {0, reason, milliseconds worth waiting before retrying}.
_ACQUIRE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  -- Waiters re-ask at least every poll interval, so the marker lives while anyone waits.
  redis.call('SET', KEYS[5], '1', 'PX', tonumber(ARGV[9]))
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, 1, math.max(1, tonumber(first[2]) - now)}
end
local limits = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
local costs = {1, tonumber(ARGV[7]), tonumber(ARGV[8])}
local levels = {}
local wait = 0
for i = 1, 3 do
  local cap = limits[i]
  if cap > 0 then
    local v = redis.call('HMGET', KEYS[i + 1], 'tokens', 'ts')
    local level = cap
    if v[1] then
      level = math.min(cap, tonumber(v[1]) + (now - tonumber(v[2])) * cap / 60000)
    end
    levels[i] = level
    if level < costs[i] then
      wait = math.max(wait, math.ceil((costs[i] - level) * 60000 / cap))
    end
  end
end
if wait > 0 then
  return {0, 2, wait}
end
for i = 1, 3 do
  local cap = limits[i]
  if cap > 0 then
    local level = levels[i] - costs[i]
    redis.call('HSET', KEYS[i + 1], 'tokens', tostring(level), 'ts', now)
    redis.call('PEXPIRE', KEYS[i + 1], math.ceil((cap - level) * 60000 / cap) + 1000)
  end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
return {1}
"""

# KEYS: leases zset, input tpm bucket, output tpm bucket, "someone waits" marker
# ARGV: lease id, itpm, otpm, input correction, output correction (actual minus reserved:
# negative refunds), channel. Publishes only when someone waits: a saturated single process
# waits on its local window instead, and then nobody needs the message.
_RELEASE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEYS[1], ARGV[1])
for i = 1, 2 do
  local cap = tonumber(ARGV[i + 1])
  local delta = tonumber(ARGV[i + 3])
  if cap > 0 and delta ~= 0 then
    local v = redis.call('HMGET', KEYS[i + 1], 'tokens', 'ts')
    local level = cap
    if v[1] then
      level = math.min(cap, tonumber(v[1]) + (now - tonumber(v[2])) * cap / 60000)
    end
    level = math.min(cap, level - delta)
    redis.call('HSET', KEYS[i + 1], 'tokens', tostring(level), 'ts', now)
    redis.call('PEXPIRE', KEYS[i + 1], math.ceil((cap - level) * 60000 / cap) + 1000)
  end
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('PUBLISH', ARGV[6], '1')
end
return 1
"""

# KEYS: leases zset; ARGV: ttl ms, lease ids... Only leases still present are extended: one that
# already expired may have been granted to someone else, so it must not come back. Returns the
# ids that were not found.
_RENEW_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local missing = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  else
    missing[#missing + 1] = ARGV[i]
  end
end
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
return missing
"""


@dataclass(slots=True)
class _RedisKeys:
    leases: str
    requests: str
    input_tokens: str
    output_tokens: str
    waiting: str
    channel: str


@dataclass(slots=True)
class _LocalWaiters:
    """Process-local queue in front of one Redis key: one waiter at a time asks Redis."""

    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0  # acquires of this process waiting now
    spare: list[Lease] = field(default_factory=list)  # slots handed over, not yet taken


# A slot is handed from one request straight to the next of the same process at most this many
# times, then given back through Redis, where other processes' waiters get their turn.
MAX_HANDOFFS: Final = 16


@dataclass(slots=True)
class _LoopState:
    """Connections, tasks and waiters of one event loop (run_sync makes one per call)."""

    loop: asyncio.AbstractEventLoop
    redis: aioredis.Redis[bytes]
    pubsub: Any
    scripts: dict[str, Any]
    guard: asyncio.Task[None] | None = None
    listener: asyncio.Task[None] | None = None
    renewer: asyncio.Task[None] | None = None
    waiters: dict[str, _LocalWaiters] = field(default_factory=dict)
    channels: dict[bytes, str] = field(default_factory=dict)
    held: dict[str, dict[str, Lease]] = field(default_factory=dict)


class RedisLimiter:
    """Limits shared by every process and machine through Redis.

    Concurrency is a sorted set of leases scored by expiry: a holder renews its leases while its
    requests run, so the slots of a SIGKILLed worker come back after `lease_ttl_s`. Requests and
    tokens per minute are token buckets refilled continuously. Waiters in one process queue
    locally and only the head of the queue asks Redis; a release publishes on a channel so
    waiters everywhere retry at once instead of polling (`poll_s` only bounds a lost message).

    One instance may serve a whole worker process across event loops: its connections belong
    to the loop that made them and are closed when that loop shuts down (or on `aclose`).
    """

    def __init__(
        self,
        redis_url: str,
        prefix: str = "distill:limits:",
        *,
        lease_ttl_s: float = 30.0,
        poll_s: float = 1.0,
        unreachable_s: float = 60.0,
    ) -> None:
        self._url = redis_url
        self._unreachable_s = unreachable_s
        self._background: set[asyncio.Task[None]] = set()
        self._prefix = prefix
        self._ttl_ms = max(1, round(lease_ttl_s * 1000))
        self._poll_s = poll_s
        self._state: _LoopState | None = None
        self._keys: dict[str, _RedisKeys] = {}

    def _keys_for(self, key: str) -> _RedisKeys:
        keys = self._keys.get(key)
        if keys is None:
            # The {hash tag} keeps one teacher's keys in one slot, as Redis Cluster scripts need.
            base = f"{self._prefix}{{{key}}}"
            keys = _RedisKeys(
                leases=f"{base}:leases",
                requests=f"{base}:rpm",
                input_tokens=f"{base}:itpm",
                output_tokens=f"{base}:otpm",
                waiting=f"{base}:waiting",
                channel=f"{base}:released",
            )
            self._keys[key] = keys
        return keys

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._state
        if state is not None and state.loop is loop:
            return state
        client = aioredis.Redis.from_url(self._url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        state = _LoopState(
            loop=loop,
            redis=client,
            pubsub=pubsub,
            scripts={
                "acquire": client.register_script(_ACQUIRE_LUA),
                "release": client.register_script(_RELEASE_LUA),
                "renew": client.register_script(_RENEW_LUA),
            },
        )
        # The loop cancels every task when it shuts down (asyncio.run, run_sync): this one
        # closes the connections then, so a caller that never calls aclose() leaks nothing.
        state.guard = loop.create_task(_close_when_cancelled(client, pubsub), name="limiter-guard")
        self._state = state
        return state

    async def _waiters_for(self, state: _LoopState, key: str) -> _LocalWaiters:
        waiters = state.waiters.get(key)
        if waiters is None:
            waiters = _LocalWaiters()
            state.waiters[key] = waiters
            channel = self._keys_for(key).channel
            state.channels[channel.encode()] = key
            await state.pubsub.subscribe(channel)
            if state.listener is None:
                state.listener = asyncio.create_task(self._listen(state), name="limiter-listener")
        return waiters

    async def _listen(self, state: _LoopState) -> None:
        while True:
            try:
                message = await state.pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=None
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a dropped connection: waiters fall back to polling
                log.warning("teacher.limiter_listener_failed", error=str(exc))
                await asyncio.sleep(self._poll_s)
                continue
            if message is None or message.get("type") != "message":
                continue
            key = state.channels.get(message["channel"])
            if key is not None and (waiters := state.waiters.get(key)) is not None:
                waiters.released.set()

    async def acquire(self, quota: TeacherQuota, *, input_tokens: int, output_tokens: int) -> Lease:
        state = self._loop_state()
        waiters = await self._waiters_for(state, quota.key)
        keys = self._keys_for(quota.key)
        cost_in, cost_out = quota.clamp(input_tokens, output_tokens)
        lease_id = uuid.uuid4().hex
        args = (
            lease_id,
            self._ttl_ms,
            quota.max_concurrency,
            quota.requests_per_minute or 0,
            quota.input_tokens_per_minute or 0,
            quota.output_tokens_per_minute or 0,
            cost_in,
            cost_out,
            max(1, round(self._poll_s * 2000)),
        )
        script_keys = [
            keys.leases,
            keys.requests,
            keys.input_tokens,
            keys.output_tokens,
            keys.waiting,
        ]
        handoffs = 0
        waiters.waiting += 1
        try:
            async with waiters.turn:
                while True:
                    if waiters.spare:  # a slot another request of ours just gave up
                        given = waiters.spare.pop()
                        lease_id, handoffs = given.id, given.handoffs + 1
                        break
                    # Cleared before asking, so a release landing between the answer and the
                    # wait below is not missed.
                    waiters.released.clear()
                    answer = await self._while_reachable(
                        lambda: state.scripts["acquire"](keys=script_keys, args=args)
                    )
                    if int(answer[0]) == 1:
                        break
                    reason, wait_ms = int(answer[1]), int(answer[2])
                    if reason == _RATE:
                        await asyncio.sleep(wait_ms / 1000.0)
                        continue
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(self._poll_s, wait_ms / 1000.0)):
                            await waiters.released.wait()
        finally:
            waiters.waiting -= 1
            if not waiters.waiting:
                while waiters.spare:  # nobody left to take them (a waiter was cancelled)
                    spare = waiters.spare.pop()
                    task = asyncio.create_task(self.release(replace(spare, handoffs=MAX_HANDOFFS)))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
        lease = Lease(quota, lease_id, cost_in, cost_out, handoffs)
        state.held.setdefault(quota.key, {})[lease_id] = lease
        if state.renewer is None:
            state.renewer = asyncio.create_task(self._renew_forever(state), name="limiter-renewer")
        return lease

    async def _while_reachable(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Redis call; while Redis is unreachable (restarting, failing over), wait and
        try again for up to `unreachable_s`, so a restart does not fail the requests that were
        waiting for a slot. Scripts come back by themselves (redis-py re-loads a script the
        server lost)."""
        deadline = time.monotonic() + self._unreachable_s
        delay = 0.1
        while True:
            try:
                return await call()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("teacher.limiter_unreachable", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def release(
        self, lease: Lease, *, input_tokens: int | None = None, output_tokens: int | None = None
    ) -> None:
        """Give the slot back. Never raises: a slot Redis cannot take back now expires by
        itself after the lease TTL (or went away with a restarted Redis)."""
        try:
            await self._release(lease, input_tokens=input_tokens, output_tokens=output_tokens)
        except Exception as exc:
            log.warning("teacher.limiter_release_failed", error=str(exc))

    async def _release(
        self, lease: Lease, *, input_tokens: int | None, output_tokens: int | None
    ) -> None:
        state = self._state
        held = None if state is None else state.held.get(lease.quota.key)
        if state is None or held is None or lease.id not in held:
            return  # released twice, or its loop is gone: its lease expires by itself
        quota = lease.quota
        waiters = state.waiters.get(quota.key)
        if (
            waiters is not None
            and waiters.waiting > len(waiters.spare)
            and lease.handoffs < MAX_HANDOFFS
            and quota.concurrency_only
        ):
            # Another request of this process waits for a slot: hand this one over without
            # asking Redis (the two scripts per request were most of the limiter's cost). Only
            # for a teacher limited by concurrency alone, since the request and token buckets
            # must be charged per request. The lease stays held, and so renewed.
            waiters.spare.append(lease)
            waiters.released.set()
            return
        del held[lease.id]
        keys = self._keys_for(quota.key)
        delta_in = 0 if input_tokens is None else input_tokens - lease.input_tokens
        delta_out = 0 if output_tokens is None else output_tokens - lease.output_tokens
        await state.scripts["release"](
            keys=[keys.leases, keys.input_tokens, keys.output_tokens, keys.waiting],
            args=(
                lease.id,
                quota.input_tokens_per_minute or 0,
                quota.output_tokens_per_minute or 0,
                delta_in,
                delta_out,
                keys.channel,
            ),
        )
        # Local waiters need not wait for our own message to come back through Redis.
        waiters = state.waiters.get(quota.key)
        if waiters is not None:
            waiters.released.set()

    async def renew(self) -> int:
        """Extend every lease this process holds; returns how many had expired meanwhile."""
        state = self._state
        if state is None:
            return 0
        lost = 0
        for key, held in list(state.held.items()):
            if not held:
                continue
            missing = await state.scripts["renew"](
                keys=[self._keys_for(key).leases], args=(self._ttl_ms, *held)
            )
            # A lease released while the script ran is missing too, and that is fine.
            expired = [m for m in missing if m.decode() in held]
            if expired:
                lost += len(expired)
                # Its slot may be someone else's by now: we run over the limit by that many
                # until these requests finish (only after a stall longer than the lease TTL).
                log.warning("teacher.lease_expired", limiter_key=key, count=len(expired))
        return lost

    async def _renew_forever(self, state: _LoopState) -> None:
        interval = self._ttl_ms / 3000.0
        while True:
            await asyncio.sleep(interval)
            if self._state is not state:
                return
            try:
                await self.renew()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis hiccup: the next round tries again before expiry
                log.warning("teacher.lease_renew_failed", error=str(exc))

    async def aclose(self) -> None:
        """Stop background tasks and close connections; the limiter can be used again later.

        Leases still held are not released: like a killed worker's, they expire after the TTL.
        """
        state, self._state = self._state, None
        if state is None or state.loop is not asyncio.get_running_loop():
            return
        tasks = [t for t in (state.listener, state.renewer, state.guard) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _close_when_cancelled(client: aioredis.Redis[bytes], pubsub: Any) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await pubsub.aclose()
        # types-redis predates redis-py 5's aclose(); close() is deprecated there.
        await client.aclose()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- in-process


@dataclass(slots=True)
class _Bucket:
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now
        return self.level


@dataclass(slots=True)
class _LocalState:
    quota: TeacherQuota
    buckets: list[_Bucket | None]
    held: int = 0
    loop: asyncio.AbstractEventLoop | None = None
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    released: asyncio.Event = field(default_factory=asyncio.Event)


class LocalLimiter:
    """The same limits inside one process (embedded mode, no Redis).

    Leases cannot outlive their holder here (the process dies with them), so they never expire.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, _LocalState] = {}

    def _state(self, quota: TeacherQuota) -> _LocalState:
        state = self._states.get(quota.key)
        now = self._clock()
        if state is None or state.quota != quota:
            limits = (
                quota.requests_per_minute,
                quota.input_tokens_per_minute,
                quota.output_tokens_per_minute,
            )
            buckets = [None if cap is None else _Bucket(cap, float(cap), now) for cap in limits]
            held = state.held if state is not None else 0
            state = _LocalState(quota, buckets, held)
            self._states[quota.key] = state
        loop = asyncio.get_running_loop()
        if state.loop is not loop:
            # asyncio primitives are bound to one loop; counts and buckets carry over.
            state.loop = loop
            state.turn = asyncio.Lock()
            state.released = asyncio.Event()
        return state

    async def acquire(self, quota: TeacherQuota, *, input_tokens: int, output_tokens: int) -> Lease:
        state = self._state(quota)
        cost_in, cost_out = quota.clamp(input_tokens, output_tokens)
        costs = (1, cost_in, cost_out)
        async with state.turn:
            while True:
                state.released.clear()
                if state.held >= quota.max_concurrency:
                    await state.released.wait()
                    continue
                now = self._clock()
                wait = 0.0
                for bucket, cost in zip(state.buckets, costs, strict=True):
                    if bucket is not None and bucket.refill(now) < cost:
                        wait = max(wait, (cost - bucket.level) * 60.0 / bucket.capacity)
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                for bucket, cost in zip(state.buckets, costs, strict=True):
                    if bucket is not None:
                        bucket.level -= cost
                state.held += 1
                break
        return Lease(quota, uuid.uuid4().hex, cost_in, cost_out)

    async def release(
        self, lease: Lease, *, input_tokens: int | None = None, output_tokens: int | None = None
    ) -> None:
        state = self._states.get(lease.quota.key)
        if state is None:
            return
        state.held = max(0, state.held - 1)
        now = self._clock()
        corrections = (
            (state.buckets[1], None if input_tokens is None else input_tokens - lease.input_tokens),
            (
                state.buckets[2],
                None if output_tokens is None else output_tokens - lease.output_tokens,
            ),
        )
        for bucket, delta in corrections:
            if bucket is not None and delta:
                bucket.level = min(bucket.capacity, bucket.refill(now) - delta)
        state.released.set()

    async def aclose(self) -> None:
        """Nothing to close; present for the Limiter port."""
