"""Runs the core's `StartTimer`/`CancelTimer` actions as trio tasks."""

from __future__ import annotations

from collections.abc import Callable

import trio

from callgate.core.events import TimerId


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
