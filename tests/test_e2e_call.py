"""A whole call on real sockets: alice (one device) calls bob (two devices)."""

from __future__ import annotations

import pytest

from callgate.config import ServerSettings
from conftest import (
    CANDIDATE,
    SDP_ANSWER,
    SDP_OFFER,
    Harness,
    call_request,
    token_for,
)

# These scenarios also run with caller and callee on different cluster nodes (conftest).
ON_CLUSTER = True


@pytest.mark.both_engines
async def test_alice_calls_bob_on_two_devices(gate: Harness) -> None:
    alice = await gate.connect("alice")
    bob_phone = await gate.connect("bob")
    bob_laptop = await gate.connect("bob")

    request = call_request("call-1", "alice", "bob") | {"x-app-extra": {"keep": True}}
    await alice.send("call-request", request, ref=1)
    await alice.expect("ack")
    for device in (bob_phone, bob_laptop):
        ring = await device.expect("call-request", id="call-1", to="bob", type="video")
        assert ring["data"]["from"] == "alice"
        assert ring["data"]["offer"]["sdp"] == SDP_OFFER
        assert ring["data"]["x-app-extra"] == {"keep": True}  # unknown fields travel untouched

    # ICE from the caller before the answer reaches every ringing device.
    await alice.send("ice-candidate", {"candidate": CANDIDATE, "callId": "call-1", "to": "bob"})
    for device in (bob_phone, bob_laptop):
        await device.expect(
            "ice-candidate", callId="call-1", candidate=CANDIDATE, **{"from": "alice"}
        )

    # bob answers on his phone, with a forged `from` that the server overwrites.
    answer = {
        "callId": "call-1",
        "to": "alice",
        "from": "mallory",
        "answer": {"type": "answer", "sdp": SDP_ANSWER},
    }
    await bob_phone.send("call-answer", answer, ref="a1")
    await bob_phone.expect("ack")
    got = await alice.expect("call-answer", callId="call-1", **{"from": "bob"})
    assert got["data"]["answer"]["sdp"] == SDP_ANSWER
    await bob_laptop.expect("call-end", callId="call-1", reason="answered_elsewhere")

    # ICE flows both ways between alice and the answering device only.
    await bob_phone.send(
        "ice-candidate", {"candidate": CANDIDATE, "callId": "call-1", "to": "alice"}
    )
    await alice.expect("ice-candidate", **{"from": "bob"})
    await alice.send("ice-candidate", {"candidate": None, "callId": "call-1", "to": "bob"})
    await bob_phone.expect("ice-candidate", candidate=None, **{"from": "alice"})
    await bob_laptop.expect_silence()

    # The laptop is a bystander now: it may not speak in the call.
    await bob_laptop.send("call-end", {"callId": "call-1", "to": "alice"}, ref=9)
    await bob_laptop.expect_error("forbidden", ref=9)

    await alice.send("call-end", {"callId": "call-1", "to": "bob"}, ref=2)
    await alice.expect("ack")
    await bob_phone.expect("call-end", callId="call-1", **{"from": "alice"})

    assert gate.live_calls() == 0
    events = gate.audit.events()
    for expected in ("call.requested", "call.ringing", "call.answered", "call.ended"):
        assert expected in events
    ended = gate.audit.records("call.ended")[0]
    assert ended["call_id"] == "call-1"
    assert ended["caller"] == "alice"
    assert ended["callee"] == "bob"
    assert ended["reason"] == "hangup"
    assert isinstance(ended["duration_ms"], int) and ended["duration_ms"] >= 0
    ringing = gate.audit.records("call.ringing")[0]
    assert ringing["devices"] == 2


async def test_audit_log_never_holds_sdp_candidates_or_tokens(gate: Harness) -> None:
    alice_token = token_for("alice")
    alice = await gate.connect("alice", token=alice_token)
    bob = await gate.connect("bob")
    await alice.send("call-request", call_request("c", "alice", "bob", "voice"))
    await bob.expect("call-request")
    await alice.send("ice-candidate", {"candidate": CANDIDATE, "callId": "c", "to": "bob"})
    await bob.expect("ice-candidate")
    answer = {"callId": "c", "to": "alice", "answer": {"type": "answer", "sdp": SDP_ANSWER}}
    await bob.send("call-answer", answer)
    await alice.expect("call-answer")
    renegotiate = {"callId": "c", "to": "bob", "description": {"type": "offer", "sdp": SDP_OFFER}}
    await alice.send("call-renegotiate", renegotiate)
    await bob.expect("call-renegotiate", **{"from": "alice"})
    await bob.send("call-end", {"callId": "c", "to": "alice"})
    await alice.expect("call-end")
    # A failed login whose token is in the audit path too.
    stranger = await gate.open()
    other_signature = token_for("alice", secret="another-secret-that-is-long-enough!!").split(".")[
        2
    ]
    forged = alice_token.rsplit(".", 1)[0] + "." + other_signature
    await stranger.send("auth", {"token": forged})
    await stranger.expect_closed(4001, "invalid token")
    await alice.ws.aclose()
    await bob.ws.aclose()
    await gate.settle()

    text = gate.audit.text
    for secret in ("secret-offer-marker", "secret-answer-marker", "marker-ice", "198.51.100.7"):
        assert secret not in text
    assert alice_token not in text
    assert alice_token.split(".")[1] not in text  # not even the claims part
    assert "call.renegotiated" in gate.audit.events()
    assert gate.audit.records("auth.failed")[0]["reason"] == "bad_signature"


@pytest.mark.both_engines
async def test_the_configured_engine_serves_the_connections(gate: Harness) -> None:
    from callgate.transport.engine import WsprotoConnection

    await gate.connect("alice")
    assert gate.server is not None
    (connection,) = gate.server.hub._live.values()
    engine = gate.engine or ServerSettings.model_fields["engine"].default  # cluster: the default
    assert isinstance(connection.ws, WsprotoConnection) == (engine == "wsproto")
