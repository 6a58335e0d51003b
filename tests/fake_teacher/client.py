"""Stdlib-only manager for a `python -m tests.fake_teacher` subprocess on a free loopback port.

Pytest usage (a module-scoped fixture keeps one process per test module)::

    @pytest.fixture(scope="module")
    def teacher() -> Iterator[FakeTeacherProcess]:
        with FakeTeacherProcess(latency_ms=50, max_concurrency=8) as proc:
            yield proc

    def test_something(teacher: FakeTeacherProcess) -> None:
        teacher.reset()                      # zero counters between tests
        teacher.configure(error_rate=0.2)    # any server flag, snake_case, at runtime
        client = openai.OpenAI(base_url=teacher.base_url, api_key="x", max_retries=0)
        ...
        assert teacher.stats()["by_status"]["200"] > 0

Always stop the process (context manager or `stop()`): pytest runs with
`filterwarnings = error`, and a still-running Popen raises ResourceWarning on collection.
"""

from __future__ import annotations

import http.client
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final
from urllib.parse import urlsplit

LISTENING_PREFIX: Final = "FAKE_TEACHER_LISTENING"
REPO_ROOT: Final = Path(__file__).resolve().parents[2]
START_TIMEOUT_S: Final = 20.0
STOP_GRACE_S: Final = 5.0


class FakeTeacherProcess:
    """Starts `python -m tests.fake_teacher` as a subprocess on a free port; context manager."""

    def __init__(
        self,
        *,
        latency_ms: float = 0,
        jitter_ms: float = 0,
        max_concurrency: int = 0,
        retry_after_s: float = 1.0,
        error_rate: float = 0.0,
        malformed_rate: float = 0.0,
        truncate_rate: float = 0.0,
        hang_rate: float = 0.0,
        hang_s: float = 3600.0,
        mislabel_rate: float = 0.0,
        faults_first_attempt_only: bool = False,
        api_key: str | None = None,
        no_json_schema: bool = False,
        models: Sequence[str] = ("fake-teacher",),
        seed: int = 0,
        python: str = sys.executable,
        cwd: str | Path = REPO_ROOT,
        extra_args: Sequence[str] = (),
    ) -> None:
        args = [
            python,
            "-m",
            "tests.fake_teacher",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--seed",
            str(seed),
            "--latency-ms",
            repr(float(latency_ms)),
            "--jitter-ms",
            repr(float(jitter_ms)),
            "--max-concurrency",
            str(max_concurrency),
            "--retry-after-s",
            repr(float(retry_after_s)),
            "--error-rate",
            repr(float(error_rate)),
            "--malformed-rate",
            repr(float(malformed_rate)),
            "--truncate-rate",
            repr(float(truncate_rate)),
            "--hang-rate",
            repr(float(hang_rate)),
            "--hang-s",
            repr(float(hang_s)),
            "--mislabel-rate",
            repr(float(mislabel_rate)),
        ]
        if faults_first_attempt_only:
            args.append("--faults-first-attempt-only")
        if api_key is not None:
            args += ["--api-key", api_key]
        if no_json_schema:
            args.append("--no-json-schema")
        for model in models:
            args += ["--model", model]
        args += list(extra_args)
        self.args: list[str] = args
        self.cwd = Path(cwd)
        self.root_url = ""
        self.base_url = ""
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> FakeTeacherProcess:
        """Spawn the server and wait (up to 20 s) for its LISTENING line."""
        if self._proc is not None:
            raise RuntimeError("fake teacher already started")
        proc = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._proc = proc
        lines: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        # A thread keeps draining stdout for the process' whole life so it can never block on a
        # full pipe, and lets the startup wait use a plain queue timeout.
        self._reader = threading.Thread(
            target=_pump, args=(proc.stdout, lines), name="fake-teacher-stdout", daemon=True
        )
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(0.0, remaining))
            except queue.Empty:
                self.stop()
                raise RuntimeError(
                    f"fake teacher did not report listening within {START_TIMEOUT_S:g} s"
                ) from None
            if line is None:
                code = proc.wait()
                self.stop()
                raise RuntimeError(f"fake teacher exited with code {code} before listening")
            if line.startswith(LISTENING_PREFIX):
                self.root_url = line.split(None, 1)[1].strip()
                break
        self.base_url = self.root_url + "/v1"
        self.port = int(urlsplit(self.root_url).port or 0)
        return self

    def stop(self) -> None:
        """Terminate the server, killing it if it has not exited after 5 s."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=STOP_GRACE_S)
            self._reader = None
        if proc.stdout is not None:
            proc.stdout.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> FakeTeacherProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- control plane

    def stats(self) -> dict[str, Any]:
        """The server's /stats document."""
        result = self._request("GET", "/stats")
        assert isinstance(result, dict)
        return result

    def timeline(self) -> list[tuple[float, int]]:
        """(wall-clock time, requests in flight just after) at every admission and answer
        since the last reset."""
        result = self._request("GET", "/timeline")
        return [(float(t), int(n)) for t, n in result["events"]]

    def reset(self) -> None:
        """Zero counters and forget request fingerprints."""
        self._request("POST", "/admin/reset", {})

    def configure(self, **changes: Any) -> None:
        """Change server flags at runtime (snake_case names, e.g. error_rate=0.1, down=True)."""
        self._request("POST", "/admin/config", changes)

    def config(self) -> dict[str, Any]:
        """The server's current configuration."""
        result = self._request("GET", "/admin/config")
        assert isinstance(result, dict)
        return result

    def metrics(self) -> str:
        """The raw Prometheus text from /metrics."""
        status, body = self._raw("GET", "/metrics")
        if status != 200:
            raise RuntimeError(f"GET /metrics -> {status}: {body!r}")
        return body.decode()

    def _request(self, method: str, path: str, payload: Any = None) -> Any:
        status, body = self._raw(method, path, payload)
        if status != 200:
            raise RuntimeError(f"{method} {path} -> {status}: {body.decode(errors='replace')}")
        return json.loads(body)

    def _raw(self, method: str, path: str, payload: Any = None) -> tuple[int, bytes]:
        # http.client rather than urllib: urllib would route loopback through any *_proxy setting.
        if not self.port:
            raise RuntimeError("fake teacher is not started")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            body = None if payload is None else json.dumps(payload).encode()
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    try:
        for line in stream:
            lines.put(line)
    except ValueError:
        pass  # the stream was closed under us by stop()
    finally:
        lines.put(None)
