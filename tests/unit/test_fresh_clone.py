"""A fresh clone runs README command 2: no ../shared beside it (the tests that need the real
data sets skip and say which file), the dev tools installed by `make` when command 1 left them
out, and everything `make check` needs declared by the committed files. `.ci/clean-clone`
does the real install from a clean clone, timed, outside the suite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
# The distributions behind the executables `make check` runs (Makefile DEV_TOOLS).
DEV_TOOL_DISTRIBUTIONS = {
    "ruff": "ruff",
    "mypy": "mypy",
    "lint-imports": "import-linter",
    "pytest": "pytest",
}


def _modules_reading_shared_data() -> list[Path]:
    return sorted(
        path
        for path in TESTS.rglob("*.py")
        if path != TESTS / "conftest.py" and "SHARED_DATA" in path.read_text(encoding="utf-8")
    )


def test_tests_reach_the_shared_data_only_through_shared_data_and_its_marker() -> None:
    """One way in (tests/conftest.py's SHARED_DATA, which DISTILL_SHARED_DATA overrides) and
    every module that takes it marks the tests that read it."""
    by_hand = re.compile(r"""/\s*["']shared["']|["'][./]*shared/data""")
    for path in TESTS.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path != TESTS / "conftest.py":
            assert not by_hand.search(text), f"{path}: build paths from tests.conftest.SHARED_DATA"
    modules = _modules_reading_shared_data()
    assert modules, "the suite no longer reads the shared data: drop this check"
    for path in modules:
        assert "mark.shared_data(" in path.read_text(encoding="utf-8"), path


def test_without_the_shared_data_its_tests_skip_and_name_the_missing_file(
    tmp_path: Path,
) -> None:
    """The marked tests run where ../shared is absent: skipped, none failed, each reason naming
    the file it needs (the rest of those modules runs in the suite itself)."""
    missing = tmp_path / "no-shared" / "data"
    modules = [str(p.relative_to(REPO)) for p in _modules_reading_shared_data()]
    marked = ["-m", "shared_data"]
    env = {**os.environ, "DISTILL_SHARED_DATA": str(missing), "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *marked, *modules],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    summary = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"\d+ skipped", summary) and "passed" not in summary, summary
    assert "failed" not in summary and "error" not in summary, summary
    reasons = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert reasons, run.stdout
    for line in reasons:
        assert f"needs {missing}/" in line, line
        assert "absent in a clone" in line, line


def _fake_venv(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A virtualenv as README command 1 leaves it for `make`: a python, no dev tools. Its
    python, and the `python3` that would create it, log their arguments instead of running."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    shim = f'#!/bin/sh\necho "$0 $*" >> {log}\n'
    for path in (venv / "bin" / "python", tmp_path / "python3"):
        path.write_text(shim)
        path.chmod(0o755)
    return venv, tmp_path / "python3", log


def test_make_installs_the_dev_tools_it_lacks_and_says_so(tmp_path: Path) -> None:
    venv, python3, log = _fake_venv(tmp_path)
    run = subprocess.run(
        ["make", "--no-print-directory", "dev-tools", f"VENV={venv}", f"PYTHON={python3}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "lacks the dev tools: ruff mypy lint-imports pytest; installing them" in run.stderr
    assert log.read_text().splitlines() == [
        f"{python3} -m venv {venv}",
        f"{venv}/bin/python -m pip install -e .[dev,student]",
    ]

    # Once they are there, nothing is installed again.
    for tool in ("ruff", "mypy", "lint-imports", "pytest"):
        (venv / "bin" / tool).write_text("#!/bin/sh\n")
        (venv / "bin" / tool).chmod(0o755)
    log.unlink()
    again = subprocess.run(
        ["make", "--no-print-directory", "dev-tools", f"VENV={venv}", f"PYTHON={python3}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and again.stderr == "" and not log.exists()


def test_a_failed_install_tells_what_to_run(tmp_path: Path) -> None:
    venv, _, _ = _fake_venv(tmp_path)
    failing = tmp_path / "python3-broken"
    failing.write_text("#!/bin/sh\nexit 1\n")
    failing.chmod(0o755)
    run = subprocess.run(
        ["make", "--no-print-directory", "lint", f"VENV={venv}", f"PYTHON={failing}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "No such file" not in run.stderr
    assert f"installing the dev tools failed; run: {failing} -m venv {venv}" in run.stderr
    assert "pip install -e '.[dev,student]'" in run.stderr


def _quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_command_2_works_after_command_1() -> None:
    """Command 1 installs into .venv whatever extras it names; command 2 is `make check`,
    whose every step first installs the dev tools into that .venv when they are missing, and
    the dev extra is what provides them."""
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    first, second = commands
    assert second == "make check"
    # A virtualenv of its own would leave make check to build a second one beside it.
    assert re.findall(r"-m venv (\S+)", first) in ([], [".venv"]), first
    named = re.search(r"-e '\.\[([a-z,-]+)\]'", first)
    extras = set(named[1].split(",")) if named else set()
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^VENV \?= \.venv$", makefile, re.M)
    assert re.search(r"^check: lint typecheck test ", makefile, re.M)
    for target in ("lint", "typecheck", "test"):
        assert re.search(rf"^{target}: dev-tools\b", makefile, re.M), target
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    optional = project["optional-dependencies"]
    dev = {re.split(r"[<>=!\[; ]", spec, maxsplit=1)[0] for spec in optional["dev"]}
    assert set(DEV_TOOL_DISTRIBUTIONS.values()) <= dev
    if "dev" not in extras:  # then command 2's first step installs it
        assert "$(PY) -m pip install -e '.[dev,student]'" in makefile


def test_a_clean_clone_declares_everything_the_suite_runs_on(tmp_path: Path) -> None:
    """Clone the committed tree (nothing untracked comes along) and ask pip what installing it
    with the dev and student extras would add to the environment this suite runs in: only the
    project itself, so every package the suite uses is one the committed pyproject declares
    and resolves. No index is asked, nothing is installed."""
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout: nothing to clone")
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)],
        check=True,
        timeout=120,
    )
    for needed in ("Makefile", ".ci/check-services", ".ci/clean-clone", "tests/data_factory.py"):
        assert (clone / needed).exists(), f"{needed} is not committed"
    report = tmp_path / "report.json"
    offline = ["--no-index", "--no-build-isolation", "--quiet", "--report", str(report)]
    editable = f"{clone}[dev,student]"
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", *offline, "-e", editable],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    added = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert added == ["distill"]
