"""The adaptive concurrency window: AIMD on a vLLM server's /metrics (429s: test_teacher_limits)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from workers.teacher import run_sync
from workers.teacher.adaptive import (
    AimdController,
    ConcurrencyWindow,
    ServerLoad,
    VllmLoadMonitor,
    parse_vllm_load,
)

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="m"}} {running}
vllm:num_requests_running{{model_name="other"}} 50.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{model_name="m"}} {waiting}
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{{model_name="m"}} 0.5
"""


def test_window_blocks_at_its_limit_and_hands_slots_over_in_order() -> None:
    async def scenario() -> None:
        window = ConcurrencyWindow(2)
        await window.acquire()
        await window.acquire()
        waiter = asyncio.create_task(window.acquire())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        window.release()
        await asyncio.wait_for(waiter, 1)
        assert window.in_use == 2

    run_sync(scenario())


def test_a_shrunk_window_lets_no_one_in_until_below_it() -> None:
    async def scenario() -> None:
        window = ConcurrencyWindow(4)
        for _ in range(4):
            await window.acquire()
        window.set_limit(2)
        waiter = asyncio.create_task(window.acquire())
        window.release()
        window.release()
        await asyncio.sleep(0.01)
        assert not waiter.done()  # 2 in use, limit 2
        window.release()
        await asyncio.wait_for(waiter, 1)

    run_sync(scenario())


def test_parse_vllm_load_sums_the_model_series() -> None:
    text = VLLM_METRICS.format(running=7.0, waiting=3.0)
    assert parse_vllm_load(text, "m") == ServerLoad(running=7.0, waiting=3.0)
    assert parse_vllm_load(text) == ServerLoad(running=57.0, waiting=3.0)
    assert parse_vllm_load("# nothing here\n") is None


def test_aimd_grows_a_full_window_and_cuts_on_a_queue() -> None:
    window = ConcurrencyWindow(64)
    controller = AimdController(window, increase_step=4, decrease_factor=0.5)
    window.set_limit(20)
    window.in_use = 20
    assert controller.observe(ServerLoad(running=20, waiting=0)) == 24
    window.in_use = 5
    assert controller.observe(ServerLoad(running=5, waiting=0)) == 24  # idle: proves nothing
    assert controller.observe(ServerLoad(running=24, waiting=12)) == 12
    assert controller.observe(ServerLoad(running=24, waiting=1)) == 12  # a blip is tolerated


def test_monitor_polls_metrics_and_shrinks_the_window() -> None:
    async def scenario() -> int:
        load = {"running": 32.0, "waiting": 40.0}

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(text=VLLM_METRICS.format(**load))

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        window = ConcurrencyWindow(32)
        monitor = VllmLoadMonitor(
            f"http://127.0.0.1:{port}/metrics",
            AimdController(window, decrease_factor=0.5),
            model="m",
            interval_s=0.02,
        )
        try:
            monitor.start()
            for _ in range(100):
                if window.limit <= 8:
                    break
                await asyncio.sleep(0.01)
            return window.limit
        finally:
            await monitor.aclose()
            await runner.cleanup()

    assert run_sync(scenario()) <= 8
