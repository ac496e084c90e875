"""The switchboard: `handle(event, now) -> actions`, the whole of callgate's call logic.

Theory of operation
-------------------
The transport authenticates connections, decodes frames and enforces per-connection limits; then
it tells the switchboard what happened (`Authenticated`, `MessageReceived`, `Disconnected`,
`TimerFired`) with the current monotonic time, and carries out the actions it gets back in order
(`Deliver`, `Ack`, `SendError`, `Audit`, `StartTimer`, `CancelTimer`). The switchboard never
awaits, reads a clock or draws randomness, so a connection task can call it without locks (trio
switches tasks only at `await`) and tests can drive it through every state with plain values.

It owns three things: presence (which devices each user has connected), the live calls
(`CallRegistry`, transitions in `calls.py`), and the ring timers of those calls. What a client may
do is decided here, once, for every transport:

* it speaks only as itself: a `call-request` whose `from` is not the sender is `forbidden`; on every
  other event the server overwrites `from` with the sender before forwarding;
* it speaks only in its own calls, only to the peer (`to`), and only in the right role and state
  (`TRANSITIONS`): otherwise `unknown_call` (not a participant, or no such call: the two are
  indistinguishable) or `forbidden`;
* every outcome the contract lists (section 4) is an action list returned here, with its audit
  record, so there is one line of audit per lifecycle step and exactly one terminal line per
  requested call (`call.unavailable`, `call.busy`, `call.rate_limited`, `call.rejected`,
  `call.cancelled`, `call.timeout` or `call.ended`).

When an action list sends the sender both an `ack` and further events, the `ack` comes first: an
ack means "valid and allowed", and what the server then decides follows as events.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, assert_never

from callgate.core.actions import Ack, Action, Audit, CancelTimer, Deliver, SendError, StartTimer
from callgate.core.calls import TRANSITIONS, Call, CallRegistry, CallState, Role, Step
from callgate.core.events import (
    Authenticated,
    ConnId,
    Disconnected,
    Event,
    MessageReceived,
    TimerFired,
    TimerId,
)
from callgate.core.policy import CallRules, CallThrottle
from callgate.errors import ErrorCode, Refused
from callgate.protocol.messages import (
    Auth,
    CallAnswer,
    CallEnd,
    CallRenegotiate,
    CallRequest,
    InCallMessage,
    Ref,
    UserConnected,
    UserId,
)


class Switchboard:
    def __init__(self, rules: CallRules, throttle: CallThrottle) -> None:
        self._rules = rules
        self._throttle = throttle
        self._device_user: dict[ConnId, UserId] = {}
        self._user_devices: dict[UserId, dict[ConnId, None]] = {}
        self._calls = CallRegistry()
        self._ring_timers: dict[TimerId, Call] = {}
        self._next_timer: TimerId = 0

    # -- inspection (tests, metrics) ---------------------------------------------------------

    @property
    def calls(self) -> CallRegistry:
        return self._calls

    def devices_of(self, user: UserId) -> list[ConnId]:
        return list(self._user_devices.get(user, {}))

    def is_idle(self) -> bool:
        """True when no device, call or timer is held: nothing outlived its connection or call."""
        return (
            not self._device_user
            and not self._user_devices
            and self._calls.is_empty()
            and not self._ring_timers
        )

    # -- the one entry point -----------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        match event:
            case Authenticated(conn=conn, user=user):
                self._device_user[conn] = user
                self._user_devices.setdefault(user, {})[conn] = None
                return []
            case MessageReceived():
                return self._on_message(event, now)
            case Disconnected(conn=conn):
                return self._on_disconnected(conn, now)
            case TimerFired(timer=timer):
                return self._on_ring_timeout(timer, now)
            case _:
                assert_never(event)

    # -- messages ----------------------------------------------------------------------------

    def _on_message(self, event: MessageReceived, now: float) -> list[Action]:
        conn, message, ref = event.conn, event.message, event.ref
        user = self._device_user.get(conn)
        if user is None:
            raise ValueError(f"message from unauthenticated connection {conn}")
        try:
            match message:
                case CallRequest():
                    return self._on_call_request(conn, user, message, ref, now)
                case UserConnected(user=claimed):
                    if claimed != user:
                        raise Refused(ErrorCode.FORBIDDEN, "user-connected must name yourself")
                    return _acked(conn, ref, [])
                case Auth():
                    raise ValueError("auth is handled by the transport, not the switchboard")
                case _:
                    return self._on_in_call(conn, user, message, ref, now)
        except Refused as refusal:
            return [
                SendError(conn, refusal.code, refusal.message, ref, refusal.retry_after),
                Audit(
                    "authz.denied",
                    {
                        "conn": conn,
                        "user": user,
                        "msg_event": message.EVENT,
                        "call_id": _call_id_of(message),
                        "reason": refusal.code.value,
                    },
                ),
            ]

    def _on_call_request(
        self, conn: ConnId, user: UserId, message: CallRequest, ref: Ref | None, now: float
    ) -> list[Action]:
        callee = message.to
        if message.from_user != user:
            raise Refused(ErrorCode.FORBIDDEN, "'from' must be your own user id")
        if callee == user:
            raise Refused(ErrorCode.FORBIDDEN, "you cannot call yourself")
        if self._calls.id_in_use(message.call_id, user, callee):
            raise Refused(ErrorCode.CALL_EXISTS, "this call id is already in use; choose another")
        fields = {
            "call_id": message.call_id,
            "caller": user,
            "callee": callee,
            "media": message.media,
            "conn": conn,
        }
        # Glare is checked before the caller's own call count: a user who is being rung by the
        # callee is "in a call" already, and must learn that the other call wins.
        if self._calls.ringing_from(callee, user) is not None:
            return _decided_for_caller(conn, ref, fields, "call.busy", "glare")
        if self._calls.count_for(user) >= self._rules.max_calls_per_user:
            raise Refused(
                ErrorCode.FORBIDDEN,
                f"you are already in {self._rules.max_calls_per_user} call(s); end one first",
            )
        throttled = self._throttle.admit_call(user, callee)
        if throttled is not None:
            return [
                SendError(
                    conn,
                    ErrorCode.RATE_LIMITED,
                    "too many call requests; try again later",
                    ref,
                    throttled.retry_after,
                ),
                Audit("call.requested", fields),
                Audit(
                    "call.rate_limited",
                    {**fields, "reason": throttled.limit, "retry_after": throttled.retry_after},
                ),
            ]
        devices = self.devices_of(callee)
        if not devices:
            return _decided_for_caller(conn, ref, fields, "call.unavailable", "unavailable")
        if self._calls.count_for(callee) >= self._rules.max_calls_per_user:
            return _decided_for_caller(conn, ref, fields, "call.busy", "busy")
        timer = self._next_timer
        self._next_timer += 1
        call = Call(
            call_id=message.call_id,
            caller=user,
            callee=callee,
            media=message.media,
            caller_conn=conn,
            ringing=dict.fromkeys(devices),
            requested_at=now,
            ring_timer=timer,
        )
        self._calls.add(call)
        self._ring_timers[timer] = call
        forwarded = _forward(message.data, user)
        return _acked(
            conn,
            ref,
            [
                Audit("call.requested", fields),
                *(Deliver(device, CallRequest.EVENT, forwarded) for device in devices),
                Audit("call.ringing", {**fields, "devices": len(devices)}),
                StartTimer(timer, now + self._rules.ring_timeout),
            ],
        )

    def _on_in_call(
        self, conn: ConnId, user: UserId, message: InCallMessage, ref: Ref | None, now: float
    ) -> list[Action]:
        call = self._calls.find(user, message.call_id)
        if call is None:
            raise Refused(ErrorCode.UNKNOWN_CALL, "no such call")
        if message.to != call.peer_of(user):
            raise Refused(ErrorCode.FORBIDDEN, "'to' is not your peer in this call")
        role = call.role_of(conn)
        step = TRANSITIONS.get((call.state, type(message), role))
        if step is None:
            raise Refused(ErrorCode.FORBIDDEN, _why_not(call, message, role))
        forwarded = _forward(message.data, user)
        fields = _call_fields(call)
        match step:
            case Step.RELAY:
                return _acked(
                    conn,
                    ref,
                    [Deliver(d, message.EVENT, forwarded) for d in call.other_side(role)],
                )
            case Step.RENEGOTIATE:
                call.renegotiations += 1
                return _acked(
                    conn,
                    ref,
                    [
                        *(Deliver(d, message.EVENT, forwarded) for d in call.other_side(role)),
                        Audit("call.renegotiated", {**fields, "conn": conn, "by": user}),
                    ],
                )
            case Step.ANSWER:
                stopped = self._calls.answer(call, conn, now)
                return _acked(
                    conn,
                    ref,
                    [
                        Deliver(call.caller_conn, message.EVENT, forwarded),
                        *_call_end_to(stopped, call, call.caller, "answered_elsewhere"),
                        CancelTimer(self._forget_timer(call)),
                        Audit("call.answered", {**fields, "conn": conn}),
                    ],
                )
            case Step.REJECT | Step.DECLINE:
                others = [d for d in call.ringing if d != conn]
                reason = "rejected" if step is Step.REJECT else "declined"
                return _acked(
                    conn,
                    ref,
                    [
                        Deliver(call.caller_conn, message.EVENT, forwarded),
                        *_call_end_to(others, call, call.caller, "rejected_elsewhere"),
                        *self._finish(call),
                        Audit("call.rejected", {**fields, "conn": conn, "reason": reason}),
                    ],
                )
            case Step.CANCEL:
                ringing = list(call.ringing)
                return _acked(
                    conn,
                    ref,
                    [
                        *(
                            Deliver(d, CallEnd.EVENT, {**forwarded, "reason": "cancelled"})
                            for d in ringing
                        ),
                        *self._finish(call),
                        Audit("call.cancelled", {**fields, "conn": conn, "reason": "cancelled"}),
                    ],
                )
            case Step.HANGUP:
                targets = call.other_side(role)
                return _acked(
                    conn,
                    ref,
                    [
                        *(Deliver(d, CallEnd.EVENT, forwarded) for d in targets),
                        *self._finish(call),
                        _ended(call, now, reason="hangup", by=user),
                    ],
                )
            case _:
                assert_never(step)

    # -- connections and timers --------------------------------------------------------------

    def _on_disconnected(self, conn: ConnId, now: float) -> list[Action]:
        user = self._device_user.pop(conn, None)
        if user is None:
            return []
        devices = self._user_devices[user]
        del devices[conn]
        if not devices:
            del self._user_devices[user]
        actions: list[Action] = []
        for call in self._calls.of_device(conn):
            role = call.role_of(conn)
            if role is Role.CALLEE_RINGING and len(call.ringing) > 1:
                # Other devices still ring: the call goes on without this one.
                self._calls.drop_ringing_device(call, conn)
                continue
            actions += _call_end_to(call.other_side(role), call, user, "peer_disconnected")
            actions += self._finish(call)
            actions.append(_ended(call, now, reason="peer_disconnected", by=user))
        return actions

    def _on_ring_timeout(self, timer: TimerId, now: float) -> list[Action]:
        call = self._ring_timers.pop(timer, None)
        if call is None or call.state is not CallState.RINGING:
            return []  # the call was answered or ended before the timer could be cancelled
        ringing = list(call.ringing)
        self._calls.remove(call)
        return [
            *_call_end_to([call.caller_conn], call, call.callee, "timeout"),
            *_call_end_to(ringing, call, call.caller, "timeout"),
            Audit("call.timeout", {**_call_fields(call), "reason": "timeout"}),
        ]

    def _forget_timer(self, call: Call) -> TimerId:
        self._ring_timers.pop(call.ring_timer, None)
        return call.ring_timer

    def _finish(self, call: Call) -> list[Action]:
        """Remove an ending call; its ring timer is cancelled if it was still armed."""
        armed = call.ring_timer in self._ring_timers
        self._forget_timer(call)
        self._calls.remove(call)
        return [CancelTimer(call.ring_timer)] if armed else []


# -- helpers: pure functions of their arguments -----------------------------------------------


def _acked(conn: ConnId, ref: Ref | None, actions: list[Action]) -> list[Action]:
    return [Ack(conn, ref), *actions] if ref is not None else actions


def _forward(data: Mapping[str, Any], sender: UserId) -> dict[str, Any]:
    """The client's data, untouched but for `from`, which is always the authenticated sender."""
    return {**data, "from": sender}


def _decided_for_caller(
    conn: ConnId, ref: Ref | None, fields: dict[str, Any], audit_event: str, reason: str
) -> list[Action]:
    """A request that is valid and allowed, but that the server answers with `call-reject`."""
    reject = {"callId": fields["call_id"], "from": fields["callee"], "reason": reason}
    return _acked(
        conn,
        ref,
        [
            Audit("call.requested", fields),
            Deliver(conn, "call-reject", reject),
            Audit(audit_event, {**fields, "reason": reason}),
        ],
    )


def _call_end_to(devices: list[ConnId], call: Call, sender: UserId, reason: str) -> list[Action]:
    data = {"callId": call.call_id, "from": sender, "reason": reason}
    return [Deliver(device, CallEnd.EVENT, data) for device in devices]


def _call_fields(call: Call) -> dict[str, Any]:
    return {
        "call_id": call.call_id,
        "caller": call.caller,
        "callee": call.callee,
        "media": call.media,
    }


def _ended(call: Call, now: float, *, reason: str, by: UserId) -> Audit:
    """The one canonical `call.ended` line; `duration_ms` counts from the answer (0 if none)."""
    duration = 0 if call.answered_at is None else round((now - call.answered_at) * 1000)
    return Audit(
        "call.ended",
        {
            **_call_fields(call),
            "reason": reason,
            "by": by,
            "answered": call.answered_at is not None,
            "duration_ms": duration,
        },
    )


def _call_id_of(message: object) -> str | None:
    call_id = getattr(message, "call_id", None)
    return call_id if isinstance(call_id, str) else None


def _why_not(call: Call, message: InCallMessage, role: Role) -> str:
    if role is Role.BYSTANDER:
        return "this call is on another of your devices"
    if isinstance(message, CallAnswer | CallRenegotiate) and call.state is CallState.CONNECTED:
        return (
            "the call is already answered"
            if isinstance(message, CallAnswer)
            else "renegotiation is not allowed here"
        )
    if call.state is CallState.RINGING and isinstance(message, CallRenegotiate):
        return "a call can be renegotiated only once it is answered"
    if role is Role.CALLER:
        return f"the caller cannot send {message.EVENT}"
    return f"{message.EVENT} is not allowed in a {call.state.name.lower()} call"
