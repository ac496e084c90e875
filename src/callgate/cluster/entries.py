"""The cluster log's entries: core events, signed by the node that saw them.

Every node of a cluster runs a replica of the same switchboard. Whatever a node's clients do
becomes a core event; the node appends it to one shared, totally ordered log (a Redis stream),
and every node applies every entry, in log order, to its replica. The switchboard is
deterministic (it reads no clock and draws no randomness: `now`, session ids and rate-limit
decisions travel in the entry), so all replicas agree on every call, and busy, glare, "first
answer wins" and "the ring timeout fires once" hold across nodes by construction.

An entry is `p` (the JSON payload) and `m` (HMAC-SHA256 over a domain tag, the cluster name and
the payload, with the cluster key). A client of Redis without the key cannot forge one, and a
copy of a real entry is refused because each origin node numbers its entries (`s`) and replicas
accept only increasing numbers. This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from callgate.core.events import (
    Authenticated,
    Disconnected,
    Event,
    MessageReceived,
    OperatorDisconnectedUser,
    OperatorEndedCall,
    RevocationChanged,
    TimerFired,
    TokenRefreshed,
)
from callgate.core.policy import Throttled
from callgate.protocol.codec import FieldLimits, ProtocolError, decode_object

VERSION = 1
_DOMAIN = b"callgate-cluster-entry-v1\x00"
_SNAPSHOT = b"snapshot\x00"  # prefixed: a snapshot's signature is never an entry's
_HEARTBEAT = b"heartbeat\x00"
_LEASE = b"lease\x00"
MAX_ENTRY_BYTES = 4 * 1024 * 1024
# Connection ids are `<node id>.<random>`: the node part says where a device is connected.
NODE_SEPARATOR = "."


def node_of(conn: str) -> str:
    return conn.partition(NODE_SEPARATOR)[0]


@dataclass(frozen=True, slots=True)
class NodeDown:
    """A node stopped heartbeating: each of its online devices is disconnected."""

    node: str


ClusterEvent = Event | NodeDown


@dataclass(frozen=True, slots=True)
class Entry:
    """One verified log entry: who appended it, its number at that node, when, and what."""

    origin: str
    seq: int
    now: float
    event: ClusterEvent
    # The ingress node's rate-limit decision for a call-request (replicas do not count again).
    throttled: Throttled | None = None


class BadEntry(Exception):
    """An entry that is refused: `reason` is one word for the audit trail."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EntryCodec:
    def __init__(self, cluster: str, key: bytes, limits: FieldLimits) -> None:
        self._prefix = _DOMAIN + cluster.encode() + b"\x00"
        self._key = key
        self._limits = limits

    def _mac(self, payload: bytes, domain: bytes = b"") -> bytes:
        message = domain + self._prefix + payload
        return hmac.new(self._key, message, hashlib.sha256).hexdigest().encode()

    def _seal_value(self, domain: bytes, body: dict[str, Any]) -> bytes:
        payload = orjson.dumps({"v": VERSION, **body})
        return orjson.dumps({"p": payload.decode(), "m": self._mac(payload, domain).decode()})

    def _open_value(self, domain: bytes, sealed: bytes) -> dict[str, Any]:
        """Raises: BadEntry("malformed" | "bad_mac")."""
        try:
            outer = orjson.loads(sealed)
            payload, mac = outer["p"].encode(), outer["m"].encode()
        except (KeyError, TypeError, AttributeError, ValueError):
            raise BadEntry("malformed") from None
        if not hmac.compare_digest(self._mac(payload, domain), mac):
            raise BadEntry("bad_mac")
        body = orjson.loads(payload)
        if not isinstance(body, dict) or body.get("v") != VERSION:
            raise BadEntry("malformed")
        return body

    def _verified(self, domain: bytes, sealed: bytes | None) -> dict[str, Any]:
        """A value's body, or {} when it is absent or does not verify (no decision rests on it)."""
        try:
            return self._open_value(domain, sealed or b"")
        except (BadEntry, ValueError):
            return {}

    def seal_snapshot(self, position: bytes, state: dict[str, Any]) -> bytes:
        """A signed snapshot: the replica's state after the log entry `position`."""
        return self._seal_value(_SNAPSHOT, {"position": position.decode(), "state": state})

    def open_snapshot(self, sealed: bytes) -> tuple[bytes, dict[str, Any]]:
        """Raises: BadEntry("malformed" | "bad_mac")."""
        body = self._open_value(_SNAPSHOT, sealed)
        return str(body["position"]).encode(), body["state"]

    def seal_heartbeat(self, node: str, beat: int) -> bytes:
        """A node's heartbeat value: its id and a number that grows with every beat."""
        return self._seal_value(_HEARTBEAT, {"node": node, "beat": beat})

    def open_heartbeat(self, sealed: bytes | None, node: str) -> int | None:
        """The beat number of `node`'s heartbeat value; None if it is absent or not genuine."""
        body = self._verified(_HEARTBEAT, sealed)
        beat = body.get("beat")
        if body.get("node") != node or not isinstance(beat, int) or isinstance(beat, bool):
            return None
        return beat

    def seal_lease(self, node: str, expires: float) -> bytes:
        """The leader lease's value: who holds it and until when (unix time)."""
        return self._seal_value(_LEASE, {"node": node, "until": expires})

    def open_lease(self, sealed: bytes | None, now: float) -> str | None:
        """The holder of a genuine, unexpired lease value; None means no lease at all."""
        body = self._verified(_LEASE, sealed)
        holder, until = body.get("node"), body.get("until")
        if not isinstance(holder, str) or not isinstance(until, int | float) or until <= now:
            return None
        return holder

    def seal(self, entry: Entry) -> dict[bytes, bytes]:
        """The stream fields of an entry."""
        body = {"v": VERSION, "o": entry.origin, "s": entry.seq, "t": entry.now}
        body.update(_event_fields(entry.event))
        if entry.throttled is not None:
            body["th"] = [entry.throttled.limit, entry.throttled.retry_after]
        payload = orjson.dumps(body)
        return {b"p": payload, b"m": self._mac(payload)}

    def open(self, fields: Mapping[bytes, bytes]) -> Entry:
        """Raises: BadEntry("malformed" | "bad_mac")."""
        payload, mac = fields.get(b"p"), fields.get(b"m")
        if not isinstance(payload, bytes) or not isinstance(mac, bytes):
            raise BadEntry("malformed")
        if len(payload) > MAX_ENTRY_BYTES:
            raise BadEntry("malformed")
        if not hmac.compare_digest(self._mac(payload), mac):
            raise BadEntry("bad_mac")
        try:
            body = orjson.loads(payload)
            return _entry(body, self._limits)
        except (KeyError, TypeError, ValueError, ProtocolError):
            # Signed with our key but not understood: a newer or broken node.
            raise BadEntry("malformed") from None


def _event_fields(event: ClusterEvent) -> dict[str, Any]:
    match event:
        case Authenticated():
            return {
                "k": "auth",
                "conn": event.conn,
                "user": event.user,
                "sid": event.session_id,
                "session": dict(event.session),
                "resume": event.resume,
                "jti": event.token_id,
                "iat": event.issued_at,
            }
        case TokenRefreshed():
            return {
                "k": "refresh",
                "conn": event.conn,
                "sid": event.session_id,
                "session": dict(event.session),
                "jti": event.token_id,
                "iat": event.issued_at,
            }
        case MessageReceived(conn=conn, message=message, ref=ref):
            data = getattr(message, "data", None)
            if data is None:  # user-connected: its data is the bare user id, as on the wire
                data = getattr(message, "user", None)
            return {"k": "msg", "conn": conn, "e": message.event, "d": data, "r": ref}
        case Disconnected(conn=conn):
            return {"k": "gone", "conn": conn}
        case TimerFired(timer=timer):
            return {"k": "timer", "id": timer}
        case RevocationChanged(token_ids=tokens, users_before=users):
            return {"k": "revoke", "tokens": sorted(tokens), "users": dict(users)}
        case NodeDown(node=node):
            return {"k": "down", "node": node}
        case OperatorEndedCall(call_id=call_id, user=user):
            return {"k": "op_end", "call": call_id, "user": user}
        case OperatorDisconnectedUser(user=user, code=code, reason=reason):
            return {"k": "op_disconnect", "user": user, "code": code, "reason": reason}
    raise TypeError(f"{type(event).__name__} is not replicated")


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _optional_number(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError("expected a number")
    return float(value)


def _entry(body: dict[str, Any], limits: FieldLimits) -> Entry:
    if body["v"] != VERSION:
        raise ValueError("unknown version")
    seq, now = body["s"], body["t"]
    if not isinstance(seq, int) or not isinstance(now, int | float):
        raise TypeError("bad header")
    throttled = None
    if body.get("th") is not None:
        limit, retry = body["th"]
        throttled = Throttled(_text(limit), int(retry))
    return Entry(_text(body["o"]), seq, float(now), _event(body, limits), throttled)


def _event(body: dict[str, Any], limits: FieldLimits) -> ClusterEvent:
    kind = body["k"]
    if kind == "auth":
        return Authenticated(
            _text(body["conn"]),
            _text(body["user"]),
            session_id=_text(body["sid"]),
            session=dict(body["session"]),
            resume=_optional_text(body["resume"]),
            token_id=_optional_text(body["jti"]),
            issued_at=_optional_number(body["iat"]),
        )
    if kind == "refresh":
        return TokenRefreshed(
            _text(body["conn"]),
            _text(body["sid"]),
            dict(body["session"]),
            _optional_text(body["jti"]),
            _optional_number(body["iat"]),
        )
    if kind == "msg":
        envelope = {"event": body["e"], "data": body["d"]}
        if body["r"] is not None:
            envelope["ref"] = body["r"]
        decoded = decode_object(envelope, limits)
        return MessageReceived(_text(body["conn"]), decoded.message, decoded.ref)
    if kind == "gone":
        return Disconnected(_text(body["conn"]))
    if kind == "timer":
        timer = body["id"]
        if not isinstance(timer, int):
            raise TypeError("timer id")
        return TimerFired(timer)
    if kind == "revoke":
        users = {_text(user): float(at) for user, at in dict(body["users"]).items()}
        return RevocationChanged(frozenset(_text(t) for t in body["tokens"]), users)
    if kind == "down":
        return NodeDown(_text(body["node"]))
    if kind == "op_end":
        return OperatorEndedCall(_text(body["call"]), _optional_text(body["user"]))
    if kind == "op_disconnect":
        code = body["code"]
        if not isinstance(code, int) or isinstance(code, bool):
            raise TypeError("close code")
        return OperatorDisconnectedUser(_text(body["user"]), code, _text(body["reason"]))
    raise ValueError("unknown kind")
