"""Input that once took a connection or a call down, over real sockets (issue 16, items 1-4).

Each of these was observed from outside: a nested extra field that decoded but could not be
encoded again closed its sender `1000` and ended the call; `ref: ""` was refused; an `auth`
message with an empty or non-string token was "authentication required"; a signed `exp` of
`1e300` passed verification and then broke the `session` message.
"""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
import structlog

from callgate.core.actions import Deliver
from callgate.protocol.codec import MAX_NESTING
from conftest import CANDIDATE, SECRET, Harness
from test_socketio import next_packet, raw_signed_in, raw_socketio


def nested(levels: int) -> Any:
    """A value that is `levels` arrays deep."""
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


DEEP = "__deep__"


def with_deep_field(message: object, levels: int) -> str:
    """`message` as JSON text, its `DEEP` placeholder string replaced by a value `levels` arrays
    deep (written as text: the standard library's encoder stops short of 1,000 levels)."""
    return json.dumps(message).replace(json.dumps(DEEP), "[" * levels + "0" + "]" * levels)


# The envelope and its `data` are two levels: an extra field this deep makes the message one
# level deeper than the limit. orjson decodes up to 1,024 levels and encodes up to 254.
TOO_DEEP = MAX_NESTING - 1


async def test_a_deeply_nested_field_is_refused_and_the_call_goes_on(gate: Harness) -> None:
    alice, bob = await gate.connected_call()
    for levels in (TOO_DEEP, 300, 1000):
        candidate = {"callId": "ab", "to": "bob", "candidate": CANDIDATE, "x": DEEP}
        envelope = {"event": "ice-candidate", "data": candidate, "ref": f"deep-{levels}"}
        await alice.ws.send_message(with_deep_field(envelope, levels))
        error = await alice.expect_error("invalid_message", ref=f"deep-{levels}")
        assert "nested" in error["data"]["message"]
    # Nothing reached bob, and the call is still up both ways.
    await bob.expect_silence()
    fits = {"callId": "ab", "to": "bob", "candidate": CANDIDATE, "x": nested(TOO_DEEP - 1)}
    await alice.send("ice-candidate", fits, ref="fits")
    assert await alice.recv() == {"event": "ack", "ref": "fits"}
    assert (await bob.expect("ice-candidate", callId="ab"))["data"]["x"] == fits["x"]
    await bob.send("ice-candidate", {"callId": "ab", "to": "alice", "candidate": None})
    await alice.expect("ice-candidate", callId="ab")
    assert "call.ended" not in gate.audit.events()


async def test_a_deeply_nested_call_request_never_rings(gate: Harness) -> None:
    alice = await gate.connect("alice")
    bob = await gate.connect("bob")
    request = {
        "id": "deep",
        "from": "alice",
        "to": "bob",
        "type": "voice",
        "offer": {"type": "offer", "sdp": "v=0"},
        "x": DEEP,
    }
    envelope = {"event": "call-request", "data": request, "ref": 1}
    await alice.ws.send_message(with_deep_field(envelope, 300))
    await alice.expect_error("invalid_message", ref=1)
    await bob.expect_silence()
    await alice.expect_silence()


async def test_a_deeply_nested_socketio_event_is_refused(gate: Harness) -> None:
    alice = await raw_signed_in(gate, "alice")
    await alice.send_message("421" + with_deep_field(["user-connected", "alice", DEEP], 300))
    error = {"code": "invalid_message", "message": f"nested deeper than {MAX_NESTING} levels"}
    packet = await next_packet(alice)
    assert packet.startswith("431") and json.loads(packet[3:]) == [{"ok": False, "error": error}]
    await alice.send_message('422["user-connected","alice"]')
    assert await next_packet(alice) == '432[{"ok":true}]'


async def test_a_message_the_server_cannot_encode_is_dropped_alone(gate: Harness) -> None:
    """Defence in depth: were a delivery ever unencodable, it is dropped and counted; the
    connection, the call and the next delivery go on. (Decoding keeps clients from causing it.)"""
    assert gate.server is not None
    alice, bob = await gate.connected_call()
    unencodable = {"callId": "ab", "to": "bob", "x": nested(300)}
    with structlog.testing.capture_logs() as logs:
        gate.server.hub.executor.execute(
            [
                Deliver(bob.conn, "ice-candidate", unencodable),
                Deliver(bob.conn, "ice-candidate", {"callId": "ab", "to": "bob", "n": 2}),
            ]
        )
    assert [(entry["event"], entry["event_name"]) for entry in logs] == [
        ("message not encodable, dropped", "ice-candidate")
    ]
    assert (await bob.expect("ice-candidate"))["data"]["n"] == 2
    await bob.send("ice-candidate", {"callId": "ab", "to": "alice", "candidate": None}, ref=3)
    assert await bob.recv() == {"event": "ack", "ref": 3}
    await alice.expect("ice-candidate", callId="ab")
    exposition = gate.server.hub.metrics.exposition().decode()
    assert 'callgate_unencodable_messages_total{event="ice-candidate"} 1.0' in exposition


async def test_an_empty_string_ref_is_acknowledged(gate: Harness) -> None:
    alice = await gate.connect("alice")
    await alice.send("user-connected", "alice", ref="")
    assert await alice.recv() == {"event": "ack", "ref": ""}


@pytest.mark.parametrize("token", ["", None, 42, ["a.b.c"], {"t": 1}, "x" * 20_000])
async def test_an_auth_message_with_a_bad_token_is_invalid_token(
    gate: Harness, token: object
) -> None:
    client = await gate.open()
    await client.send("auth", {"token": token}, ref=1)
    await client.expect_closed(4001, "invalid token")
    [failed] = gate.audit.records("auth.failed")
    assert failed["reason"] == "malformed"


async def test_an_auth_message_without_a_token_field_is_invalid_token(gate: Harness) -> None:
    client = await gate.open()
    await client.send("auth", {})
    await client.expect_closed(4001, "invalid token")


async def test_a_first_message_that_is_not_auth_is_authentication_required(
    gate: Harness,
) -> None:
    client = await gate.open()
    await client.send("user-connected", "alice")
    await client.expect_closed(4001, "authentication required")


def _signed(claims: dict[str, Any]) -> str:
    return jwt.encode({"sub": "eve", **claims}, SECRET, algorithm="HS256")


# Every range case is held in tests/test_auth.py; here, that the refusal reaches the wire and
# the trail as any other bad token does.
@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": 1e300}, "bad_exp"),
        ({"exp": 4_000_000_000, "iat": -1e300}, "bad_iat"),
        # Not numbers at all: `true` was read as 1 (so "token expired", audited `expired`), and
        # a string `nbf` was audited `malformed`.
        ({"exp": True}, "bad_exp"),
        ({"exp": "4000000000"}, "bad_exp"),
        ({"exp": 4_000_000_000, "nbf": "0"}, "bad_nbf"),
        ({"exp": 4_000_000_000, "nbf": False}, "bad_nbf"),
        ({"exp": 4_000_000_000, "iat": "1"}, "bad_iat"),
        ({"exp": 4_000_000_000, "iat": True}, "bad_iat"),
    ],
)
async def test_a_time_claim_out_of_range_is_an_invalid_token(
    gate: Harness, claims: dict[str, Any], reason: str
) -> None:
    client = await gate.open()
    await client.send("auth", {"token": _signed(claims)})
    await client.expect_closed(4001, "invalid token")
    [failed] = gate.audit.records("auth.failed")
    assert failed["reason"] == reason


async def test_a_time_claim_in_range_signs_in(gate: Harness) -> None:
    client = await gate.open()
    await client.send("auth", {"token": _signed({"exp": 4_000_000_000, "iat": 1, "nbf": 0})})
    session = await client.expect("session", user="eve")
    assert session["data"]["expiresAt"] == 4_000_000_000


async def test_socketio_rejects_an_out_of_range_exp(gate: Harness) -> None:
    ws = await raw_socketio(gate)
    await ws.send_message("40" + json.dumps({"token": _signed({"exp": 1e300})}))
    packet = await next_packet(ws)
    assert packet.startswith("44") and "invalid token" in packet, packet
    [failed] = gate.audit.records("auth.failed")
    assert failed["reason"] == "bad_exp"


# What a client may write in its close frame: up to 123 bytes of its own text.
CLOSE_TEXT = 'eyJhbGciOiJIUzI1NiJ9.e30.marker\n{"event":"auth.ok"} a=candidate:1 marker-ice'


@pytest.mark.both_engines
@pytest.mark.parametrize("signed_in", [True, False])
async def test_a_clients_close_reason_is_not_written_to_the_trail(
    harness: Harness, signed_in: bool
) -> None:
    """The close frame's reason is the client's own text: it reached `conn.close` word for word
    (a token, a candidate line, a forged record's JSON), from anyone who could open a socket.
    The trail says only that the client closed, and with which code."""
    await harness.start()
    client = await harness.connect("alice") if signed_in else await harness.open()
    await client.ws.aclose(4000, CLOSE_TEXT)
    await harness.settle()
    [closed] = harness.audit.records("conn.close")
    assert closed["close_code"] == 4000
    assert closed["reason"] == "closed by the client"
    assert "marker" not in harness.audit.text


@pytest.mark.both_engines
@pytest.mark.parametrize(
    ("frame", "code", "reason"),
    [
        (bytes([0x81, 0x82, 0, 0, 0, 0, 0xFF, 0xFE]), 1007, "invalid UTF-8"),  # text, not UTF-8
        (bytes([0xC1, 0x80, 0, 0, 0, 0]), 1002, "protocol error"),  # RSV1: nothing negotiated it
    ],
)
async def test_a_broken_frame_is_the_servers_close_not_the_clients(
    harness: Harness, frame: bytes, code: int, reason: str
) -> None:
    """wsproto reports a broken frame as a close with the code RFC 6455 names for it. Taken for
    the client's own close, the connection ended without a close frame (RFC 6455 7.1.7: the
    server SHOULD send one), and the trail said the client closed it."""
    await harness.start()
    alice = await harness.connect("alice")
    await alice.stream.send_all(frame)
    if harness.engine != "trio-websocket":  # which fails the connection without a close frame
        await alice.expect_closed(code, reason)
    await harness.settle()
    [closed] = harness.audit.records("conn.close")
    assert (closed["close_code"], closed["reason"]) == (code, reason)
