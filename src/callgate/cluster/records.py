"""The cluster's shared state as signed records, and one event's slice of it as a switchboard.

Theory of operation
-------------------
A cluster keeps no replica of the switchboard anywhere. Its state lives in Redis as records:

* `u:<user>`: the user's devices (online or held, with session ids and resume buffers), the
  missed calls not yet acknowledged, and the keys of the calls the user takes part in;
* `c:<call key>`: one live call (the `Call` of core/calls.py as plain data).

When something happens on a node (a sign-in, a message, a disconnect, a timer), the node loads
the records of the users the event concerns, with their calls and the other participants of those
calls (`Scope`), builds a switchboard holding exactly that (`Slice.board`), lets the unchanged
core decide (`handle`), and writes back what changed, atomically and only if nothing it read
changed meanwhile (store.py's compare-and-set; on a conflict it loads again and decides again).
So busy, glare, "the first answer wins" and "the ring timeout fires once" hold across nodes with
the very code the single-node tests walk through every state, and no node holds or applies
anything its own clients are not part of.

Every record is `hex(HMAC-SHA256(cluster key, domain, cluster name, record name, payload))`
followed by the JSON payload. The name is signed too, so a record cannot be moved to another key;
a Redis client without the cluster key can delete a record (as a Redis restart would) or put back
an older genuine value of the same key, but never make one up. Pure: no I/O, no clock.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from callgate.cluster.entries import node_of
from callgate.core.actions import Action, CancelTimer, StartTimer
from callgate.core.events import TimerId
from callgate.core.policy import CallRules, CallThrottle
from callgate.core.switchboard import Switchboard
from callgate.hmac_sha256 import HmacSha256
from callgate.protocol.messages import UserId

_DOMAIN = b"callgate-cluster-record-v1\x00"
MAC_HEX = 64  # the length of the hex MAC in front of every record's payload
USER_PREFIX = "u:"
CALL_PREFIX = "c:"
# A field of a compare-and-set that keeps the record as read (store.py's commit script).
KEEP = b"="
# Longest member of the shared timer set a node writes: a 20-digit id, "|", a user id (user
# ids are bounded far below this by `[server] max_user_id_length`).
MAX_TIMER_MEMBER = 1024


class BadRecord(Exception):
    """A record that does not verify: `reason` is one word for the audit trail."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class RecordCodec:
    def __init__(self, cluster: str, key: bytes) -> None:
        self._cluster = cluster.encode()
        self._hmac = HmacSha256(key)

    def _mac(self, name: str, payload: bytes) -> bytes:
        message = b"%s%s\x00%s\x00%s" % (_DOMAIN, self._cluster, name.encode(), payload)
        return self._hmac.digest(message).hex().encode()

    def seal(self, name: str, payload: Mapping[str, Any]) -> bytes:
        body = orjson.dumps(payload)
        return self._mac(name, body) + body

    def open(self, name: str, raw: bytes) -> dict[str, Any]:
        """The verified payload of record `name`. Raises: BadRecord("bad_mac" | "malformed")."""
        mac, body = raw[:MAC_HEX], raw[MAC_HEX:]
        if not hmac.compare_digest(mac, self._mac(name, body)):
            raise BadRecord(name, "bad_mac")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadRecord(name, "malformed") from None
        if not isinstance(payload, dict):
            raise BadRecord(name, "malformed")
        return payload

    def online_nodes(self, user: UserId, raw: bytes) -> set[str]:
        """The nodes where `user`'s record says they have an online device (those nodes'
        presence sets list them). Raises: BadRecord("bad_mac" | "malformed")."""
        name = USER_PREFIX + user
        devices = self.open(name, raw).get("devices")
        try:
            return _online_nodes(devices) if isinstance(devices, list) else set()
        except (KeyError, TypeError, AttributeError):
            raise BadRecord(name, "malformed") from None


def empty_user() -> dict[str, Any]:
    return {"devices": [], "missed": [], "calls": []}


@dataclass(slots=True)
class Timer:
    """A core timer as the shared sorted set holds it: its id and the user to load to fire it."""

    timer: TimerId
    user: UserId

    @property
    def member(self) -> str:
        return f"{self.timer}|{self.user}"

    @staticmethod
    def parse(member: str) -> Timer | None:
        """A member of the shared timer set, or None for one no node wrote (the set is
        unsigned: anything may be in it): only the form `member` gives, ASCII digits without
        leading zeros (`isdigit` alone also takes digits `int` refuses, such as "²"; "0123|a"
        would name timer 123 under another member)."""
        timer, sep, user = member.partition("|")
        if not sep or not user or len(member) > MAX_TIMER_MEMBER:
            return None
        if not (timer.isascii() and timer.isdigit()) or len(timer) > 20:
            return None
        parsed = Timer(int(timer), user)
        return parsed if parsed.member == member else None


@dataclass(slots=True)
class Writes:
    """What one decision changes, for store.py's atomic commit."""

    # record name -> (the raw value read, or b"" if absent; the new raw, b"" to delete, or KEEP)
    records: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    timers_started: list[tuple[Timer, float]] = field(default_factory=list)
    timers_done: list[Timer] = field(default_factory=list)
    # each started timer's signed deadline (EntryCodec.seal_timer_due), by member: the node
    # adds them before the commit
    timer_deadlines: dict[str, bytes] = field(default_factory=dict)
    # per node: users that now have an online device there, and users that no longer do
    present: dict[str, set[UserId]] = field(default_factory=dict)
    absent: dict[str, set[UserId]] = field(default_factory=dict)

    def sign_timers(self, seal: Callable[[str, float], bytes]) -> None:
        """Each started timer's deadline, signed (`EntryCodec.seal_timer_due`): the commit
        writes it beside the unsigned score."""
        for timer, deadline in self.timers_started:
            self.timer_deadlines[timer.member] = seal(timer.member, deadline)

    @property
    def changes(self) -> bool:
        return bool(
            any(new != KEEP for _, new in self.records.values())
            or self.timers_started
            or self.timers_done
            or self.present
            or self.absent
        )


class Slice:
    """The records one event concerns, verified, and the switchboard built from them."""

    def __init__(
        self,
        codec: RecordCodec,
        raw: Mapping[str, bytes | None],
        rules: CallRules,
        throttle: CallThrottle,
        bases: Iterable[int],
    ) -> None:
        """`raw`: record name -> raw value (None: absent), as the store's load returned it.
        `bases`: three random numbers from which this slice numbers new timers, call keys and
        missed calls (the core draws no randomness; ids must not collide across nodes).
        Raises: BadRecord."""
        self._codec = codec
        self.raw = dict(raw)
        self.users: dict[UserId, dict[str, Any]] = {}
        self.calls: dict[str, dict[str, Any]] = {}
        for name, value in raw.items():
            if name.startswith(USER_PREFIX):
                user = name[len(USER_PREFIX) :]
                self.users[user] = empty_user() if value is None else codec.open(name, value)
            elif name.startswith(CALL_PREFIX) and value is not None:
                self.calls[name[len(CALL_PREFIX) :]] = codec.open(name, value)
        next_timer, call_requests, next_missed = bases
        self.board = Switchboard(rules, throttle)
        self.board.restore_state(
            {
                "next_timer": next_timer,
                "call_requests": call_requests,
                "devices": [d for record in self.users.values() for d in record["devices"]],
                "calls": list(self.calls.values()),
                "ring_timers": [
                    c["ring_timer"] for c in self.calls.values() if c["state"] != "CONNECTED"
                ],
                "missed": {
                    "next_id": next_missed,
                    "users": {u: r["missed"] for u, r in self.users.items() if r["missed"]},
                },
            }
        )
        devices = [d for record in self.users.values() for d in record["devices"]]
        self._timer_users = _timers_of(devices, self.calls)

    def writes(self, actions: list[Action], fired: Timer | None = None) -> Writes:
        """Compare the board after `handle` with what was read: what to write back."""
        state = self.board.export_state()
        devices: dict[UserId, list[dict[str, Any]]] = {}
        for device in state["devices"]:
            devices.setdefault(device["user"], []).append(device)
        calls = {call["call_key"]: call for call in state["calls"]}
        missed = state["missed"]["users"]
        writes = Writes()
        gone = set(self.calls) - set(calls)
        for key, call in calls.items():
            name = CALL_PREFIX + key
            before = self.calls.get(key)
            old_raw = self.raw.get(name) or b""
            writes.records[name] = (
                old_raw,
                KEEP if before == call else self._codec.seal(name, call),
            )
        for key in gone:
            name = CALL_PREFIX + key
            writes.records[name] = (self.raw.get(name) or b"", b"")
        for user, before in self.users.items():
            name = USER_PREFIX + user
            keys = [k for k in before["calls"] if k not in gone]
            keys += [
                k for k, c in calls.items() if user in (c["caller"], c["callee"]) and k not in keys
            ]
            after = {
                "devices": devices.get(user, []),
                "missed": missed.get(user, []),
                "calls": keys,
            }
            old_raw = self.raw.get(name) or b""
            if after == before:
                new = KEEP
            elif not after["devices"] and not after["missed"] and not after["calls"]:
                new = b""
            else:
                new = self._codec.seal(name, after)
            writes.records[name] = (old_raw, new)
            online_before = _online_nodes(before["devices"])
            online_after = _online_nodes(after["devices"])
            for node in online_after - online_before:
                writes.present.setdefault(node, set()).add(user)
            for node in online_before - online_after:
                writes.absent.setdefault(node, set()).add(user)
        owners = {**self._timer_users, **_timers_of(state["devices"], calls)}
        for action in actions:
            if isinstance(action, StartTimer) and action.timer in owners:
                writes.timers_started.append(
                    (Timer(action.timer, owners[action.timer]), action.deadline)
                )
            elif isinstance(action, CancelTimer) and action.timer in owners:
                writes.timers_done.append(Timer(action.timer, owners[action.timer]))
        if fired is not None:  # claimed from the shared set: done, whatever it found
            writes.timers_done.append(fired)
        return writes


def _timers_of(
    devices: Iterable[Mapping[str, Any]], calls: Mapping[str, Mapping[str, Any]]
) -> dict[TimerId, UserId]:
    """Which user's record holds each armed timer (what loads it when it fires): a call's
    ring timer is its caller's, a held device's grace timer its user's."""
    owners: dict[TimerId, UserId] = {}
    for call in calls.values():
        if call["state"] != "CONNECTED":
            owners[int(call["ring_timer"])] = call["caller"]
    for device in devices:
        if device["hold"] is not None:
            owners[int(device["hold"]["timer"])] = device["user"]
    return owners


def _online_nodes(devices: Iterable[Mapping[str, Any]]) -> set[str]:
    return {node_of(device["conn"]) for device in devices if device["hold"] is None}
