"""The per-connection moving windows, without sockets or clocks (times are given)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from limits import parse_many

from callgate.ratelimit import ConnectionLimits, MovingWindows


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
