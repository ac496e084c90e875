"""Rate limits (contract section 6): `limits`' rules and moving windows.

The rules (`"5/minute;100/hour"`) are parsed by the `limits` library, and every limit follows its
moving-window rule. Callers only see `RateLimiter`'s methods, which answer `None` (admitted and
counted) or the number of seconds after which to retry.

In memory the windows are kept here, not in `limits`' MemoryStorage: that storage expires its
entries from a `threading.Timer` which it starts anew, 10 ms after the last one, whenever hits
keep coming, so a connect storm started a thread for about every five connections (strace: 651
thread creations for 3,000 connections), each a handful of system calls and a fight for the GIL.
The windows here are the same rule on a list per key (`MovingWindows`), swept once a second.

The per-connection limits (`messages`, `flood`) are checked on every message, so they are kept on
the connection itself (`ConnectionLimits`): a few list operations, and nothing to expire once the
connection is gone.

In cluster mode the call limits (per user, per pair) live in Redis through `limits`' Redis
storage, so that they hold across nodes; `admit_call` then does network I/O and is only called
from a worker thread. The per-connection and per-address limits stay in memory: a connection
lives on one node.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from limits import RateLimitItem, parse_many
from limits.errors import StorageError
from limits.storage import Storage
from limits.strategies import MovingWindowRateLimiter

from callgate.config import LimitSettings
from callgate.core.policy import Throttled


class RateLimiter:
    def __init__(self, settings: LimitSettings, call_storage: Storage | None = None) -> None:
        # The call limits: in memory, or on the cluster's shared storage (Redis).
        self._shared = None if call_storage is None else MovingWindowRateLimiter(call_storage)
        self._call_request = parse_many(settings.call_request)
        self._call_request_pair = parse_many(settings.call_request_pair)
        self._calls_by_caller = KeyedWindows(self._call_request)
        self._calls_by_pair = KeyedWindows(self._call_request_pair)
        self._handshakes = KeyedWindows(parse_many(settings.handshakes))
        self._messages = parse_many(settings.messages)
        self._flood = parse_many(settings.flood)

    def close(self) -> None:
        """Close the shared storage's connections (cluster mode); memory has none."""
        if self._shared is not None:
            client = getattr(self._shared.storage, "storage", None)
            if client is not None:
                client.close()

    def admit_call(
        self, caller: str, callee: str, retyped: Callable[[str], None] | None = None
    ) -> Throttled | None:
        """The core's `CallThrottle`: per caller, then per caller and callee pair. On the
        shared storage, windows of another type than `limits` writes (only a Redis client
        without the cluster key makes one) are cleared, as if deleted, and counted again;
        `retyped` is told the limit's name.

        Raises: limits.errors.StorageError when the shared storage (Redis) cannot be reached.
        """
        shared, now = self._shared, time.monotonic()
        # The names are also the shared storage's key prefixes: they must not change.
        for limit, windows, items, key in (
            ("call_request", self._calls_by_caller, self._call_request, (caller,)),
            ("call_request_pair", self._calls_by_pair, self._call_request_pair, (caller, callee)),
        ):
            if shared is None:
                retry = windows.hit(key, now)
            else:
                try:
                    retry = _admit_shared(shared, items, limit, *key)
                except StorageError as exc:
                    # WRONGTYPE would refuse this caller's requests for good: cleared (DEL
                    # takes a key of any type) and counted once more.
                    # (Redis 7 answers a script's WRONGTYPE as is; 6.2 inside "ERR Error
                    # running script ...": looked for anywhere in the message.)
                    if "WRONGTYPE" not in str(exc.storage_error):
                        raise
                    for item in items:
                        shared.clear(item, limit, *key)
                    if retyped is not None:
                        retyped(limit)
                    retry = _admit_shared(shared, items, limit, *key)
            if retry is not None:
                return Throttled(limit, retry)
        return None

    def for_connection(self) -> ConnectionLimits:
        return ConnectionLimits(self._messages, self._flood)

    def admit_handshake(self, address: str) -> int | None:
        return self._handshakes.hit((address,), time.monotonic())


def _admit_shared(
    limiter: MovingWindowRateLimiter, items: list[RateLimitItem], *identifiers: str
) -> int | None:
    """Count one hit against every window if all admit it; else seconds until one does."""
    if len(items) == 1:  # the common case: one round trip, not two
        if limiter.hit(items[0], *identifiers):
            return None
        return _retry_after(limiter, items[0], identifiers)
    for item in items:
        if not limiter.test(item, *identifiers):
            return _retry_after(limiter, item, identifiers)
    for item in items:
        limiter.hit(item, *identifiers)
    return None


def _retry_after(
    limiter: MovingWindowRateLimiter, item: RateLimitItem, identifiers: tuple[str, ...]
) -> int:
    stats = limiter.get_window_stats(item, *identifiers)
    return max(1, math.ceil(stats.reset_time - time.time()))


class MovingWindows:
    """Moving windows of one key, kept in memory by their owner: `limits`' moving-window rule.

    A hit is admitted when every window has had fewer than its amount of hits in its last
    period; then it counts in all of them. Otherwise nothing is counted, and the answer is the
    seconds until the oldest hit of the full window leaves it.
    """

    __slots__ = ("_windows",)

    def __init__(self, items: list[RateLimitItem]) -> None:
        self._windows = [_Window(item.amount, float(item.get_expiry())) for item in items]

    def hit(self, now: float) -> int | None:
        for window in self._windows:
            if window.full(now):
                return max(1, math.ceil(window.hits[window.start] + window.period - now))
        for window in self._windows:
            window.hits.append(now)
        return None

    def idle(self, now: float) -> bool:
        """True when no hit is left in any window: forgetting these windows changes nothing."""
        for window in self._windows:
            window.full(now)  # drops the hits that left it
            if window.start < len(window.hits):
                return False
        return True


# How often `KeyedWindows` forgets the keys whose hits have all left their windows.
SWEEP_SECONDS = 1.0


class KeyedWindows:
    """`MovingWindows` per key (an address, a caller, a caller and callee pair), for keys that
    come and go: a key's windows exist while a hit of it is inside one, so memory follows the
    keys seen within the longest period, as in `limits`' own storage."""

    __slots__ = ("_by_key", "_items", "_next_sweep")

    def __init__(self, items: list[RateLimitItem]) -> None:
        self._items = items
        self._by_key: dict[tuple[str, ...], MovingWindows] = {}
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._by_key)

    def hit(self, key: tuple[str, ...], now: float) -> int | None:
        """None when admitted (and counted); otherwise seconds until a hit of `key` would be."""
        if now >= self._next_sweep:
            self.sweep(now)
        windows = self._by_key.get(key)
        if windows is None:
            windows = self._by_key[key] = MovingWindows(self._items)
        return windows.hit(now)

    def sweep(self, now: float) -> None:
        """Forget the keys with no hit left in any window."""
        self._next_sweep = now + SWEEP_SECONDS
        idle = [key for key, windows in self._by_key.items() if windows.idle(now)]
        for key in idle:
            del self._by_key[key]


class _Window:
    """The hits of one window, oldest first: a list read from `start`, compacted now and then.

    A deque would do, but an idle connection holds two of these, and an empty deque costs ten
    times an empty list.
    """

    __slots__ = ("amount", "hits", "period", "start")

    def __init__(self, amount: int, period: float) -> None:
        self.amount = amount
        self.period = period
        self.hits: list[float] = []
        self.start = 0

    def full(self, now: float) -> bool:
        """Forget the hits that left the window; True if it holds `amount` hits still."""
        hits, start, cutoff = self.hits, self.start, now - self.period
        end = len(hits)
        while start < end and hits[start] <= cutoff:
            start += 1
        if start and start * 2 >= end:
            del hits[:start]
            start, end = 0, len(hits)
        self.start = start
        return end - start >= self.amount


class ConnectionLimits:
    """The limits of one connection: `messages` per message, `flood` per refused message."""

    __slots__ = ("_flood", "_messages")

    def __init__(self, messages: list[RateLimitItem], flood: list[RateLimitItem]) -> None:
        self._messages = MovingWindows(messages)
        self._flood = MovingWindows(flood)

    def admit_message(self, now: float | None = None) -> int | None:
        """None when admitted (and counted); otherwise seconds until a message would be."""
        return self._messages.hit(time.monotonic() if now is None else now)

    def is_flooding(self, now: float | None = None) -> bool:
        """Count one refused message; True once the connection is past the `flood` limit."""
        return self._flood.hit(time.monotonic() if now is None else now) is not None
