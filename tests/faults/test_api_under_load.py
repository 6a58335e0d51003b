"""Many concurrent requests against a small connection pool: every one is answered promptly,
none waits for the pool's timeout (issue 11: p99 16-19 s under 50 polling clients)."""

from __future__ import annotations

import asyncio
import time

import httpx

from service.api.app import create_app
from service.auth import create_api_key, get_or_create_tenant
from service.db import make_engine, session_factory
from service.settings import ApiSettings, BrokerSettings, DatabaseSettings, Settings
from service.tasks import RecordingTaskSender


def test_more_requests_than_connections_are_queued_not_stalled(pg_url: str) -> None:
    pool_size = 2  # 4 connections in all, 40 threadpool threads, 60 requests at once
    engine = make_engine(pg_url, pool_size=pool_size)
    sessions = session_factory(engine)
    with sessions() as session:
        _, key = create_api_key(session, get_or_create_tenant(session, "load"))
        session.commit()
    settings = Settings(
        database=DatabaseSettings(url=pg_url, pool_size=pool_size),
        broker=BrokerSettings(url=None),
        api=ApiSettings(),
    )
    app = create_app(settings, sessions=sessions, task_sender=RecordingTaskSender())

    async def scenario() -> list[tuple[int, float]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://api",
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        ) as client:

            async def one(i: int) -> tuple[int, float]:
                started = time.perf_counter()
                path = ("/v1/jobs", "/v1/datasets", "/v1/teachers")[i % 3]
                resp = await client.get(path)
                return resp.status_code, time.perf_counter() - started

            return await asyncio.gather(*(one(i) for i in range(60)))

    try:
        started = time.perf_counter()
        results = asyncio.run(scenario())
        wall = time.perf_counter() - started
    finally:
        engine.dispose()
    assert {status for status, _ in results} == {200}
    # Queued behind each other they take a moment; stalled, they waited for the pool's 30 s.
    assert wall < 15, f"{wall:.1f} s"
