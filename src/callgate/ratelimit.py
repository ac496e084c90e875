"""Rate limits (contract section 6), on the `limits` library's moving windows.

The library's async API needs asyncio, so under trio its synchronous API is used: with the
in-memory storage a check is a short, non-blocking computation. A multi-node backend swaps the
storage; callers only see `RateLimiter`'s methods, which answer `None` (admitted and counted) or
the number of seconds after which to retry.
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
    def __init__(self, settings: LimitSettings, storage: Storage | None = None) -> None:
        self._limiter = MovingWindowRateLimiter(storage or MemoryStorage())
        self._call_request = parse_many(settings.call_request)
        self._call_request_pair = parse_many(settings.call_request_pair)
        self._messages = parse_many(settings.messages)
        self._handshakes = parse_many(settings.handshakes)
        self._flood = parse_many(settings.flood)

    def _admit(self, items: list[RateLimitItem], *identifiers: str) -> int | None:
        """Count one hit against every window if all admit it; else seconds until one does."""
        if len(items) == 1:  # the common case, and the per-message one: one call, not two
            if self._limiter.hit(items[0], *identifiers):
                return None
            return self._retry_after(items[0], identifiers)
        for item in items:
            if not self._limiter.test(item, *identifiers):
                return self._retry_after(item, identifiers)
        for item in items:
            self._limiter.hit(item, *identifiers)
        return None

    def _retry_after(self, item: RateLimitItem, identifiers: tuple[str, ...]) -> int:
        stats = self._limiter.get_window_stats(item, *identifiers)
        return max(1, math.ceil(stats.reset_time - time.time()))

    def admit_call(self, caller: str, callee: str) -> Throttled | None:
        """The core's `CallThrottle`: per caller, then per caller and callee pair."""
        retry = self._admit(self._call_request, "call_request", caller)
        if retry is not None:
            return Throttled("call_request", retry)
        retry = self._admit(self._call_request_pair, "call_request_pair", caller, callee)
        if retry is not None:
            return Throttled("call_request_pair", retry)
        return None

    def admit_message(self, conn: str) -> int | None:
        return self._admit(self._messages, "messages", conn)

    def admit_handshake(self, address: str) -> int | None:
        return self._admit(self._handshakes, "handshakes", address)

    def is_flooding(self, conn: str) -> bool:
        """Count one refused message; True once the connection is past the `flood` limit."""
        return self._admit(self._flood, "flood", conn) is not None
