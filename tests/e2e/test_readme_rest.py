"""The README's REST flow, executed as written: its bash block(s) under "## The API", run with
bash, curl and jq against an embedded `distill serve` on a free port (the laptop default: no
DATABASE_URL, no REDIS_URL) and the project's fake OpenAI-compatible teacher."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.auth import create_api_key, get_or_create_tenant
from service.db import make_engine, session_factory
from tests.e2e.conftest import DISTILL, wait_for
from tests.fake_teacher.client import FakeTeacherProcess

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"^```bash\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def readme_rest_blocks() -> list[str]:
    """The bash blocks of the README's "## The API" section, in order."""
    text = (REPO / "README.md").read_text()
    start = text.index("\n## The API\n")
    end = text.find("\n## ", start + 1)
    return _BLOCK.findall(text[start : end if end != -1 else len(text)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _environment(home: Path) -> dict[str, str]:
    """The caller's environment without any distill setting: an embedded server in `home`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DISTILL_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(
        {
            "DISTILL_HOME": str(home),
            "DISTILL_LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
            "PATH": f"{Path(DISTILL).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def teacher() -> Iterator[FakeTeacherProcess]:
    with FakeTeacherProcess() as proc:
        yield proc


@pytest.fixture(scope="module")
def embedded_server(
    server_dir: Path, teacher: FakeTeacherProcess
) -> Iterator[tuple[str, dict[str, str]]]:
    """One server for the module: starting one takes seconds (tens on a busy machine). The
    fake teacher stands in for the local teacher the operator runs (`teacher: local`)."""
    tmp_path = server_dir
    env = _environment(tmp_path / "home")
    port = _free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [DISTILL, "serve", "--port", str(port)],
        env={
            **env,
            "DISTILL_LOG_LEVEL": "INFO",
            "DISTILL_API__LOCAL_TEACHER_URL": teacher.base_url,
        },
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "distill serve to answer")
        yield base, env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_readme_has_one_rest_flow_using_names_and_content_types() -> None:
    blocks = readme_rest_blocks()
    assert blocks, "no ```bash block under ## The API"
    flow = "\n".join(blocks)
    assert flow.count("Content-Type: application/json") >= 2
    assert '"train": "banking-seed"' in flow and '"teacher": "my-teacher"' in flow


@pytest.mark.skipif(
    not (shutil.which("curl") and shutil.which("jq")),
    reason="the README's REST flow needs curl and jq (apt-get install curl jq)",
)
def test_the_readme_rest_flow_runs_as_written(
    embedded_server: tuple[str, dict[str, str]], teacher: FakeTeacherProcess, tmp_path: Path
) -> None:
    base, env = embedded_server
    work = tmp_path / "clone"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")  # the block runs from a clone's root
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(readme_rest_blocks())],
        cwd=work,
        env={
            **env,
            "DISTILL_URL": base,
            "TEACHER_URL": teacher.base_url,
            "TEACHER_MODEL": "fake-teacher",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    calls = teacher.stats()["completions_ok"]
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert calls > 0
    lines = result.stdout.splitlines()
    iterations = [json.loads(line) for line in lines if line.startswith('{"number"')]
    assert [it["number"] for it in iterations] == [0, 1, 2]
    assert all(it["status"] == "completed" for it in iterations), iterations
    assert sum(it["examples_accepted"] for it in iterations) > 0
    exported = (work / "banking-chat.jsonl").read_text().splitlines()
    assert len(exported) >= 48  # the seed rows at least, as chat messages
    assert "messages" in json.loads(exported[0])
    refresh = json.loads(lines[-1])
    assert refresh["outcome"] == "waiting" and refresh["job_status"], refresh


def _log_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_serve_logs_in_one_format_without_alembic_chatter(
    embedded_server: tuple[str, dict[str, str]], server_dir: Path
) -> None:
    """uvicorn's lines and distill's events alike, and no `setup plugin alembic…` lines."""
    base, _ = embedded_server
    assert httpx.get(f"{base}/healthz").status_code == 200
    lines = wait_for(lambda: _log_lines(server_dir / "serve.log"), 10, "the access log line")
    assert not [line for line in lines if "setup plugin" in line], lines
    assert all(line.startswith("timestamp=") for line in lines), lines
    assert any("logger='uvicorn.access'" in line for line in lines), lines


def test_teacher_local_over_rest_is_the_operators_local_teacher(
    embedded_server: tuple[str, dict[str, str]], teacher: FakeTeacherProcess
) -> None:
    """`distill serve` with DISTILL_API__LOCAL_TEACHER_URL: a REST job's `teacher: local` gets
    the local teacher's defaults at that URL (the composition root wires it)."""
    base, env = embedded_server
    engine = make_engine(f"sqlite:///{env['DISTILL_HOME']}/distill.db")
    with session_factory(engine)() as session:  # the server's own database
        _, key = create_api_key(session, get_or_create_tenant(session, "local-user"))
        session.commit()
    engine.dispose()
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=auth, timeout=30) as http:
        seed = (REPO / "examples" / "data" / "banking-seed.jsonl").read_bytes()
        up = http.post(
            "/v1/datasets?name=seed", content=seed, headers={"Content-Type": "application/x-ndjson"}
        )
        assert up.status_code == 201, up.text
        spec = {
            "name": "local-over-rest",
            "strategy": "random",
            "task": {"kind": "classification", "instructions": "Classify."},
            "datasets": {"train": "seed"},
            "teacher": "local",
            "student": {"type": "builtin", "model": "tfidf"},
            "budget": {"max_iterations": 1},
        }
        job = http.post("/v1/jobs", json=spec)
        assert job.status_code == 201, job.text
        stored = http.get(f"/v1/teachers/{job.json()['teacher_id']}").json()
        assert stored["base_url"] == teacher.base_url and stored["model"] == "gemma-3-270m"
        assert stored["limits"]["max_concurrency"] == 1
        # Stopped so the server's executor is free for the next test. On a slow machine the
        # job may have ended already (the fake teacher serves no gemma-3-270m): 409 then. A
        # cancel that met the job starting gets "the job changed concurrently; retry": asked
        # again, as it says.
        for _ in range(10):
            cancel = http.post(f"/v1/jobs/{job.json()['id']}/cancel")
            if "changed concurrently" not in cancel.text:
                break
        ended = http.get(f"/v1/jobs/{job.json()['id']}").json()["status"]
        assert cancel.status_code == 202 or (
            cancel.status_code == 409 and ended in ("succeeded", "failed", "cancelled")
        ), (cancel.text, ended)
