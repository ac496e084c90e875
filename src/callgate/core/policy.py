"""The rules the switchboard applies, and the narrow port through which it asks for rate limits.

`CallThrottle` is the one place the core consults something outside itself: the real one
(`callgate.ratelimit.RateLimiter`) keeps moving-window counters that read the wall clock, and a
multi-node backend will keep them in a shared store. The core only asks "may this caller call
this callee now?" and never sees how that is counted; tests pass a plain fake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from callgate.protocol.messages import UserId


@dataclass(frozen=True, slots=True)
class CallRules:
    ring_timeout: float = 45.0
    max_calls_per_user: int = 1
    # Seconds a dropped device's calls are held for it to resume; 0 ends them at once.
    reconnect_grace: float = 0.0
    # Messages kept for a held device; the rest are dropped and counted in the audit. Also how
    # many of a caller's ICE candidates an unanswered call keeps for callee devices to come.
    resume_buffer: int = 32
    # A call to a user with no device online: refused at once, or held PENDING until a device
    # signs in or `ring_timeout` (the app's backend wakes the phone meanwhile).
    offline: Literal["unavailable", "notify"] = "unavailable"
    # Missed calls kept per user for the next sign-in (0: none are kept), for how many seconds,
    # and across all users.
    missed_calls: int = 0
    missed_call_max_age: float = 7 * 86400.0
    missed_calls_total: int = 100_000
    # Write a `call.missed` audit record for every call that ends missed (on when missed calls
    # are kept, calls held pending, or webhooks sent).
    report_missed: bool = False


@dataclass(frozen=True, slots=True)
class Throttled:
    """A limit refused the request; `limit` names its config key, `retry_after` is in seconds."""

    limit: str
    retry_after: int


class CallThrottle(Protocol):
    def admit_call(self, caller: UserId, callee: UserId) -> Throttled | None:
        """Count one call attempt if it is within every limit; otherwise say which limit refused."""


class NoThrottle:
    """Admits everything (tests of the call logic that are not about rate limits)."""

    def admit_call(self, caller: UserId, callee: UserId) -> Throttled | None:
        return None
