"""Signed values that nodes exchange through Redis: heartbeats, the lease, death, deliveries.

Nothing unsigned read from Redis decides anything. Each value here is signed with the cluster key
(HMAC-SHA256 over a domain tag, the cluster name and the payload), with a domain tag per kind so
that one is never taken for another. Deliveries (actions for another node's connections) also
name their target node and carry their origin's number, so a copy is refused, and the time
their origin sealed them, so a copy kept longer than a node remembers numbers is refused too
(`is_stale`, `forgettable`). Pure: no I/O, no clock. (The shared call state's records are
signed in records.py.)
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from callgate.core.actions import Ack, Close, Deliver, SendError
from callgate.errors import ErrorCode
from callgate.hmac_sha256 import HmacSha256

VERSION = 2
_DOMAIN = b"callgate-cluster-v2\x00"
_HEARTBEAT = b"heartbeat\x00"
_LEASE = b"lease\x00"
_DEAD = b"dead\x00"
_EPOCH = b"epoch\x00"
_REVOCATIONS = b"revocations\x00"
_DELIVERY = b"delivery\x00"
_LINK = b"link\x00"
_TIMER_DUE = b"timer-due\x00"
MAC_BYTES = 64  # hex of HMAC-SHA256
MAX_DELIVERY_BYTES = 8 * 1024 * 1024
# Connection ids are `<node id>.<random>`: the node part says where a device is connected.
NODE_SEPARATOR = "."


def node_of(conn: str) -> str:
    return conn.partition(NODE_SEPARATOR)[0]


@dataclass(frozen=True, slots=True)
class Forget:
    """Drop this node's cached route of `user`'s call `call_id` (it changed elsewhere)."""

    user: str
    call_id: str


@dataclass(frozen=True, slots=True)
class Learn:
    """`user`'s device `conn` on this node is in connected call `call_id`: its messages go to
    `peer`'s devices `peer_conns` (the route, told by the node that connected or moved it)."""

    user: str
    call_id: str
    conn: str
    peer: str
    peer_conns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NodeGone:
    """Node `node` was declared dead: send nothing more to it, and forget routes through it."""

    node: str


# What one node asks another to do: deliveries (with the device's user, when known, so that a
# delivery that finds no connection can follow the device), acks, errors, closes, and the routes
# of connected calls (Learn, Forget, NodeGone).
Order = Deliver | Ack | SendError | Close | Forget | Learn | NodeGone


@dataclass(frozen=True, slots=True)
class Delivery:
    """A verified batch of orders from `origin` for this node, sealed at `at` (unix
    milliseconds, on the origin's clock; None from a node of the release before batches were
    dated, which still speaks VERSION 2)."""

    origin: str
    seq: int
    orders: list[tuple[Order, str | None]]
    at: int | None = None

    @property
    def messages(self) -> int:
        """How many deliveries to devices it holds (what refusing it keeps from them)."""
        return sum(1 for order, _ in self.orders if isinstance(order, Deliver))


def is_stale(delivery: Delivery, now: float, max_age: float) -> bool:
    """Sealed more than `max_age` seconds before `now` (unix seconds): refused, whether a
    genuine batch held that long (Redis away for longer) or a recorded one appended again.
    An undated batch (the previous release's) is never stale: its origin is never forgotten."""
    return delivery.at is not None and delivery.at < (now - max_age) * 1000


def is_from_the_future(delivery: Delivery, now: float, max_age: float) -> bool:
    """Sealed more than `max_age` seconds after `now` (unix seconds): its sender's clock runs
    ahead by more than the cluster tolerates. Refused: a batch dated that far ahead would stay
    fresh, and keep its sender remembered, for as long as the clock was wrong."""
    return delivery.at is not None and delivery.at > (now + max_age) * 1000


def heard_time(delivery: Delivery, now: float) -> float:
    """When to count `delivery`'s sender as last heard from (unix seconds, for `forgettable`):
    now, or the batch's own time if its sender's clock runs ahead of this node's, so a copy of
    it is stale by the time its sender is forgotten, whatever the two clocks say."""
    return now if delivery.at is None else max(now, delivery.at / 1000)


def forget_after(max_age: float) -> float:
    """Seconds without a dated batch from an origin after which its marks may be forgotten:
    `max_age`, and as much again as a margin for the clocks of two nodes, which NTP keeps far
    closer than that."""
    return 2 * max_age


def forgettable(heard: Mapping[str, float], now: float, max_age: float) -> list[str]:
    """The origins whose last batch carried out here was dated, and carried out (at
    `heard[origin]`, unix seconds on this node's clock) more than `forget_after(max_age)`
    before `now`. Any batch of theirs that this node carried out was sealed before that, so
    a copy of it appended again is refused as stale: forgetting its number reopens no replay."""
    horizon = now - forget_after(max_age)
    return [origin for origin, when in heard.items() if when < horizon]


class Heartbeat(NamedTuple):
    """A node's genuine heartbeat: its beat number, how far it had read its inbox, per origin
    the number of the last batch it had carried out, and when it beat (unix milliseconds on
    its clock; None from a node of the release before beats were dated)."""

    beat: int
    read: str
    done: dict[str, int]
    at: int | None = None

    def older_than(self, max_age_ms: int, now_ms: int) -> bool:
        """Sealed more than `max_age_ms` before `now_ms`: a value kept past its expiry (a
        recorded one put back). An undated beat (the previous release's) never is."""
        return self.at is not None and self.at < now_ms - max_age_ms


# A revocation list's version: its generation (unix milliseconds when written, and always past
# the one it replaced), then the id of the node that wrote it (orders two written at once).
RevocationVersion = tuple[int, str]


@dataclass(frozen=True, slots=True)
class Revocations:
    """A verified revocation list of the cluster: tokens by `jti`, users' tokens issued before a
    time, and its version."""

    token_ids: frozenset[str]
    users_before: dict[str, float]
    version: RevocationVersion


class BadEntry(Exception):
    """A value or delivery that is refused: `reason` is one word for the audit trail."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EntryCodec:
    def __init__(self, cluster: str, key: bytes) -> None:
        self._prefix = _DOMAIN + cluster.encode() + b"\x00"
        self._hmac = HmacSha256(key)

    def _mac(self, payload: bytes, domain: bytes) -> bytes:
        return self._hmac.digest(domain + self._prefix + payload).hex().encode()

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

    def seal_heartbeat(
        self,
        node: str,
        beat: int,
        read_up_to: str = "0-0",
        link: str = "",
        done: Mapping[str, int] | None = None,
        at: int | None = None,
    ) -> bytes:
        """A node's heartbeat value: its id, a number that grows with every beat, how far it
        has read its inbox and, per origin, the number of the last batch it carried out (what
        a node burying it need not hand over again), the `host:port` its direct links listen
        on ("" = none; links.py), and when it beat (`at`, unix milliseconds: a recorded
        `last:<node>` put back after it expired does not count as evidence that it ran)."""
        body: dict[str, Any] = {"node": node, "beat": beat, "read": read_up_to, "link": link}
        body["done"] = dict(done or {})
        if at is not None:
            body["at"] = at
        return self._seal_value(_HEARTBEAT, body)

    def link_of(self, sealed: bytes | None, node: str) -> str | None:
        """Where `node`'s direct links listen, from its genuine heartbeat; None if it has no
        link, or the value is absent or not genuine (then deliveries take its inbox)."""
        body = self._verified(_HEARTBEAT, sealed)
        link = body.get("link")
        if body.get("node") != node or not isinstance(link, str) or not link:
            return None
        return link

    def open_heartbeat(self, sealed: bytes | None, node: str) -> int | None:
        """The beat number of `node`'s heartbeat value; None if it is absent or not genuine."""
        beat = self.read_heartbeat(sealed, node)
        return None if beat is None else beat[0]

    def read_heartbeat(self, sealed: bytes | None, node: str) -> tuple[int, str] | None:
        """`node`'s beat number and inbox position; None if absent or not genuine."""
        heartbeat = self.heartbeat(sealed, node)
        return None if heartbeat is None else (heartbeat.beat, heartbeat.read)

    def heartbeat(self, sealed: bytes | None, node: str) -> Heartbeat | None:
        """`node`'s genuine heartbeat, verified once; None if absent or not genuine."""
        body = self._verified(_HEARTBEAT, sealed)
        beat, read, done = body.get("beat"), body.get("read", "0-0"), body.get("done")
        if body.get("node") != node or not isinstance(beat, int) or isinstance(beat, bool):
            return None
        marks = (
            {str(k): v for k, v in done.items() if type(v) is int} if isinstance(done, dict) else {}
        )
        at = body.get("at")
        return Heartbeat(beat, str(read), marks, at if type(at) is int else None)

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

    def seal_epoch(self, token: str) -> bytes:
        """The value that marks one Redis dataset (a new one after a restart without data)."""
        return self._seal_value(_EPOCH, {"epoch": token})

    def seal_dead(self, node: str, *, buried: bool = False) -> bytes:
        """The cluster's verdict that `node` is dead (it reads it, and closes what it holds);
        `buried`: written again once its burial is done (a member of that name is then never
        buried again). The previous release reads only `node`."""
        body: dict[str, Any] = {"node": node}
        if buried:
            body["buried"] = True
        return self._seal_value(_DEAD, body)

    def is_dead(self, sealed: bytes | None, node: str) -> bool:
        return self._verified(_DEAD, sealed).get("node") == node

    def is_buried(self, sealed: bytes | None, node: str) -> bool:
        """Whether `sealed` is the verdict on `node` written once its burial was done."""
        body = self._verified(_DEAD, sealed)
        return body.get("node") == node and body.get("buried") is True

    def seal_revocations(
        self, tokens: frozenset[str], users: Mapping[str, float], version: RevocationVersion
    ) -> bytes:
        """The cluster's revocation list, with its version: (a number that only grows, the
        node that wrote it). Nodes take a list only if it is newer than theirs, so an older
        genuine value put back by a Redis client without the key un-revokes nothing."""
        generation, node = version
        body = {"tokens": sorted(tokens), "users": dict(users), "gen": generation, "by": node}
        return self._seal_value(_REVOCATIONS, body)

    def open_revocations(self, sealed: bytes | None) -> Revocations | None:
        """The cluster's revocation list and its version; None when absent or not genuine."""
        body = self._verified(_REVOCATIONS, sealed)
        tokens, users = body.get("tokens"), body.get("users")
        generation, node = body.get("gen", 0), body.get("by", "")
        if not isinstance(tokens, list) or not isinstance(users, dict):
            return None
        if type(generation) is not int or not isinstance(node, str):
            return None
        return Revocations(
            frozenset(str(t) for t in tokens),
            {str(u): float(t) for u, t in users.items() if isinstance(t, int | float)},
            (generation, node),
        )

    def seal_timer_due(self, member: str, deadline: float) -> bytes:
        """When the shared timer `member` is due (unix seconds): the timer set's scores are
        unsigned, so a node fires a claimed timer only once this says it is due."""
        return self._seal_value(_TIMER_DUE, {"timer": member, "due": deadline})

    def open_timer_due(self, sealed: bytes | None, member: str) -> float | None:
        """`member`'s genuine deadline; None when absent or not genuine."""
        body = self._verified(_TIMER_DUE, sealed)
        due = body.get("due")
        if body.get("timer") != member or not isinstance(due, int | float):
            return None
        return float(due)

    def seal_link(self, kind: str, body: dict[str, Any]) -> bytes:
        """A direct link's control frame (hello, welcome, ack): its MAC, then its payload."""
        payload = orjson.dumps({"v": VERSION, "k": kind, **body})
        return self._mac(payload, _LINK) + payload

    def open_link(self, frame: bytes, kind: str) -> dict[str, Any]:
        """Raises: BadEntry("malformed" | "bad_mac")."""
        mac, payload = frame[:MAC_BYTES], frame[MAC_BYTES:]
        if not hmac.compare_digest(self._mac(payload, _LINK), mac):
            raise BadEntry("bad_mac")
        try:
            body = orjson.loads(payload)
        except ValueError:
            raise BadEntry("malformed") from None
        if not isinstance(body, dict) or body.get("v") != VERSION or body.get("k") != kind:
            raise BadEntry("malformed")
        return body

    def seal_delivery(
        self,
        origin: str,
        target: str,
        seq: int,
        orders: list[tuple[Order, str | None]],
        *,
        at: int | None,
    ) -> dict[bytes, bytes]:
        """The stream fields of a batch of orders for node `target`, sealed at `at` (unix
        milliseconds; None only to stand for the previous release, which did not date them)."""
        body: dict[str, Any] = {
            "v": VERSION,
            "o": origin,
            "t": target,
            "s": seq,
            "a": [_order(o, u) for o, u in orders],
        }
        if at is not None:
            body["at"] = at
        payload = orjson.dumps(body)
        return {b"p": payload, b"m": self._mac(payload, _DELIVERY)}

    def open_delivery(self, fields: Mapping[bytes, bytes], target: str) -> Delivery:
        """Raises: BadEntry("malformed" | "bad_mac" | "misrouted")."""
        payload, mac = fields.get(b"p"), fields.get(b"m")
        if not isinstance(payload, bytes) or not isinstance(mac, bytes):
            raise BadEntry("malformed")
        if len(payload) > MAX_DELIVERY_BYTES:
            raise BadEntry("malformed")
        if not hmac.compare_digest(self._mac(payload, _DELIVERY), mac):
            raise BadEntry("bad_mac")
        try:
            body = orjson.loads(payload)
            if body["v"] != VERSION:
                raise BadEntry("malformed")
            if body["t"] != target:
                raise BadEntry("misrouted")
            orders = [_read_order(item) for item in body["a"]]
            at = body.get("at")
            if at is not None and type(at) is not int:
                raise BadEntry("malformed")
            return Delivery(str(body["o"]), int(body["s"]), orders, at)
        except (KeyError, TypeError, ValueError, IndexError):
            # Signed with our key but not understood: a newer or broken node.
            raise BadEntry("malformed") from None


def _order(order: Order, user: str | None) -> list[Any]:
    match order:
        case Deliver(conn=conn, event=event, data=data):
            return ["d", conn, user, event, dict(data)]
        case Ack(conn=conn, ref=ref):
            return ["a", conn, ref]
        case SendError(conn=conn, code=code, message=message, ref=ref, retry_after=retry):
            return ["e", conn, code.value, message, ref, retry]
        case Close(conn=conn, code=code, reason=reason):
            return ["c", conn, code, reason]
        case Forget(user=forget_user, call_id=call_id):
            return ["x", forget_user, call_id]
        case Learn(user=learn_user, call_id=call_id, conn=conn, peer=peer, peer_conns=conns):
            return ["l", learn_user, call_id, conn, peer, list(conns)]
        case NodeGone(node=node):
            return ["g", node]


def _read_order(item: list[Any]) -> tuple[Order, str | None]:
    kind = item[0]
    if kind == "d":
        _, conn, user, event, data = item
        if not isinstance(data, dict):
            raise TypeError("delivery data")
        return Deliver(str(conn), str(event), data), (None if user is None else str(user))
    if kind == "a":
        return Ack(str(item[1]), item[2]), None
    if kind == "e":
        _, conn, code, message, ref, retry = item
        return SendError(str(conn), ErrorCode(code), str(message), ref, retry), None
    if kind == "c":
        return Close(str(item[1]), int(item[2]), str(item[3])), None
    if kind == "x":
        return Forget(str(item[1]), str(item[2])), None
    if kind == "g":
        return NodeGone(str(item[1])), None
    if kind == "l":
        _, user, call_id, conn, peer, conns = item
        learned = Learn(str(user), str(call_id), str(conn), str(peer), tuple(map(str, conns)))
        return learned, None
    raise ValueError(f"unknown order {kind!r}")
