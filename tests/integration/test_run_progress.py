"""`distill run` as a user sees it in a terminal: the iteration's bar moves once per teacher call
(not once per batch or per phase), and log lines do not break the bars."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.fake_teacher.client import FakeTeacherProcess

DISTILL = str(Path(sys.executable).parent / "distill")
DATA = REPO / "examples" / "data"
# A bar as rich draws it: "iteration 1 ━━━━╸━━━━ 3/12 teacher calls · generating ...".
BAR = re.compile(r"iteration 1 [━╸╺ ]+ (\d+)/(\d+) teacher calls · (\w+)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BATCH_SIZE = 4


@pytest.fixture(scope="module")
def teacher() -> Iterator[FakeTeacherProcess]:
    # Slow enough that several calls fall between two reads of the progress (every 0.5 s).
    with FakeTeacherProcess(latency_ms=250) as proc:
        yield proc


def _spec_file(tmp_path: Path, teacher: FakeTeacherProcess, **changes: Any) -> Path:
    """A job on the banking seed set against `teacher`, one call at a time as with the local
    teacher."""
    spec = {
        "name": "progress",
        "strategy": "pgkd",
        "task": {"kind": "classification", "instructions": "Classify a bank message."},
        "datasets": {
            "train": str(DATA / "banking-seed.jsonl"),
            "validation": str(DATA / "banking-validation.jsonl"),
        },
        "teacher": {
            "base_url": teacher.base_url,
            "model": "fake-teacher",
            "limits": {"max_concurrency": 1},
        },
        "student": {"type": "builtin", "model": "tfidf"},
        "budget": {"max_iterations": 1, "max_examples": 24},
        "params": {"examples_per_target": 2},
        "batch_size": BATCH_SIZE,
        "seed": 0,
        **changes,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _env(tmp_path: Path, columns: int = 200) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("DISTILL_")
    }
    env.update(DISTILL_HOME=str(tmp_path / "home"), NO_COLOR="1", COLUMNS=str(columns))
    return env


def _run(
    tmp_path: Path, teacher: FakeTeacherProcess, columns: int = 200
) -> subprocess.CompletedProcess[str]:
    path = _spec_file(tmp_path, teacher)
    # A terminal as rich sees one: live bars redrawn in place, as a user watches them.
    env = {
        **_env(tmp_path, columns),
        "DISTILL_LOG_LEVEL": "INFO",
        "TTY_COMPATIBLE": "1",
        "TTY_INTERACTIVE": "1",
    }
    return subprocess.run(
        [DISTILL, "run", str(path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_bar_moves_per_teacher_call_and_logs_go_to_a_file(
    tmp_path: Path, teacher: FakeTeacherProcess
) -> None:
    teacher.reset()
    result = _run(tmp_path, teacher)
    assert result.returncode == 0, result.stdout + result.stderr
    drawn = ANSI.sub("", result.stdout)
    frames = [(int(done), int(total), status) for done, total, status in BAR.findall(drawn)]
    assert frames, result.stdout
    totals = {total for _, total, _ in frames}
    assert len(totals) == 1, totals
    calls = totals.pop()
    assert calls == teacher.stats()["by_status"]["200"] > 2 * BATCH_SIZE
    counts = [done for done, _, _ in frames]
    assert counts == sorted(counts)  # never backwards
    assert counts[-1] == calls
    # Drawn between calls while the one generation step was still running: a bar that moved
    # only when a batch or the phase closed would show 0 and then multiples of the batch size.
    during = {done for done, _, status in frames if status == "generating"}
    assert len({n for n in during if n % BATCH_SIZE}) >= 2, sorted(during)
    # INFO events (one per teacher call) went to the log file, not through the bars.
    assert "level='info'" not in result.stdout + result.stderr
    log = (tmp_path / "home" / "logs" / "run.log").read_text()
    assert "event='iteration.completed'" in log
    assert f"log: {tmp_path / 'home' / 'logs' / 'run.log'}" in result.stdout


def test_the_summary_names_every_rejection_reason_whole_in_80_columns(
    tmp_path: Path, teacher: FakeTeacherProcess
) -> None:
    # A teacher that gives half its examples another label than asked: `label_not_asked`.
    teacher.reset()
    teacher.configure(mislabel_rate=0.5)
    try:
        result = _run(tmp_path, teacher, columns=80)
    finally:
        teacher.configure(mislabel_rate=0.0)
    assert result.returncode == 0, result.stdout + result.stderr
    drawn = ANSI.sub("", result.stdout)
    table = drawn[drawn.rindex("┏") : drawn.rindex("┘")]
    assert "…" not in table, table  # no cell cut short
    reasons = drawn[drawn.index("rejected, by reason:") :].splitlines()
    assert re.fullmatch(
        r"  iteration 1: (\w+=\d+, )*label_not_asked=\d+(, \w+=\d+)*", reasons[1]
    ), reasons


def _status(tmp_path: Path, job_id: str) -> str:
    shown = subprocess.run(
        [DISTILL, "jobs", "show", job_id],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    match = re.match(r"\S+ \[\w+\] (\w+)", shown)  # "name [strategy] status — reason"
    assert match, shown
    return match.group(1)


def test_ctrl_c_pauses_the_job_and_resume_then_serve_finishes_it(
    tmp_path: Path, teacher: FakeTeacherProcess
) -> None:
    teacher.reset()
    spec = _spec_file(
        tmp_path,
        teacher,
        name="interrupted",
        strategy="random",
        params={},
    )
    run = subprocess.Popen(
        [DISTILL, "run", str(spec)],
        env={**_env(tmp_path), "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert run.stdout is not None
    seen = ""
    # Mid-generation: a call answered (one at a time, 250 ms each), more to come.
    while not any(int(done) and status == "generating" for done, _, status in BAR.findall(seen)):
        line = run.stdout.readline()
        assert line, seen
        seen += ANSI.sub("", line)
    run.send_signal(signal.SIGINT)
    rest, _ = run.communicate(timeout=60)
    out = ANSI.sub("", seen + rest)
    assert run.returncode == 130, out
    job_id = re.search(r"job (\S+) \(random\) created", out).group(1)  # type: ignore[union-attr]
    assert f"interrupted: job {job_id} is paused" in out, out
    assert _status(tmp_path, job_id) == "paused"
    served = teacher.stats()["by_status"]["200"]
    assert served >= 1

    # What the message says: resume, then serve (embedded: it runs the job's steps).
    subprocess.run([DISTILL, "jobs", "resume", job_id], env=_env(tmp_path), check=True, timeout=60)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [DISTILL, "serve", "--port", str(port)],
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while (status := _status(tmp_path, job_id)) != "succeeded":
            assert status in ("running", "queued") and time.monotonic() < deadline, status
            time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert teacher.stats()["by_status"]["200"] > served  # it went on where it stopped
