"""What to do: the outputs of `Switchboard.handle`. Imperative, as they are orders."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from callgate.core.events import ConnId, TimerId
from callgate.errors import ErrorCode
from callgate.protocol.messages import Ref


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send `{"event": event, "data": data}` to one connection."""

    conn: ConnId
    event: str
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer a client message that carried `ref`: it was valid and allowed."""

    conn: ConnId
    ref: Ref


@dataclass(frozen=True, slots=True)
class SendError:
    """Answer a client message with an `error` event; the message itself is dropped."""

    conn: ConnId
    code: ErrorCode
    message: str
    ref: Ref | None = None
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class Audit:
    """Write one audit record. `fields` only ever holds allow-listed, non-secret metadata."""

    event: str
    fields: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Close:
    """Close one connection with a WebSocket close code, after what is queued for it."""

    conn: ConnId
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Fire `TimerFired(timer)` at `deadline` (the same clock as the `now` given to the core)."""

    timer: TimerId
    deadline: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    timer: TimerId


Action = Deliver | Ack | SendError | Audit | Close | StartTimer | CancelTimer
