"""The audit log writer: allow-list, redaction, one line per record whatever users choose."""

from __future__ import annotations

import io
import json

from callgate.audit import AuditLog, StreamSink


def write(fields: dict[str, object], event: str = "call.requested") -> dict[str, object]:
    stream = io.StringIO()
    AuditLog(StreamSink(stream)).write(event, fields)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert isinstance(record, dict)
    return record


def test_unknown_and_secret_fields_never_written() -> None:
    record = write(
        {"caller": "alice", "sdp": "v=0 secret", "token": "eyJ", "candidate": "c", "offer": {}}
    )
    assert set(record) == {"ts", "event", "caller", "seq"}


def test_record_shape() -> None:
    record = write({"call_id": "c1", "duration_ms": 12, "answered": True})
    assert list(record)[:2] == ["ts", "event"]
    assert record["event"] == "call.requested"
    assert str(record["ts"]).endswith("Z")


def test_hostile_user_ids_cannot_break_lines_or_inject_escapes() -> None:
    stream = io.StringIO()
    hostile = 'eve\n{"event":"call.ended"}\r\x1b[2J\u2028\u0085'
    AuditLog(StreamSink(stream)).write("authz.denied", {"user": hostile, "reason": hostile})
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "\x1b" not in text and "\r" not in text and "\u2028" not in text
    assert text.isascii()
    assert json.loads(text)["user"] == hostile


def test_long_values_are_cut() -> None:
    record = write({"user": "x" * 10_000})
    assert len(str(record["user"])) < 300


def test_event_key_cannot_override_the_event() -> None:
    assert write({"event": "forged"}, event="auth.ok")["event"] == "auth.ok"
