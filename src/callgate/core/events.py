"""What happened: the inputs of `Switchboard.handle`. Past tense, as they are facts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from callgate.protocol.messages import ClientMessage, Ref, UserId

ConnId = str
TimerId = int


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A connection proved it is `user`; from now on it is one of the user's devices.

    `session` is what the transport puts in the `session` message (expiry, ICE servers); the core
    adds `sessionId` (fresh, from the transport's randomness) and whether `resume` succeeded.
    `token_id` (`jti`) and `issued_at` (`iat`) let revocation find the device later. `wall` is
    the unix time of the sign-in (the core's `now` is another clock): it dates missed calls.
    """

    conn: ConnId
    user: UserId
    session_id: str = ""
    session: Mapping[str, Any] = field(default_factory=dict)
    resume: str | None = None
    token_id: str | None = None
    issued_at: float | None = None
    wall: float | None = None


@dataclass(frozen=True, slots=True)
class TokenRefreshed:
    """An authenticated connection presented a fresh token for the same user."""

    conn: ConnId
    session_id: str
    session: Mapping[str, Any] = field(default_factory=dict)
    token_id: str | None = None
    issued_at: float | None = None


@dataclass(frozen=True, slots=True)
class RevocationChanged:
    """The revocation list is now this: tokens by `jti`, and users' tokens issued before a time."""

    token_ids: frozenset[str] = frozenset()
    users_before: Mapping[UserId, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ShuttingDown:
    """The server is stopping: every live call ends now."""


@dataclass(frozen=True, slots=True)
class OperatorEndedCall:
    """An operator ended call `call_id` (of `user`, when several calls share the id): every
    participant gets `call-end` with reason `ended_by_operator`."""

    call_id: str
    user: UserId | None = None


@dataclass(frozen=True, slots=True)
class OperatorDisconnectedUser:
    """An operator disconnected every device of `user`: each is closed with `code` and `reason`
    (what the client sees), and its calls end with reason `ended_by_operator`."""

    user: UserId
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """An authenticated connection sent a valid, rate-admitted message."""

    conn: ConnId
    message: ClientMessage
    ref: Ref | None = None


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A connection is gone (closed by either side, or killed)."""

    conn: ConnId


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A timer armed by `StartTimer` reached its deadline."""

    timer: TimerId


@dataclass(frozen=True, slots=True)
class DeliveryFailed:
    """A delivery to device `conn` (of `user`) found no open connection where it was sent.

    Cluster mode: the device dropped meanwhile (it is held: the message waits for its resume)
    or resumed elsewhere (the message follows its call). `data` is what was to be delivered.
    """

    conn: ConnId
    user: UserId
    event: str
    data: Mapping[str, Any]


Event = (
    Authenticated
    | TokenRefreshed
    | MessageReceived
    | Disconnected
    | TimerFired
    | RevocationChanged
    | ShuttingDown
    | OperatorEndedCall
    | OperatorDisconnectedUser
    | DeliveryFailed
)
