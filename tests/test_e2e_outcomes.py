"""Every outcome of contract section 4, on real sockets."""

from __future__ import annotations

import trio

from callgate.audit import TERMINAL_CALL_EVENTS
from conftest import SDP_ANSWER, Client, Harness, call_request, make_settings

# These scenarios also run with caller and callee on different cluster nodes (conftest).
ON_CLUSTER = True


async def ringing_on_two_devices(gate: Harness) -> tuple[Client, Client, Client]:
    """alice's call `c1` ringing on both of bob's devices."""
    alice = await gate.connect("alice")
    bob1 = await gate.connect("bob")
    bob2 = await gate.connect("bob")
    await alice.send("call-request", call_request("c1", "alice", "bob"))
    await bob1.expect("call-request")
    await bob2.expect("call-request")
    return alice, bob1, bob2


def answer(call_id: str, to: str) -> dict[str, object]:
    return {"callId": call_id, "to": to, "answer": {"type": "answer", "sdp": SDP_ANSWER}}


async def test_unavailable_when_callee_has_no_device(gate: Harness) -> None:
    alice = await gate.connect("alice")
    await alice.send("call-request", call_request("c1", "alice", "bob"), ref=1)
    await alice.expect("ack")
    await alice.expect("call-reject", callId="c1", reason="unavailable", **{"from": "bob"})
    assert [r["event"] for r in gate.audit.records() if r["event"].startswith("call.")] == [
        "call.requested",
        "call.unavailable",
    ]


async def test_busy_when_callee_is_in_a_call(gate: Harness) -> None:
    alice, bob, carol = [await gate.connect(u) for u in ("alice", "bob", "carol")]
    await alice.send("call-request", call_request("c1", "alice", "bob"))
    await bob.expect("call-request")
    await carol.send("call-request", call_request("c2", "carol", "bob"), ref=5)
    await carol.expect("ack")
    await carol.expect("call-reject", callId="c2", reason="busy", **{"from": "bob"})
    await bob.expect_silence()
    assert gate.audit.records("call.busy")[0]["reason"] == "busy"


async def test_glare_first_request_wins(gate: Harness) -> None:
    alice = await gate.connect("alice")
    bob = await gate.connect("bob")
    await alice.send("call-request", call_request("a-to-b", "alice", "bob"))
    await bob.expect("call-request", id="a-to-b")
    await bob.send("call-request", call_request("b-to-a", "bob", "alice"))
    await bob.expect("call-reject", callId="b-to-a", reason="glare", **{"from": "alice"})
    # The first call is untouched and can be answered.
    await bob.send("call-answer", answer("a-to-b", "alice"))
    await alice.expect("call-answer", callId="a-to-b")
    assert gate.audit.records("call.busy")[0]["reason"] == "glare"


async def test_ring_timeout_ends_both_sides(harness: Harness) -> None:
    await harness.start(make_settings(calls={"ring_timeout": 0.3}))
    alice = await harness.connect("alice")
    bob1 = await harness.connect("bob")
    bob2 = await harness.connect("bob")
    await alice.send("call-request", call_request("c1", "alice", "bob"))
    await bob1.expect("call-request")
    await bob2.expect("call-request")
    await alice.expect("call-end", callId="c1", reason="timeout", **{"from": "bob"})
    await bob1.expect("call-end", callId="c1", reason="timeout", **{"from": "alice"})
    await bob2.expect("call-end", callId="c1", reason="timeout")
    assert len(harness.audit.records("call.timeout")) == 1
    assert harness.server is not None
    assert harness.holds_devices()  # devices are still connected
    assert harness.live_calls() == 0
    assert harness.armed_timers() == 0


async def test_reject_on_one_device_stops_the_others(gate: Harness) -> None:
    alice, bob1, bob2 = await ringing_on_two_devices(gate)
    await bob2.send("call-reject", {"callId": "c1", "to": "alice", "reason": "declined"})
    await alice.expect("call-reject", callId="c1", reason="declined", **{"from": "bob"})
    await bob1.expect("call-end", callId="c1", reason="rejected_elsewhere")
    assert gate.audit.records("call.rejected")[0]["reason"] == "rejected"
    assert gate.armed_timers() == 0


async def test_caller_cancels_before_answer(gate: Harness) -> None:
    alice, bob1, bob2 = await ringing_on_two_devices(gate)
    await alice.send("call-end", {"callId": "c1", "to": "bob"})
    await bob1.expect("call-end", callId="c1", reason="cancelled", **{"from": "alice"})
    await bob2.expect("call-end", callId="c1", reason="cancelled")
    assert len(gate.audit.records("call.cancelled")) == 1


async def test_callee_disconnect_ends_connected_call(gate: Harness) -> None:
    alice = await gate.connect("alice")
    bob = await gate.connect("bob")
    await alice.send("call-request", call_request("c1", "alice", "bob"))
    await bob.expect("call-request")
    await bob.send("call-answer", answer("c1", "alice"))
    await alice.expect("call-answer")
    await bob.ws.aclose()
    await alice.expect("call-end", callId="c1", reason="peer_disconnected", **{"from": "bob"})
    ended = gate.audit.records("call.ended")[0]
    assert ended["reason"] == "peer_disconnected"
    assert ended["answered"] is True


async def test_caller_disconnect_while_ringing(gate: Harness) -> None:
    alice, bob1, bob2 = await ringing_on_two_devices(gate)
    await alice.ws.aclose()
    await bob1.expect("call-end", callId="c1", reason="peer_disconnected")
    await bob2.expect("call-end", callId="c1", reason="peer_disconnected")


async def test_one_ringing_device_leaving_keeps_the_call(gate: Harness) -> None:
    alice, bob1, bob2 = await ringing_on_two_devices(gate)
    await bob1.ws.aclose()
    await bob2.send("call-answer", answer("c1", "alice"))
    await alice.expect("call-answer", callId="c1")
    # The last ringing device leaving would have ended it; this one answered instead.
    await bob2.ws.aclose()
    await alice.expect("call-end", reason="peer_disconnected")


async def test_nothing_outlives_its_connections(gate: Harness) -> None:
    alice = await gate.connect("alice")
    bob = await gate.connect("bob")
    await alice.send("call-request", call_request("c1", "alice", "bob"))
    await bob.expect("call-request")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alice.ws.aclose)
        nursery.start_soon(bob.ws.aclose)
    await gate.settle()
    assert gate.armed_timers() == 0
    requested = gate.audit.records("call.requested")
    terminal = [r for r in gate.audit.records() if r["event"] in TERMINAL_CALL_EVENTS]
    assert len(requested) == len(terminal) == 1
