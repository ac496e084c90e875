"""Decode client frames into typed messages and encode server messages (contract 1, 3, 5, 6).

`decode` is total: for any text it returns an `Envelope` or raises `ProtocolError`, never anything
else (a hypothesis test holds it to that). It checks the envelope, the event name, every field the
server reads (type, enum value, length, UTF-8 size) and refuses what could not be forwarded
safely: lone surrogates (not encodable as UTF-8), NaN/Infinity, absurd nesting. orjson parses and
writes the wire format; the audit log keeps the standard library's canonical JSON.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeGuard

import orjson

from callgate.errors import ErrorCode, Refused
from callgate.protocol.messages import (
    AUTH,
    CALL_ANSWER,
    CALL_END,
    CALL_REJECT,
    CALL_RENEGOTIATE,
    CALL_REQUEST,
    ICE_CANDIDATE,
    MISSED_CALLS_ACK,
    USER_CONNECTED,
    Auth,
    CallAnswer,
    CallEnd,
    CallReject,
    CallRenegotiate,
    CallRequest,
    ClientMessage,
    Envelope,
    IceCandidate,
    Media,
    MissedCallsAck,
    Ref,
    UserConnected,
)

MAX_REF_LENGTH = 128
MAX_SAFE_INTEGER = 2**53 - 1  # refs must survive a JavaScript client's Number
MAX_TOKEN_BYTES = 16384
MAX_SHORT_STRING = 256  # sdpMid, usernameFragment and similar small strings
# Objects and arrays inside one message, its envelope included. orjson reads 1,024 levels but
# writes only 254, so a message nested between the two could be read and never forwarded: the
# limit is checked where a message is read, far below what the encoder can write again.
MAX_NESTING = 32
_REFUSED_IN_IDS = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_CALL_ID = re.compile(r"[A-Za-z0-9._:-]+")


class UnencodableMessage(ValueError):
    """A server message that cannot be written as JSON (a value nested past the encoder's limit,
    an integer over 64 bits). Decoding keeps clients from causing one; the transport drops such a
    message alone and reports it, so it never takes a connection or a call down with it."""


class ProtocolError(Refused):
    """A frame is not a valid message; carries the frame's `ref` when one could be read."""

    def __init__(self, code: ErrorCode, message: str, ref: Ref | None = None) -> None:
        super().__init__(code, message)
        self.ref = ref


@dataclass(frozen=True, slots=True)
class FieldLimits:
    """Contract section 6; the defaults are the contract's."""

    max_sdp_bytes: int = 16384
    max_candidate_bytes: int = 1024
    max_user_id_length: int = 128
    max_call_id_length: int = 128


def parse_json(text: str) -> object:
    """JSON text to a value that can be forwarded as UTF-8 JSON. Raises: ProtocolError.

    orjson refuses what could not be forwarded safely: NaN and Infinity (not JSON), unpaired
    UTF-16 surrogates (not encodable as UTF-8) and absurd nesting.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "not valid JSON") from None
    # Fast path: a text with few brackets cannot be deeply nested (brackets in strings count
    # too, which only sends a few more messages to the exact walk).
    if text.count("{") + text.count("[") > MAX_NESTING and _nested_deeper_than(value, MAX_NESTING):
        ref = _readable_ref(value)
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, f"nested deeper than {MAX_NESTING} levels", ref
        )
    return value


def _nested_deeper_than(value: object, limit: int) -> bool:
    """Whether objects and arrays nest more than `limit` levels (iterative: no recursion limit)."""
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def valid_user_id(value: object, max_length: int) -> TypeGuard[str]:
    """1..max_length characters, none of them control, format, surrogate or line separators."""
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        return False
    if value.isprintable():  # fast path: printable text has none of the refused categories
        return True
    return not any(unicodedata.category(char) in _REFUSED_IN_IDS for char in value)


def valid_token(value: object) -> TypeGuard[str]:
    """What may be a token: a non-empty string of at most `MAX_TOKEN_BYTES` characters."""
    return isinstance(value, str) and 0 < len(value) <= MAX_TOKEN_BYTES


def valid_call_id(value: object, max_length: int) -> TypeGuard[str]:
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        return False
    # Every ICE candidate of a call repeats its id: remember the ids whose characters passed.
    if value in _CALL_ID_CHARS_OK:
        return True
    if _CALL_ID.fullmatch(value) is None:
        return False
    if len(_CALL_ID_CHARS_OK) >= _CALL_ID_CACHE_SIZE:
        _CALL_ID_CHARS_OK.clear()
    _CALL_ID_CHARS_OK[value] = None
    return True


# Call ids known to be made of [A-Za-z0-9._:-] only (the length is checked every time).
_CALL_ID_CHARS_OK: dict[str, None] = {}
_CALL_ID_CACHE_SIZE = 4096


class _Fields:
    """Reads typed fields out of one `data` object, raising `invalid_message` that names them."""

    __slots__ = ("data", "event", "limits", "ref")

    def __init__(self, event: str, data: Mapping[str, Any], ref: Ref | None, limits: FieldLimits):
        self.event = event
        self.data = data
        self.ref = ref
        self.limits = limits

    def fail(self, message: str) -> NoReturn:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"{self.event}: {message}", self.ref)

    def user_id(self, key: str) -> str:
        value = self.data.get(key)
        if not valid_user_id(value, self.limits.max_user_id_length):
            self.fail(
                f"'{key}' must be a user id of 1-{self.limits.max_user_id_length} characters"
                " without control characters"
            )
        return value

    def call_id(self, key: str) -> str:
        value = self.data.get(key)
        if not valid_call_id(value, self.limits.max_call_id_length):
            self.fail(
                f"'{key}' must be a call id of 1-{self.limits.max_call_id_length}"
                " characters from [A-Za-z0-9._:-]"
            )
        return value

    def description(self, key: str, allowed_types: tuple[str, ...]) -> None:
        value = self.data.get(key)
        if not isinstance(value, dict):
            self.fail(f"'{key}' must be an object {{type, sdp}}")
        kind = value.get("type")
        if kind not in allowed_types:
            self.fail(f"'{key}.type' must be one of {', '.join(allowed_types)}")
        sdp = value.get("sdp")
        if not isinstance(sdp, str):
            self.fail(f"'{key}.sdp' must be a string")
        if len(sdp) > self.limits.max_sdp_bytes or (
            len(sdp) * 4 > self.limits.max_sdp_bytes
            and len(sdp.encode("utf-8")) > self.limits.max_sdp_bytes
        ):
            self.fail(f"'{key}.sdp' is over {self.limits.max_sdp_bytes} bytes")

    def candidate(self, key: str) -> None:
        if key not in self.data:
            self.fail(f"'{key}' is required (use null for end-of-candidates)")
        value = self.data[key]
        if value is None:
            return
        if not isinstance(value, dict):
            self.fail(f"'{key}' must be an RTCIceCandidate object or null")
        text = value.get("candidate")
        if not isinstance(text, str):
            self.fail(f"'{key}.candidate' must be a string")
        limit = self.limits.max_candidate_bytes
        # A character is at most 4 bytes: only encode what could be over the limit.
        if len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit:
            self.fail(f"'{key}.candidate' is over {self.limits.max_candidate_bytes} bytes")
        for name in ("sdpMid", "usernameFragment"):
            part = value.get(name)
            if part is not None and (not isinstance(part, str) or len(part) > MAX_SHORT_STRING):
                self.fail(f"'{key}.{name}' must be a short string or null")
        index = value.get("sdpMLineIndex")
        if index is not None and (
            not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= 65535
        ):
            self.fail(f"'{key}.sdpMLineIndex' must be an integer 0-65535 or null")

    def optional_timestamp(self, key: str) -> None:
        value = self.data.get(key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            self.fail(f"'{key}' must be milliseconds since the epoch")


def _read_ref(envelope: Mapping[str, Any]) -> Ref | None:
    if "ref" not in envelope:
        return None
    ref = envelope["ref"]
    if isinstance(ref, str) and len(ref) <= MAX_REF_LENGTH:  # "" too: the contract allows it
        return ref
    if isinstance(ref, int) and not isinstance(ref, bool) and abs(ref) <= MAX_SAFE_INTEGER:
        return ref
    raise ProtocolError(
        ErrorCode.INVALID_MESSAGE,
        f"'ref' must be a string of at most {MAX_REF_LENGTH} characters or a safe integer",
    )


def _readable_ref(envelope: object) -> Ref | None:
    """The envelope's `ref` if it is a valid one, else None (for errors about the whole frame)."""
    if not isinstance(envelope, dict):
        return None
    try:
        return _read_ref(envelope)
    except ProtocolError:
        return None


def _decode_auth(fields: _Fields) -> Auth:
    # A token that is missing, empty, not a string or too long is no malformed message but an
    # invalid token (contract 2), on a sign-in and on a renewal alike: it reads as "", which
    # `valid_token` refuses where the token is used.
    token = fields.data.get("token")
    resume = fields.data.get("resume")
    if resume is not None and (not isinstance(resume, str) or len(resume) > MAX_REF_LENGTH):
        fields.fail("'resume' must be a session id string")
    return Auth(token=token if valid_token(token) else "", resume=resume)


def _decode_call_request(fields: _Fields) -> CallRequest:
    call_id = fields.call_id("id")
    from_user = fields.user_id("from")
    to = fields.user_id("to")
    media = fields.data.get("type")
    if media not in ("video", "voice"):
        fields.fail("'type' must be 'video' or 'voice'")
    fields.description("offer", ("offer",))
    fields.optional_timestamp("timestamp")
    media_kind: Media = "video" if media == "video" else "voice"
    return CallRequest(call_id, from_user, to, media_kind, fields.data)


def _decode_answer(fields: _Fields) -> CallAnswer:
    call_id, to = fields.call_id("callId"), fields.user_id("to")
    fields.description("answer", ("answer",))
    return CallAnswer(call_id, to, fields.data)


def _decode_reject(fields: _Fields) -> CallReject:
    return CallReject(fields.call_id("callId"), fields.user_id("to"), fields.data)


def _decode_end(fields: _Fields) -> CallEnd:
    return CallEnd(fields.call_id("callId"), fields.user_id("to"), fields.data)


def _decode_ice(fields: _Fields) -> IceCandidate:
    call_id, to = fields.call_id("callId"), fields.user_id("to")
    fields.candidate("candidate")
    return IceCandidate(call_id, to, fields.data)


def _decode_renegotiate(fields: _Fields) -> CallRenegotiate:
    call_id, to = fields.call_id("callId"), fields.user_id("to")
    fields.description("description", ("offer", "answer"))
    return CallRenegotiate(call_id, to, fields.data)


# The most ids one `missed-calls-ack` may name (more than any user's list holds), and their length.
MAX_ACK_IDS = 1000
MAX_MISSED_ID_LENGTH = 64


def _decode_missed_calls_ack(fields: _Fields) -> MissedCallsAck:
    ids = fields.data.get("ids")
    if (
        not isinstance(ids, list)
        or len(ids) > MAX_ACK_IDS
        or not all(isinstance(i, str) and 0 < len(i) <= MAX_MISSED_ID_LENGTH for i in ids)
    ):
        fields.fail(
            f"'ids' must be a list of at most {MAX_ACK_IDS} missed-call ids"
            f" (strings of 1-{MAX_MISSED_ID_LENGTH} characters)"
        )
    return MissedCallsAck(frozenset(ids), fields.data)


_DECODERS: dict[str, Callable[[_Fields], ClientMessage]] = {
    AUTH: _decode_auth,
    CALL_REQUEST: _decode_call_request,
    CALL_ANSWER: _decode_answer,
    CALL_REJECT: _decode_reject,
    CALL_END: _decode_end,
    ICE_CANDIDATE: _decode_ice,
    CALL_RENEGOTIATE: _decode_renegotiate,
    MISSED_CALLS_ACK: _decode_missed_calls_ack,
}


def decode(text: str, limits: FieldLimits) -> Envelope:
    """Decode one text frame.

    Raises:
        ProtocolError: `invalid_message` or `unknown_event`, with the frame's `ref` when readable.
    """
    return decode_object(parse_json(text), limits)


def decode_object(envelope: object, limits: FieldLimits) -> Envelope:
    """Decode an already parsed envelope (the Socket.IO dialect builds one from its packets).

    Raises:
        ProtocolError: as `decode`.
    """
    if not isinstance(envelope, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "a message must be a JSON object")
    ref = _read_ref(envelope)
    event = envelope.get("event")
    if not isinstance(event, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'event' must be a string", ref)
    data = envelope.get("data")
    if event == USER_CONNECTED:
        # The original design sends the bare user id string as data. Whatever else it holds
        # (another id, no id at all, no data) is the switchboard's `forbidden` (contract 3).
        return Envelope(UserConnected(data if isinstance(data, str) else None), ref)
    decoder = _DECODERS.get(event)
    if decoder is None:
        raise ProtocolError(ErrorCode.UNKNOWN_EVENT, f"unknown event {excerpt(event)}", ref)
    if not isinstance(data, dict):
        if event == AUTH:  # no token in it: an invalid token, as in `_decode_auth`
            return Envelope(Auth(token=""), ref)
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"{event}: 'data' must be an object", ref)
    return Envelope(decoder(_Fields(event, data, ref, limits)), ref)


MAX_EXCERPT = 32


def excerpt(text: str) -> str:
    """What an error may echo of a client's text: its first `MAX_EXCERPT` characters, each
    printable ASCII or else `?`, quoted. Never more, so an error cannot carry a token or any
    other secret a client put in the wrong field back out (to logs, proxies, screens)."""
    shown = "".join(char if " " <= char <= "~" else "?" for char in text[:MAX_EXCERPT])
    return json.dumps(shown + ("..." if len(text) > MAX_EXCERPT else ""))


def peek_ref(text: str) -> Ref | None:
    """The `ref` of a frame the server will not process (rate limited), if it has a valid one."""
    try:
        return _readable_ref(parse_json(text))
    except ProtocolError:
        return None


def encode(event: str, data: Mapping[str, Any] | None = None, ref: Ref | None = None) -> str:
    """One server message as compact JSON text (UTF-8 on the wire)."""
    message: dict[str, Any] = {"event": event}
    if data is not None:
        message["data"] = data
    if ref is not None:
        message["ref"] = ref
    return dump_json(message)


def dump_json(value: Any) -> str:
    """Compact JSON text (orjson: several times faster than the standard library here).

    Raises: UnencodableMessage."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as err:
        raise UnencodableMessage(str(err)) from None


def encode_error(
    code: ErrorCode, message: str, ref: Ref | None = None, retry_after: int | None = None
) -> str:
    data: dict[str, Any] = {"code": code.value, "message": message}
    if retry_after is not None:
        data["retryAfter"] = retry_after
    return encode("error", data, ref)
