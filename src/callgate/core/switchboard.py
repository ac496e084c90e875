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

Calls to users who are not there (`CallRules.offline`): by default such a call ends at once,
`unavailable`. In "notify" mode it is held PENDING (the caller is told with `call-pending`, the
audit says `call.pending`, which the webhooks turn into the push that wakes the phone) until a
device of the callee signs in, which rings; at `ring_timeout` the caller gets `call-reject`
`unavailable` as before. A call that ends without an answer that the callee did not decline is
*missed* (`missed.py`): a `call.missed` record, and an entry the callee's next sign-in is shown.

When an action list sends the sender both an `ack` and further events, the `ack` comes first: an
ack means "valid and allowed", and what the server then decides follows as events.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, assert_never

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
from callgate.core.calls import TRANSITIONS, Call, CallRegistry, CallState, Role, Step
from callgate.core.devices import Device, DeviceRegistry, Hold
from callgate.core.events import (
    Authenticated,
    ConnId,
    DeliveryFailed,
    Disconnected,
    Event,
    MessageReceived,
    OperatorDisconnectedUser,
    OperatorEndedCall,
    RevocationChanged,
    ShuttingDown,
    TimerFired,
    TimerId,
    TokenRefreshed,
)
from callgate.core.missed import MissedCall, MissedCalls
from callgate.core.policy import CallRules, CallThrottle
from callgate.errors import ErrorCode, Refused
from callgate.protocol.messages import (
    CALL_END,
    CALL_REQUEST,
    ICE_CANDIDATE,
    Auth,
    CallAnswer,
    CallRenegotiate,
    CallRequest,
    InCallMessage,
    MissedCallsAck,
    Ref,
    UserConnected,
    UserId,
)

# The `call-end` reason (and `call.ended` reason) of a call an operator ended.
ENDED_BY_OPERATOR = "ended_by_operator"


class Switchboard:
    def __init__(self, rules: CallRules, throttle: CallThrottle) -> None:
        self._rules = rules
        self._throttle = throttle
        self._devices = DeviceRegistry()
        self._calls = CallRegistry()
        self._ring_timers: dict[TimerId, Call] = {}
        self._grace_timers: dict[TimerId, Device] = {}
        self._next_timer: TimerId = 0
        self._call_requests = 0  # numbers call keys (`Call.key`)
        self._notify = rules.offline == "notify"
        self._missed = MissedCalls(
            rules.missed_calls, rules.missed_call_max_age, rules.missed_calls_total
        )

    # -- inspection (tests, metrics) ---------------------------------------------------------

    @property
    def calls(self) -> CallRegistry:
        return self._calls

    def devices_of(self, user: UserId) -> list[ConnId]:
        """The user's online devices (held ones are not: they do not ring)."""
        return self._devices.online(user)

    def online_connections(self) -> list[ConnId]:
        """Every online device's connection, in the order they signed in."""
        return [device.conn for device in self._devices.all() if device.hold is None]

    def devices(self) -> list[Device]:
        """Every device, online or held, in the order they signed in."""
        return self._devices.all()

    def held_devices(self) -> int:
        return sum(1 for device in self._devices.all() if device.hold is not None)

    def missed_calls_of(self, user: UserId, now: float) -> list[MissedCall]:
        """The missed calls the user's next sign-in would be shown."""
        return self._missed.of(user, now)

    def is_idle(self) -> bool:
        """True when no device, session, call or timer is left: nothing outlived its owner.

        Missed calls are not counted: they are kept for users who are not there, by design.
        """
        return (
            self._devices.is_empty()
            and self._calls.is_empty()
            and not self._ring_timers
            and not self._grace_timers
        )

    # -- state as plain data (cluster snapshots) ---------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Everything the switchboard knows, as JSON-ready data; `restore_state` reads it back.

        Orders are kept (devices by sign-in, calls by registry order, ringing devices), so a
        restored switchboard sends in the same order as the one it was taken from.
        """
        return {
            "next_timer": self._next_timer,
            "call_requests": self._call_requests,
            "devices": [_device_state(device) for device in self._devices.all()],
            "calls": [_call_state(call) for call in self._calls],
            "ring_timers": sorted(self._ring_timers),
            "missed": self._missed.export_state(),
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Replace everything with `state` (from `export_state`). Raises: KeyError, TypeError."""
        devices, calls = DeviceRegistry(), CallRegistry()
        grace_timers: dict[TimerId, Device] = {}
        for item in state["devices"]:
            device = Device(item["conn"], item["user"], item["sid"], item["jti"], item["iat"])
            devices.add(device)
            if item["hold"] is not None:
                hold = item["hold"]
                buffer = [Deliver(conn, event, data) for conn, event, data in hold["buffer"]]
                device.hold = Hold(int(hold["timer"]), buffer, int(hold["dropped"]))
                devices.go_offline(device)
                grace_timers[device.hold.timer] = device
        by_timer: dict[TimerId, Call] = {}
        for item in state["calls"]:
            call = Call(
                call_id=item["call_id"],
                caller=item["caller"],
                callee=item["callee"],
                media=item["media"],
                caller_conn=item["caller_conn"],
                ringing=dict.fromkeys(item["ringing"]),
                requested_at=float(item["requested_at"]),
                ring_timer=int(item["ring_timer"]),
                state=CallState[item["state"]],
                callee_conn=item["callee_conn"],
                answered_at=item["answered_at"],
                renegotiations=int(item["renegotiations"]),
                key=str(item.get("call_key", "")),
                request=item.get("request"),
                early=list(item.get("early", [])),
            )
            calls.add(call)
            by_timer[call.ring_timer] = call
        self._devices, self._calls, self._grace_timers = devices, calls, grace_timers
        self._ring_timers = {timer: by_timer[timer] for timer in state["ring_timers"]}
        self._next_timer = int(state["next_timer"])
        self._call_requests = int(state.get("call_requests", 0))
        if "missed" in state:
            self._missed.restore_state(state["missed"])

    # -- the one entry point -----------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        match event:
            case Authenticated():
                actions = self._on_authenticated(event, now)
            case TokenRefreshed():
                actions = self._on_refreshed(event)
            case MessageReceived():
                actions = self._on_message(event, now)
            case Disconnected(conn=conn):
                actions = self._on_disconnected(conn, now)
            case TimerFired(timer=timer):
                actions = self._on_timer(timer, now)
            case RevocationChanged():
                actions = self._on_revocation(event, now)
            case ShuttingDown():
                actions = self._on_shutdown(now)
            case OperatorEndedCall():
                actions = self._on_operator_end(event, now)
            case OperatorDisconnectedUser():
                actions = self._on_operator_disconnect(event, now)
            case DeliveryFailed():
                actions = self._on_delivery_failed(event)
            case _:
                assert_never(event)
        return self._route_to_held(actions)

    def _new_timer(self) -> TimerId:
        self._next_timer += 1
        return self._next_timer

    def _route_to_held(self, actions: list[Action]) -> list[Action]:
        """Deliveries to a held device wait in its buffer (bounded) instead of going out."""
        routed: list[Action] = []
        for action in actions:
            device = self._devices.get(action.conn) if isinstance(action, Deliver) else None
            if device is None or device.hold is None:
                routed.append(action)
            elif len(device.hold.buffer) < self._rules.resume_buffer:
                device.hold.buffer.append(action)  # type: ignore[arg-type]
            else:
                device.hold.dropped += 1
        return routed

    # -- sessions ----------------------------------------------------------------------------

    def _on_authenticated(self, event: Authenticated, now: float) -> list[Action]:
        conn, user = event.conn, event.user
        previous = self._devices.by_session(event.resume) if event.resume else None
        resumable = previous is not None and previous.user == user and previous.conn != conn
        device = Device(conn, user, event.session_id, event.token_id, event.issued_at)
        actions: list[Action] = []
        if previous is not None and resumable:
            actions = self._take_over(previous, device)
        self._devices.add(device)
        session = {**event.session, "sessionId": event.session_id}
        if event.resume is not None:
            session["resumed"] = resumable
            if not resumable:
                actions.append(Audit("session.resume_failed", {"conn": conn, "user": user}))
        actions += self._missed_calls_for(conn, user, event.wall, now)
        if self._notify:
            actions += self._ring_late_device(conn, user)
        # The new `session` message goes before anything buffered for the resumed device.
        return [Deliver(conn, "session", session), *actions]

    def _missed_calls_for(
        self, conn: ConnId, user: UserId, wall: float | None, now: float
    ) -> list[Action]:
        """A signing-in device is shown its user's missed calls not yet acknowledged."""
        missed = self._missed.dated(user, now, wall)  # none when missed calls are off
        if not missed:
            return []
        calls = [
            {
                "id": entry.id,
                "callId": entry.call_id,
                "from": entry.caller,
                "type": entry.media,
                "reason": entry.reason,
                "time": entry.time,
            }
            for entry in missed
        ]
        return [Deliver(conn, "missed-calls", {"calls": calls})]

    def _ring_late_device(self, conn: ConnId, user: UserId) -> list[Action]:
        """ "notify" mode: a callee device that signs in rings for its user's unanswered calls."""
        actions: list[Action] = []
        for call in self._calls.unanswered_to(user):
            if call.request is None or conn in call.ringing:
                continue  # placed before a restart into notify mode; or already ringing here
            was_pending = call.state is CallState.PENDING
            self._calls.ring_device(call, conn)
            actions.append(Deliver(conn, CALL_REQUEST, call.request))
            actions += [Deliver(conn, ICE_CANDIDATE, candidate) for candidate in call.early]
            if was_pending:
                ringing = {"callId": call.call_id, "from": call.callee}
                actions.append(Deliver(call.caller_conn, "call-ringing", ringing))
            # `devices`: how many ring now (the report's column is how many rang).
            devices = len(call.ringing)
            fields = {**_call_fields(call), "conn": call.caller_conn, "devices": devices}
            actions.append(Audit("call.ringing", fields))
        return actions

    def _take_over(self, previous: Device, device: Device) -> list[Action]:
        """`device` continues `previous`: its calls, and what was buffered for it."""
        actions: list[Action] = []
        if previous.hold is not None:
            self._grace_timers.pop(previous.hold.timer, None)
            actions.append(CancelTimer(previous.hold.timer))
            buffered = previous.hold.buffer
        else:
            # Still connected (a half-open socket the server has not noticed yet): retire it.
            actions.append(Close(previous.conn, 4003, "session resumed on another connection"))
            buffered = []
        self._devices.remove(previous)
        calls = self._calls.move_device(previous.conn, device.conn)
        actions += [Deliver(device.conn, d.event, d.data) for d in buffered]
        actions.append(
            Audit(
                "session.resumed",
                {
                    "conn": device.conn,
                    "previous_conn": previous.conn,
                    "user": device.user,
                    "calls": calls,
                    "delivered": len(buffered),
                },
            )
        )
        return actions

    def _on_refreshed(self, event: TokenRefreshed) -> list[Action]:
        device = self._devices.get(event.conn)
        if device is None:
            raise ValueError(f"refresh on unknown connection {event.conn}")
        device.token_id, device.issued_at = event.token_id, event.issued_at
        self._devices.rotate_session(device, event.session_id)
        return [
            Deliver(event.conn, "session", {**event.session, "sessionId": event.session_id}),
            Audit("token.refreshed", {"conn": event.conn, "user": device.user}),
        ]

    # -- messages ----------------------------------------------------------------------------

    def _on_message(self, event: MessageReceived, now: float) -> list[Action]:
        conn, message, ref = event.conn, event.message, event.ref
        device = self._devices.get(conn)
        if device is None or device.hold is not None:
            raise ValueError(f"message from a connection that is not online: {conn}")
        user = device.user
        try:
            match message:
                case CallRequest():
                    return self._on_call_request(conn, user, message, ref, now)
                case UserConnected(user=claimed):
                    if claimed != user:
                        raise Refused(ErrorCode.FORBIDDEN, "user-connected must name yourself")
                    return _acked(conn, ref, [])
                case MissedCallsAck(ids=ids):
                    # Unknown ids (acknowledged by another device, aged out) are no error.
                    self._missed.acknowledge(user, ids)
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
                        "msg_event": message.event,
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
        self._call_requests += 1
        call_key = f"{conn}.{self._call_requests}"
        # What names the call in every record of it (`_call_fields` once it exists).
        identity = {
            "call_key": call_key,
            "call_id": message.call_id,
            "caller": user,
            "callee": callee,
            "media": message.media,
        }
        fields = {**identity, "conn": conn}
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
        if not devices and not self._notify:
            missed = self._missed_call(identity, now, "unavailable")
            decided = _decided_for_caller(conn, ref, fields, "call.unavailable", "unavailable")
            return [*decided, *missed]
        if self._calls.count_for(callee) >= self._rules.max_calls_per_user:
            return _decided_for_caller(conn, ref, fields, "call.busy", "busy")
        timer = self._new_timer()
        forwarded = _forward(message.data, user)
        call = Call(
            call_id=message.call_id,
            caller=user,
            callee=callee,
            media=message.media,
            caller_conn=conn,
            ringing=dict.fromkeys(devices),
            requested_at=now,
            ring_timer=timer,
            key=call_key,
            state=CallState.RINGING if devices else CallState.PENDING,
            request=forwarded if self._notify else None,
        )
        self._calls.add(call)
        self._ring_timers[timer] = call
        if not devices:  # "notify": held until a device of the callee signs in
            return _acked(
                conn,
                ref,
                [
                    Audit("call.requested", fields),
                    Deliver(conn, "call-pending", {"callId": call.call_id, "from": callee}),
                    Audit("call.pending", fields),
                    StartTimer(timer, now + self._rules.ring_timeout),
                ],
            )
        return _acked(
            conn,
            ref,
            [
                Audit("call.requested", fields),
                *(Deliver(device, CALL_REQUEST, forwarded) for device in devices),
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
        if step is Step.RELAY:  # nearly every in-call message: no audit, no state change
            if self._notify and role is Role.CALLER and call.state is not CallState.CONNECTED:
                self._keep_early(call, forwarded)
            return _acked(
                conn, ref, [Deliver(d, message.event, forwarded) for d in call.other_side(role)]
            )
        fields = _call_fields(call)
        match step:
            case Step.RENEGOTIATE:
                call.renegotiations += 1
                return _acked(
                    conn,
                    ref,
                    [
                        *(Deliver(d, message.event, forwarded) for d in call.other_side(role)),
                        renegotiated_record(call, conn, user),
                    ],
                )
            case Step.ANSWER:
                stopped = self._calls.answer(call, conn, now)
                return _acked(
                    conn,
                    ref,
                    [
                        Deliver(call.caller_conn, message.event, forwarded),
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
                        Deliver(call.caller_conn, message.event, forwarded),
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
                            Deliver(d, CALL_END, {**forwarded, "reason": "cancelled"})
                            for d in ringing
                        ),
                        *self._finish(call),
                        Audit("call.cancelled", {**fields, "conn": conn, "reason": "cancelled"}),
                        *self._missed_call_of(call, "cancelled"),
                    ],
                )
            case Step.HANGUP:
                targets = call.other_side(role)
                return _acked(
                    conn,
                    ref,
                    [
                        *(Deliver(d, CALL_END, forwarded) for d in targets),
                        *self._finish(call),
                        ended_record(call, now, reason="hangup", by=user),
                    ],
                )
            case _:
                assert_never(step)

    # -- connections and timers --------------------------------------------------------------

    def _on_disconnected(self, conn: ConnId, now: float) -> list[Action]:
        device = self._devices.get(conn)
        if device is None:
            return []  # never authenticated, or already taken over / revoked
        self._devices.go_offline(device)
        for call in self._calls.of_device(conn):
            if call.role_of(conn) is Role.CALLEE_RINGING and len(call.ringing) > 1:
                # Other devices still ring: the call goes on without this one.
                self._calls.drop_ringing_device(call, conn)
        calls = self._calls.of_device(conn)
        if calls and self._rules.reconnect_grace > 0:
            timer = self._new_timer()
            device.hold = Hold(timer)
            self._grace_timers[timer] = device
            return [
                StartTimer(timer, now + self._rules.reconnect_grace),
                Audit("session.held", {"conn": conn, "user": device.user, "calls": len(calls)}),
            ]
        return self._retire(device, "peer_disconnected", now)

    def _retire(self, device: Device, reason: str, now: float) -> list[Action]:
        """Forget a device and end every call it is in, telling the other participants why."""
        if device.hold is not None:
            self._grace_timers.pop(device.hold.timer, None)
        self._devices.remove(device)
        actions: list[Action] = []
        for call in self._calls.of_device(device.conn):
            actions += self._terminate(call, reason, now, by=device)
        return actions

    def _terminate(self, call: Call, reason: str, now: float, by: Device | None) -> list[Action]:
        """End `call` for a reason of the server's; every other device of it gets `call-end`."""
        actions: list[Action] = []
        for conn in call.devices():
            if by is None or conn != by.conn:
                sender = call.callee if conn == call.caller_conn else call.caller
                actions += _call_end_to([conn], call, sender, reason)
        actions += self._finish(call)
        actions.append(ended_record(call, now, reason=reason, by=by.user if by else None))
        if call.answered_at is None and reason == "peer_disconnected":
            actions += self._missed_call_of(call, reason)
        return actions

    def _on_timer(self, timer: TimerId, now: float) -> list[Action]:
        device = self._grace_timers.pop(timer, None)
        if device is None or device.hold is None:
            return self._on_ring_timeout(timer, now)
        # Nobody resumed the device: what was buffered for it is lost, and said so.
        expired = Audit(
            "session.expired",
            {
                "conn": device.conn,
                "user": device.user,
                "dropped_messages": device.hold.dropped + len(device.hold.buffer),
            },
        )
        return [*self._retire(device, "peer_disconnected", now), expired]

    def _on_ring_timeout(self, timer: TimerId, now: float) -> list[Action]:
        call = self._ring_timers.pop(timer, None)
        if call is None or call.state is CallState.CONNECTED:
            return []  # the call was answered or ended before the timer could be cancelled
        self._calls.remove(call)
        if call.state is CallState.PENDING:  # no device of the callee came: as if at once
            reject = {"callId": call.call_id, "from": call.callee, "reason": "unavailable"}
            return [
                Deliver(call.caller_conn, "call-reject", reject),
                Audit("call.unavailable", {**_call_fields(call), "reason": "unavailable"}),
                *self._missed_call_of(call, "unavailable"),
            ]
        ringing = list(call.ringing)
        return [
            *_call_end_to([call.caller_conn], call, call.callee, "timeout"),
            *_call_end_to(ringing, call, call.caller, "timeout"),
            Audit("call.timeout", {**_call_fields(call), "reason": "timeout"}),
            *self._missed_call_of(call, "timeout"),
        ]

    def _on_revocation(self, event: RevocationChanged, now: float) -> list[Action]:
        users_before = dict(event.users_before)
        actions: list[Action] = []
        for device in self._devices.all():
            if not device.is_revoked(event.token_ids, users_before):
                continue
            if device.hold is None:
                actions.append(Close(device.conn, 4003, "token revoked"))
            actions.append(Audit("session.revoked", {"conn": device.conn, "user": device.user}))
            actions += self._retire(device, "revoked", now)
        return actions

    def calls_with_id(self, call_id: str, user: UserId | None = None) -> list[Call]:
        """The live calls named `call_id` (ids are unique per pair of users only), of `user`
        when given."""
        if user is not None:
            call = self._calls.find(user, call_id)
            return [call] if call is not None else []
        return [call for call in self._calls if call.call_id == call_id]

    def _on_operator_end(self, event: OperatorEndedCall, now: float) -> list[Action]:
        """Nothing when the call is gone (ended meanwhile) or the id is ambiguous: the operator's
        side checks both before it sends the event, and a race ends nothing by mistake."""
        calls = self.calls_with_id(event.call_id, event.user)
        if len(calls) != 1:
            return []
        return self._terminate(calls[0], ENDED_BY_OPERATOR, now, by=None)

    def _on_operator_disconnect(self, event: OperatorDisconnectedUser, now: float) -> list[Action]:
        actions: list[Action] = []
        for device in self._devices.all():
            if device.user != event.user:
                continue
            if device.hold is None:
                actions.append(Close(device.conn, event.code, event.reason))
            actions += self._retire(device, ENDED_BY_OPERATOR, now)
        return actions

    def _on_delivery_failed(self, event: DeliveryFailed) -> list[Action]:
        """Send again what found no connection: to the device's buffer if it is held, else
        after its call (a resumed device has a new connection). With neither, the device left
        and its call ended (the sender was told that): nothing is left to deliver to."""
        if self._devices.get(event.conn) is not None:
            return [Deliver(event.conn, event.event, event.data)]  # held: `_route_to_held`
        call_id = event.data.get("callId")
        call = self._calls.find(event.user, call_id) if isinstance(call_id, str) else None
        if call is None:
            return []
        side = [call.caller_conn] if event.user == call.caller else call.callee_side()
        return [Deliver(conn, event.event, event.data) for conn in side]

    def _on_shutdown(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for call in list(self._calls):
            actions += self._terminate(call, "server_shutdown", now, by=None)
        return actions

    def _keep_early(self, call: Call, forwarded: dict[str, Any]) -> None:
        """A caller's candidate before the answer, for the callee devices still to come."""
        if len(call.early) < self._rules.resume_buffer:
            call.early.append(forwarded)

    def _missed_call_of(self, call: Call, reason: str) -> list[Action]:
        return self._missed_call(_call_fields(call), call.requested_at, reason)

    def _missed_call(self, call: dict[str, Any], at: float, reason: str) -> list[Action]:
        """A call (its `_call_fields`) that ended unanswered, and not declined: kept for the
        callee's next sign-in."""
        if not self._rules.report_missed:
            return []
        self._missed.add(call["callee"], call["call_id"], call["caller"], call["media"], at, reason)
        return [Audit("call.missed", {**call, "reason": reason})]

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


def _device_state(device: Device) -> dict[str, Any]:
    hold = device.hold
    return {
        "conn": device.conn,
        "user": device.user,
        "sid": device.session_id,
        "jti": device.token_id,
        "iat": device.issued_at,
        "hold": None
        if hold is None
        else {
            "timer": hold.timer,
            "dropped": hold.dropped,
            "buffer": [[d.conn, d.event, dict(d.data)] for d in hold.buffer],
        },
    }


def _call_state(call: Call) -> dict[str, Any]:
    return {
        **_call_fields(call),
        "caller_conn": call.caller_conn,
        "ringing": list(call.ringing),
        "requested_at": call.requested_at,
        "ring_timer": call.ring_timer,
        "state": call.state.name,
        "callee_conn": call.callee_conn,
        "answered_at": call.answered_at,
        "renegotiations": call.renegotiations,
        "request": None if call.request is None else dict(call.request),
        "early": [dict(candidate) for candidate in call.early],
    }


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
    return [Deliver(device, CALL_END, data) for device in devices]


def _call_fields(call: Call) -> dict[str, Any]:
    return {
        "call_key": call.key,
        "call_id": call.call_id,
        "caller": call.caller,
        "callee": call.callee,
        "media": call.media,
    }


def renegotiated_record(call: Call, conn: ConnId, by: UserId) -> Audit:
    """The `call.renegotiated` line: one per renegotiation (an ICE restart, voice to video)."""
    return Audit("call.renegotiated", {**_call_fields(call), "conn": conn, "by": by})


def ended_record(call: Call, now: float, *, reason: str, by: UserId | None) -> Audit:
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
    if call.state is not CallState.CONNECTED and isinstance(message, CallRenegotiate):
        return "a call can be renegotiated only once it is answered"
    if role is Role.CALLER:
        return f"the caller cannot send {message.event}"
    return f"{message.event} is not allowed in a {call.state.name.lower()} call"
