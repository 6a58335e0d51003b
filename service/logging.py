"""structlog configuration: key-value events at the configured level, to stderr, in one format
for distill's own events and the standard-library loggers (uvicorn, Celery, Alembic) alike."""

from __future__ import annotations

import logging
import sys

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
