"""Typed client messages (contract sections 2 and 3).

Every message the codec accepts becomes one of these frozen classes. The call events keep the
client's whole `data` object in `data`, because the contract forwards unknown extra fields
untouched; the typed fields are the ones the server reads and has validated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

UserId = str
CallId = str
Ref = str | int
Media = Literal["video", "voice"]


@dataclass(frozen=True, slots=True)
class Auth:
    """`auth`: the first message of a browser, or a token refresh on an open connection."""

    EVENT: ClassVar[str] = "auth"
    token: str
    resume: str | None = None


@dataclass(frozen=True, slots=True)
class UserConnected:
    """`user-connected`: the original design's identity claim; accepted only for yourself."""

    EVENT: ClassVar[str] = "user-connected"
    user: UserId


@dataclass(frozen=True, slots=True)
class CallRequest:
    """`call-request`: place a call; `data` is forwarded to every device of `to`."""

    EVENT: ClassVar[str] = "call-request"
    call_id: CallId
    from_user: UserId
    to: UserId
    media: Media
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class _InCall:
    """A message about an existing call: it names the call and addresses the peer in `to`."""

    EVENT: ClassVar[str]
    call_id: CallId
    to: UserId
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class CallAnswer(_InCall):
    EVENT: ClassVar[str] = "call-answer"


@dataclass(frozen=True, slots=True)
class CallReject(_InCall):
    EVENT: ClassVar[str] = "call-reject"


@dataclass(frozen=True, slots=True)
class CallEnd(_InCall):
    EVENT: ClassVar[str] = "call-end"


@dataclass(frozen=True, slots=True)
class IceCandidate(_InCall):
    EVENT: ClassVar[str] = "ice-candidate"


@dataclass(frozen=True, slots=True)
class CallRenegotiate(_InCall):
    EVENT: ClassVar[str] = "call-renegotiate"


# Messages about an existing call: they name it by `call_id` and address the peer in `to`.
InCallMessage = CallAnswer | CallReject | CallEnd | IceCandidate | CallRenegotiate
ClientMessage = Auth | UserConnected | CallRequest | InCallMessage


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded frame: the message and the client's correlation id, if it sent one."""

    message: ClientMessage
    ref: Ref | None = None
