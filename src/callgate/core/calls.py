"""Call state: the states, the roles a device can have in a call, and every transition.

Theory of operation
-------------------
A call is placed by one *device* (connection) of the caller and rings on every device the callee
had connected at that moment. It has two live states, RINGING and CONNECTED; a call that ends is
removed at once, so no state outlives its call. With `[calls] offline = "notify"` there is a third:
a call to a user with no device online is PENDING (nothing rings yet: the app's backend is waking
a phone), and becomes RINGING when a device of the callee signs in; in that mode a callee device
that signs in while a call to its user is unanswered rings too. Until the answer, what the caller
trickles (ICE candidates) is also kept, bounded, for the devices that come later.

Which messages a device may send about a call depends only on (state, message kind, role of that
device), and that is the table `TRANSITIONS` below: an entry names the `Step` the switchboard
performs; a missing entry means `forbidden`.

Roles are per device, not per user: the caller's *other* devices, and the callee's devices that
did not answer, are BYSTANDERs of the call and may not speak in it.

Call ids are chosen by clients. A call is found through the sender's own calls (a user has at
most `max_calls_per_user`), so a call id is only ever visible to its two participants: anyone else
gets `unknown_call`, whether or not the id exists.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from callgate.core.events import ConnId, TimerId
from callgate.protocol.messages import (
    CallAnswer,
    CallEnd,
    CallId,
    CallReject,
    CallRenegotiate,
    IceCandidate,
    InCallMessage,
    Media,
    UserId,
)


class _Member(Enum):
    """Members hash by identity (they are singletons, and compare by identity): the transition
    table is looked up on every in-call message, and `Enum.__hash__` is Python code."""

    __hash__ = object.__hash__


class CallState(_Member):
    PENDING = auto()  # offered to a user with no device online ("notify" mode): nothing rings
    RINGING = auto()  # offered, ringing on the callee's devices, not yet answered
    CONNECTED = auto()  # answered on one callee device; media is being set up or flowing


class Role(_Member):
    CALLER = auto()  # the device that sent the call-request
    CALLEE_RINGING = auto()  # a callee device that is ringing (before the answer)
    CALLEE_ACTIVE = auto()  # the callee device that answered
    BYSTANDER = auto()  # another device of a participant: not part of this call


class Step(_Member):
    ANSWER = auto()  # callee takes the call on this device; the others stop ringing
    REJECT = auto()  # callee declines with call-reject; the others stop ringing
    DECLINE = auto()  # callee declines with call-end while ringing; same outcome as REJECT
    CANCEL = auto()  # caller hangs up before the answer
    HANGUP = auto()  # either side ends a connected call
    RELAY = auto()  # forward to the other side (ICE candidates), state unchanged
    RENEGOTIATE = auto()  # forward a new description (ICE restart, voice to video)


P, R, C = CallState.PENDING, CallState.RINGING, CallState.CONNECTED
TRANSITIONS: dict[tuple[CallState, type[InCallMessage], Role], Step] = {
    (P, CallEnd, Role.CALLER): Step.CANCEL,
    (P, IceCandidate, Role.CALLER): Step.RELAY,  # kept for the devices that sign in later
    (R, CallAnswer, Role.CALLEE_RINGING): Step.ANSWER,
    (R, CallReject, Role.CALLEE_RINGING): Step.REJECT,
    (R, CallEnd, Role.CALLEE_RINGING): Step.DECLINE,
    (R, CallEnd, Role.CALLER): Step.CANCEL,
    (R, IceCandidate, Role.CALLER): Step.RELAY,
    (R, IceCandidate, Role.CALLEE_RINGING): Step.RELAY,
    (C, CallEnd, Role.CALLER): Step.HANGUP,
    (C, CallEnd, Role.CALLEE_ACTIVE): Step.HANGUP,
    (C, IceCandidate, Role.CALLER): Step.RELAY,
    (C, IceCandidate, Role.CALLEE_ACTIVE): Step.RELAY,
    (C, CallRenegotiate, Role.CALLER): Step.RENEGOTIATE,
    (C, CallRenegotiate, Role.CALLEE_ACTIVE): Step.RENEGOTIATE,
}
del P, R, C


@dataclass(slots=True, eq=False)
class Call:
    """One live call. Mutated only by `CallRegistry` and the switchboard."""

    call_id: CallId
    caller: UserId
    callee: UserId
    media: Media
    caller_conn: ConnId
    # Insertion-ordered set of the callee devices still ringing (empty once answered).
    ringing: dict[ConnId, None]
    requested_at: float
    ring_timer: TimerId
    state: CallState = CallState.RINGING
    callee_conn: ConnId | None = None
    answered_at: float | None = None
    renegotiations: int = field(default=0)
    # Server-assigned, unique in the deployment (the call id is the caller's and may repeat):
    # the calling connection's id (random, unique) and the switchboard's count of call requests.
    key: str = ""
    # "notify" mode only: the forwarded call-request and the caller's candidates before the
    # answer, for callee devices that sign in while the call is unanswered.
    request: Mapping[str, Any] | None = None
    early: list[Mapping[str, Any]] = field(default_factory=list)

    def role_of(self, conn: ConnId) -> Role:
        if conn == self.caller_conn:
            return Role.CALLER
        if conn == self.callee_conn:
            return Role.CALLEE_ACTIVE
        if conn in self.ringing:
            return Role.CALLEE_RINGING
        return Role.BYSTANDER

    def peer_of(self, user: UserId) -> UserId:
        return self.callee if user == self.caller else self.caller

    def callee_side(self) -> list[ConnId]:
        """The callee devices that take part now: every ringing one, or the one that answered."""
        return [self.callee_conn] if self.callee_conn is not None else list(self.ringing)

    def other_side(self, role: Role) -> list[ConnId]:
        """Where a message from a device in `role` goes."""
        return [self.caller_conn] if role is not Role.CALLER else self.callee_side()

    def devices(self) -> list[ConnId]:
        return [self.caller_conn, *self.callee_side()]


class CallRegistry:
    """Live calls, indexed by participant user and by device. Holds nothing for ended calls."""

    def __init__(self) -> None:
        self._by_user: dict[UserId, dict[CallId, Call]] = {}
        self._by_device: dict[ConnId, dict[Call, None]] = {}

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __iter__(self) -> Iterator[Call]:
        seen: set[int] = set()
        for calls in self._by_user.values():
            for call in calls.values():
                if id(call) not in seen:
                    seen.add(id(call))
                    yield call

    def find(self, user: UserId, call_id: CallId) -> Call | None:
        """The call `call_id` of which `user` is a participant, if any."""
        return self._by_user.get(user, {}).get(call_id)

    def id_in_use(self, call_id: CallId, *users: UserId) -> bool:
        return any(call_id in self._by_user.get(user, {}) for user in users)

    def count_for(self, user: UserId) -> int:
        return len(self._by_user.get(user, {}))

    def ringing_from(self, caller: UserId, callee: UserId) -> Call | None:
        """A call `caller` placed to `callee` that is still ringing or pending (the glare test)."""
        for call in self._by_user.get(caller, {}).values():
            if (
                call.caller == caller
                and call.callee == callee
                and call.state is not CallState.CONNECTED
            ):
                return call
        return None

    def unanswered_to(self, callee: UserId) -> list[Call]:
        """The calls to `callee` that are pending or ringing, oldest first."""
        return [
            call
            for call in self._by_user.get(callee, {}).values()
            if call.callee == callee and call.state is not CallState.CONNECTED
        ]

    def ring_device(self, call: Call, conn: ConnId) -> None:
        """A device of the callee that signed in rings for `call` too (a pending one rings)."""
        call.ringing[conn] = None
        call.state = CallState.RINGING
        self._link(conn, call)

    def of_device(self, conn: ConnId) -> list[Call]:
        return list(self._by_device.get(conn, {}))

    def add(self, call: Call) -> None:
        for user in (call.caller, call.callee):
            self._by_user.setdefault(user, {})[call.call_id] = call
        for conn in call.devices():
            self._link(conn, call)

    def answer(self, call: Call, conn: ConnId, now: float) -> list[ConnId]:
        """Move `call` to CONNECTED on device `conn`; returns the devices that stop ringing."""
        others = [device for device in call.ringing if device != conn]
        for device in others:
            self._unlink(device, call)
        call.ringing = {}
        call.callee_conn = conn
        call.state = CallState.CONNECTED
        call.answered_at = now
        return others

    def move_device(self, old: ConnId, new: ConnId) -> int:
        """A resumed device: its calls now reach it on connection `new`. Returns how many."""
        calls = self._by_device.pop(old, {})
        for call in calls:
            if call.caller_conn == old:
                call.caller_conn = new
            if call.callee_conn == old:
                call.callee_conn = new
            if old in call.ringing:
                call.ringing = {(new if c == old else c): None for c in call.ringing}
        if calls:
            self._by_device[new] = calls
        return len(calls)

    def drop_ringing_device(self, call: Call, conn: ConnId) -> None:
        call.ringing.pop(conn, None)
        self._unlink(conn, call)

    def remove(self, call: Call) -> None:
        for user in (call.caller, call.callee):
            calls = self._by_user.get(user)
            if calls is not None and calls.get(call.call_id) is call:
                del calls[call.call_id]
                if not calls:
                    del self._by_user[user]
        for conn in call.devices():
            self._unlink(conn, call)

    def _link(self, conn: ConnId, call: Call) -> None:
        self._by_device.setdefault(conn, {})[call] = None

    def _unlink(self, conn: ConnId, call: Call) -> None:
        calls = self._by_device.get(conn)
        if calls is not None:
            calls.pop(call, None)
            if not calls:
                del self._by_device[conn]

    def is_empty(self) -> bool:
        return not self._by_user and not self._by_device
