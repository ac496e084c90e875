"""One wait for every idle connection of the wsproto engine, and its messages handled inline.

Signaling traffic is sparse: a message arrives on one socket, is forwarded to another, and the
connection goes back to waiting. With a task per connection, each message costs a trip through
trio's scheduler: an `epoll_ctl` to arm the socket again (trio registers one-shot), the task
rescheduled and resumed, its cancel scopes checked. That was the largest single part of a
sparse-forwarding profile, larger than decoding and forwarding the message
(docs/performance.md).

So a connection whose task would only wait for its next message parks here instead
(`Reactor.park`). The reactor keeps those sockets in an epoll set of its own, registered once
and level-triggered, and waits on that set with one trio wait for all of them. When a socket is
readable the reactor calls the connection's `on_readable` in its own task, which reads, decodes
the frames and hands each message to the transport's synchronous handler. Only when something
has to wait (a token refresh, a close, an error to raise, a frame only wsproto can decode) is the
connection's own task woken, with everything in order, and it goes on exactly as it would have.

The parked task stays cancellable: cancelling it takes its socket out of the set first.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Callable
from typing import Protocol

import outcome
import trio

from callgate.log import get_logger

log = get_logger("callgate.reactor")

# Readiness events taken per poll; more stay ready (level-triggered) for the next.
_BATCH = 64
# How long one turn of the reactor may go on polling before it yields to trio.
_TURN_SECONDS = 0.0005


class Parked(Protocol):
    """A connection that can wait here (the wsproto engine's `WsprotoConnection`)."""

    def on_readable(self) -> None: ...


class Reactor:
    """The epoll set of the parked connections, and the task that serves it (`run`)."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        # fd -> (the connection, its parked task)
        self._parked: dict[int, tuple[Parked, trio.lowlevel.Task]] = {}
        # Called after each turn, in the reactor's task: what the turn's messages queued for
        # elsewhere goes out in one write per destination (the cluster's links).
        self._after_turn: list[Callable[[], None]] = []
        self.turning = False  # inside a turn: `after_turn` callbacks will run at its end

    @staticmethod
    def supported() -> bool:
        return hasattr(select, "epoll")

    @property
    def running(self) -> bool:
        return self._epoll is not None

    def __len__(self) -> int:
        return len(self._parked)

    async def run(self) -> None:
        """Serve the parked connections until cancelled; then wake them all to fend for
        themselves (each goes back to waiting on its own socket)."""
        epoll = self._epoll = select.epoll()
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll)
                # What arrives while a batch is handled is served in the same turn (no trip
                # through trio's scheduler, no epoll_ctl to re-arm its wait), for up to
                # _TURN_SECONDS: trio's other tasks (writers, timers, accepts) wait no longer.
                turn_ends = time.perf_counter() + _TURN_SECONDS
                self.turning = True
                try:
                    while True:
                        events = epoll.poll(0, _BATCH)
                        if not events:
                            break
                        self._serve(events)
                        if time.perf_counter() >= turn_ends:
                            break
                finally:
                    self.turning = False
                    self._end_turn()
        finally:
            self._epoll = None
            for fd in list(self._parked):
                self.wake(fd, None)
            trio.lowlevel.notify_closing(epoll)
            epoll.close()

    def after_turn(self, callback: Callable[[], None]) -> None:
        self._after_turn.append(callback)

    def _end_turn(self) -> None:
        for callback in self._after_turn:
            try:
                callback()
            except Exception:
                log.exception("after a reactor turn")

    def _serve(self, events: list[tuple[int, int]]) -> None:
        for fd, _ in events:
            entry = self._parked.get(fd)
            if entry is None:  # it left during this batch
                continue
            try:
                entry[0].on_readable()
            except Exception:
                # A bug, not the client's doing: that connection ends (1006), and
                # every other one goes on.
                log.exception("reading a parked connection failed")
                self.wake(fd, b"")

    async def park(self, fd: int, connection: Parked) -> bytes | None:
        """Wait here until `connection.on_readable` wakes this task with `wake`; returns what
        `wake` was given. Raises: trio.Cancelled (the socket has left the set by then)."""
        epoll = self._epoll
        if epoll is None:
            raise RuntimeError("the reactor is not running")
        epoll.register(fd, select.EPOLLIN)
        self._parked[fd] = (connection, trio.lowlevel.current_task())

        def abort(_: Callable[[], object]) -> trio.lowlevel.Abort:
            self._leave(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        data: bytes | None = await trio.lowlevel.wait_task_rescheduled(abort)
        return data

    def holds(self, fd: int) -> bool:
        """`fd`'s task is still parked here (not woken, not cancelled)."""
        return fd in self._parked

    def wake(self, fd: int, data: bytes | None) -> None:
        """Take `fd` out of the set and resume its parked task with `data`."""
        entry = self._leave(fd)
        if entry is not None:
            trio.lowlevel.reschedule(entry[1], outcome.Value(data))

    def _leave(self, fd: int) -> tuple[Parked, trio.lowlevel.Task] | None:
        entry = self._parked.pop(fd, None)
        if entry is not None and self._epoll is not None:
            with contextlib.suppress(OSError):  # already gone from the set: its socket closed
                self._epoll.unregister(fd)
        return entry
