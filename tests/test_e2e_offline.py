"""Calls to users who are not there, on real sockets: pending calls ("notify") and missed calls.

These run on a mock clock (as tests/test_chaos.py does): a callee that signs in "2 seconds later"
and a ring timeout take trio time, not real time.
"""

from __future__ import annotations

import time
from typing import Any
from unittest.mock import ANY

import pytest
import trio
import trio.testing

from callgate.client import (
    CallEnded,
    CallPending,
    CallRejected,
    CallRequested,
    CallRinging,
    MissedCalls,
    connect,
)
from conftest import (
    CANDIDATE,
    SDP_ANSWER,
    SDP_OFFER,
    Harness,
    call_request,
    make_settings,
    token_for,
)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Jumps to the next deadline once every task has waited 5 ms of real time (test_chaos)."""
    return trio.testing.MockClock(autojump_threshold=0.005)


def notify(**calls: Any) -> Any:
    return make_settings(calls={"offline": "notify", "ring_timeout": 60, **calls})


def end(call_id: str, to: str) -> dict[str, str]:
    return {"callId": call_id, "to": to}


async def test_a_call_to_an_offline_user_rings_the_device_that_signs_in_later(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    await harness.start(notify())
    alice = await harness.connect("alice")
    await alice.send("call-request", call_request("p1", "alice", "bob"), ref=1)
    await alice.expect("ack")
    pending = await alice.expect("call-pending", callId="p1")
    assert pending["data"] == {"callId": "p1", "from": "bob"}
    # alice trickles her candidates at once, as browsers do: they wait for bob's device.
    await alice.send("ice-candidate", {"candidate": CANDIDATE, "callId": "p1", "to": "bob"})
    await alice.expect_silence()

    await trio.sleep(2)  # bob's phone wakes up (trio time)
    bob = await harness.connect("bob")
    ring = await bob.expect("call-request", id="p1", to="bob", type="video")
    assert ring["data"]["from"] == "alice" and ring["data"]["offer"]["sdp"] == SDP_OFFER
    await bob.expect("ice-candidate", callId="p1", candidate=CANDIDATE, **{"from": "alice"})
    await alice.expect("call-ringing", callId="p1", **{"from": "bob"})

    answer = {"callId": "p1", "to": "alice", "answer": {"type": "answer", "sdp": SDP_ANSWER}}
    await bob.send("call-answer", answer, ref=2)
    await bob.expect("ack")
    await alice.expect("call-answer", callId="p1", **{"from": "bob"})
    await bob.send("ice-candidate", {"candidate": CANDIDATE, "callId": "p1", "to": "alice"})
    await alice.expect("ice-candidate", **{"from": "bob"})
    await alice.send("ice-candidate", {"candidate": None, "callId": "p1", "to": "bob"})
    await bob.expect("ice-candidate", candidate=None)
    await alice.send("call-end", end("p1", "bob"))
    await bob.expect("call-end", callId="p1", **{"from": "alice"})

    events = [e for e in harness.audit.events() if e.startswith("call.")]
    assert events == [
        "call.requested",
        "call.pending",
        "call.ringing",
        "call.answered",
        "call.ended",
    ]
    assert harness.armed_timers() == 0


async def test_nobody_signs_in_before_the_ring_timeout(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    await harness.start(notify(ring_timeout=5))
    alice = await harness.connect("alice")
    await alice.send("call-request", call_request("p1", "alice", "bob"))
    await alice.expect("call-pending", callId="p1")
    started = trio.current_time()
    reject = await alice.expect("call-reject", callId="p1", reason="unavailable")
    assert reject["data"]["from"] == "bob"
    assert trio.current_time() - started >= 5
    assert [r["reason"] for r in harness.audit.records("call.unavailable")] == ["unavailable"]
    assert [r["reason"] for r in harness.audit.records("call.missed")] == ["unavailable"]
    bob = await harness.connect("bob")  # too late: nothing rings
    await bob.expect_silence()
    assert harness.server is not None
    assert harness.live_calls() == 0 and harness.armed_timers() == 0


async def test_cancel_while_pending(harness: Harness, clock: trio.testing.MockClock) -> None:
    await harness.start(notify())
    alice = await harness.connect("alice")
    await alice.send("call-request", call_request("p1", "alice", "bob"))
    await alice.expect("call-pending")
    await alice.send("call-end", end("p1", "bob"), ref="bye")
    assert (await alice.expect("ack"))["ref"] == "bye"
    bob = await harness.connect("bob")
    await bob.expect_silence()
    cancelled = harness.audit.records("call.cancelled")
    assert [r["call_id"] for r in cancelled] == ["p1"]
    assert [r["reason"] for r in harness.audit.records("call.missed")] == ["cancelled"]
    assert harness.armed_timers() == 0


async def test_a_pending_call_makes_the_callee_busy_and_wins_the_glare(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    await harness.start(notify())
    alice = await harness.connect("alice")
    carol = await harness.connect("carol")
    await alice.send("call-request", call_request("p1", "alice", "bob"))
    await alice.expect("call-pending")
    await carol.send("call-request", call_request("p2", "carol", "bob"), ref=1)
    await carol.expect("ack")
    await carol.expect("call-reject", callId="p2", reason="busy")
    # bob's device signs in and rings; his own call to alice, crossing hers, loses.
    bob = await harness.connect("bob")
    await bob.expect("call-request", id="p1")
    await alice.expect("call-ringing")
    await bob.send("call-request", call_request("p3", "bob", "alice"), ref=2)
    await bob.expect("ack")
    await bob.expect("call-reject", callId="p3", reason="glare")
    assert [r["reason"] for r in harness.audit.records("call.busy")] == ["busy", "glare"]


async def test_missed_calls_are_shown_once_at_the_next_sign_in(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    await harness.start(make_settings(calls={"missed_calls": 10, "ring_timeout": 30}))
    alice = await harness.connect("alice")
    before = time.time()
    await alice.send("call-request", call_request("m1", "alice", "bob", "voice"))
    await alice.expect("call-reject", callId="m1", reason="unavailable")  # the default mode

    bob = await harness.connect("bob")
    shown = await bob.expect("missed-calls")
    (missed,) = shown["data"]["calls"]
    assert missed["callId"] == "m1" and missed["from"] == "alice" and missed["type"] == "voice"
    assert missed["reason"] == "unavailable"
    assert before * 1000 - 1000 <= missed["time"] <= time.time() * 1000 + 1000
    # Not acknowledged yet: a second device is shown them too.
    laptop = await harness.connect("bob")
    assert (await laptop.expect("missed-calls"))["data"]["calls"] == [missed]
    await bob.send("missed-calls-ack", {"ids": [missed["id"]]}, ref="seen")
    assert (await bob.expect("ack"))["ref"] == "seen"
    again = await harness.connect("bob")
    await again.expect_silence()
    # Acknowledging twice, or ids that are not there, is no error.
    await again.send("missed-calls-ack", {"ids": [missed["id"], "m999"]}, ref=3)
    assert (await again.expect("ack"))["ref"] == 3
    await again.send("missed-calls-ack", {"ids": "m1"}, ref=4)
    await again.expect_error("invalid_message", ref=4)
    assert [r["callee"] for r in harness.audit.records("call.missed")] == ["bob"]


async def test_the_python_client_reads_pending_and_missed_calls(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    await harness.start(notify(ring_timeout=5, missed_calls=5))
    async with connect(harness.url, token_for("alice")) as alice:
        await alice.call("c1", "bob", SDP_OFFER)
        assert await alice.next_event() == CallPending("c1", "bob")
        rejected = await alice.next_event()
        assert isinstance(rejected, CallRejected) and rejected.reason == "unavailable"
        await alice.call("c2", "bob", SDP_OFFER, media="voice")
        assert await alice.next_event() == CallPending("c2", "bob")
        async with connect(harness.url, token_for("bob")) as bob:
            missed = await bob.next_event()
            assert isinstance(missed, MissedCalls)
            assert [(m.call_id, m.caller, m.reason) for m in missed.calls] == [
                ("c1", "alice", "unavailable")
            ]
            ring = await bob.next_event()
            assert isinstance(ring, CallRequested) and ring.call_id == "c2"
            assert await alice.next_event() == CallRinging("c2", "bob")
            await bob.acknowledge_missed(m.id for m in missed.calls)
        # bob's only ringing device left: c2 ended unanswered, missed too; c1 is not sent again.
        assert await alice.next_event() == CallEnded("c2", "bob", "peer_disconnected", ANY)
        async with connect(harness.url, token_for("bob")) as again:
            missed = await again.next_event()
            assert isinstance(missed, MissedCalls)
            assert [(m.call_id, m.media, m.reason) for m in missed.calls] == [
                ("c2", "voice", "peer_disconnected")
            ]
