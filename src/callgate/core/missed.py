"""Missed calls: what a callee is told at the next sign-in, until a device acknowledges it.

A call that ends without an answer and without the callee declining it (contract: docs/protocol.md,
"Missed calls") leaves one `MissedCall` for its callee. Every sign-in of the callee gets the
list in a `missed-calls` event; a device acknowledges entries by id (`missed-calls-ack`), and
they are never sent again. The list is bounded three ways, since callee ids are chosen by
callers: `per_user` entries per user (the oldest goes first), `max_age` seconds, and `total`
entries across all users (the entries of the user missed longest ago go first).

Times are the core's clock (`now`); the first sign-in that is shown an entry dates it on the
wall clock (its `wall` time, less the entry's age), once. Entries live in memory, on one
server: they do not outlive a restart.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from callgate.protocol.messages import CallId, Media, UserId


@dataclass(frozen=True, slots=True)
class MissedCall:
    id: str  # the server's id of this entry: what a device acknowledges
    call_id: CallId
    caller: UserId
    media: Media
    at: float  # when the call was requested, on the core's clock
    reason: str  # how the call ended: unavailable, timeout, cancelled, peer_disconnected
    # Unix milliseconds of the request, fixed the first time it is shown (`dated`), so that
    # every device is shown the same time.
    time: int | None = None


class MissedCalls:
    """The missed calls of every user, bounded per user, by age and in total."""

    def __init__(self, per_user: int, max_age: float, total: int) -> None:
        self._per_user = per_user
        self._max_age = max_age
        self._total = total
        # Users in the order their latest missed call was added (the least recent first).
        self._by_user: dict[UserId, deque[MissedCall]] = {}
        self._count = 0
        self._next_id = 0

    @property
    def enabled(self) -> bool:
        return self._per_user > 0

    def __len__(self) -> int:
        return self._count

    def add(
        self, callee: UserId, call_id: CallId, caller: UserId, media: Media, at: float, reason: str
    ) -> MissedCall | None:
        """Remember a missed call for `callee` (None when missed calls are off)."""
        if not self.enabled:
            return None
        self._next_id += 1
        entry = MissedCall(f"m{self._next_id}", call_id, caller, media, at, reason)
        entries = self._by_user.pop(callee, None) or deque()
        self._by_user[callee] = entries  # now the most recent user
        entries.append(entry)
        self._count += 1
        if len(entries) > self._per_user:
            entries.popleft()
            self._count -= 1
        self._expire_oldest(at)
        while self._count > self._total:
            self._drop_first_of_least_recent()
        return entry

    def of(self, user: UserId, now: float) -> list[MissedCall]:
        """The user's missed calls not older than `max_age`, oldest first."""
        entries = self._by_user.get(user)
        if entries is None:
            return []
        while entries and now - entries[0].at > self._max_age:
            self._drop_oldest(user, entries)
        return list(entries)

    def dated(self, user: UserId, now: float, wall: float | None) -> list[MissedCall]:
        """`of`, each entry given its wall-clock time the first time it is shown."""
        entries = self.of(user, now)
        if wall is None or all(entry.time is not None for entry in entries):
            return entries
        dated = [
            entry
            if entry.time is not None
            else replace(entry, time=round((wall - (now - entry.at)) * 1000))
            for entry in entries
        ]
        self._by_user[user] = deque(dated)
        return dated

    def acknowledge(self, user: UserId, ids: frozenset[str]) -> int:
        """Forget the user's entries with these ids; unknown ids are ignored. Returns how many."""
        entries = self._by_user.get(user)
        if entries is None or not ids:
            return 0
        kept = deque(entry for entry in entries if entry.id not in ids)
        removed = len(entries) - len(kept)
        self._count -= removed
        if kept:
            self._by_user[user] = kept
        else:
            del self._by_user[user]
        return removed

    def export_state(self) -> dict[str, Any]:
        """Every user's entries as plain data (oldest first); `restore_state` reads it back."""
        return {
            "next_id": self._next_id,
            "users": {
                user: [
                    [e.id, e.call_id, e.caller, e.media, e.at, e.reason, e.time] for e in entries
                ]
                for user, entries in self._by_user.items()
            },
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Replace everything with `state` (from `export_state`). Raises: KeyError, TypeError."""
        self._by_user = {
            user: deque(MissedCall(*entry) for entry in entries)
            for user, entries in state["users"].items()
            if entries
        }
        self._count = sum(len(entries) for entries in self._by_user.values())
        self._next_id = int(state["next_id"])

    def _expire_oldest(self, now: float) -> None:
        """Age out what the least recent user holds: users who never sign in again go too."""
        while self._by_user:
            user = next(iter(self._by_user))
            entries = self._by_user[user]
            if now - entries[0].at <= self._max_age:
                return
            self._drop_oldest(user, entries)

    def _drop_first_of_least_recent(self) -> None:
        user = next(iter(self._by_user))
        self._drop_oldest(user, self._by_user[user])

    def _drop_oldest(self, user: UserId, entries: deque[MissedCall]) -> None:
        """Forget the user's oldest entry, and the user once none is left."""
        entries.popleft()
        self._count -= 1
        if not entries:
            del self._by_user[user]
