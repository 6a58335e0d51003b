"""structlog configuration: key-value events at the configured level, to stderr, in one format
for distill's own events and the standard-library loggers (uvicorn, Celery, Alembic) alike."""

from __future__ import annotations

import atexit
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

# Loggers whose INFO lines say nothing an operator needs: one line per HTTP request is the
# teacher gateway's job (with tokens and latency), not the HTTP clients'; Alembic announces
# each of its plugins on every start.
_HANDLER = "distill"
_QUIET = ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "alembic.runtime.plugins")


def _renderer() -> Processor:
    if sys.stderr.isatty():
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"])


def configure_logging(level: str = "INFO") -> None:
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
    ]
    renderer = _renderer()
    # A standard-library record goes through the same processors and renderer as a structlog
    # event, so a process prints one format (uvicorn's and Celery's lines included: the
    # composition root starts uvicorn with log_config=None, so its loggers reach this handler).
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER]:  # configured again
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for noisy in _QUIET:
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time of the write: a live display (rich's
    progress bars) replaces it with a proxy that prints whole lines above the bars."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_LOUD = frozenset({"warning", "warn", "error", "err", "critical", "fatal", "exception"})


# The open run log, replaced (and the previous one closed) by each configure_run_logging: a
# process that runs several jobs in turn (tests drive `distill run` in process) keeps one open.
_run_log: TextIO | None = None


def _close_run_log() -> None:
    global _run_log
    if _run_log is not None:
        _run_log.close()
        _run_log = None


atexit.register(_close_run_log)


class _FileAndLoudToStderr:
    """A structlog logger: every event to the run log, warnings and worse to stderr as well.

    structlog calls the method named after the event's level with the rendered line, so the
    level is known here without parsing the line. The file is looked up at each write: loggers
    are cached on first use, and the file may have been replaced since."""

    def _write(self, method: str, message: str) -> None:
        if _run_log is not None:
            _run_log.write(message + "\n")
            _run_log.flush()
        if method in _LOUD:
            sys.stderr.write(message + "\n")

    def __getattr__(self, method: str) -> Any:
        return lambda message: self._write(method, message)


def configure_run_logging(level: str, path: Path) -> None:
    """Logging for a command that draws progress bars (`distill run`): every event at `level`
    or above is appended to `path`; only warnings and errors reach the terminal, through the
    current `sys.stderr`, so the live display prints them above its bars instead of through
    them. Call it before the first event is logged (structlog caches loggers on first use)."""
    global _run_log
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        # Plain stream handlers (basicConfig's, ours from an earlier run) write to the terminal
        # or to the previous run log; subclasses (a test runner's capture) are left alone.
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    _close_run_log()
    _run_log = path.open("a", encoding="utf-8")
    to_file = logging.StreamHandler(_run_log)
    to_file.setLevel(numeric)
    to_terminal = logging.StreamHandler(_CurrentStderr())
    to_terminal.setLevel(max(numeric, logging.WARNING))
    for handler in (to_file, to_terminal):
        # Named like configure_logging's handler, so configuring again replaces both.
        handler.set_name(_HANDLER)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(numeric)
    for noisy in _QUIET:
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"]),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *args: _FileAndLoudToStderr(),
        cache_logger_on_first_use=True,
    )
