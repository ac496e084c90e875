"""The switchboard with callees who are not there: pending calls ("notify") and missed calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from callgate.audit import TERMINAL_CALL_EVENTS
from callgate.core.actions import Ack, Action, Audit, CancelTimer, Deliver, StartTimer
from callgate.core.calls import CallState
from callgate.core.events import Authenticated, Disconnected, MessageReceived, TimerFired
from callgate.core.missed import MissedCalls
from callgate.core.policy import CallRules, NoThrottle
from callgate.core.switchboard import Switchboard
from callgate.errors import ErrorCode
from callgate.protocol.messages import (
    CallAnswer,
    CallEnd,
    CallReject,
    CallRenegotiate,
    IceCandidate,
    MissedCallsAck,
)
from test_core import audits, delivered, error_code, in_call, request

NOTIFY = CallRules(ring_timeout=30, offline="notify", missed_calls=10, report_missed=True)


class Offline:
    """alice (a1) and carol (c1) online; dave has no device."""

    def __init__(self, rules: CallRules = NOTIFY) -> None:
        self.board = Switchboard(rules, NoThrottle())
        self.now = 100.0
        self.wall = 1_800_000_000.0  # unix time at `now`
        self.sign_in("a1", "alice")
        self.sign_in("c1", "carol")

    def sign_in(self, conn: str, user: str) -> list[Action]:
        return self.board.handle(
            Authenticated(conn, user, wall=self.wall + self.now - 100.0), self.now
        )

    def send(self, conn: str, message: Any, ref: Any = None) -> list[Action]:
        return self.board.handle(MessageReceived(conn, message, ref), self.now)

    def call_dave(self, call_id: str = "c1") -> list[Action]:
        return self.send("a1", request(call_id, "alice", "dave"), ref=1)

    def state(self) -> CallState:
        (call,) = list(self.board.calls)
        return call.state


def candidate(to: str, call_id: str = "c1", n: int = 0) -> IceCandidate:
    data = {"callId": call_id, "to": to, "candidate": {"candidate": f"candidate:{n}"}}
    return IceCandidate(call_id, to, data)


# -- pending ------------------------------------------------------------------------------------


def test_a_call_to_an_offline_user_is_pending_and_the_caller_is_told() -> None:
    o = Offline()
    actions = o.call_dave()
    assert actions[0] == Ack("a1", 1)
    assert delivered(actions) == [("a1", "call-pending", None)]
    pending = next(a for a in actions if isinstance(a, Deliver))
    assert pending.data == {"callId": "c1", "from": "dave"}
    assert audits(actions) == ["call.requested", "call.pending"]
    assert StartTimer(1, 130.0) in actions
    assert o.state() is CallState.PENDING


def test_the_default_mode_still_refuses_at_once() -> None:
    o = Offline(CallRules(ring_timeout=30))
    actions = o.call_dave()
    assert delivered(actions) == [("a1", "call-reject", "unavailable")]
    assert audits(actions) == ["call.requested", "call.unavailable"]
    assert len(o.board.calls) == 0


def test_a_device_that_signs_in_rings_with_what_the_caller_trickled() -> None:
    o = Offline()
    o.call_dave()
    assert delivered(o.send("a1", candidate("dave", n=1))) == []  # kept, nobody to send it to
    o.send("a1", candidate("dave", n=2))
    o.now = 110.0
    actions = o.sign_in("d1", "dave")
    assert [(d[0], d[1]) for d in delivered(actions)] == [
        ("d1", "session"),
        ("d1", "call-request"),
        ("d1", "ice-candidate"),
        ("d1", "ice-candidate"),
        ("a1", "call-ringing"),
    ]
    ring = [a for a in actions if isinstance(a, Deliver) and a.conn == "d1"]
    assert ring[1].data["from"] == "alice" and ring[1].data["offer"]["sdp"] == "v=0"
    assert [r.data["candidate"]["candidate"] for r in ring[2:]] == ["candidate:1", "candidate:2"]
    assert audits(actions) == ["call.ringing"]
    assert o.state() is CallState.RINGING
    # From here the call goes on as any other: answer, ICE both ways, hang up.
    answered = o.send("d1", in_call(CallAnswer, "alice"))
    assert delivered(answered) == [("a1", "call-answer", None)]
    assert CancelTimer(1) in answered
    assert delivered(o.send("d1", candidate("alice"))) == [("a1", "ice-candidate", None)]
    assert delivered(o.send("a1", candidate("dave"))) == [("d1", "ice-candidate", None)]
    ended = o.send("a1", in_call(CallEnd, "dave"))
    assert delivered(ended) == [("d1", "call-end", None)]
    assert audits(ended) == ["call.ended"]
    assert o.board.missed_calls_of("dave", o.now) == []  # answered: not missed


def test_a_second_device_that_signs_in_while_it_rings_rings_too() -> None:
    o = Offline()
    o.call_dave()
    o.sign_in("d1", "dave")
    actions = o.sign_in("d2", "dave")
    assert [(d[0], d[1]) for d in delivered(actions)] == [
        ("d2", "session"),
        ("d2", "call-request"),
    ]  # the caller heard "ringing" once
    # The trail says how many ring now: the report's `devices` column is how many rang.
    [ringing] = [a for a in actions if isinstance(a, Audit) and a.event == "call.ringing"]
    assert ringing.fields["devices"] == 2
    answered = o.send("d2", in_call(CallAnswer, "alice"))
    assert delivered(answered) == [
        ("a1", "call-answer", None),
        ("d1", "call-end", "answered_elsewhere"),
    ]


def test_the_kept_candidates_are_bounded() -> None:
    o = Offline(CallRules(ring_timeout=30, offline="notify", resume_buffer=2))
    o.call_dave()
    for n in range(5):
        o.send("a1", candidate("dave", n=n))
    ring = delivered(o.sign_in("d1", "dave"))
    assert [d[1] for d in ring].count("ice-candidate") == 2


def test_nothing_rings_late_in_the_default_mode() -> None:
    o = Offline(CallRules(ring_timeout=30))
    o.sign_in("d1", "dave")
    o.send("a1", request("c1", "alice", "dave"))
    actions = o.sign_in("d2", "dave")
    assert delivered(actions) == [("d2", "session", None)]


def test_nobody_comes_before_the_ring_timeout() -> None:
    o = Offline()
    o.call_dave()
    actions = o.board.handle(TimerFired(1), 130.0)
    assert delivered(actions) == [("a1", "call-reject", "unavailable")]
    reject = next(a for a in actions if isinstance(a, Deliver))
    assert reject.data == {"callId": "c1", "from": "dave", "reason": "unavailable"}
    assert audits(actions) == ["call.unavailable", "call.missed"]
    assert len(o.board.calls) == 0
    assert o.board.handle(TimerFired(1), 131.0) == []
    assert o.board.is_idle() is False  # alice and carol are still signed in
    # dave signing in later rings for nothing.
    assert delivered(o.sign_in("d1", "dave"))[1:] == [("d1", "missed-calls", None)]


def test_cancel_while_pending_ends_it_and_counts_as_missed() -> None:
    o = Offline()
    o.call_dave()
    actions = o.send("a1", in_call(CallEnd, "dave"), ref=2)
    assert actions[0] == Ack("a1", 2)
    assert delivered(actions) == []
    assert CancelTimer(1) in actions
    assert audits(actions) == ["call.cancelled", "call.missed"]
    missed = next(a for a in actions if isinstance(a, Audit) and a.event == "call.missed")
    cancelled = next(a for a in actions if isinstance(a, Audit) and a.event == "call.cancelled")
    assert missed.fields == {
        "call_key": cancelled.fields["call_key"],  # the call's one identity in the trail
        "call_id": "c1",
        "caller": "alice",
        "callee": "dave",
        "media": "video",
        "reason": "cancelled",
    }
    assert len(o.board.calls) == 0


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        (CallAnswer, ErrorCode.FORBIDDEN),
        (CallReject, ErrorCode.FORBIDDEN),
        (CallRenegotiate, ErrorCode.FORBIDDEN),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_the_caller_can_only_trickle_or_cancel_while_pending(kind: Any, code: ErrorCode) -> None:
    o = Offline()
    o.call_dave()
    assert error_code(o.send("a1", in_call(kind, "dave"))) is code
    assert o.state() is CallState.PENDING


def test_the_callers_other_device_is_a_bystander_of_a_pending_call() -> None:
    o = Offline()
    o.sign_in("a2", "alice")
    o.call_dave()
    assert error_code(o.send("a2", in_call(CallEnd, "dave"))) is ErrorCode.FORBIDDEN
    assert error_code(o.send("c1", in_call(CallEnd, "dave"))) is ErrorCode.UNKNOWN_CALL


def test_a_pending_call_makes_the_callee_busy() -> None:
    o = Offline()
    o.call_dave()
    actions = o.send("c1", request("c2", "carol", "dave"))
    assert delivered(actions) == [("c1", "call-reject", "busy")]
    assert len(o.board.calls) == 1
    # and the caller is in a call: one more is refused as for a ringing one
    assert error_code(o.send("a1", request("c3", "alice", "carol"))) is ErrorCode.FORBIDDEN


def test_a_pending_call_glares_like_a_ringing_one() -> None:
    o = Offline(CallRules(ring_timeout=30, offline="notify", max_calls_per_user=2))
    o.call_dave()
    o.sign_in("d1", "dave")
    # dave signs in and, before answering, calls alice: the call already ringing wins.
    assert delivered(o.send("d1", request("c9", "dave", "alice"))) == [
        ("d1", "call-reject", "glare")
    ]
    # glare is found on a call still pending too (found through the registry's caller index)
    p = Offline(CallRules(ring_timeout=30, offline="notify", max_calls_per_user=2))
    p.call_dave()
    assert p.board.calls.ringing_from("alice", "dave") is not None


def test_the_callers_device_leaving_a_pending_call_ends_it_as_missed() -> None:
    o = Offline()
    o.call_dave()
    actions = o.board.handle(Disconnected("a1"), 105.0)
    assert audits(actions) == ["call.ended", "call.missed"]
    assert CancelTimer(1) in actions
    assert len(o.board.calls) == 0


def test_every_requested_call_has_one_terminal_audit_in_notify_mode() -> None:
    o = Offline()
    log: list[str] = []
    log += audits(o.call_dave("x"))
    log += audits(o.board.handle(TimerFired(1), 130.0))
    log += audits(o.call_dave("y"))
    log += audits(o.send("a1", in_call(CallEnd, "dave", "y")))
    log += audits(o.call_dave("z"))
    log += audits(o.sign_in("d1", "dave"))
    log += audits(o.send("d1", in_call(CallReject, "alice", "z")))
    assert log.count("call.requested") == 3
    assert sum(1 for event in log if event in TERMINAL_CALL_EVENTS) == 3
    assert log.count("call.missed") == 2  # rejected is the callee's choice, not missed


# -- missed calls -------------------------------------------------------------------------------


def test_missed_calls_are_shown_at_the_next_sign_in_until_acknowledged() -> None:
    o = Offline(CallRules(ring_timeout=30, missed_calls=10, report_missed=True))
    assert audits(o.call_dave("u1")) == ["call.requested", "call.unavailable", "call.missed"]
    o.sign_in("d1", "dave")  # dave is online now: carol's call rings, and times out
    o.send(
        "c1",
        request(
            "t1",
            "carol",
            "dave",
        ),
    )
    o.board.handle(TimerFired(1), 140.0)
    o.board.handle(Disconnected("d1"), 140.0)
    o.now = 160.0
    actions = o.sign_in("d2", "dave")
    shown = [a for a in actions if isinstance(a, Deliver) and a.event == "missed-calls"]
    assert len(shown) == 1
    calls = shown[0].data["calls"]
    assert [(c["callId"], c["from"], c["type"], c["reason"]) for c in calls] == [
        ("u1", "alice", "video", "unavailable"),
        ("t1", "carol", "video", "timeout"),
    ]
    # Times are the wall clock of the request (the sign-in's, less the entries' age).
    assert calls[0]["time"] == round((o.wall + 0.0) * 1000)
    assert o.send("d2", MissedCallsAck(frozenset({calls[0]["id"]}), {}), ref=5) == [Ack("d2", 5)]
    again = o.sign_in("d3", "dave")
    shown = [a for a in again if isinstance(a, Deliver) and a.event == "missed-calls"]
    assert [c["callId"] for c in shown[0].data["calls"]] == ["t1"]
    o.send("d3", MissedCallsAck(frozenset({c["id"] for c in shown[0].data["calls"]}), {}))
    assert delivered(o.sign_in("d4", "dave")) == [("d4", "session", None)]


def test_declined_busy_and_answered_calls_are_not_missed() -> None:
    o = Offline(CallRules(ring_timeout=30, missed_calls=10, report_missed=True))
    o.sign_in("d1", "dave")
    o.send("a1", request("r1", "alice", "dave"))
    assert "call.missed" not in audits(o.send("d1", in_call(CallReject, "alice", "r1")))
    o.send("a1", request("r2", "alice", "dave"))
    assert "call.missed" not in audits(o.send("c1", request("b1", "carol", "dave")))  # busy
    o.send("d1", in_call(CallAnswer, "alice", "r2"))
    assert "call.missed" not in audits(o.send("a1", in_call(CallEnd, "dave", "r2")))
    assert o.board.missed_calls_of("dave", o.now) == []


def test_cancel_after_it_rang_is_missed() -> None:
    o = Offline(CallRules(ring_timeout=30, missed_calls=10, report_missed=True))
    o.sign_in("d1", "dave")
    o.send("a1", request("r1", "alice", "dave"))
    assert audits(o.send("a1", in_call(CallEnd, "dave", "r1"))) == [
        "call.cancelled",
        "call.missed",
    ]
    assert [m.reason for m in o.board.missed_calls_of("dave", o.now)] == ["cancelled"]


def test_without_missed_calls_nothing_is_kept_or_shown() -> None:
    o = Offline(CallRules(ring_timeout=30, report_missed=True))
    assert "call.missed" in audits(o.call_dave())  # reported (for webhooks) ...
    assert delivered(o.sign_in("d1", "dave")) == [("d1", "session", None)]  # ... never shown


def test_missed_calls_are_bounded_per_user_by_age_and_in_total() -> None:
    missed = MissedCalls(per_user=3, max_age=60.0, total=5)
    for n in range(5):
        missed.add("dave", f"c{n}", "alice", "voice", float(n), "timeout")
    assert [m.call_id for m in missed.of("dave", 10.0)] == ["c2", "c3", "c4"]
    assert [m.call_id for m in missed.of("dave", 62.5)] == ["c3", "c4"]  # c2 is over 60 s old
    for n in range(4):
        missed.add(f"user{n}", "x", "alice", "voice", 63.0, "timeout")
    assert len(missed) == 5  # dave's oldest went first: he was missed longest ago
    assert [m.call_id for m in missed.of("dave", 63.0)] == ["c4"]
    # Users who never sign in again age out as others are added.
    missed.add("eve", "late", "alice", "voice", 200.0, "timeout")
    assert len(missed) == 1


def test_acknowledging_is_idempotent_and_per_user() -> None:
    missed = MissedCalls(per_user=3, max_age=60.0, total=100)
    entry = missed.add("dave", "c1", "alice", "voice", 0.0, "timeout")
    assert entry is not None
    assert missed.acknowledge("mallory", frozenset({entry.id})) == 0
    assert missed.acknowledge("dave", frozenset({entry.id, "m999"})) == 1
    assert missed.acknowledge("dave", frozenset({entry.id})) == 0
    assert len(missed) == 0


def test_a_restored_switchboard_holds_the_pending_call_and_what_was_kept() -> None:
    o = Offline()
    o.call_dave()
    o.send("a1", candidate("dave", n=1))
    copy = Switchboard(NOTIFY, NoThrottle())
    copy.restore_state(json.loads(json.dumps(o.board.export_state())))
    assert copy.export_state() == o.board.export_state()
    sign_in = Authenticated("d1", "dave", wall=o.wall)
    assert copy.handle(sign_in, 110.0) == o.board.handle(sign_in, 110.0)
