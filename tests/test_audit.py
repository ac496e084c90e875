"""The audit log writer: allow-list, redaction, one line per record whatever users choose."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from callgate.audit import (
    AUDIT_FIELDS,
    AuditLog,
    StreamSink,
    _dumps,
    canonical,
    chain_mac,
    iso_utc,
)


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


# orjson writes the common records; the standard library's encoder is the definition.
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.text(alphabet=st.characters(max_codepoint=127), max_size=20)
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(AUDIT_FIELDS)), _SCALARS, max_size=8))
def test_fast_encoding_is_the_standard_librarys(record: dict[str, object]) -> None:
    """The MAC covers exactly the bytes the definition gives, and lines read the same."""
    body = {k: v for k, v in record.items() if k != "mac"}
    expected = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert canonical(record) == expected.encode("ascii")
    assert _dumps(record) == json.dumps(record, ensure_ascii=True, separators=(",", ":"))


def test_the_chain_mac_is_hmac_sha256_of_the_previous_mac_and_the_canonical_record() -> None:
    record = {"ts": "2026-11-24T00:00:00Z", "event": "call.ended", "seq": 7, "mac": "ignored"}
    message = b"prev\n" + canonical(record)
    assert chain_mac(b"k" * 32, "prev", record) == (
        hmac.new(b"k" * 32, message, hashlib.sha256).hexdigest()
    )


@given(st.integers(0, 4_102_444_800 * 10**9))  # up to 2100
def test_timestamps_read_as_structlogs_iso_utc(unix_ns: int) -> None:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=unix_ns // 1000)
    assert iso_utc(unix_ns) == moment.isoformat().replace("+00:00", "Z")


def test_a_whole_second_has_no_fraction() -> None:
    assert iso_utc(1_700_000_000 * 10**9) == "2023-11-14T22:13:20Z"
