"""Operational logging (structlog) on stderr, separate from the audit log.

Human-readable on a terminal, JSON lines otherwise. Tracebacks never include local variables:
those can hold tokens and SDP.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from functools import partial
from typing import Any

import structlog

from callgate.audit import REDACTED_FIELDS


def _redact(_: Any, __: str, record: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in REDACTED_FIELDS & record.keys():
        record[key] = "[redacted]"
    return record


def _tag(
    tags: Mapping[str, object], _: Any, __: str, record: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in tags.items():
        record.setdefault(key, value)
    return record


def configure_logging(
    *,
    level: str = "info",
    json_output: bool | None = None,
    tags: Mapping[str, object] | None = None,
) -> None:
    """`tags`: fields every line carries (a worker's index under `callgate serve --workers`)."""
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer: Any
    if json_output:
        renderer = structlog.processors.JSONRenderer()
        exceptions: list[Any] = [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        ]
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        exceptions = []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([partial(_tag, dict(tags))] if tags else []),
            _redact,
            *exceptions,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write per line (PrintLogger writes the newline apart when stderr is unbuffered,
        # PYTHONUNBUFFERED=1): the workers of `serve --workers` share one stderr, and their
        # lines must not interleave.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
