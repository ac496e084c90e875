"""Timers: the core's `StartTimer`/`CancelTimer` actions, and the per-connection clocks."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from functools import partial

import trio

from callgate.core.events import TimerId
from callgate.log import get_logger

log = get_logger("callgate.timers")


class Timers:
    """The core's timers (ring timeout, reconnect grace), as entries of the `Deadlines` heap.

    Starting and cancelling are synchronous, so the core stays synchronous; a timer costs an
    entry in the heap, not a task.
    """

    def __init__(self, deadlines: Deadlines, on_fire: Callable[[TimerId], None]) -> None:
        self._deadlines = deadlines
        self._on_fire = on_fire
        self._entries: dict[TimerId, Deadline] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def start(self, timer: TimerId, deadline: float) -> None:
        self.cancel(timer)  # a timer id is armed at most once
        self._entries[timer] = self._deadlines.call_at(deadline, partial(self._fire, timer))

    def cancel_all(self) -> None:
        for entry in self._entries.values():
            self._deadlines.cancel(entry)
        self._entries.clear()

    def cancel(self, timer: TimerId) -> None:
        self._deadlines.cancel(self._entries.pop(timer, None))

    def _fire(self, timer: TimerId) -> None:
        del self._entries[timer]
        self._on_fire(timer)


class Deadline:
    """One scheduled call of `Deadlines`; `cancel()` it to drop the call."""

    __slots__ = ("callback", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None


class Deadlines:
    """Every clock of a server in one heap and one task: each connection's keepalive, token
    expiry and Engine.IO heartbeat, and the core's timers (`Timers`).

    A task that only sleeps until a deadline costs an idle connection more memory than its
    socket does (the task, its coroutine frames, cancel scopes), and a server holds tens of
    thousands of idle connections; arming and cancelling a task for every ringing call costs
    call setup time. So they are entries of one heap, run by `run`. Callbacks are
    synchronous and quick, like the core's actions; one that raises is logged and the rest go on.
    Cancelled entries stay in the heap until their time, or until they are the majority, when
    the heap is rebuilt without them.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._cancelled = 0
        self._sleep: trio.CancelScope | None = None

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    def call_at(self, when: float, callback: Callable[[], None]) -> Deadline:
        """Call `callback()` at trio time `when` (at once if it is past)."""
        entry = Deadline(when, callback)
        heapq.heappush(self._heap, (when, next(self._order), entry))
        if self._sleep is not None and when < self._sleep.deadline:
            self._sleep.deadline = when  # the runner wakes up earlier
        return entry

    def cancel(self, entry: Deadline | None) -> None:
        if entry is None or entry.callback is None:
            return
        entry.cancel()
        self._cancelled += 1
        if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
            self._heap = [item for item in self._heap if item[2].callback is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    async def run(self) -> None:
        """Call every entry when it is due; runs until cancelled."""
        heap = self._heap
        while True:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            heap = self._heap  # a rebuild may have replaced it
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                entry = heapq.heappop(heap)[2]
                callback, entry.callback = entry.callback, None
                if callback is None:
                    self._cancelled -= 1
                    continue
                try:
                    callback()
                except Exception:
                    log.exception("deadline callback failed")
                heap = self._heap
