"""Rate limits (contract section 6), on the `limits` library's moving windows.

The library's async API needs asyncio, so under trio its synchronous API is used: with the
in-memory storage a check is a short, non-blocking computation. A multi-node backend swaps the
storage; callers only see `RateLimiter`'s methods, which answer `None` (admitted and counted) or
the number of seconds after which to retry.

The per-connection limits (`messages`, `flood`) are checked on every message, so they are kept on
the connection itself (`ConnectionLimits`, the same moving-window semantics): a few list
operations instead of a storage lookup, and nothing to expire once the connection is gone.

In cluster mode the call limits (per user, per pair) live in Redis, so that they hold across
nodes; `admit_call` then does network I/O and is only called from a worker thread. The
per-connection and per-address limits stay in memory: a connection lives on one node.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, Storage
from limits.strategies import MovingWindowRateLimiter

from callgate.config import LimitSettings
from callgate.core.policy import Throttled


class RateLimiter:
    def __init__(self, settings: LimitSettings, call_storage: Storage | None = None) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._call_limiter = (
            self._limiter if call_storage is None else MovingWindowRateLimiter(call_storage)
        )
        self._call_request = parse_many(settings.call_request)
        self._call_request_pair = parse_many(settings.call_request_pair)
        self._messages = parse_many(settings.messages)
        self._handshakes = parse_many(settings.handshakes)
        self._flood = parse_many(settings.flood)

    def _admit(
        self,
        items: list[RateLimitItem],
        *identifiers: str,
        limiter: MovingWindowRateLimiter | None = None,
    ) -> int | None:
        """Count one hit against every window if all admit it; else seconds until one does."""
        limiter = limiter or self._limiter
        if len(items) == 1:  # the common case, and the per-message one: one call, not two
            if limiter.hit(items[0], *identifiers):
                return None
            return _retry_after(limiter, items[0], identifiers)
        for item in items:
            if not limiter.test(item, *identifiers):
                return _retry_after(limiter, item, identifiers)
        for item in items:
            limiter.hit(item, *identifiers)
        return None

    def close(self) -> None:
        """Close the shared storage's connections (cluster mode); the memory one has none."""
        if self._call_limiter is not self._limiter:
            client = getattr(self._call_limiter.storage, "storage", None)
            if client is not None:
                client.close()

    def admit_call(self, caller: str, callee: str) -> Throttled | None:
        """The core's `CallThrottle`: per caller, then per caller and callee pair.

        Raises: limits.errors.StorageError when the shared storage (Redis) cannot be reached.
        """
        shared = self._call_limiter
        retry = self._admit(self._call_request, "call_request", caller, limiter=shared)
        if retry is not None:
            return Throttled("call_request", retry)
        retry = self._admit(
            self._call_request_pair, "call_request_pair", caller, callee, limiter=shared
        )
        if retry is not None:
            return Throttled("call_request_pair", retry)
        return None

    def for_connection(self) -> ConnectionLimits:
        return ConnectionLimits(self._messages, self._flood)

    def admit_handshake(self, address: str) -> int | None:
        return self._admit(self._handshakes, "handshakes", address)


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
