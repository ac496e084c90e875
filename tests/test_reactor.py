"""The reactor (transport/reactor.py) and the wsproto engine parked in it, over real sockets.

The engine's contract with the reactor: messages that arrive while its task is parked go to the
inline handler in the reactor's task; anything the handler declines, anything it raises, and any
frame only wsproto can decode wakes the connection's own task, which sees everything in the
order it arrived.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from callgate.transport.engine import WsprotoConnection
from callgate.transport.reactor import Reactor

STEP = 5


class Pair:
    """An engine on one end of a socket pair, a masking wsproto client on the other."""

    def __init__(self, reactor: Reactor, inline: Callable[[str], bool]) -> None:
        server_sock, client_sock = trio.socket.socketpair()
        self.engine_stream = trio.SocketStream(server_sock)
        self.engine = WsprotoConnection(
            self.engine_stream, Connection(ConnectionType.SERVER), 2**20
        )
        self.engine.attach_reactor(reactor, inline)
        self.peer = trio.SocketStream(client_sock)
        self.client = Connection(ConnectionType.CLIENT)
        OPEN.append(self)

    async def send(self, *events: Any) -> None:
        await self.peer.send_all(b"".join(self.client.send(event) for event in events))

    def close(self) -> None:
        self.engine_stream.socket.close()
        self.peer.socket.close()


OPEN: list[Pair] = []


@pytest.fixture(autouse=True)
async def _close_pairs() -> AsyncIterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


@pytest.fixture
async def reactor(nursery: trio.Nursery) -> Reactor:
    running = Reactor()
    nursery.start_soon(running.run)
    await trio.testing.wait_all_tasks_blocked()
    return running


def _recorder(handled: list[str]) -> Callable[[str], bool]:
    def inline(text: str) -> bool:
        handled.append(text)
        return True

    return inline


async def _until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(STEP):
        while not condition():
            await trio.sleep(0.005)


async def test_messages_are_handled_inline_while_the_task_stays_parked(
    reactor: Reactor, nursery: trio.Nursery
) -> None:
    handled: list[str] = []
    pair = Pair(reactor, _recorder(handled))
    woken: list[str | bytes] = []

    async def task() -> None:
        woken.append(await pair.engine.get_message())

    nursery.start_soon(task)
    await _until(lambda: len(reactor) == 1)
    await pair.send(TextMessage(data="one"), TextMessage(data="two"))
    await pair.send(TextMessage(data="three"))
    await _until(lambda: len(handled) == 3)
    assert handled == ["one", "two", "three"]
    assert woken == [] and len(reactor) == 1


async def test_a_declined_message_and_the_ones_after_it_go_to_the_task_in_order(
    reactor: Reactor,
) -> None:
    handled: list[str] = []

    def inline(text: str) -> bool:
        if text == "refresh":
            return False  # it has to wait: the task takes it, untouched
        handled.append(text)
        return True

    pair = Pair(reactor, inline)
    await pair.send(TextMessage(data="a"), TextMessage(data="refresh"), TextMessage(data="b"))
    with trio.fail_after(STEP):
        assert await pair.engine.get_message() == "refresh"
        assert await pair.engine.get_message() == "b"
    assert handled == ["a"]
    assert len(reactor) == 0  # the task is running, not parked


async def test_what_the_handler_raises_is_raised_by_the_task_after_earlier_messages(
    reactor: Reactor,
) -> None:
    def inline(text: str) -> bool:
        if text == "bad":
            raise ValueError("refused")
        return text != "keep"

    pair = Pair(reactor, inline)
    await pair.send(TextMessage(data="keep"))
    with trio.fail_after(STEP):
        assert await pair.engine.get_message() == "keep"
        await pair.send(TextMessage(data="fine"), TextMessage(data="bad"), TextMessage(data="x"))
        with pytest.raises(ValueError, match="refused"):
            await pair.engine.get_message()
        assert await pair.engine.get_message() == "x"


async def test_frames_only_wsproto_decodes_wake_the_task(reactor: Reactor) -> None:
    pair = Pair(reactor, lambda text: True)
    with trio.fail_after(STEP):
        # A ping (answered by wsproto), a binary message, then a close: all on the task.
        await pair.send(Ping(payload=b"p"), BytesMessage(data=b"\x00"), CloseConnection(1000))
        assert await pair.engine.get_message() == b"\x00"
        with pytest.raises(ConnectionClosed):
            await pair.engine.get_message()
        pair.client.receive_data(await pair.peer.receive_some())
        replies = [type(event).__name__ for event in pair.client.events()]
    assert replies == ["Pong", "CloseConnection"]
    assert len(reactor) == 0


async def test_the_end_of_the_stream_wakes_the_task(reactor: Reactor) -> None:
    pair = Pair(reactor, lambda text: True)
    with trio.fail_after(STEP):
        await pair.peer.aclose()
        with pytest.raises(ConnectionClosed):
            await pair.engine.get_message()
    assert pair.engine.closed is not None and pair.engine.closed.code == 1006


async def test_a_cancelled_task_leaves_the_reactor(reactor: Reactor, nursery: trio.Nursery) -> None:
    handled: list[str] = []
    pair = Pair(reactor, _recorder(handled))
    with trio.move_on_after(0.05):
        await pair.engine.get_message()
    assert len(reactor) == 0
    # Its socket is out of the set: data for it now waits for the next get_message.
    await pair.send(TextMessage(data="later"))
    await trio.sleep(0.05)
    assert handled == []


async def test_a_stopping_reactor_hands_its_connections_back(nursery: trio.Nursery) -> None:
    reactor = Reactor()
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await reactor.run()

    nursery.start_soon(run)
    await _until(lambda: reactor.running)
    pair = Pair(reactor, lambda text: True)
    received: list[str | bytes] = []

    async def task() -> None:
        received.append(await pair.engine.get_message())

    nursery.start_soon(task)
    await _until(lambda: len(reactor) == 1)
    scope.cancel()
    await _until(lambda: not reactor.running)
    # The task waits on its own socket now, and gets the next message itself.
    await pair.send(TextMessage(data="after"))
    await _until(lambda: received == ["after"])


async def test_a_handler_that_cancels_its_own_connection_stops_there(
    reactor: Reactor, nursery: trio.Nursery
) -> None:
    """Say the handler finds the connection's outbox full and aborts it: the rest of that read
    is left to the (cancelled) task, not handled after the connection was given up."""
    handled: list[str] = []
    scope = trio.CancelScope()

    def inline(text: str) -> bool:
        handled.append(text)
        scope.cancel()
        return True

    pair = Pair(reactor, inline)

    async def task() -> None:
        with scope:
            await pair.engine.get_message()

    nursery.start_soon(task)
    await _until(lambda: len(reactor) == 1)
    await pair.send(TextMessage(data="first"), TextMessage(data="second"))
    await _until(lambda: len(reactor) == 0)
    await trio.testing.wait_all_tasks_blocked()
    assert handled == ["first"]


class _Broken:
    def on_readable(self) -> None:
        raise RuntimeError("a bug in a connection")


async def test_a_failing_connection_is_woken_and_the_reactor_goes_on(
    reactor: Reactor, nursery: trio.Nursery
) -> None:
    broken_sock, broken_peer = trio.socket.socketpair()
    woken: list[bytes | None] = []

    async def broken_task() -> None:
        woken.append(await reactor.park(broken_sock.fileno(), _Broken()))

    nursery.start_soon(broken_task)
    handled: list[str] = []
    healthy = Pair(reactor, _recorder(handled))
    nursery.start_soon(healthy.engine.get_message)
    await _until(lambda: len(reactor) == 2)
    await broken_peer.send(b"x")
    await _until(lambda: woken == [b""])  # its task sees the end of its stream
    await healthy.send(TextMessage(data="still served"))
    await _until(lambda: handled == ["still served"])
    broken_sock.close()
    broken_peer.close()


async def test_a_busy_reactor_still_lets_other_tasks_run(
    reactor: Reactor, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn that has run its time yields to trio's other tasks, with events still ready."""
    monkeypatch.setattr("callgate.transport.reactor._BATCH", 2)
    monkeypatch.setattr("callgate.transport.reactor._TURN_SECONDS", 0.0)  # one poll a turn
    other_ran = 0
    seen: list[int] = []  # for each message served, how often the other task had run

    def inline(text: str) -> bool:
        seen.append(other_ran)
        return True

    pairs = [Pair(reactor, inline) for _ in range(6)]
    for pair in pairs:
        nursery.start_soon(pair.engine.get_message)
    await _until(lambda: len(reactor) == 6)

    async def other_task() -> None:
        nonlocal other_ran
        while len(seen) < 6:
            other_ran += 1
            await trio.sleep(0)

    nursery.start_soon(other_task)
    await trio.sleep(0)
    # All six become readable at once: written without yielding, through duplicates of the
    # client sockets (plain blocking sockets).
    for index, pair in enumerate(pairs):
        with socket.socket(fileno=os.dup(pair.peer.socket.fileno())) as raw:
            raw.sendall(pair.client.send(TextMessage(data=f"m{index}")))
    await _until(lambda: len(seen) == 6)
    # Three turns of two, in three of trio's scheduling rounds: the other task ran in between
    # (in which order trio runs a round's tasks is its own choice, so not necessarily twice).
    assert len(set(seen)) >= 2, seen


async def test_after_turn_runs_once_a_turn_after_its_messages_and_outside_it(
    reactor: Reactor, nursery: trio.Nursery
) -> None:
    """What a turn's messages queue for elsewhere goes out at its end (the cluster's links):
    each callback runs after the turn's handlers, with `turning` already False."""
    events: list[str] = []

    def inline(text: str) -> bool:
        events.append(f"{text}:{'turning' if reactor.turning else 'outside'}")
        return True

    reactor.after_turn(lambda: events.append(f"end:{'turning' if reactor.turning else 'outside'}"))
    pair = Pair(reactor, inline)

    async def task() -> None:
        await pair.engine.get_message()

    nursery.start_soon(task)
    await _until(lambda: len(reactor) == 1)
    await pair.send(TextMessage(data="one"), TextMessage(data="two"))
    await _until(lambda: "end:outside" in events)
    assert events[:3] == ["one:turning", "two:turning", "end:outside"]
