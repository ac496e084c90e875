"""Engine.IO v4 and Socket.IO v5 framing over WebSocket (contract section 11). Pure.

One WebSocket text frame is one Engine.IO packet: a type digit, then its payload.
    0 open   1 close   2 ping   3 pong   4 message (a Socket.IO packet)
A Socket.IO packet is a type digit, an optional `/namespace,`, an optional ack id, then JSON:
    0 CONNECT   1 DISCONNECT   2 EVENT   3 ACK   4 CONNECT_ERROR   5/6 binary (refused)
so `42["call-request",{...}]` is an event, `4212["call-end",{...}]` an event asking for ack 12,
`4312[{"ok":true}]` the ack, and `40{"token":"..."}` a CONNECT with an auth payload.
Packet types and ack ids are ASCII digits only (`str.isdigit` and a regex digit class also take
superscripts and Arabic-Indic digits, which `int` then refuses or reads), and a namespace is short
and plain: an error that names it sends nothing else of what the client wrote (a token) back.

Client events become the same envelope objects the native protocol carries
(`{"event", "data", "ref"}`, the ack id as `ref`), so one codec validates both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from callgate.errors import ErrorCode
from callgate.protocol.codec import ProtocolError, dump_json, parse_json

ENGINE_OPEN, ENGINE_CLOSE, ENGINE_PING, ENGINE_PONG, ENGINE_MESSAGE = "0", "1", "2", "3", "4"
CONNECT, DISCONNECT, EVENT, ACK, CONNECT_ERROR = 0, 1, 2, 3, 4
MAIN_NAMESPACE = "/"
_PACKET_TYPES = "0123456789"
_ACK_ID = re.compile(r"[0-9]+")
MAX_ACK_ID_DIGITS = 15  # below 2**53: the id survives a JavaScript client's Number
# `/` and at most 31 URL path characters: what an error may echo of a client's namespace.
_NAMESPACE = re.compile(r"/[A-Za-z0-9._~!$&'()*+;=:@%/-]{0,31}")


@dataclass(frozen=True, slots=True)
class SocketPacket:
    kind: int
    namespace: str = MAIN_NAMESPACE
    ack_id: int | None = None
    payload: Any = None


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_MESSAGE, message)


def parse_socket_packet(text: str) -> SocketPacket:
    """A Socket.IO packet (the payload of an Engine.IO message).

    Raises:
        ProtocolError: not a packet this server accepts (binary packets included).
    """
    if not text or text[0] not in _PACKET_TYPES:
        raise _invalid("not a Socket.IO packet")
    kind, rest = ord(text[0]) - ord("0"), text[1:]
    if kind not in (CONNECT, DISCONNECT, EVENT, ACK):
        raise _invalid("binary and server-only Socket.IO packets are not accepted")
    namespace = MAIN_NAMESPACE
    if rest.startswith("/"):
        named = _NAMESPACE.match(rest)
        end = named.end() if named is not None else 0  # it matches: `rest` starts with '/'
        if end < len(rest) and rest[end] != ",":
            raise _invalid("a namespace is '/' and at most 31 URL path characters, then ','")
        namespace, rest = rest[:end], rest[end + 1 :]
    ack_id = None
    digits = _ACK_ID.match(rest)
    if digits is not None:
        if digits.end() > MAX_ACK_ID_DIGITS:
            raise _invalid(f"an ack id has at most {MAX_ACK_ID_DIGITS} digits")
        ack_id = int(digits.group())
        rest = rest[digits.end() :]
    try:
        payload = parse_json(rest) if rest else None
    except ProtocolError as bad:  # answered on the ack, when the client asked for one
        raise ProtocolError(bad.code, bad.message, ack_id) from None
    return SocketPacket(kind, namespace, ack_id, payload)


def event_envelope(packet: SocketPacket) -> dict[str, Any]:
    """An EVENT packet as the native envelope object, for the shared codec.

    Raises:
        ProtocolError: not `[name, data]`.
    """
    arguments = packet.payload
    if not isinstance(arguments, list) or not arguments or not isinstance(arguments[0], str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "an event is [name, data]", packet.ack_id)
    envelope: dict[str, Any] = {"event": arguments[0]}
    if len(arguments) > 1:
        envelope["data"] = arguments[1]
    if packet.ack_id is not None:
        envelope["ref"] = packet.ack_id
    return envelope


_json = dump_json


def open_packet(sid: str, ping_interval: float, ping_timeout: float, max_payload: int) -> str:
    return ENGINE_OPEN + _json(
        {
            "sid": sid,
            "upgrades": [],
            "pingInterval": int(ping_interval * 1000),
            "pingTimeout": int(ping_timeout * 1000),
            "maxPayload": max_payload,
        }
    )


def connected_packet(sid: str) -> str:
    return f"{ENGINE_MESSAGE}{CONNECT}" + _json({"sid": sid})


def connect_error_packet(message: str, namespace: str = MAIN_NAMESPACE) -> str:
    prefix = "" if namespace == MAIN_NAMESPACE else f"{namespace},"
    return f"{ENGINE_MESSAGE}{CONNECT_ERROR}{prefix}" + _json({"message": message})


def event_packet(event: str, data: Any) -> str:
    return f"{ENGINE_MESSAGE}{EVENT}" + _json([event, data])


def ack_packet(ack_id: int, result: Any) -> str:
    return f"{ENGINE_MESSAGE}{ACK}{ack_id}" + _json([result])


def disconnect_packet() -> str:
    return f"{ENGINE_MESSAGE}{DISCONNECT}"
