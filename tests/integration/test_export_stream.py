"""The streamed export over a real socket (uvicorn): it reads from a server-side cursor, and a
client that goes away mid-stream stops the query and leaves no session in a transaction
(checked in pg_stat_activity)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench.export import BenchJob, create_bench_job, insert, seed_rows_exported
from service.api.app import create_app
from service.cli import upgrade_database
from service.db import make_engine, session_factory
from service.settings import ApiSettings, BrokerSettings, DatabaseSettings, Settings
from tests.conftest import PG_SERVER, fresh_database

# More rows than the socket buffers between the two ends hold (about 4 MB here), so a client
# that stops reading leaves the server mid-stream.
ROWS = 60_000


@dataclass
class Server:
    base: str
    database: str
    job: BenchJob

    def export(self, client: httpx.Client, **params: str) -> httpx.Response:
        return client.build_request(
            "GET",
            f"{self.base}/v1/jobs/{self.job.job_id}/export",
            params=params,
            headers={"Authorization": f"Bearer {self.job.api_key}"},
        )  # type: ignore[return-value]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with fresh_database("distill_stream") as url:
        upgrade_database(url)
        engine = make_engine(url)
        sessions = session_factory(engine)
        job = create_bench_job(sessions)
        insert(sessions, job, ROWS, 5000)
        settings = Settings(
            database=DatabaseSettings(url=url),
            broker=BrokerSettings(url=None),
            api=ApiSettings(allow_private_teacher_urls=False),
        )
        config = uvicorn.Config(
            create_app(settings, sessions=sessions), host="127.0.0.1", port=0, log_level="warning"
        )
        srv = uvicorn.Server(config)
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while not srv.started:
                assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
                time.sleep(0.05)
            port = srv.servers[0].sockets[0].getsockname()[1]
            yield Server(f"http://127.0.0.1:{port}", str(make_url(url).database), job)
        finally:
            srv.should_exit = True
            thread.join(timeout=30)
            engine.dispose()


def _backends(database: str) -> list[tuple[str, str]]:
    """(state, query) of the other sessions on the database."""
    admin = create_engine(f"{PG_SERVER}/postgres")
    try:
        with admin.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT state, query FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": database},
            ).all()
        return [(str(state), str(query)) for state, query in rows]
    finally:
        admin.dispose()


def _in_transaction(database: str) -> list[tuple[str, str]]:
    return [
        (state, query)
        for state, query in _backends(database)
        if state.startswith("idle in transaction") or state == "active"
    ]


def _wait_for(condition: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def _start_reading(server: Server) -> socket.socket:
    """A client with a small receive window that asks for the export and reads its head."""
    url = httpx.URL(server.base)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((url.host, url.port or 80))
    sock.sendall(
        f"GET /v1/jobs/{server.job.job_id}/export HTTP/1.1\r\nHost: {url.host}\r\n"
        f"Authorization: Bearer {server.job.api_key}\r\nConnection: close\r\n\r\n".encode()
    )
    head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def test_a_client_that_goes_away_stops_the_query(server: Server) -> None:
    sock = _start_reading(server)
    try:
        # Mid-stream the export holds a server-side cursor open (DECLARE, then FETCH).
        assert _wait_for(
            lambda: any(
                q.lstrip().upper().startswith(("FETCH", "DECLARE"))
                for _, q in _in_transaction(server.database)
            )
        ), _backends(server.database)
    finally:
        sock.close()  # the client goes away with most of the rows unsent
    assert _wait_for(lambda: not _in_transaction(server.database)), _backends(server.database)
    # The server still answers, and a whole export still arrives whole.
    with httpx.Client(timeout=120) as client:
        whole = client.send(server.export(client))
        assert whole.status_code == 200
        assert whole.content.count(b"\n") == ROWS + seed_rows_exported()
    assert _wait_for(lambda: not _in_transaction(server.database)), _backends(server.database)


def test_a_bad_request_opens_no_stream(server: Server) -> None:
    with httpx.Client(timeout=30) as client:
        bad = client.send(server.export(client, format="nope"))
        assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "format"
    assert _wait_for(lambda: not _in_transaction(server.database)), _backends(server.database)
