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


async def test_an_outbox_over_its_size_closes_1008_before_it_holds_outbound_queue_frames() -> None:
    """`outbound_queue` counts frames; a client that stops reading could have 256 frames of
    64 KB each held for it (16 MB; 10 ringing devices that never read: 150 MB, observed). The
    outbox is also bounded in size (`outbound_queue_bytes`, in characters)."""
    ws = _StuckSocket()
    connection = Connection("c1", ws, NativeDialect(), "127.0.0.1", 256, 30.0, queue_bytes=10_000)  # type: ignore[arg-type]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            connection.run_in(nursery)
            connection.push("in-hand")
            await trio.testing.wait_all_tasks_blocked()  # the writer is stuck in that write
            for n in range(3):  # 7 + 3 x 3,000 characters fit in 10,000
                connection.push(str(n) * 3000)
            assert connection.close_code is None
            connection.push("3" * 3000)  # this one does not
            closed: tuple[int | None, str] = (connection.close_code, connection.close_reason)
            assert closed == (1008, "client too slow: outbound queue full")
            ws.release.set()
            await connection.writer_done.wait()
            nursery.cancel_scope.cancel()
    assert ws.sent == ["in-hand"]
    assert ws.closed_with == (1008, "client too slow: outbound queue full")


async def test_a_frame_larger_than_the_outbox_size_goes_out_when_nothing_waits() -> None:
    """The size bounds what waits, not what may be sent: a frame over it is queued alone."""
    ws = _StuckSocket()
    connection = Connection("c1", ws, NativeDialect(), "127.0.0.1", 256, 30.0, queue_bytes=1000)  # type: ignore[arg-type]
    ws.release.set()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            connection.run_in(nursery)
            for n in range(3):
                connection.push(str(n) * 5000)
                while len(ws.sent) <= n:
                    await trio.sleep(0)
            nursery.cancel_scope.cancel()
    assert connection.close_code is None
    assert [len(sent) for sent in ws.sent] == [5000, 5000, 5000]
