"""What happened: the inputs of `Switchboard.handle`. Past tense, as they are facts."""

from __future__ import annotations

from dataclasses import dataclass

from callgate.protocol.messages import ClientMessage, Ref, UserId

ConnId = str
TimerId = int


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A connection proved it is `user`; from now on it is one of the user's devices."""

    conn: ConnId
    user: UserId


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


Event = Authenticated | MessageReceived | Disconnected | TimerFired
