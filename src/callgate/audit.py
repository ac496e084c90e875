"""The audit log: one JSON object per line, for auditors (contract section 10).

Records pass two guards before they are written. First an allow-list: only the keys in
`AUDIT_FIELDS` survive, whatever a caller passes. Second a redaction processor: any key that could
carry SDP, ICE candidates or tokens is replaced, in case a future field slips through the first.
Values are flattened to JSON scalars and long strings are cut; the JSON encoder escapes every
control and non-ASCII character, so a user-chosen id can never break a line or put a terminal
escape sequence on an auditor's screen.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

# Every key an audit record may carry. docs/protocol.md documents each.
AUDIT_FIELDS = frozenset(
    {
        "ts",
        "event",
        "conn",
        "addr",
        "user",
        "call_id",
        "caller",
        "callee",
        "media",
        "reason",
        "by",
        "devices",
        "answered",
        "duration_ms",
        "retry_after",
        "msg_event",
        "code",
        "close_code",
        "expires_at",
        "previous_conn",
        "calls",
        "delivered",
        "dropped_messages",
    }
)
# Keys that could hold secrets or media descriptions; never written even if allow-listed later.
REDACTED_FIELDS = frozenset(
    {"sdp", "offer", "answer", "description", "candidate", "token", "authorization", "secret"}
)
MAX_VALUE_CHARS = 256
# Every `call.requested` record is followed by exactly one of these for the same call.
TERMINAL_CALL_EVENTS = frozenset(
    {
        "call.unavailable",
        "call.busy",
        "call.rate_limited",
        "call.rejected",
        "call.cancelled",
        "call.timeout",
        "call.ended",
    }
)


def _keep_allowed(_: Any, __: str, record: MutableMapping[str, Any]) -> Mapping[str, Any]:
    return {key: value for key, value in record.items() if key in AUDIT_FIELDS}


def _redact(_: Any, __: str, record: MutableMapping[str, Any]) -> Mapping[str, Any]:
    return {
        key: ("[redacted]" if key in REDACTED_FIELDS else value) for key, value in record.items()
    }


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."


def _flatten(_: Any, __: str, record: MutableMapping[str, Any]) -> Mapping[str, Any]:
    # `ts` and `event` first, so a line reads left to right as "when, what, details".
    ordered = {"ts": record.get("ts"), "event": record.get("event")}
    ordered.update((key, _scalar(value)) for key, value in record.items() if value is not None)
    return ordered


def _dumps(record: Any, **_: Any) -> str:
    # ensure_ascii escapes control characters (U+0000-U+001F, ESC) and all non-ASCII text.
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


class AuditLog:
    """Writes audit records to a text stream (stdout or an append-only file), one per line."""

    def __init__(self, stream: TextIO, *, owns_stream: bool = False, strict: bool = False) -> None:
        """`strict` (tests) raises on a field outside the allow-list instead of dropping it, so a
        new audit field cannot be silently lost."""
        self._stream = stream
        self._owns_stream = owns_stream
        self._strict = strict
        self._logger = structlog.wrap_logger(
            structlog.WriteLogger(stream),
            processors=[
                _keep_allowed,
                _redact,
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                _flatten,
                structlog.processors.JSONRenderer(serializer=_dumps),
            ],
            cache_logger_on_first_use=True,
        )

    @classmethod
    def open(cls, path: str) -> AuditLog:
        """`-` is stdout; anything else is a file opened for appending."""
        if path == "-":
            return cls(sys.stdout)
        return cls(open(path, "a", encoding="utf-8"), owns_stream=True)

    def write(self, event: str, fields: Mapping[str, Any]) -> None:
        if self._strict:
            unknown = set(fields) - AUDIT_FIELDS
            if unknown:
                raise ValueError(f"audit fields not in the allow-list: {sorted(unknown)}")
        # structlog names the event positionally; an `event` key in fields would collide.
        self._logger.msg(event, **{k: v for k, v in fields.items() if k != "event"})

    def close(self) -> None:
        self._stream.flush()
        if self._owns_stream:
            self._stream.close()
