"""A connection's own life, without sockets: what `abort` cancels."""

from __future__ import annotations

import trio

from callgate.transport.connection import Connection


class _NoSocket:
    closed = None


async def test_abort_cancels_the_nursery_the_connection_runs_in() -> None:
    connection = Connection("c1", _NoSocket(), "127.0.0.1", 8)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        connection.run_in(nursery)
        nursery.start_soon(trio.sleep_forever)  # the writer, say
        connection.abort(1008, "client too slow")
        await trio.sleep_forever()  # cancelled with everything else inside
    assert (connection.close_code, connection.close_reason) == (1008, "client too slow")


async def test_an_abort_before_the_connection_runs_still_cancels_it() -> None:
    connection = Connection("c1", _NoSocket(), "127.0.0.1", 8)  # type: ignore[arg-type]
    connection.abort(1006, "gone")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            connection.run_in(nursery)
            await trio.sleep_forever()
