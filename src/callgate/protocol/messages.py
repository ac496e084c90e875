"""Typed client messages (contract sections 2 and 3).

Every message the codec accepts becomes one of these frozen classes. The call events keep the
client's whole `data` object in `data`, because the contract forwards unknown extra fields
untouched; the typed fields are the ones the server reads and has validated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

UserId = str
CallId = str
Ref = str | int
Media = Literal["video", "voice"]

# The event names of the client messages (each class says its own in `event`).
AUTH: Final = "auth"
USER_CONNECTED: Final = "user-connected"
CALL_REQUEST: Final = "call-request"
CALL_ANSWER: Final = "call-answer"
CALL_REJECT: Final = "call-reject"
CALL_END: Final = "call-end"
ICE_CANDIDATE: Final = "ice-candidate"
CALL_RENEGOTIATE: Final = "call-renegotiate"
MISSED_CALLS_ACK: Final = "missed-calls-ack"


@dataclass(frozen=True, slots=True)
class Auth:
    """`auth`: the first message of a browser, or a token refresh on an open connection."""

    token: str
    resume: str | None = None

    @property
    def event(self) -> str:
        return AUTH


@dataclass(frozen=True, slots=True)
class UserConnected:
    """`user-connected`: the original design's identity claim; accepted only for yourself.

    `user` is the claimed id, or None when the data is not a string: any value but the
    sender's own id is `forbidden` (contract section 3), so the codec does not refuse it."""

    user: UserId | None

    @property
    def event(self) -> str:
        return USER_CONNECTED


@dataclass(frozen=True, slots=True)
class CallRequest:
    """`call-request`: place a call; `data` is forwarded to every device of `to`."""

    call_id: CallId
    from_user: UserId
    to: UserId
    media: Media
    data: Mapping[str, Any]

    @property
    def event(self) -> str:
        return CALL_REQUEST


@dataclass(frozen=True, slots=True)
class _InCall:
    """A message about an existing call: it names the call and addresses the peer in `to`."""

    call_id: CallId
    to: UserId
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class CallAnswer(_InCall):
    @property
    def event(self) -> str:
        return CALL_ANSWER


@dataclass(frozen=True, slots=True)
class CallReject(_InCall):
    @property
    def event(self) -> str:
        return CALL_REJECT


@dataclass(frozen=True, slots=True)
class CallEnd(_InCall):
    @property
    def event(self) -> str:
        return CALL_END


@dataclass(frozen=True, slots=True)
class IceCandidate(_InCall):
    @property
    def event(self) -> str:
        return ICE_CANDIDATE


@dataclass(frozen=True, slots=True)
class CallRenegotiate(_InCall):
    @property
    def event(self) -> str:
        return CALL_RENEGOTIATE


@dataclass(frozen=True, slots=True)
class MissedCallsAck:
    """`missed-calls-ack`: these missed calls (by their `id`) were shown; never send them again."""

    ids: frozenset[str]
    data: Mapping[str, Any]

    @property
    def event(self) -> str:
        return MISSED_CALLS_ACK


# Messages about an existing call: they name it by `call_id` and address the peer in `to`.
InCallMessage = CallAnswer | CallReject | CallEnd | IceCandidate | CallRenegotiate
ClientMessage = Auth | UserConnected | CallRequest | InCallMessage | MissedCallsAck


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded frame: the message and the client's correlation id, if it sent one."""

    message: ClientMessage
    ref: Ref | None = None
