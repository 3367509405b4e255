"""structlog set-up: JSON lines when not on a terminal (journald), readable console output on one.

Request ids travel in contextvars (`bind_contextvars(request_id=...)`), so every
line about a request carries its id, also from the executor thread (the daemon
runs each step in a copy of the loop's context). What names the process (a
peer's role and name) is added to every line instead, from any thread: threads
start with an empty context, and so do the callbacks they hand to the loop.
"""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "auto", process_fields: dict[str, str] | None = None) -> None:
    """`process_fields`: added to every line this process logs, whichever thread logs it."""
    fields = dict(process_fields or {})

    def add_process_fields(_logger: object, _method: str, event: dict) -> dict:
        for key, value in fields.items():
            event.setdefault(key, value)
        return event

    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_process_fields,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )
