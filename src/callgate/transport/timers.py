"""Timers: the core's `StartTimer`/`CancelTimer` actions, and the per-connection clocks."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import trio

from callgate.core.events import TimerId
from callgate.log import get_logger

log = get_logger("callgate.timers")


class Timers:
    """One sleeping task per armed timer; cancelling is synchronous, so the core stays sync."""

    def __init__(self, nursery: trio.Nursery, on_fire: Callable[[TimerId], None]) -> None:
        self._nursery = nursery
        self._on_fire = on_fire
        self._scopes: dict[TimerId, trio.CancelScope] = {}

    def __len__(self) -> int:
        return len(self._scopes)

    def start(self, timer: TimerId, deadline: float) -> None:
        scope = trio.CancelScope()
        self._scopes[timer] = scope
        self._nursery.start_soon(self._run, timer, deadline, scope)

    def cancel_all(self) -> None:
        for scope in self._scopes.values():
            scope.cancel()
        self._scopes.clear()

    def cancel(self, timer: TimerId) -> None:
        scope = self._scopes.pop(timer, None)
        if scope is not None:
            scope.cancel()

    async def _run(self, timer: TimerId, deadline: float, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep_until(deadline)
            del self._scopes[timer]
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
    """Many per-connection clocks (keepalive, token expiry, Engine.IO heartbeat), one task.

    A task that only sleeps until a deadline costs an idle connection more memory than its
    socket does (the task, its coroutine frames, cancel scopes), and a server holds tens of
    thousands of idle connections. So they are entries of one heap, run by `run`. Callbacks are
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
