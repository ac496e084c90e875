"""The two wire dialects as sans-I/O objects: text in, envelopes out; replies in, text out.

A dialect knows how one wire format looks and nothing about sockets, clocks or tasks (as h11 is
for HTTP). The transport asks it three kinds of question:

- **Signing in** (`greeting`, `sign_in`, `welcome`): what goes out when the socket opens, what a
  frame read before sign-in means (credentials, or something to answer and keep waiting), and
  what confirms the sign-in. Native: nothing, an `auth` message, nothing (the `session` event
  follows in both). Socket.IO: the Engine.IO open packet, a CONNECT with `{token, resume}`,
  `40{"sid"}`.
- **Reading** (`read`): a frame after sign-in as an `Envelope`, or what the frame asks of the
  connection (a pong to send, a pong received, the client leaving).
- **Writing** (`event`, `ack`, `error`, `farewell`, `refusal`): replies rendered as frames.

Each dialect has one heartbeat: `heartbeat_frame` is the text frame of its ping (Engine.IO's
`2`), or None when it uses WebSocket pings. The transport runs the one heartbeat loop for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from callgate.errors import AuthError, ErrorCode
from callgate.protocol import socketio as sio
from callgate.protocol.codec import (
    FieldLimits,
    ProtocolError,
    decode,
    decode_object,
    encode,
    encode_error,
    parse_json,
    peek_ref,
    valid_token,
)
from callgate.protocol.messages import AUTH as AUTH_EVENT
from callgate.protocol.messages import Auth, Envelope, Ref

# The reasons the contract gives for a refused sign-in (section 2).
INVALID_TOKEN: Final = "invalid token"  # noqa: S105 - a close reason, not a secret
AUTHENTICATION_REQUIRED: Final = "authentication required"

# Close codes after which a Socket.IO client must not reconnect by itself (contract 11).
_NO_RECONNECT: Final = frozenset({4003, 4010, 4029, 1003, 1009})


@dataclass(frozen=True, slots=True)
class Credentials:
    """A sign-in attempt read from the client: its token, the session it resumes, its ref."""

    token: str
    resume: str | None = None
    ref: Ref | None = None


@dataclass(frozen=True, slots=True)
class Incoming:
    """What one frame means, beyond the message it may carry."""

    envelope: Envelope | None = None
    reply: str | None = None  # a frame to send back at once (an Engine.IO pong)
    pong: bool = False  # the answer to our heartbeat ping
    left: bool = False  # the client said goodbye (Engine.IO close, Socket.IO DISCONNECT)


NOTHING: Final = Incoming()


class Dialect(Protocol):
    """One wire format (see the module docstring for the three kinds of question)."""

    @property
    def heartbeat_frame(self) -> str | None: ...

    @property
    def connects(self) -> bool:
        """Whether a client signs in with a frame of its own even when its upgrade carried a
        token (Socket.IO's CONNECT, which every client sends and waits to have answered)."""
        ...

    def greeting(self, conn_id: str) -> list[str]: ...

    def sign_in(
        self, text: str, limits: FieldLimits, upgrade: Credentials | None = None
    ) -> Credentials | Incoming:
        """`upgrade`: what the upgrade carried (a dialect that `connects`): its token, used
        when the frame has none of its own (`""`: none), and the session it resumes, used when
        the frame names none.

        Raises: AuthError (a frame that is no sign-in, or a malformed one)."""
        ...

    def welcome(self, conn_id: str) -> list[str]: ...

    def read(self, text: str, limits: FieldLimits) -> Incoming:
        """Raises: ProtocolError (answered as an `error`; the connection stays)."""
        ...

    def event(self, name: str, data: Mapping[str, Any]) -> str: ...

    def ack(self, ref: Ref) -> str | None: ...

    def error(
        self, code: ErrorCode, message: str, ref: Ref | None, retry_after: int | None
    ) -> str: ...

    def farewell(self, code: int, reason: str) -> list[str]: ...

    def refusal(self, code: int, reason: str, error: str | None) -> list[str]: ...

    def peek_ref(self, text: str) -> Ref | None: ...


def _credentials(token: object, resume: object, ref: Ref | None) -> Credentials:
    """Raises: AuthError `invalid token` for a token that is missing, empty, too long or not a
    string."""
    if not valid_token(token):
        raise AuthError(INVALID_TOKEN, "malformed")
    return Credentials(token, resume if isinstance(resume, str) else None, ref)


def _refused_sign_in(text: str) -> AuthError:
    """Why a first frame that did not decode signs nobody in: an `auth` message whose token is
    missing, empty, too long or not a string carries a bad token (`invalid token`, as any other);
    anything else is not a sign-in at all (`authentication required`)."""
    try:
        envelope = parse_json(text)
    except ProtocolError:
        return AuthError(AUTHENTICATION_REQUIRED, "not_authenticated")
    if not isinstance(envelope, dict) or envelope.get("event") != AUTH_EVENT:
        return AuthError(AUTHENTICATION_REQUIRED, "not_authenticated")
    data = envelope.get("data")
    if not valid_token(data.get("token") if isinstance(data, dict) else None):
        return AuthError(INVALID_TOKEN, "malformed")
    return AuthError(AUTHENTICATION_REQUIRED, "not_authenticated")


class NativeDialect:
    """callgate's JSON envelopes (contract sections 1-10); WebSocket pings for the heartbeat."""

    heartbeat_frame: str | None = None
    connects = False  # a token on the upgrade signs in: an `auth` after it is a renewal

    def greeting(self, conn_id: str) -> list[str]:
        return []

    def sign_in(
        self, text: str, limits: FieldLimits, upgrade: Credentials | None = None
    ) -> Credentials | Incoming:
        try:
            envelope = decode(text, limits)
        except ProtocolError:
            raise _refused_sign_in(text) from None
        message = envelope.message
        if not isinstance(message, Auth):
            raise AuthError(AUTHENTICATION_REQUIRED, "not_authenticated")
        return _credentials(message.token, message.resume, envelope.ref)

    def welcome(self, conn_id: str) -> list[str]:
        return []

    def read(self, text: str, limits: FieldLimits) -> Incoming:
        return Incoming(decode(text, limits))

    def event(self, name: str, data: Mapping[str, Any]) -> str:
        return encode(name, data)

    def ack(self, ref: Ref) -> str | None:
        return encode("ack", None, ref)

    def error(self, code: ErrorCode, message: str, ref: Ref | None, retry_after: int | None) -> str:
        return encode_error(code, message, ref, retry_after)

    def farewell(self, code: int, reason: str) -> list[str]:
        return []  # the close frame says it all

    def refusal(self, code: int, reason: str, error: str | None) -> list[str]:
        return [] if error is None else [error]

    def peek_ref(self, text: str) -> Ref | None:
        return peek_ref(text)


class SocketIODialect:
    """Engine.IO v4 / Socket.IO v5 framing (contract section 11); Engine.IO's own heartbeat."""

    heartbeat_frame: str | None = sio.ENGINE_PING
    connects = True  # a client sends CONNECT and waits for `40`, signed in by header or not

    def __init__(self, ping_interval: float, ping_timeout: float, max_payload: int) -> None:
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._max_payload = max_payload

    def greeting(self, conn_id: str) -> list[str]:
        return [
            sio.open_packet(conn_id, self._ping_interval, self._ping_timeout, self._max_payload)
        ]

    def sign_in(
        self, text: str, limits: FieldLimits, upgrade: Credentials | None = None
    ) -> Credentials | Incoming:
        if text[:1] != sio.ENGINE_MESSAGE:
            engine = self._engine_packet(text)
            if engine is None:
                raise AuthError(AUTHENTICATION_REQUIRED, "not_authenticated")
            return engine
        try:
            packet = sio.parse_socket_packet(text[1:])
        except ProtocolError:
            raise AuthError(AUTHENTICATION_REQUIRED, "not_authenticated") from None
        if packet.kind != sio.CONNECT:
            raise AuthError(AUTHENTICATION_REQUIRED, "not_authenticated")
        if packet.namespace != sio.MAIN_NAMESPACE:
            # Answered, and the client may try the main namespace next.
            return Incoming(reply=sio.connect_error_packet("Invalid namespace", packet.namespace))
        auth = packet.payload if isinstance(packet.payload, dict) else {}
        token, resume = auth.get("token"), auth.get("resume")
        if upgrade is not None:
            # What the upgrade carried (a client's `extraHeaders`: `Authorization`,
            # `Callgate-Resume`) counts where the CONNECT says nothing of its own.
            if token is None and upgrade.token:
                token = upgrade.token
            if not isinstance(resume, str):
                resume = upgrade.resume
        return _credentials(token, resume, None)

    def welcome(self, conn_id: str) -> list[str]:
        return [sio.connected_packet(conn_id)]

    def read(self, text: str, limits: FieldLimits) -> Incoming:
        if text[:1] != sio.ENGINE_MESSAGE:
            engine = self._engine_packet(text)
            if engine is None:
                raise ProtocolError(ErrorCode.INVALID_MESSAGE, "not an Engine.IO message packet")
            return engine
        packet = sio.parse_socket_packet(text[1:])
        if packet.namespace != sio.MAIN_NAMESPACE:
            # A multiplexed `io(url + "/other")` beside the main socket: its CONNECT is refused
            # on its namespace, as before sign-in; it has nothing else to leave or send.
            if packet.kind == sio.CONNECT:
                return Incoming(
                    reply=sio.connect_error_packet("Invalid namespace", packet.namespace)
                )
            if packet.kind == sio.DISCONNECT:
                return NOTHING
        if packet.kind == sio.DISCONNECT:
            return Incoming(left=True)
        if packet.kind != sio.EVENT or packet.namespace != sio.MAIN_NAMESPACE:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "only events on the main namespace")
        return Incoming(decode_object(sio.event_envelope(packet), limits))

    @staticmethod
    def _engine_packet(text: str) -> Incoming | None:
        """An Engine.IO packet other than a message, or None for an unknown one."""
        kind = text[:1]
        if kind == sio.ENGINE_PONG:
            return Incoming(pong=True)
        if kind == sio.ENGINE_PING:
            return Incoming(reply=sio.ENGINE_PONG + text[1:])
        if kind == sio.ENGINE_CLOSE:
            return Incoming(left=True)
        return None

    def event(self, name: str, data: Mapping[str, Any]) -> str:
        return sio.event_packet(name, data)

    def ack(self, ref: Ref) -> str | None:
        return sio.ack_packet(ref, {"ok": True}) if isinstance(ref, int) else None

    def error(self, code: ErrorCode, message: str, ref: Ref | None, retry_after: int | None) -> str:
        error: dict[str, Any] = {"code": code.value, "message": message}
        if retry_after is not None:
            error["retryAfter"] = retry_after
        if isinstance(ref, int):
            return sio.ack_packet(ref, {"ok": False, "error": error})
        return sio.event_packet("error", error)

    def farewell(self, code: int, reason: str) -> list[str]:
        # Say why first; then `41` (Socket.IO DISCONNECT) where the client must not come back.
        closing = sio.event_packet("closing", {"code": code, "reason": reason})
        return [closing, sio.disconnect_packet()] if code in _NO_RECONNECT else [closing]

    def refusal(self, code: int, reason: str, error: str | None) -> list[str]:
        # A failed CONNECT: CONNECT_ERROR with the reason, and no `closing` event (the client
        # never had a session), whatever error the native dialect would have sent first.
        return [sio.connect_error_packet(reason)]

    def peek_ref(self, text: str) -> Ref | None:
        try:
            return sio.parse_socket_packet(text[1:]).ack_id if text[:1] == "4" else None
        except ProtocolError:
            return None
