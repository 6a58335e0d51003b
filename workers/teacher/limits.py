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
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.domain.teacher import TeacherEndpoint

log = structlog.get_logger(__name__)

_CONCURRENCY: Final = 1  # acquire refused: every slot is leased
_RATE: Final = 2  # acquire refused: a request or token bucket is short

# A 429 teaches a limiter what the server really holds, below the `max_concurrency` a user
# configured: how many other requests it was running when it refused one. That learned
# capacity is kept beside the leases and shared like them (in Redis, every process and machine
# backs off together, and one that stops leaves its share to the others). No slot above it is
# probed for HOLD_S after a refusal (each probe past the server costs a refused request its
# whole Retry-After); then it grows by one slot every GROW_EVERY_S, only while it binds.
HOLD_S: Final = 10.0
GROW_EVERY_S: Final = 0.25
# Redis forgets it this long after the last refusal (a server's capacity changes, and Redis's
# memory is not a registry of every teacher ever seen).
LEARNED_TTL_S: Final = 3600.0


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


@dataclass(slots=True)
class LearnedCapacity:
    """What a server showed it holds, below the configured cap (None: nothing learnt).

    The rule of the module's comment, for one process; `RedisLimiter`'s scripts apply the
    same rule to state kept in Redis.
    """

    limit: int | None = None
    refused_at: float = -math.inf
    grown_at: float = -math.inf

    def cap(self, maximum: int) -> int:
        return maximum if self.limit is None else min(maximum, self.limit)

    def refused(self, maximum: int, others: int, now: float) -> int:
        """The server refused a request while `others` of its users' requests were out."""
        self.limit = max(1, min(self.cap(maximum), others))
        self.refused_at = self.grown_at = now
        return self.limit

    def grow_if_due(self, maximum: int, now: float) -> None:
        """Called when the learned capacity is what keeps a request waiting."""
        if self.limit is None or now - self.refused_at < HOLD_S:
            return
        if now - self.grown_at >= GROW_EVERY_S:
            self.grown_at = now
            self.limit += 1
            if self.limit >= maximum:
                self.limit = None  # back to the configured cap: nothing left to learn


class Limiter(Protocol):
    """Grants request slots under a teacher's limits; shared by every gateway that uses it.

    `acquire` waits (without holding anything) until a concurrency slot is free and the request
    and token buckets can pay for the request, then returns a lease. `release` returns the slot
    and corrects the token buckets with what the request really used (None: keep the estimate);
    `overloaded` says the server refused the request (a 429): the capacity it holds is learnt.
    `capacity` is the concurrency the limiter grants now, as this process last saw it.
    """

    async def acquire(
        self, quota: TeacherQuota, *, input_tokens: int, output_tokens: int
    ) -> Lease: ...

    async def release(
        self,
        lease: Lease,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        overloaded: bool = False,
    ) -> None: ...

    def capacity(self, quota: TeacherQuota) -> int: ...

    async def aclose(self) -> None: ...


# --------------------------------------------------------------------------- Redis

# The learned capacity (see LearnedCapacity), a hash: limit, refused_at, grown_at (ms, Redis's
# clock). Its rule in Lua, for both scripts: the cap granted now; with `hold` and `step` (ms),
# grown by a slot when due (the caller's requests wait on it).
_LEARNED_LUA: Final = """
local function learned_cap(key, maximum, now, hold, step)
  local v = redis.call('HMGET', key, 'limit', 'refused_at', 'grown_at')
  local limit = tonumber(v[1])
  if not limit then
    return maximum
  end
  if hold and now - tonumber(v[2]) >= hold and now - tonumber(v[3]) >= step then
    limit = limit + 1
    if limit >= maximum then
      redis.call('DEL', key)
      return maximum
    end
    redis.call('HSET', key, 'limit', limit, 'grown_at', now)
  end
  return math.min(maximum, limit)
end
"""

# KEYS: leases zset, rpm bucket, input tpm bucket, output tpm bucket, "someone waits" marker,
# learned capacity. ARGV: lease ttl ms, max concurrency, rpm, itpm, otpm (0 = no limit), input,
# output, marker ttl ms, the learned capacity's hold and step ms, then the ids of the leases
# asked for (one, or a block of several when no bucket is set). Grants as many of them as
# there are free slots under the learned capacity: returns {1, granted, cap}, or {0, reason,
# milliseconds worth waiting before retrying, cap}.
_ACQUIRE_LUA: Final = (
    _LEARNED_LUA
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local cap = learned_cap(KEYS[6], tonumber(ARGV[2]), now)
if held >= cap and cap < tonumber(ARGV[2]) then
  cap = learned_cap(KEYS[6], tonumber(ARGV[2]), now, tonumber(ARGV[9]), tonumber(ARGV[10]))
end
local free = cap - held
if free <= 0 then
  -- Waiters re-ask at least every poll interval, so the marker lives while anyone waits.
  redis.call('SET', KEYS[5], '1', 'PX', tonumber(ARGV[8]))
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, 1, math.max(1, tonumber(first[2]) - now), cap}
end
local limits = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local costs = {1, tonumber(ARGV[6]), tonumber(ARGV[7])}
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
  return {0, 2, wait, cap}
end
for i = 1, 3 do
  local cap = limits[i]
  if cap > 0 then
    local level = levels[i] - costs[i]
    redis.call('HSET', KEYS[i + 1], 'tokens', tostring(level), 'ts', now)
    redis.call('PEXPIRE', KEYS[i + 1], math.ceil((cap - level) * 60000 / cap) + 1000)
  end
end
local granted = math.min(free, #ARGV - 10)
for i = 1, granted do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[10 + i])
end
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
return {1, granted, cap}
"""
)

# KEYS: leases zset, learned capacity. ARGV: max concurrency, the caller's free slots (leased,
# serving no request), learned ttl ms, the id of the refused request's lease. Gives that lease
# back and learns: the server held the others in use. Returns the learned capacity.
_OVERLOAD_LUA: Final = (
    _LEARNED_LUA
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEYS[1], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local maximum = tonumber(ARGV[1])
local others = held - tonumber(ARGV[2])
local limit = math.max(1, math.min(learned_cap(KEYS[2], maximum, now), others))
redis.call('HSET', KEYS[2], 'limit', limit, 'refused_at', now, 'grown_at', now)
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
return limit
"""
)

# KEYS: leases zset, input tpm bucket, output tpm bucket, "someone waits" marker
# ARGV: itpm, otpm, input correction, output correction (actual minus reserved, summed over the
# leases; negative refunds), channel, then the ids of the leases given back. Publishes only when
# someone waits: a saturated single process reuses its own slots, and then nobody needs it.
_RELEASE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 6, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
end
for i = 1, 2 do
  local cap = tonumber(ARGV[i])
  local delta = tonumber(ARGV[i + 2])
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
  redis.call('PUBLISH', ARGV[5], '1')
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
    learned: str


# A slot serves at most this many requests of one process in a row, then goes back through
# Redis, where other processes' waiters get their turn.
MAX_HANDOFFS: Final = 16
# A concurrency-only teacher's slots are leased this many at a time (one script call), so a
# window filling up costs a few round trips, not one per request.
BLOCK: Final = 8
# A slot nobody of this process took for this long goes back to Redis (a burst's leftovers).
LINGER_S: Final = 0.05


@dataclass(slots=True)
class _Slots:
    """What this process holds of one teacher key: the queue of its acquires and its free slots.

    Only the head of the queue asks Redis. A free slot is leased in Redis but serves no request:
    the next acquire takes it without a round trip; one left free for LINGER_S is given back.
    """

    quota: TeacherQuota
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0  # acquires of this process waiting now
    free: list[tuple[Lease, float]] = field(default_factory=list)  # (slot, freed at)
    # Given back at the next flush: (lease, input correction, output correction).
    returning: list[tuple[Lease, int, int]] = field(default_factory=list)
    flush: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # something to give back now
    cap: int = 0  # the concurrency Redis granted under at the last answer (learned or not)


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
    slots: dict[str, _Slots] = field(default_factory=dict)
    channels: dict[bytes, str] = field(default_factory=dict)
    held: dict[str, dict[str, Lease]] = field(default_factory=dict)


class RedisLimiter:
    """Limits shared by every process and machine through Redis.

    Concurrency is a sorted set of leases scored by expiry: a holder renews its leases while its
    requests run, so the slots of a SIGKILLed worker come back after `lease_ttl_s`. Requests and
    tokens per minute are token buckets refilled continuously. Waiters in one process queue
    locally and only the head of the queue asks Redis; a release publishes on a channel so
    waiters everywhere retry at once instead of polling (`poll_s` only bounds a lost message).

    Round trips are leased in blocks (issue 14: two scripts per request were most of the
    limiter's cost): a concurrency-only teacher's slots are leased BLOCK at a time and a slot a
    request gives back serves the process's next request without Redis, up to MAX_HANDOFFS
    times; slots given back within one turn of the event loop go in one script call. Every slot
    a process holds, in use or free, is a lease in Redis, so the processes together never hold
    more than the cap. A teacher with request or token buckets is charged per request (the
    buckets must see each one), its releases still batched. The capacity a 429 teaches
    (`LearnedCapacity`) is a hash beside the leases: every process grants under it.

    One instance may serve a whole worker process across event loops: its connections belong
    to the loop that made them and are closed when that loop shuts down (or on `aclose`), its
    free slots given back first.
    """

    def __init__(
        self,
        redis_url: str,
        prefix: str = "distill:limits:",
        *,
        lease_ttl_s: float = 30.0,
        poll_s: float = 1.0,
        unreachable_s: float = 60.0,
        hold_s: float = HOLD_S,
        step_s: float = GROW_EVERY_S,
    ) -> None:
        """`hold_s` and `step_s`: how the capacity learnt from a 429 grows back (tests)."""
        self._url = redis_url
        self._hold_s = hold_s
        self._step_s = step_s
        self._unreachable_s = unreachable_s
        self._prefix = prefix
        self._ttl_ms = max(1, round(lease_ttl_s * 1000))
        self._poll_s = poll_s
        self._state: _LoopState | None = None
        self._keys: dict[str, _RedisKeys] = {}
        # Acquire and release scripts run so far (round trips a request costs, for benches).
        self.script_calls = 0

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
                learned=f"{base}:learned",
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
                "overload": client.register_script(_OVERLOAD_LUA),
            },
        )
        # The loop cancels every task when it shuts down (asyncio.run, run_sync): this one
        # gives the free slots back and closes the connections then, so a caller that never
        # calls aclose() leaks nothing.
        state.guard = loop.create_task(self._close_when_cancelled(state), name="limiter-guard")
        self._state = state
        return state

    async def _slots_for(self, state: _LoopState, quota: TeacherQuota) -> _Slots:
        slots = state.slots.get(quota.key)
        if slots is None:
            slots = _Slots(quota)
            state.slots[quota.key] = slots
            channel = self._keys_for(quota.key).channel
            state.channels[channel.encode()] = quota.key
            await state.pubsub.subscribe(channel)
            if state.listener is None:
                state.listener = asyncio.create_task(self._listen(state), name="limiter-listener")
        slots.quota = quota
        return slots

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
            if key is not None and (slots := state.slots.get(key)) is not None:
                slots.released.set()

    async def acquire(self, quota: TeacherQuota, *, input_tokens: int, output_tokens: int) -> Lease:
        state = self._loop_state()
        slots = await self._slots_for(state, quota)
        cost_in, cost_out = quota.clamp(input_tokens, output_tokens)
        if not slots.waiting and slots.free and quota.concurrency_only:
            return self._reuse(slots, cost_in, cost_out)
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        slots.waiting += 1
        try:
            async with slots.turn:
                while True:
                    if slots.free and quota.concurrency_only:
                        return self._reuse(slots, cost_in, cost_out)
                    # Cleared before asking, so a release landing between the answer and the
                    # wait below is not missed.
                    slots.released.clear()
                    if slots.returning:  # refunds first: they may be what lets this one pass
                        await self._flush(state, slots)
                    lease, wait = await self._ask(state, slots, cost_in, cost_out)
                    if task is not None and task.cancelling() > cancels:
                        # A cancel that landed during the Redis call and that redis-py (8.1)
                        # dropped: the call returned as if none had come, and this loop
                        # would poll on for ever under an `asyncio.wait_for` that waits for
                        # it to end (seen about once in seven runs of
                        # test_a_live_holder_renews_its_lease_past_the_ttl). Honour it.
                        if lease is not None:
                            await self.release(lease)
                        raise asyncio.CancelledError
                    if lease is not None:
                        break
                    assert wait is not None
                    reason, wait_ms = wait
                    if reason == _RATE:
                        await asyncio.sleep(wait_ms / 1000.0)
                        continue
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(self._poll_s, wait_ms / 1000.0)):
                            await slots.released.wait()
        finally:
            slots.waiting -= 1
        if state.renewer is None:
            state.renewer = asyncio.create_task(self._renew_forever(state), name="limiter-renewer")
        return lease

    def _reuse(self, slots: _Slots, cost_in: int, cost_out: int) -> Lease:
        """A free slot of this process serves the next request (no round trip)."""
        slot, _ = slots.free.pop()  # the most recent: older ones age towards LINGER_S
        return Lease(slots.quota, slot.id, cost_in, cost_out, slot.handoffs + 1)

    async def _ask(
        self, state: _LoopState, slots: _Slots, cost_in: int, cost_out: int
    ) -> tuple[Lease | None, tuple[int, int] | None]:
        """One script call: a lease (and, for a concurrency-only teacher, up to BLOCK - 1 more
        slots, kept free for the next requests), or (reason, milliseconds to wait)."""
        quota = slots.quota
        keys = self._keys_for(quota.key)
        block = min(BLOCK, quota.max_concurrency) if quota.concurrency_only else 1
        ids = [uuid.uuid4().hex for _ in range(block)]
        args = (
            self._ttl_ms,
            quota.max_concurrency,
            quota.requests_per_minute or 0,
            quota.input_tokens_per_minute or 0,
            quota.output_tokens_per_minute or 0,
            cost_in,
            cost_out,
            max(1, round(self._poll_s * 2000)),
            round(self._hold_s * 1000),
            round(self._step_s * 1000),
            *ids,
        )
        script_keys = [
            keys.leases,
            keys.requests,
            keys.input_tokens,
            keys.output_tokens,
            keys.waiting,
            keys.learned,
        ]
        self.script_calls += 1
        answer = await self._while_reachable(
            lambda: state.scripts["acquire"](keys=script_keys, args=args)
        )
        if int(answer[0]) != 1:
            slots.cap = int(answer[3])
            return None, (int(answer[1]), int(answer[2]))
        granted = int(answer[1])
        slots.cap = int(answer[2])
        held = state.held.setdefault(quota.key, {})
        lease = Lease(quota, ids[0], cost_in, cost_out)
        held[lease.id] = lease
        if granted > 1:
            now = time.monotonic()
            for slot_id in ids[1:granted]:
                spare = Lease(quota, slot_id, 0, 0)
                held[slot_id] = spare
                slots.free.append((spare, now))
            self._schedule_flush(state, slots, now=False)
        return lease, None

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

    def capacity(self, quota: TeacherQuota) -> int:
        state = self._state
        slots = None if state is None else state.slots.get(quota.key)
        return slots.cap if slots is not None and slots.cap else quota.max_concurrency

    async def release(
        self,
        lease: Lease,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        overloaded: bool = False,
    ) -> None:
        """Give the slot back: to this process's next request, or to Redis at the next flush
        (within this turn of the event loop); a refused request's at once, learning the
        capacity. Never raises: a slot Redis cannot take back now expires by itself after the
        lease TTL (or went away with a restarted Redis)."""
        state = self._state
        held = None if state is None else state.held.get(lease.quota.key)
        if state is None or held is None or lease.id not in held:
            return  # released twice, or its loop is gone: its lease expires by itself
        slots = state.slots[lease.quota.key]
        if any(slot.id == lease.id for slot, _ in slots.free):
            return  # released twice: it is free already (and must serve one request at a time)
        if overloaded:
            try:
                await self._overloaded(state, slots, lease)
            except Exception as exc:  # the release below still gives it back; the next 429 learns
                log.warning("teacher.limiter_release_failed", error=str(exc))
        elif lease.quota.concurrency_only and lease.handoffs < MAX_HANDOFFS:
            # Kept for this process's next request; the lease stays held, and so renewed.
            held[lease.id] = lease
            slots.free.append((lease, time.monotonic()))
            slots.released.set()
            self._schedule_flush(state, slots, now=False)
            return
        del held[lease.id]
        delta_in = 0 if input_tokens is None else input_tokens - lease.input_tokens
        delta_out = 0 if output_tokens is None else output_tokens - lease.output_tokens
        slots.returning.append((lease, delta_in, delta_out))
        self._schedule_flush(state, slots, now=True)

    async def _overloaded(self, state: _LoopState, slots: _Slots, lease: Lease) -> None:
        """Redis takes the refused request's slot back at once (the release script, after
        this, only corrects the token buckets) and learns what the server holds: the leases
        still held, less this process's free ones, which go back too (the server is full: a
        request in one would be refused). Leases are never granted over the learned capacity
        and a slot handed to this process's next request is still one lease, so the processes'
        requests in flight fall to it as the running ones end."""
        quota = slots.quota
        keys = self._keys_for(quota.key)
        self.script_calls += 1
        learned = await state.scripts["overload"](
            keys=[keys.leases, keys.learned],
            args=(quota.max_concurrency, len(slots.free), round(LEARNED_TTL_S * 1000), lease.id),
        )
        slots.cap = int(learned)
        mine = state.held[quota.key]
        for slot, _ in slots.free:
            mine.pop(slot.id, None)
            slots.returning.append((slot, 0, 0))
        slots.free = []

    def _schedule_flush(self, state: _LoopState, slots: _Slots, *, now: bool) -> None:
        """Make sure a flush task runs; `now` wakes it for slots released for good."""
        if now:
            slots.wake.set()
        if slots.flush is None or slots.flush.done():
            slots.flush = state.loop.create_task(self._flush_loop(state, slots))

    async def _flush_loop(self, state: _LoopState, slots: _Slots) -> None:
        """Give slots back while this process holds spare ones: those released for good at
        once (the task runs after the other callbacks of this turn of the loop, so one script
        call carries all of them), the free ones once nobody took them for LINGER_S."""
        while slots.free or slots.returning:
            if not slots.returning:
                oldest = min(freed for _, freed in slots.free)
                slots.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(
                        max(LINGER_S / 5, oldest + LINGER_S - time.monotonic())
                    ):
                        await slots.wake.wait()
            try:
                await self._flush(state, slots)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the slots expire by themselves after the lease TTL
                log.warning("teacher.limiter_release_failed", error=str(exc))

    async def _flush(self, state: _LoopState, slots: _Slots, *, everything: bool = False) -> None:
        """Give back, in one script call, the slots released for good and the free ones that
        nobody took for LINGER_S (every free one with `everything`)."""
        now = time.monotonic()
        held = state.held.get(slots.quota.key, {})
        if everything or not slots.waiting:
            stale = {slot.id for slot, freed in slots.free if everything or now - freed >= LINGER_S}
            if stale:
                for slot, _ in slots.free:
                    if slot.id in stale:
                        held.pop(slot.id, None)
                        slots.returning.append((slot, 0, 0))
                slots.free = [entry for entry in slots.free if entry[0].id not in stale]
        returning, slots.returning = slots.returning, []
        if not returning:
            return
        quota = slots.quota
        keys = self._keys_for(quota.key)
        self.script_calls += 1
        await state.scripts["release"](
            keys=[keys.leases, keys.input_tokens, keys.output_tokens, keys.waiting],
            args=(
                quota.input_tokens_per_minute or 0,
                quota.output_tokens_per_minute or 0,
                sum(delta for _, delta, _ in returning),
                sum(delta for _, _, delta in returning),
                keys.channel,
                *(lease.id for lease, _, _ in returning),
            ),
        )
        # Local waiters need not wait for our own message to come back through Redis.
        slots.released.set()

    async def renew(self) -> int:
        """Extend every lease this process holds; returns how many in use had expired
        meanwhile (an expired free slot is dropped: it may be someone else's by now)."""
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
            expired = {m.decode() for m in missing} & set(held)
            slots = state.slots.get(key)
            if slots is not None and expired:
                dropped = [s for s, _ in slots.free if s.id in expired]
                slots.free = [(s, t) for s, t in slots.free if s.id not in expired]
                for slot in dropped:
                    del held[slot.id]
                    expired.discard(slot.id)
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

    async def _give_back_free(self, state: _LoopState) -> None:
        """Every free slot back to Redis now (the loop or the limiter is closing)."""
        for slots in list(state.slots.values()):
            if slots.flush is not None and slots.flush is not asyncio.current_task():
                slots.flush.cancel()
            try:
                await self._flush(state, slots, everything=True)
            except Exception as exc:  # they expire by themselves after the lease TTL
                log.warning("teacher.limiter_release_failed", error=str(exc))

    async def aclose(self) -> None:
        """Give the free slots back, stop background tasks and close connections; the limiter
        can be used again later.

        Leases in use are not released: like a killed worker's, they expire after the TTL.
        """
        state, self._state = self._state, None
        if state is None or state.loop is not asyncio.get_running_loop():
            return
        await self._give_back_free(state)
        tasks = [t for t in (state.listener, state.renewer, state.guard) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_when_cancelled(self, state: _LoopState) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            if self._state is state:  # the loop shuts down without aclose()
                self._state = None
                await self._give_back_free(state)
            await state.pubsub.aclose()
            # types-redis predates redis-py 5's aclose(); close() is deprecated there.
            await state.redis.aclose()  # type: ignore[attr-defined]


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
    learned: LearnedCapacity = field(default_factory=LearnedCapacity)
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
            if state is None:
                state = _LocalState(quota, buckets)
            else:
                state = _LocalState(quota, buckets, state.held, state.learned)
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
                now = self._clock()
                if state.held >= state.learned.cap(quota.max_concurrency):
                    state.learned.grow_if_due(quota.max_concurrency, now)
                if state.held >= state.learned.cap(quota.max_concurrency):
                    # A release wakes it, and so does the learned capacity's next step.
                    step = None if state.learned.limit is None else GROW_EVERY_S
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(step):
                            await state.released.wait()
                    continue
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

    def capacity(self, quota: TeacherQuota) -> int:
        state = self._states.get(quota.key)
        return quota.max_concurrency if state is None else state.learned.cap(quota.max_concurrency)

    async def release(
        self,
        lease: Lease,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        overloaded: bool = False,
    ) -> None:
        state = self._states.get(lease.quota.key)
        if state is None:
            return
        state.held = max(0, state.held - 1)
        now = self._clock()
        if overloaded:
            state.learned.refused(lease.quota.max_concurrency, state.held, now)
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
