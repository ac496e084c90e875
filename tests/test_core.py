"""The switchboard without sockets: tables over (state x message x role), time through `now`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from callgate.audit import TERMINAL_CALL_EVENTS
from callgate.core.actions import (
    Ack,
    Action,
    Audit,
    CancelTimer,
    Close,
    Deliver,
    SendError,
    StartTimer,
)
from callgate.core.calls import TRANSITIONS, CallState, Role, Step
from callgate.core.events import (
    Authenticated,
    Disconnected,
    Event,
    MessageReceived,
    RevocationChanged,
    ShuttingDown,
    TimerFired,
    TokenRefreshed,
)
from callgate.core.policy import CallRules, NoThrottle, Throttled
from callgate.core.switchboard import Switchboard
from callgate.errors import ErrorCode
from callgate.protocol.messages import (
    CallAnswer,
    CallEnd,
    CallReject,
    CallRenegotiate,
    CallRequest,
    IceCandidate,
    InCallMessage,
)

OFFER = {"type": "offer", "sdp": "v=0"}


def request(call_id: str = "c1", caller: str = "alice", callee: str = "bob") -> CallRequest:
    data = {"id": call_id, "from": caller, "to": callee, "type": "video", "offer": OFFER}
    return CallRequest(call_id, caller, callee, "video", data)


def in_call(kind: type[InCallMessage], to: str, call_id: str = "c1") -> InCallMessage:
    data: dict[str, Any] = {"callId": call_id, "to": to}
    return kind(call_id, to, data)


class Board:
    """A switchboard with alice (device a1), bob (devices b1, b2) and carol (c1) online."""

    def __init__(self, rules: CallRules | None = None, throttle: Any = None) -> None:
        self.board = Switchboard(rules or CallRules(ring_timeout=30), throttle or NoThrottle())
        self.now = 100.0
        for conn, user in (("a1", "alice"), ("a2", "alice"), ("b1", "bob"), ("b2", "bob")):
            self.board.handle(Authenticated(conn, user), self.now)
        self.board.handle(Authenticated("c1", "carol"), self.now)

    def send(self, conn: str, message: Any, ref: Any = None) -> list[Action]:
        return self.board.handle(MessageReceived(conn, message, ref), self.now)

    def ring(self) -> list[Action]:
        return self.send("a1", request(), ref=1)

    def connect(self) -> None:
        self.ring()
        self.send("b1", in_call(CallAnswer, "alice"))


def delivered(actions: list[Action]) -> list[tuple[str, str, Any]]:
    return [(a.conn, a.event, a.data.get("reason")) for a in actions if isinstance(a, Deliver)]


def audits(actions: list[Action]) -> list[str]:
    return [a.event for a in actions if isinstance(a, Audit)]


def error_code(actions: list[Action]) -> ErrorCode | None:
    errors = [a for a in actions if isinstance(a, SendError)]
    return errors[0].code if errors else None


# -- the transition table, exhaustively ----------------------------------------------------------

KINDS: list[type[InCallMessage]] = [CallAnswer, CallReject, CallEnd, IceCandidate, CallRenegotiate]
# A device with each role, per state: (conn, user, peer).
DEVICES = {
    (CallState.RINGING, Role.CALLER): ("a1", "bob"),
    (CallState.RINGING, Role.CALLEE_RINGING): ("b2", "alice"),
    (CallState.RINGING, Role.BYSTANDER): ("a2", "bob"),
    (CallState.CONNECTED, Role.CALLER): ("a1", "bob"),
    (CallState.CONNECTED, Role.CALLEE_ACTIVE): ("b1", "alice"),
    (CallState.CONNECTED, Role.BYSTANDER): ("b2", "alice"),
}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("state_role", list(DEVICES), ids=lambda sr: f"{sr[0].name}-{sr[1].name}")
def test_every_state_message_and_role(
    kind: type[InCallMessage], state_role: tuple[CallState, Role]
) -> None:
    state, role = state_role
    conn, peer = DEVICES[state_role]
    setup = Board()
    setup.ring()
    if state is CallState.CONNECTED:
        setup.send("b1", in_call(CallAnswer, "alice"))
    actions = setup.send(conn, in_call(kind, peer), ref="r")
    step = TRANSITIONS.get((state, kind, role))
    if step is None:
        assert error_code(actions) is ErrorCode.FORBIDDEN
        assert audits(actions) == ["authz.denied"]
        return
    assert actions[0] == Ack(conn, "r")
    assert error_code(actions) is None
    targets = {d[0] for d in delivered(actions)}
    assert conn not in targets  # never echoed to the sender
    expected_audit = {
        Step.ANSWER: ["call.answered"],
        Step.REJECT: ["call.rejected"],
        Step.DECLINE: ["call.rejected"],
        Step.CANCEL: ["call.cancelled"],
        Step.HANGUP: ["call.ended"],
        Step.RELAY: [],
        Step.RENEGOTIATE: ["call.renegotiated"],
    }[step]
    assert audits(actions) == expected_audit
    if step in {Step.REJECT, Step.DECLINE, Step.CANCEL, Step.HANGUP}:
        assert len(setup.board.calls) == 0


def test_forwarded_from_is_always_the_sender() -> None:
    b = Board()
    b.ring()
    message = CallAnswer("c1", "alice", {"callId": "c1", "to": "alice", "from": "mallory"})
    actions = b.send("b1", message)
    answer = next(a for a in actions if isinstance(a, Deliver) and a.event == "call-answer")
    assert answer.data["from"] == "bob" and answer.conn == "a1"


def test_ringing_reaches_every_callee_device_and_arms_a_timer() -> None:
    b = Board()
    actions = b.ring()
    assert actions[0] == Ack("a1", 1)
    assert [(d[0], d[1]) for d in delivered(actions)] == [
        ("b1", "call-request"),
        ("b2", "call-request"),
    ]
    assert StartTimer(1, 130.0) in actions
    assert audits(actions) == ["call.requested", "call.ringing"]


def test_answer_stops_other_devices_and_cancels_timer() -> None:
    b = Board()
    b.ring()
    actions = b.send("b2", in_call(CallAnswer, "alice"))
    assert delivered(actions) == [
        ("a1", "call-answer", None),
        ("b1", "call-end", "answered_elsewhere"),
    ]
    assert CancelTimer(1) in actions


def test_ring_timeout_fires_once() -> None:
    b = Board()
    b.ring()
    actions = b.board.handle(TimerFired(1), 130.0)
    assert delivered(actions) == [
        ("a1", "call-end", "timeout"),
        ("b1", "call-end", "timeout"),
        ("b2", "call-end", "timeout"),
    ]
    assert audits(actions) == ["call.timeout"]
    assert b.board.handle(TimerFired(1), 131.0) == []


def test_stale_timer_after_answer_does_nothing() -> None:
    b = Board()
    b.connect()
    assert b.board.handle(TimerFired(1), 200.0) == []
    assert len(b.board.calls) == 1


def test_duration_is_measured_from_the_answer() -> None:
    b = Board()
    b.ring()
    b.now = 105.0
    b.send("b1", in_call(CallAnswer, "alice"))
    b.now = 165.5
    actions = b.send("a1", in_call(CallEnd, "bob"))
    ended = next(a for a in actions if isinstance(a, Audit) and a.event == "call.ended")
    assert ended.fields["duration_ms"] == 60500
    assert ended.fields["reason"] == "hangup"


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        ("a1", [("b1", "call-end", "peer_disconnected")]),
        ("b1", [("a1", "call-end", "peer_disconnected")]),
        ("b2", []),  # a bystander leaving changes nothing
        ("a2", []),
    ],
)
def test_disconnect_of_each_device_in_a_connected_call(
    conn: str, expected: list[tuple[str, str, str]]
) -> None:
    b = Board()
    b.connect()
    actions = b.board.handle(Disconnected(conn), 150.0)
    assert delivered(actions) == expected
    assert len(b.board.calls) == (1 if not expected else 0)


def test_last_ringing_device_leaving_ends_the_call() -> None:
    b = Board()
    b.ring()
    assert b.board.handle(Disconnected("b1"), 101.0) == []
    actions = b.board.handle(Disconnected("b2"), 102.0)
    assert delivered(actions) == [("a1", "call-end", "peer_disconnected")]
    assert CancelTimer(1) in actions


def test_everyone_leaving_leaves_nothing_behind() -> None:
    b = Board()
    b.connect()
    for conn in ("a1", "a2", "b1", "b2", "c1"):
        b.board.handle(Disconnected(conn), 200.0)
    assert b.board.is_idle()


def test_unknown_call_is_indistinguishable_from_not_participant() -> None:
    b = Board()
    b.connect()
    outsider = b.send("c1", in_call(IceCandidate, "alice"))
    missing = b.send("c1", in_call(IceCandidate, "alice", call_id="zzz"))
    assert outsider[0] == missing[0]


@pytest.mark.parametrize(
    ("sender", "message", "code"),
    [
        ("c1", request(caller="alice"), ErrorCode.FORBIDDEN),  # spoofed from
        ("a1", request(callee="alice"), ErrorCode.FORBIDDEN),  # calling yourself
        ("a1", in_call(CallEnd, "bob", call_id="nope"), ErrorCode.UNKNOWN_CALL),
    ],
)
def test_refusals(sender: str, message: Any, code: ErrorCode) -> None:
    assert error_code(Board().send(sender, message)) is code


def test_outcomes_unavailable_busy_glare() -> None:
    b = Board()
    assert delivered(b.send("a1", request(callee="dave"))) == [("a1", "call-reject", "unavailable")]
    b.ring()
    assert delivered(b.send("c1", request("c2", "carol", "bob"))) == [("c1", "call-reject", "busy")]
    assert delivered(b.send("b1", request("c3", "bob", "alice"))) == [
        ("b1", "call-reject", "glare")
    ]
    assert error_code(b.send("a1", request("c1", "alice", "bob"))) is ErrorCode.CALL_EXISTS


class CountingThrottle:
    def __init__(self, allowed: int) -> None:
        self.allowed = allowed

    def admit_call(self, caller: str, callee: str) -> Throttled | None:
        self.allowed -= 1
        return None if self.allowed >= 0 else Throttled("call_request", 7)


def test_throttled_call_request() -> None:
    b = Board(throttle=CountingThrottle(0))
    actions = b.send("a1", request(), ref=3)
    assert actions[0] == SendError(
        "a1", ErrorCode.RATE_LIMITED, "too many call requests; try again later", 3, 7
    )
    assert audits(actions) == ["call.requested", "call.rate_limited"]
    assert len(b.board.calls) == 0


def test_max_calls_per_user_two() -> None:
    b = Board(CallRules(max_calls_per_user=2))
    b.ring()
    actions = b.send("c1", request("c2", "carol", "bob"))
    assert [d[1] for d in delivered(actions)] == ["call-request", "call-request"]
    assert len(b.board.calls) == 2


def test_every_requested_call_has_exactly_one_terminal_audit() -> None:
    b = Board()
    log: list[str] = []
    log += audits(b.ring())
    log += audits(b.send("c1", request("x", "carol", "bob")))
    log += audits(b.send("b2", in_call(CallAnswer, "alice")))
    log += audits(b.board.handle(Disconnected("a1"), 120.0))
    log += audits(b.send("c1", request("y", "carol", "dave")))
    assert log.count("call.requested") == 3
    assert sum(1 for event in log if event in TERMINAL_CALL_EVENTS) == 3


# -- sessions: hold, resume, refresh, revocation, shutdown ----------------------------------------


class GraceBoard(Board):
    """alice (a1) in a connected call with bob (b1), with a 15 s reconnect grace."""

    def __init__(self) -> None:
        super().__init__(CallRules(ring_timeout=30, reconnect_grace=15, resume_buffer=2))
        self.board.handle(Authenticated("a1", "alice", session_id="s-a1"), self.now)
        self.connect()

    def resume(self, conn: str, user: str, session: str) -> list[Action]:
        return self.board.handle(
            Authenticated(conn, user, session_id=f"s-{conn}", resume=session), self.now
        )


def test_dropped_device_is_held_and_its_peer_notices_nothing() -> None:
    b = GraceBoard()
    actions = b.board.handle(Disconnected("a1"), 101.0)
    assert delivered(actions) == []
    assert audits(actions) == ["session.held"]
    assert b.board.held_devices() == 1
    # bob keeps talking; it is buffered for alice.
    assert delivered(b.send("b1", in_call(IceCandidate, "alice"))) == []


def test_resume_takes_over_calls_and_delivers_the_buffer_in_order() -> None:
    b = GraceBoard()
    held = b.board.handle(Disconnected("a1"), 101.0)
    grace = next(a for a in held if isinstance(a, StartTimer))
    b.send("b1", in_call(IceCandidate, "alice"))
    actions = b.resume("a9", "alice", "s-a1")
    assert [(d[0], d[1]) for d in delivered(actions)] == [
        ("a9", "session"),
        ("a9", "ice-candidate"),
    ]
    session = next(a for a in actions if isinstance(a, Deliver))
    assert session.data["resumed"] is True and session.data["sessionId"] == "s-a9"
    assert "session.resumed" in audits(actions)
    assert CancelTimer(grace.timer) in actions
    # The call now lives on a9: bob's messages reach it, and alice can hang up from it.
    assert delivered(b.send("b1", in_call(IceCandidate, "alice"))) == [
        ("a9", "ice-candidate", None)
    ]
    assert delivered(b.send("a9", in_call(CallEnd, "bob"))) == [("b1", "call-end", None)]


def test_session_ids_are_single_use_and_bound_to_the_user() -> None:
    b = GraceBoard()
    b.board.handle(Disconnected("a1"), 101.0)
    stolen = b.resume("m1", "mallory", "s-a1")
    assert stolen[0].data["resumed"] is False  # type: ignore[union-attr]
    assert b.board.held_devices() == 1  # mallory took nothing
    b.resume("a9", "alice", "s-a1")
    again = b.resume("a8", "alice", "s-a1")
    assert again[0].data["resumed"] is False  # type: ignore[union-attr]


def test_grace_expiry_ends_calls_and_counts_dropped_messages() -> None:
    b = GraceBoard()
    actions = b.board.handle(Disconnected("a1"), 101.0)
    grace = next(a for a in actions if isinstance(a, StartTimer))
    for _ in range(5):
        b.send("b1", in_call(IceCandidate, "alice"))
    actions = b.board.handle(TimerFired(grace.timer), grace.deadline)
    assert delivered(actions) == [("b1", "call-end", "peer_disconnected")]
    expired = next(a for a in actions if isinstance(a, Audit) and a.event == "session.expired")
    assert expired.fields["dropped_messages"] == 5
    assert b.resume("a9", "alice", "s-a1")[0].data["resumed"] is False  # type: ignore[union-attr]


def test_resume_of_a_live_half_open_device_retires_the_old_connection() -> None:
    b = GraceBoard()
    actions = b.resume("a9", "alice", "s-a1")
    assert Close("a1", 4003, "session resumed on another connection") in actions
    assert b.board.handle(Disconnected("a1"), 102.0) == []  # the old socket's end changes nothing
    assert delivered(b.send("b1", in_call(IceCandidate, "alice"))) == [
        ("a9", "ice-candidate", None)
    ]


def test_refresh_rotates_the_session_id() -> None:
    b = GraceBoard()
    actions = b.board.handle(TokenRefreshed("a1", "s-new", {"expiresAt": 5}), 101.0)
    assert delivered(actions) == [("a1", "session", None)]
    assert audits(actions) == ["token.refreshed"]
    b.board.handle(Disconnected("a1"), 102.0)
    assert b.resume("a9", "alice", "s-a1")[0].data["resumed"] is False  # type: ignore[union-attr]
    assert b.resume("a8", "alice", "s-new")[0].data["resumed"] is True  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("token_ids", "users_before"),
    [(frozenset({"jti-a"}), {}), (frozenset(), {"alice": 50.0})],
    ids=["by-jti", "by-user"],
)
def test_revocation_closes_live_devices_and_ends_their_calls(
    token_ids: frozenset[str], users_before: dict[str, float]
) -> None:
    b = Board()
    b.board.handle(Authenticated("a1", "alice", token_id="jti-a", issued_at=10.0), b.now)
    b.connect()
    actions = b.board.handle(RevocationChanged(token_ids, users_before), 110.0)
    assert Close("a1", 4003, "token revoked") in actions
    assert delivered(actions) == [("b1", "call-end", "revoked")]
    ended = next(a for a in actions if isinstance(a, Audit) and a.event == "call.ended")
    assert ended.fields["reason"] == "revoked"
    # a2's token has no jti and no iat: kept when revoking by jti; revoked with the user, since
    # without `iat` it cannot prove it was issued after the cut-off.
    assert b.board.devices_of("alice") == (["a2"] if token_ids else [])


def test_revocation_reaches_held_devices() -> None:
    b = GraceBoard()
    b.board.handle(Authenticated("a1", "alice", session_id="s-a1", token_id="t1"), b.now)
    b.board.handle(Disconnected("a1"), 101.0)
    actions = b.board.handle(RevocationChanged(frozenset({"t1"})), 102.0)
    assert delivered(actions) == [("b1", "call-end", "revoked")]
    assert b.resume("a9", "alice", "s-a1")[0].data["resumed"] is False  # type: ignore[union-attr]


def test_shutdown_ends_every_call_once() -> None:
    b = Board()
    b.connect()
    actions = b.board.handle(ShuttingDown(), 120.0)
    assert sorted(delivered(actions)) == [
        ("a1", "call-end", "server_shutdown"),
        ("b1", "call-end", "server_shutdown"),
    ]
    assert audits(actions) == ["call.ended"]
    assert len(b.board.calls) == 0


# -- state as plain data (what a cluster snapshot holds) -----------------------------------------


def busy_board() -> Board:
    """A ringing call on two devices, a connected call, and a held device with a buffer."""
    b = Board(CallRules(ring_timeout=30, reconnect_grace=10, max_calls_per_user=2))
    b.ring()  # alice a1 -> bob b1, b2: ringing
    b.board.handle(Authenticated("d1", "dave", "sd"), b.now)
    b.send("c1", request("c2", "carol", "dave"))
    b.send("d1", in_call(CallAnswer, "carol", "c2"))
    b.board.handle(Disconnected("d1"), b.now)  # held, with what carol sends kept for it
    b.send("c1", in_call(IceCandidate, "dave", "c2"))
    return b


FOLLOW_UPS: list[tuple[str, Any]] = [
    ("b2", in_call(CallAnswer, "alice")),
    ("c1", in_call(CallEnd, "dave", "c2")),
    ("a1", in_call(CallEnd, "bob")),
    ("b1", in_call(CallReject, "alice")),
]


@pytest.mark.parametrize(("conn", "message"), FOLLOW_UPS, ids=lambda v: getattr(v, "EVENT", v))
def test_a_restored_switchboard_decides_exactly_like_the_original(conn: str, message: Any) -> None:
    original = busy_board()
    state = original.board.export_state()
    copy = Switchboard(
        CallRules(ring_timeout=30, reconnect_grace=10, max_calls_per_user=2), NoThrottle()
    )
    copy.restore_state(json.loads(json.dumps(state)))  # it survives JSON
    assert copy.export_state() == state
    later = original.now + 5
    resume = Authenticated("d2", "dave", "new", resume="sd")
    events: list[Event] = [MessageReceived(conn, message), resume]
    for event in [*events, TimerFired(1), TimerFired(2), TimerFired(3)]:
        assert copy.handle(event, later) == original.board.handle(event, later)
    assert copy.export_state() == original.board.export_state()
