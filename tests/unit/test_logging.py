"""One log format per process: distill's structlog events and the standard-library loggers
(uvicorn, Celery, Alembic) render alike, and Alembic's plugin announcements are not printed."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest
import structlog

from service.logging import configure_logging

KEY_VALUE = re.compile(r"^timestamp='[^']+Z' level='(\w+)' event='([^']*)'")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = logging.getLogger("alembic.runtime.plugins").level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("alembic.runtime.plugins").setLevel(quiet)
        structlog.reset_defaults()


def test_stdlib_and_structlog_lines_share_one_format(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO")
    # A library's logger (uvicorn's own are checked on a real `distill serve`, in
    # tests/e2e/test_readme_rest.py: an in-process uvicorn elsewhere in the suite may have
    # set them not to propagate).
    logging.getLogger("some_library.server").info("Started server process [%d]", 42)
    structlog.get_logger().info("job.created", job_id="j-1")
    logging.getLogger("alembic.runtime.plugins").info("setup plugin %s", "alembic.x")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 2, lines
    parsed = [KEY_VALUE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m.group(1), m.group(2)) for m in parsed if m] == [
        ("info", "Started server process [42]"),
        ("info", "job.created"),
    ]
    assert "logger='some_library.server'" in lines[0] and "job_id='j-1'" in lines[1]


def test_configuring_twice_prints_each_line_once(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO")
    configure_logging("WARNING")
    logging.getLogger("celery").info("hidden")
    logging.getLogger("celery").warning("shown")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "event='shown'" in lines[0]
