"""The per-connection clocks' heap (`Deadlines`), on trio's virtual clock: no real waiting."""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing

from callgate.transport.timers import Deadlines


@pytest.fixture
async def deadlines(nursery: trio.Nursery) -> Deadlines:
    clock = Deadlines()
    nursery.start_soon(clock.run)
    await trio.testing.wait_all_tasks_blocked()
    return clock


async def test_entries_fire_in_deadline_order_at_their_time(
    deadlines: Deadlines, autojump_clock: trio.testing.MockClock
) -> None:
    start, fired = trio.current_time(), list[tuple[float, float]]()

    def note(delay: float) -> None:
        fired.append((delay, trio.current_time()))

    for delay in (3.0, 1.0, 2.0):
        deadlines.call_at(start + delay, partial(note, delay))
    await trio.sleep(5)
    assert [d for d, _ in fired] == [1.0, 2.0, 3.0]
    assert [round(at - start, 6) for _, at in fired] == [1.0, 2.0, 3.0]
    assert len(deadlines) == 0


async def test_an_earlier_entry_wakes_the_sleeping_runner(
    deadlines: Deadlines, autojump_clock: trio.testing.MockClock
) -> None:
    start, fired = trio.current_time(), list[object]()
    deadlines.call_at(start + 100, lambda: fired.append("late"))
    await trio.sleep(1)  # the runner now sleeps until start + 100
    deadlines.call_at(start + 2, lambda: fired.append(trio.current_time() - start))
    await trio.sleep(2)
    assert fired == [pytest.approx(2.0)]


async def test_cancelled_entries_never_fire_and_are_dropped(
    deadlines: Deadlines, autojump_clock: trio.testing.MockClock
) -> None:
    start, fired = trio.current_time(), list[int]()
    entries = [
        deadlines.call_at(start + 1 + i / 1000, partial(fired.append, i)) for i in range(200)
    ]
    for entry in entries[:150]:
        deadlines.cancel(entry)
    deadlines.cancel(entries[0])  # twice is harmless
    deadlines.cancel(None)
    assert len(deadlines) == 50
    await trio.sleep(2)
    assert fired == list(range(150, 200))


async def test_a_failing_callback_does_not_stop_the_others(
    deadlines: Deadlines, autojump_clock: trio.testing.MockClock
) -> None:
    start, fired = trio.current_time(), list[str]()

    def broken() -> None:
        raise ValueError("a bug in one connection's callback")

    deadlines.call_at(start + 1, broken)
    deadlines.call_at(start + 1, lambda: fired.append("next"))
    deadlines.call_at(start + 2, lambda: fired.append("later"))
    await trio.sleep(3)
    assert fired == ["next", "later"]


async def test_a_callback_may_schedule_and_cancel(
    deadlines: Deadlines, autojump_clock: trio.testing.MockClock
) -> None:
    start, fired = trio.current_time(), list[str]()
    victim = deadlines.call_at(start + 5, lambda: fired.append("victim"))

    def tick() -> None:
        fired.append("tick")
        deadlines.cancel(victim)
        deadlines.call_at(trio.current_time(), lambda: fired.append("now"))

    deadlines.call_at(start + 1, tick)
    await trio.sleep(6)
    assert fired == ["tick", "now"]
