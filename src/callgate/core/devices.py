"""Devices (authenticated connections) and their sessions: who is online, who is held.

A device is online while its connection is open. When the connection drops while the device is in
a call, and `reconnect_grace` is set, the device is *held*: it is no longer online (it does not
ring for new calls), but it keeps its calls, and what is sent to it is buffered, until a new
connection resumes it with its current session id or the grace runs out.

Session ids come from the transport (the core draws no randomness). Each device has exactly one
live session id at a time; every `session` message issues the next one, so an id can be used to
resume only once, and only by the same user.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from callgate.core.actions import Deliver
from callgate.core.events import ConnId, TimerId
from callgate.protocol.messages import UserId


@dataclass(slots=True, eq=False)
class Hold:
    """The grace period of a dropped device."""

    timer: TimerId
    buffer: list[Deliver] = field(default_factory=list)
    dropped: int = 0


@dataclass(slots=True, eq=False)
class Device:
    conn: ConnId
    user: UserId
    session_id: str
    token_id: str | None = None
    issued_at: float | None = None
    hold: Hold | None = None

    def is_revoked(self, token_ids: frozenset[str], users_before: dict[UserId, float]) -> bool:
        if self.token_id is not None and self.token_id in token_ids:
            return True
        before = users_before.get(self.user)
        # A token without `iat` cannot prove it was issued after the cut-off.
        return before is not None and (self.issued_at is None or self.issued_at < before)


class DeviceRegistry:
    def __init__(self) -> None:
        self._devices: dict[ConnId, Device] = {}
        self._sessions: dict[str, ConnId] = {}
        self._online: dict[UserId, dict[ConnId, None]] = {}

    def all(self) -> list[Device]:
        return list(self._devices.values())

    def get(self, conn: ConnId) -> Device | None:
        return self._devices.get(conn)

    def by_session(self, session_id: str) -> Device | None:
        conn = self._sessions.get(session_id)
        return self._devices.get(conn) if conn is not None else None

    def online(self, user: UserId) -> list[ConnId]:
        return list(self._online.get(user, {}))

    def add(self, device: Device) -> None:
        self._devices[device.conn] = device
        if device.session_id:
            self._sessions[device.session_id] = device.conn
        self._online.setdefault(device.user, {})[device.conn] = None

    def rotate_session(self, device: Device, session_id: str) -> None:
        self._sessions.pop(device.session_id, None)
        device.session_id = session_id
        if session_id:
            self._sessions[session_id] = device.conn

    def go_offline(self, device: Device) -> None:
        online = self._online.get(device.user)
        if online is not None:
            online.pop(device.conn, None)
            if not online:
                del self._online[device.user]

    def remove(self, device: Device) -> None:
        self.go_offline(device)
        self._devices.pop(device.conn, None)
        if self._sessions.get(device.session_id) == device.conn:
            del self._sessions[device.session_id]

    def is_empty(self) -> bool:
        return not self._devices and not self._sessions and not self._online
