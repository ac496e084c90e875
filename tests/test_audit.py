"""The audit log writer: allow-list, redaction, one line per record whatever users choose."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callgate._accel import PURE_VARIABLE
from callgate.audit import (
    AUDIT_FIELDS,
    REFUSAL_WINDOW,
    SYSLOG_TAG,
    Anchor,
    AuditLog,
    FileSink,
    HttpAnchor,
    RefusalDigest,
    Signer,
    StreamSink,
    SyslogAnchor,
    canonical,
    chain_mac,
    iso_utc,
    render,
)
from callgate.trail import verify
from conftest import AUDIT_PRIVATE_KEY, AUDIT_PUBLIC_KEY, assert_valid_record


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
    assert render(record) == json.dumps(record, ensure_ascii=True, separators=(",", ":"))


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


# -- repeated refusals (issue 16, item 10): one connection cannot fill the disk --------------

WINDOW = REFUSAL_WINDOW


def denied(
    conn: str = "c1",
    msg_event: str = "ice-candidate",
    reason: str = "unknown_call",
    call_id: str = "x",
) -> dict[str, object]:
    return {
        "conn": conn,
        "user": "eve",
        "msg_event": msg_event,
        "call_id": call_id,
        "reason": reason,
    }


def total(records: list[tuple[str, Mapping[str, object]]]) -> int:
    """How many refusals the records stand for: a summary its `count`, any other one."""
    return sum(int(str(fields.get("count", 1))) for _, fields in records)


def test_a_burst_is_its_first_refusal_then_one_count_per_window() -> None:
    digest = RefusalDigest()
    written = digest.admit("authz.denied", denied(call_id="first"), now=100.0)
    assert written == [("authz.denied", denied(call_id="first"))]  # the first, in full
    for i in range(499):
        assert digest.admit("authz.denied", denied(call_id=f"n{i}"), now=100.0 + i / 10) == []
    assert digest.due(100.0 + WINDOW - 0.001) == []
    summary = digest.due(100.0 + WINDOW)
    assert summary == [
        (
            "authz.denied",
            {
                "conn": "c1",
                "user": "eve",
                "msg_event": "ice-candidate",
                "reason": "unknown_call",
                "count": 499,
            },
        )
    ]
    assert total(written + summary) == 500
    # A window without repeats is forgotten: the next refusal is a new first, in full.
    assert digest.due(100.0 + 2 * WINDOW) == []
    assert len(digest) == 0
    again = digest.admit("authz.denied", denied(call_id="later"), now=100.0 + 2 * WINDOW + 1)
    assert again == [("authz.denied", denied(call_id="later"))]


def test_every_kind_and_every_connection_has_its_own_first() -> None:
    digest = RefusalDigest()
    kinds: list[tuple[str, dict[str, object]]] = [
        ("authz.denied", denied()),
        ("authz.denied", denied(reason="forbidden")),
        ("authz.denied", denied(msg_event="call-end")),
        ("authz.denied", denied(conn="c2")),
        ("auth.failed", {"conn": "c1", "user": "eve", "reason": "bad_signature"}),
        ("auth.failed", {"conn": "c1", "user": "eve", "reason": "malformed"}),
    ]
    for event, fields in kinds:
        assert digest.admit(event, fields, now=0.0) == [(event, fields)]
        assert digest.admit(event, fields, now=1.0) == []
    assert len(digest) == len(kinds)
    # A closing connection's counts are written at once, and nothing of it is kept.
    closed = digest.closed("c1")
    assert sorted((event, f["reason"], f["count"]) for event, f in closed) == [
        ("auth.failed", "bad_signature", 1),
        ("auth.failed", "malformed", 1),
        ("authz.denied", "forbidden", 1),
        ("authz.denied", "unknown_call", 1),
        ("authz.denied", "unknown_call", 1),
    ]
    assert len(digest) == 1  # c2's window
    assert digest.flush() == [("authz.denied", {**_without_call_id(denied(conn="c2")), "count": 1})]
    assert len(digest) == 0


def _without_call_id(fields: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in fields.items() if k != "call_id"}


def test_lifecycle_records_and_records_without_a_connection_are_never_held_back() -> None:
    digest = RefusalDigest()
    for event, fields in [
        ("call.requested", {"conn": "c1", "call_id": "x", "caller": "eve", "callee": "bob"}),
        ("call.rate_limited", {"conn": "c1", "call_id": "x", "reason": "call_request"}),
        ("auth.ok", {"conn": "c1", "user": "eve"}),
        ("session.resume_failed", {"conn": "c1", "user": "eve"}),
        ("conn.close", {"conn": "c1"}),
        ("authz.denied", {"user": "eve", "reason": "forbidden"}),  # no conn: not one connection's
    ]:
        for second in range(3):
            assert digest.admit(event, fields, now=float(second)) == [(event, fields)]
    assert len(digest) == 0


def test_token_refreshes_and_renegotiations_are_summed_per_connection_and_call() -> None:
    """A client can cause these with every message it sends, without being refused: they are
    summed as refusals are, a renegotiation per call and with the call's fields."""
    digest = RefusalDigest()
    call = {"call_key": "c1.1", "call_id": "x", "caller": "eve", "callee": "bob", "media": "voice"}
    other = {**call, "call_key": "c1.2", "call_id": "y"}
    first = [
        ("token.refreshed", {"conn": "c1", "user": "eve"}),
        ("call.renegotiated", {**call, "conn": "c1", "by": "eve"}),
        ("call.renegotiated", {**other, "conn": "c1", "by": "eve"}),
    ]
    for event, fields in first:
        assert digest.admit(event, fields, now=0.0) == [(event, fields)]
    for second in range(1, 10):
        for event, fields in first:
            assert digest.admit(event, fields, now=float(second)) == []
    closed = digest.closed("c1")
    assert sorted(closed, key=str) == sorted(
        [(event, {**fields, "count": 9}) for event, fields in first], key=str
    )
    assert len(digest) == 0


def test_a_calls_summed_renegotiations_are_written_before_its_terminal_record() -> None:
    """An auditor reads a call by its `call_key` up to its terminal record (the call report
    does): the count of its renegotiations, from both sides, comes before that record, not at
    the window's end or when a connection closes, after it. Another call's count waits."""
    stream = io.StringIO()
    log = AuditLog(StreamSink(stream), strict=True)
    call = {"call_key": "c1.1", "call_id": "x", "caller": "eve", "callee": "bob", "media": "voice"}
    other = {**call, "call_key": "c1.2", "call_id": "y"}
    for second in range(4):
        log.write("call.renegotiated", {**call, "conn": "c1", "by": "eve"}, now=float(second))
        log.write("call.renegotiated", {**call, "conn": "c2", "by": "bob"}, now=float(second))
        log.write("call.renegotiated", {**other, "conn": "c1", "by": "eve"}, now=float(second))
    log.write("call.ended", {**call, "reason": "hangup", "by": "eve"}, now=5.0)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    story = [
        (r["event"], r.get("conn"), r.get("count")) for r in records if r.get("call_key") == "c1.1"
    ]
    assert story == [
        ("call.renegotiated", "c1", None),
        ("call.renegotiated", "c2", None),
        ("call.renegotiated", "c1", 3),
        ("call.renegotiated", "c2", 3),
        ("call.ended", None, None),
    ]
    assert [r.get("count") for r in records if r.get("call_key") == "c1.2"] == [None]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["c1", "c2"]),
            st.sampled_from(["unknown_call", "forbidden"]),
            st.floats(0, 2 * WINDOW),  # the time since the step before
            st.booleans(),  # whether the clock's tick comes before this refusal
        ),
        max_size=200,
    )
)
def test_counts_add_up_and_records_of_a_kind_are_a_window_apart(
    steps: list[tuple[str, str, float, bool]],
) -> None:
    digest = RefusalDigest()
    now, written, sent = 0.0, [], Counter[tuple[str, str]]()
    times: dict[tuple[str, str], list[float]] = {}

    def record(records: list[tuple[str, Mapping[str, object]]]) -> None:
        for event, fields in records:
            written.append((event, fields))
            times.setdefault((str(fields["conn"]), str(fields["reason"])), []).append(now)

    for conn, reason, elapsed, tick in steps:
        now += elapsed
        if tick:
            record(digest.due(now))
        record(digest.admit("authz.denied", denied(conn=conn, reason=reason), now))
        sent[conn, reason] += 1
    for kind, moments in times.items():
        # `a + WINDOW`, as the digest computes it: `b - a` can round just under the window.
        assert all(b >= a + WINDOW for a, b in itertools.pairwise(moments)), (kind, moments)
    record(digest.flush())
    assert len(digest) == 0
    for kind, count in sent.items():
        mine = [(e, f) for e, f in written if (f["conn"], f["reason"]) == kind]
        assert total(mine) == count
        assert "count" not in mine[0][1]  # the first of each kind is written in full


def test_the_log_writes_a_connections_counts_before_its_close() -> None:
    stream = io.StringIO()
    log = AuditLog(StreamSink(stream), key=b"k" * 32, strict=True)
    log.write("conn.open", {"conn": "c1", "addr": "127.0.0.1"}, now=0.0)
    for i in range(1000):
        log.write("authz.denied", denied(call_id=f"n{i}"), now=i / 100)
    log.write("conn.close", {"conn": "c1", "user": "eve", "close_code": 1000}, now=10.0)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["event"] for r in records] == [
        "conn.open",
        "authz.denied",
        "authz.denied",
        "conn.close",
    ]
    assert records[1]["call_id"] == "n0" and "count" not in records[1]
    assert records[2]["count"] == 999 and "call_id" not in records[2]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]  # one chain, nothing skipped
    for record in records:
        assert_valid_record(record)


def test_the_log_writes_a_count_when_its_window_ends() -> None:
    stream = io.StringIO()
    log = AuditLog(StreamSink(stream), strict=True)
    for i in range(10):
        log.write("auth.failed", {"conn": "c1", "user": "eve", "reason": "malformed"}, now=i)
    log.tick(now=WINDOW - 1)
    assert len(stream.getvalue().splitlines()) == 1
    log.tick(now=WINDOW)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["event"], r.get("count")) for r in lines] == [
        ("auth.failed", None),
        ("auth.failed", 9),
    ]
    assert_valid_record(lines[1])


# A trail with every record kind the writer makes on its own: openings, rotations, checkpoints,
# a crash sealed off; written by a fresh interpreter so each build can be asked for it.
_WRITE_A_TRAIL = """
import json, sys
from pathlib import Path
import callgate
from callgate.audit import AuditLog, FileAnchor, FileSink, Signer, load_private_key
from conftest import AUDIT_KEY, AUDIT_SIGNING_KEY
folder = Path(sys.argv[1])
def log():
    sink = FileSink(folder / "audit.log", 4096, 3600)
    signer = Signer(load_private_key(AUDIT_SIGNING_KEY))
    anchor = FileAnchor(folder / "audit.anchor")
    return AuditLog(sink, key=AUDIT_KEY, signer=signer, anchors=[anchor], checkpoint_every=7)
audit = log()
for n in range(40):
    fields = {"call_key": f"c.{n}", "call_id": f"id{n}", "caller": "a", "callee": "b"}
    audit.write("call.requested", {**fields, "media": "voice", "conn": "c"})
audit.close()
with (folder / "audit.log").open("ab") as out:
    out.write(b'{"ts":"2026')
audit = log()
audit.write("conn.open", {"conn": "d", "addr": "127.0.0.1"})
audit.close()
print(callgate.IMPLEMENTATION)
"""
# What differs between two runs whatever the build: the time, and the seals that cover it.
_PER_RUN = {"ts", "mac", "digest", "sig", "prev", "prev_mac", "trail"}


def _trail_written_by(build: str, folder: Path) -> tuple[str, list[dict[str, object]]]:
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k != PURE_VARIABLE}
    if build == "pure":
        env[PURE_VARIABLE] = "1"
    tests = str(Path(__file__).parent)
    env["PYTHONPATH"] = os.pathsep.join([tests, env.get("PYTHONPATH", "")])
    ran = subprocess.run(
        [sys.executable, "-c", _WRITE_A_TRAIL, str(folder)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    logs = [*sorted(folder.glob("audit.log.2*")), folder / "audit.log", folder / "audit.anchor"]
    records = [
        {k: v for k, v in json.loads(line).items() if k not in _PER_RUN}
        for path in logs
        for line in path.read_text().splitlines()
        if line.endswith("}")
    ]
    return ran.stdout.strip(), records


def test_both_builds_write_identical_records(tmp_path: Path) -> None:
    implementation, compiled = _trail_written_by("default", tmp_path / "compiled")
    if implementation != "compiled":
        pytest.skip(f"no current compiled build here ({implementation})")
    _, pure = _trail_written_by("pure", tmp_path / "pure")
    assert compiled == pure
    kinds = Counter(str(record["event"]) for record in pure)
    assert kinds["audit.recovered"] == 1 and kinds["audit.checkpoint"] >= 6
    assert kinds["audit.opened"] >= 4


def _signed_log_with(anchor: Anchor, folder: Path) -> list[str]:
    """Write a short signed trail with this anchor; returns its checkpoint lines."""
    log = AuditLog(
        FileSink(folder / "audit.log", 1 << 20, 3600),
        signer=Signer(AUDIT_PRIVATE_KEY),
        anchors=[anchor],
        checkpoint_every=3,
    )
    for n in range(7):
        log.write("conn.open", {"conn": f"c{n}", "addr": "127.0.0.1"})
    log.close()
    return [
        line
        for line in (folder / "audit.log").read_text().splitlines()
        if "audit.checkpoint" in line
    ]


def test_checkpoints_reach_a_syslog_anchor_and_its_export_verifies(tmp_path: Path) -> None:
    address = tmp_path / "log.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(address))
    try:
        checkpoints = _signed_log_with(SyslogAnchor(str(address)), tmp_path)
        receiver.settimeout(5)
        received = [receiver.recv(65536).decode() for _ in checkpoints]
    finally:
        receiver.close()
    assert len(checkpoints) == 3  # two by count, and the final one at close
    for message, line in zip(received, checkpoints, strict=True):
        assert message.startswith("<") and f"{SYSLOG_TAG}: {line}" in message
    export = tmp_path / "syslog.export"
    export.write_text("".join(f"Dec  7 11:00:00 host {m.split('>', 1)[1]}\n" for m in received))
    verdict = verify([tmp_path / "audit.log"], public_keys=[AUDIT_PUBLIC_KEY], anchors=[export])
    assert verdict.problems == [] and verdict.anchored_through == verdict.last_seq


def test_checkpoints_reach_an_http_anchor(tmp_path: Path) -> None:
    posted: list[tuple[str, bytes]] = []

    class Keeper(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            posted.append((self.headers["Content-Type"], self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Keeper)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/anchor"
        checkpoints = _signed_log_with(HttpAnchor(url), tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    # close() waited for the final checkpoint: every line arrived, in order.
    assert [body.decode() for _, body in posted] == checkpoints
    assert {kind for kind, _ in posted} == {"application/json"}
