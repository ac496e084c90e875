"""A minimal HTTP/1.1 endpoint (h11 on trio) for `/metrics`, `/healthz` and `/readyz`.

It answers one GET per connection and closes; every read is bounded in size and time, so a
misbehaving scraper cannot hold the task.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import h11
import trio

Route = Callable[[str], tuple[int, bytes, bytes]]  # query string -> (status, content type, body)
MAX_REQUEST_BYTES = 16384
REQUEST_TIMEOUT = 5.0


async def _answer(routes: dict[str, Route], stream: trio.SocketStream) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(4096)
                    connection.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    break
                return
            path, _, query = event.target.decode("ascii", "replace").partition("?")
            route = routes.get(path) if event.method == b"GET" else None
            status, content_type, body = (
                route(query) if route else (404, b"text/plain", b"not found\n")
            )
            await stream.send_all(
                connection.send(
                    h11.Response(
                        status_code=status,
                        headers=[
                            (b"content-type", content_type),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ],
                    )
                )
                or b""
            )
            await stream.send_all(connection.send(h11.Data(data=body)) or b"")
            await stream.send_all(connection.send(h11.EndOfMessage()) or b"")
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def serve_http(
    host: str,
    port: int,
    routes: dict[str, Route],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_answer, routes), listeners)
