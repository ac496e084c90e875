"""A client cannot fill the audit trail with refusals (issue 16, item 10), on real sockets.

A refused message used to write one record each: at the default 50 messages a second per
connection, 256 connections of one address grew the trail by about 4.7 MiB/s. Now each kind of
refusal from a connection is written in full once, then summed into one record per window with
`count` (docs/audit-log.md, "Repeated refusals"); call and connection records are never held back.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import trio

from callgate.audit import AuditLog, StreamSink
from conftest import AUDIT_KEY, STEP, AuditCapture, Client, Harness, call_request, token_for

ON_CLUSTER = True

REFUSALS = 150  # of each kind; enough to have filled the trail, few enough for a slow machine
REFRESHES = 30


def of_connection(harness: Harness, conn: str) -> list[dict[str, Any]]:
    return [record for record in harness.audit.records() if record.get("conn") == conn]


def refusals_by_kind(
    records: list[dict[str, Any]],
) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    kinds: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for record in records:
        if record["event"] in ("authz.denied", "auth.failed"):
            kind = (record["event"], record.get("msg_event", ""), record["reason"])
            kinds.setdefault(kind, []).append(record)
    return kinds


def stands_for(records: list[dict[str, Any]]) -> int:
    return sum(int(record.get("count", 1)) for record in records)


async def refuse(eve: Client, round_: int) -> None:
    """One refused message of each of two kinds, each answered before the next is sent."""
    unknown = {"candidate": None, "callId": f"nope{round_}", "to": "bob"}
    await eve.send("ice-candidate", unknown, ref=round_)
    await eve.expect_error("unknown_call", ref=round_)
    await eve.send("call-request", call_request(f"spoof{round_}", "alice", "bob"), ref=f"s{round_}")
    await eve.expect_error("forbidden", ref=f"s{round_}")


async def test_a_flood_of_refusals_is_each_kinds_first_and_a_count(gate: Harness) -> None:
    eve = await gate.connect("eve")
    for round_ in range(REFUSALS):
        await refuse(eve, round_)
    for attempt in range(REFRESHES):  # token refreshes with a token that is no token
        await eve.send("auth", {"token": "not-a-token"}, ref=f"a{attempt}")
        await eve.expect_error("forbidden", ref=f"a{attempt}")
    for attempt in range(3):  # calls are never held back, even when they go nowhere
        await eve.send("call-request", call_request(f"real{attempt}", "eve", "nobody"))
        await eve.expect("call-reject", callId=f"real{attempt}", reason="unavailable")
    conn = eve.conn
    await eve.ws.aclose()
    await gate.settle()

    records = of_connection(gate, conn)
    kinds = refusals_by_kind(records)
    assert set(kinds) == {
        ("authz.denied", "ice-candidate", "unknown_call"),
        ("authz.denied", "call-request", "forbidden"),
        ("auth.failed", "", "malformed"),
    }
    for kind, written in kinds.items():
        sent = REFRESHES if kind[0] == "auth.failed" else REFUSALS
        # The first is there in full (with the refused message's call id), then one count.
        assert "count" not in written[0], written
        assert written[0].get("call_id") in (None, "nope0", "spoof0")
        assert len(written) == 2, written
        assert written[1]["count"] == sent - 1 and "call_id" not in written[1]
        assert stands_for(written) == sent
    assert Counter(record["event"] for record in records) == {
        "conn.open": 1,
        "auth.ok": 1,
        "authz.denied": 4,
        "auth.failed": 2,
        "call.requested": 3,
        "call.unavailable": 3,
        "conn.close": 1,
    }
    assert records[-1]["event"] == "conn.close"  # the counts come before the connection's end


async def test_a_count_is_written_when_its_window_ends_while_connected(harness: Harness) -> None:
    captures: list[AuditCapture] = getattr(harness, "captures", [harness.capture])
    for capture in captures:  # a short window, so that the server's clock ends one
        capture.log = AuditLog(
            StreamSink(capture.stream), key=AUDIT_KEY, strict=True, refusal_window=0.5
        )
    await harness.start()
    eve = await harness.connect("eve")
    for round_ in range(20):
        await refuse(eve, round_)
    with trio.fail_after(STEP):
        while not any("count" in r for r in of_connection(harness, eve.conn)):
            await trio.sleep(0.05)
    assert not harness.audit.records("conn.close")  # eve is still connected
    await refuse(eve, 20)
    conn = eve.conn
    await eve.ws.aclose()
    await harness.settle()
    kinds = refusals_by_kind(of_connection(harness, conn))
    assert len(kinds) == 2
    for written in kinds.values():
        assert "count" not in written[0]
        assert stands_for(written) == 21


async def test_token_refreshes_and_renegotiations_are_summed_too(gate: Harness) -> None:
    """Neither is a refusal, and each used to write a record: at the message rate, a connection
    grew the trail by 50 records a second (observed: 41 a second for each), ten times the bound
    the docs give. Now a connection's repeats of each are summed as refusals are: the first in
    full, then a count (a renegotiation's per call, with the call's fields)."""
    alice, bob = await gate.connected_call()
    for attempt in range(REFRESHES):
        await alice.send("auth", {"token": token_for("alice")}, ref=f"r{attempt}")
        await alice.expect("session", user="alice")
        await alice.expect("ack")
    offer = {"type": "offer", "sdp": "v=0"}
    for attempt in range(REFRESHES):
        await alice.send(
            "call-renegotiate", {"callId": "ab", "to": "bob", "description": offer}, ref=attempt
        )
        assert await alice.recv() == {"event": "ack", "ref": attempt}
        await bob.expect("call-renegotiate", callId="ab")
    conn = alice.conn
    await alice.ws.aclose()
    await bob.expect("call-end", callId="ab")
    await bob.ws.aclose()
    await gate.settle()
    records = of_connection(gate, conn)
    refreshed = [r for r in records if r["event"] == "token.refreshed"]
    renegotiated = [r for r in records if r["event"] == "call.renegotiated"]
    for written in (refreshed, renegotiated):
        assert len(written) == 2, written
        assert "count" not in written[0]
        assert written[1]["count"] == REFRESHES - 1
        assert stands_for(written) == REFRESHES
    assert refreshed[1] == {**refreshed[0], "count": REFRESHES - 1, **_chain(refreshed[1])}
    # The count names its call as the first record does (call_id, call_key, caller, callee).
    assert renegotiated[1] == {**renegotiated[0], "count": REFRESHES - 1, **_chain(renegotiated[1])}
    assert records[-1]["event"] == "conn.close"


def _chain(record: dict[str, Any]) -> dict[str, Any]:
    """The fields every record has of its own (time and place in the trail)."""
    return {key: record[key] for key in ("ts", "seq", "mac") if key in record}
