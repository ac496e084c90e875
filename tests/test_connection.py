"""A connection's own life, without sockets: what `abort` cancels."""

from __future__ import annotations

import trio
import trio.testing

from callgate.protocol.dialects import NativeDialect, SocketIODialect
from callgate.transport.connection import Connection


class _NoSocket:
    closed = None


async def test_abort_cancels_the_nursery_the_connection_runs_in() -> None:
    connection = Connection("c1", _NoSocket(), NativeDialect(), "127.0.0.1", 8)  # type: ignore[arg-type]
    cancelled: list[str] = []

    async def writer() -> None:  # the writer, say
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append("writer")
            raise

    async with trio.open_nursery() as nursery:
        connection.run_in(nursery)
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        connection.abort(1008, "client too slow")
        try:
            await trio.lowlevel.checkpoint()  # the first chance to see the cancellation
        except trio.Cancelled:
            cancelled.append("body")
            raise
        raise AssertionError("abort did not cancel the nursery")
    assert nursery.cancel_scope.cancelled_caught
    assert sorted(cancelled) == ["body", "writer"]
    assert (connection.close_code, connection.close_reason) == (1008, "client too slow")


async def test_an_abort_before_the_connection_runs_still_cancels_it() -> None:
    connection = Connection("c1", _NoSocket(), NativeDialect(), "127.0.0.1", 8)  # type: ignore[arg-type]
    connection.abort(1006, "gone")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            connection.run_in(nursery)
            await trio.sleep_forever()


class _StuckSocket:
    """A socket whose writes wait for `release`: a client that does not read."""

    closed = None

    def __init__(self) -> None:
        self.release = trio.Event()
        self.sent: list[str] = []
        self.closed_with: tuple[int, str | None] | None = None

    async def send_messages(self, messages: list[str]) -> None:
        for message in messages:
            await self.release.wait()
            self.sent.append(message)

    def try_send_now(self, message: str) -> bool:
        return False

    backlog = has_more = False

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        await self.release.wait()  # a close frame is a write too
        self.closed_with = (code, reason)


async def test_a_full_outbox_closes_1008_after_the_frame_in_hand() -> None:
    """The writer is not cancelled in the middle of a frame (no close frame could follow it):
    it finishes that one, drops what is queued behind it, says why and closes with 1008."""
    ws = _StuckSocket()
    connection = Connection("c1", ws, SocketIODialect(25, 20, 65536), "127.0.0.1", 8, 30.0)  # type: ignore[arg-type]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            connection.run_in(nursery)
            connection.push("4in-hand")
            await trio.testing.wait_all_tasks_blocked()  # the writer is stuck in that write
            for n in range(9):  # 8 fill the outbox, the 9th overflows it
                connection.push(f"4queued-{n}")
            assert connection.close_code == 1008
            ws.release.set()
            await connection.writer_done.wait()
            nursery.cancel_scope.cancel()
    closing = '42["closing",{"code":1008,"reason":"client too slow: outbound queue full"}]'
    assert ws.sent == ["4in-hand", closing]
    assert ws.closed_with == (1008, "client too slow: outbound queue full")


async def test_a_client_that_never_reads_again_is_cut_off_after_close_timeout() -> None:
    ws = _StuckSocket()
    connection = Connection("c1", ws, NativeDialect(), "127.0.0.1", 8, 0.1)  # type: ignore[arg-type]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            connection.run_in(nursery)
            for n in range(10):
                connection.push(f"frame-{n}")
            await trio.sleep_forever()  # cancelled at the overflow's deadline
    assert (ws.sent, ws.closed_with, connection.close_code) == ([], None, 1008)
