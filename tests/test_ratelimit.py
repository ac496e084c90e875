"""The per-connection moving windows, without sockets or clocks (times are given)."""

from __future__ import annotations

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
