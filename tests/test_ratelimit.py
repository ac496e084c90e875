"""The moving windows, per connection and per key, without sockets or clocks (times are given)."""

from __future__ import annotations

import math
import os
import threading
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from limits import parse_many
from limits.storage import RedisStorage

from callgate.config import LimitSettings
from callgate.core.policy import Throttled
from callgate.ratelimit import (
    SWEEP_SECONDS,
    ConnectionLimits,
    KeyedWindows,
    MovingWindows,
    RateLimiter,
)


def test_a_window_admits_its_amount_per_period_and_says_when_to_retry() -> None:
    window = MovingWindows(parse_many("3/second"))
    assert [window.hit(t) for t in (0.0, 0.1, 0.2)] == [None, None, None]
    assert window.hit(0.5) == 1  # the hit at 0.0 leaves the window at 1.0
    assert window.hit(0.99) == 1
    assert window.hit(1.0) is None  # 0.0 is out: moving, not fixed, windows
    assert window.hit(1.05) == 1


def test_every_window_must_admit_and_a_refusal_counts_nowhere() -> None:
    window = MovingWindows(parse_many("2/second;3/minute"))
    assert [window.hit(t) for t in (0.0, 0.5)] == [None, None]
    assert window.hit(0.6) == 1  # the per-second window is full
    assert window.hit(2.0) is None  # third in the minute
    assert window.hit(3.5) == 57  # the per-minute one is full until 60.0
    assert window.hit(60.0) is None  # the refusals above were not counted


def test_connection_limits_count_messages_and_refusals_apart() -> None:
    limits = ConnectionLimits(parse_many("1/second"), parse_many("2/10 seconds"))
    assert limits.admit_message(0.0) is None
    assert limits.admit_message(0.1) == 1
    assert [limits.is_flooding(t) for t in (0.1, 0.2, 0.3)] == [False, False, True]


@settings(max_examples=200, deadline=None)
@given(
    amount=st.integers(1, 5),
    period=st.sampled_from([1, 2, 10]),
    gaps=st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=120),
)
def test_a_window_decides_like_the_plain_rule(amount: int, period: int, gaps: list[float]) -> None:
    """The compacted list against the rule written plainly: admitted while fewer than `amount`
    admitted hits are newer than `period` seconds."""
    window = MovingWindows(parse_many(f"{amount}/{period} seconds"))
    admitted: list[float] = []
    now = 0.0
    for gap in gaps:
        now += gap
        recent = [t for t in admitted if t > now - period]
        expected = None if len(recent) < amount else max(1, math.ceil(recent[0] + period - now))
        assert window.hit(now) == expected
        if expected is None:
            admitted.append(now)


def test_each_key_has_its_own_windows() -> None:
    by_address = KeyedWindows(parse_many("2/minute"))
    assert [by_address.hit(("a",), t) for t in (0.0, 1.0)] == [None, None]
    assert by_address.hit(("a",), 2.0) == 58
    assert by_address.hit(("b",), 2.0) is None  # another address is not held back
    assert by_address.hit(("a", "b"), 2.0) is None  # nor a pair that starts with it


def test_keys_are_forgotten_once_their_hits_left_every_window() -> None:
    """Memory follows the keys seen within the longest period, never every key ever seen."""
    windows = KeyedWindows(parse_many("5/second;10/minute"))
    for n in range(1000):
        windows.hit((f"10.0.{n // 250}.{n % 250}",), n / 1000)
    assert len(windows) == 1000
    windows.hit(("late",), 30.0)  # the per-minute window still holds every early hit
    assert len(windows) == 1001
    windows.hit(("later",), 61.0 + SWEEP_SECONDS)  # a sweep after the minute: only these stay
    assert len(windows) == 2


def test_the_memory_limiter_starts_no_thread() -> None:
    """limits' MemoryStorage starts a timer thread about every 10 ms while hits come in; this
    one keeps its windows itself (see callgate/ratelimit.py)."""
    limiter = RateLimiter(LimitSettings(handshakes="100000/minute", call_request="100000/minute"))
    before = threading.active_count()
    for n in range(500):
        limiter.admit_handshake(f"127.0.0.{n % 7}")
        limiter.admit_call(f"caller{n}", "callee")
    assert threading.active_count() == before


def test_call_limits_per_caller_then_per_pair() -> None:
    limiter = RateLimiter(LimitSettings(call_request="4/minute", call_request_pair="2/minute"))
    assert limiter.admit_call("alice", "bob") is None
    assert limiter.admit_call("alice", "bob") is None
    third = limiter.admit_call("alice", "bob")
    assert isinstance(third, Throttled) and third.limit == "call_request_pair"
    assert 0 < third.retry_after <= 60
    # The caller's window counted that attempt too (it was checked first): one call is left.
    assert limiter.admit_call("alice", "carol") is None
    fifth = limiter.admit_call("alice", "dave")
    assert isinstance(fifth, Throttled) and fifth.limit == "call_request"
    assert limiter.admit_call("bob", "alice") is None  # each caller counts alone


def test_a_shared_window_of_another_type_is_cleared_however_redis_words_the_error() -> None:
    """`limits`' moving window runs Lua scripts. Redis 7 passes a WRONGTYPE from inside one
    through as is; Redis 6.2 wraps it ("ERR Error running script ...: WRONGTYPE ..."). Either
    way the caller's window (written by a Redis client without the key) is cleared and the
    call counted again: a caller refused for good otherwise. The real storage, its first
    script answering as Redis 6.2 does."""
    from redis.exceptions import ResponseError

    from conftest import REDIS_URL

    # (as redis-py reads Redis 6.2's "ERR Error running script ...": without the "ERR ")
    redis_6_2 = ResponseError(
        "Error running script (call to f_0123): @user_script:12: @user_script: 12: "
        "WRONGTYPE Operation against a key holding the wrong kind of value"
    )

    class FirstScriptFails(RedisStorage):
        failed = False

        def acquire_entry(self, *args: Any, **kwargs: Any) -> bool:
            if not FirstScriptFails.failed:
                FirstScriptFails.failed = True
                raise redis_6_2
            return bool(super().acquire_entry(*args, **kwargs))

    prefix = f"test-{os.urandom(4).hex()}:limits"
    storage = FirstScriptFails(REDIS_URL, key_prefix=prefix, wrap_exceptions=True)
    limiter = RateLimiter(LimitSettings(call_request="5/minute"), call_storage=storage)
    told: list[str] = []
    try:
        assert limiter.admit_call("alice", "bob", told.append) is None
        assert told == ["call_request"] and FirstScriptFails.failed
    finally:
        storage.reset()
        limiter.close()
