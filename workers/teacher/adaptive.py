"""A local concurrency window adapted by AIMD from a vLLM server's own /metrics."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from dataclasses import dataclass

import aiohttp
import structlog
from prometheus_client.parser import text_string_to_metric_families

log = structlog.get_logger(__name__)

RUNNING_METRIC = "vllm:num_requests_running"
WAITING_METRIC = "vllm:num_requests_waiting"


class ConcurrencyWindow:
    """How many requests this process may have in flight to one server right now.

    It sits in front of the limiter and only ever lowers the limit below `max_concurrency`:
    the AIMD controller moves it from a vLLM server's own queue. (What a 429 teaches, the
    capacity the server holds, is shared by every process: the limiter learns it.)
    """

    def __init__(self, maximum: int, *, minimum: int = 1) -> None:
        self.maximum = maximum
        self.minimum = max(1, min(minimum, maximum))
        self.limit = maximum
        self.in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the slot was handed to us just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(future)
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.limit:
            future = self._waiters.popleft()
            if not future.done():
                self.in_use += 1  # handed over directly: no one can barge in between
                future.set_result(None)

    def set_limit(self, limit: int) -> None:
        self.limit = max(self.minimum, min(self.maximum, limit))
        self._wake()


@dataclass(frozen=True, slots=True)
class ServerLoad:
    running: float
    waiting: float


def parse_vllm_load(text: str, model: str | None = None) -> ServerLoad | None:
    """Running and waiting requests from vLLM's Prometheus text, summed over its series.

    Series labelled with another `model_name` are skipped when `model` is given.
    """
    running = waiting = 0.0
    seen = False
    for family in text_string_to_metric_families(text):
        if family.name not in (RUNNING_METRIC, WAITING_METRIC):
            continue
        for sample in family.samples:
            name = sample.labels.get("model_name")
            if model is not None and name is not None and name != model:
                continue
            seen = True
            if family.name == RUNNING_METRIC:
                running += sample.value
            else:
                waiting += sample.value
    return ServerLoad(running, waiting) if seen else None


class AimdController:
    """AIMD on the server's queue: grow while nothing waits, shrink when the queue builds up."""

    def __init__(
        self,
        window: ConcurrencyWindow,
        *,
        increase_step: int | None = None,
        decrease_factor: float = 0.7,
        waiting_tolerance: float = 0.1,
    ) -> None:
        self.window = window
        self.increase_step = increase_step or max(1, window.maximum // 16)
        self.decrease_factor = decrease_factor
        self.waiting_tolerance = waiting_tolerance

    def observe(self, load: ServerLoad) -> int:
        """Apply one sample; returns the new limit."""
        window = self.window
        # "~0": a request or two in the queue for a moment is how a busy server looks.
        allowed = max(1.0, self.waiting_tolerance * max(load.running, 1.0))
        if load.waiting > allowed:
            window.set_limit(math.floor(window.limit * self.decrease_factor))
        elif load.waiting <= 0.5 and window.in_use >= window.limit:
            # Only grow a window that is actually used up; an idle one proves nothing.
            window.set_limit(window.limit + self.increase_step)
        return window.limit


class VllmLoadMonitor:
    """Polls a vLLM server's /metrics every `interval_s` and feeds the AIMD controller."""

    def __init__(
        self,
        metrics_url: str,
        controller: AimdController,
        *,
        model: str | None = None,
        interval_s: float = 0.5,
        timeout_s: float = 2.0,
        public_only: bool = False,
    ) -> None:
        self.metrics_url = metrics_url
        self.public_only = public_only
        self.polls = 0  # load readings taken (for tests and debugging)
        self.controller = controller
        self.model = model
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="vllm-load-monitor")

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = None
        if self.public_only:  # a tenant's teacher: the same SSRF guard as its requests
            from workers.teacher.network import PublicOnlyResolver

            connector = aiohttp.TCPConnector(resolver=PublicOnlyResolver())
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            while True:
                try:
                    async with session.get(self.metrics_url) as response:
                        response.raise_for_status()
                        text = await response.text()
                    load = parse_vllm_load(text, self.model)
                    self.polls += 1
                    if load is not None:
                        before = self.controller.window.limit
                        after = self.controller.observe(load)
                        if after != before:
                            log.debug(
                                "teacher.window_adapted",
                                limit=after,
                                running=load.running,
                                waiting=load.waiting,
                            )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # metrics are advisory: keep the last window
                    log.debug("teacher.metrics_poll_failed", error=str(exc))
                await asyncio.sleep(self.interval_s)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
