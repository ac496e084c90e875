"""A minimal HTTP/1.1 endpoint (h11 on trio): `/metrics`, `/healthz`, `/readyz`, and the admin API.

It answers one request per connection and closes; every read is bounded in size and time (the
head by h11's `max_incomplete_event_size`, the body by `max_body`, the whole request by
`REQUEST_TIMEOUT`), so a misbehaving scraper or admin client cannot hold the task.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import h11
import trio

from callgate.log import get_logger

log = get_logger("callgate.http")
Route = Callable[[str], tuple[int, bytes, bytes]]  # query string -> (status, content type, body)
MAX_REQUEST_BYTES = 16384
REQUEST_TIMEOUT = 5.0
MAX_DISCARD_BYTES = 65536  # of a refused body, read and dropped so the 413 reaches the client


@dataclass(frozen=True, slots=True)
class Request:
    """One request: header names lowercased; `peer` is the TCP peer's address."""

    method: str
    path: str
    query: str
    headers: dict[bytes, bytes]
    body: bytes
    peer: str


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: bytes
    body: bytes


Handler = Callable[[Request], Response]
# Awaited before the handler, for what it must read first (the admin API in a cluster).
Prepare = Callable[[Request], Awaitable[None]]


def get_routes(routes: dict[str, Route]) -> Handler:
    """A handler that answers GET on `routes` (path -> route), and 404 for anything else."""

    def handle(request: Request) -> Response:
        route = routes.get(request.path) if request.method == "GET" else None
        if route is None:
            return Response(404, b"text/plain", b"not found\n")
        return Response(*route(request.query))

    return handle


class _TooLarge(Exception):
    pass


async def _read_request(
    connection: h11.Connection, stream: trio.SocketStream, max_body: int
) -> tuple[h11.Request, bytes] | None:
    """Raises: _TooLarge for a body over `max_body`; h11.RemoteProtocolError."""
    request: h11.Request | None = None
    body = b""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            connection.receive_data(data)
            if not data and connection.their_state is not h11.DONE:
                return None
            continue
        if isinstance(event, h11.Request):
            request = event
            length = dict(event.headers).get(b"content-length")
            if length is not None and int(length) > max_body:
                raise _TooLarge
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request, body
        else:
            return None


def _peer(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return ""


async def _answer(
    handler: Handler, max_body: int, prepare: Prepare | None, stream: trio.SocketStream
) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            unread = False
            try:
                read = await _read_request(connection, stream, max_body)
            except _TooLarge:
                response = Response(413, b"application/json", b'{"error": "body too large"}')
                unread = True
            else:
                if read is None:
                    return
                event, body = read
                path, _, query = event.target.decode("ascii", "replace").partition("?")
                request = Request(
                    event.method.decode("ascii", "replace"),
                    path,
                    query,
                    dict(event.headers),  # h11 lowercases the names
                    body,
                    _peer(stream),
                )
                try:
                    if prepare is not None:
                        await prepare(request)
                    response = handler(request)
                except Exception:
                    # A bug answers this request only: the listener's nursery must go on serving.
                    log.exception("HTTP handler failed", path=path)
                    response = Response(500, b"application/json", b'{"error": "internal error"}')
            await stream.send_all(
                connection.send(
                    h11.Response(
                        status_code=response.status,
                        headers=[
                            (b"content-type", response.content_type),
                            (b"content-length", str(len(response.body)).encode()),
                            (b"connection", b"close"),
                        ],
                    )
                )
                or b""
            )
            await stream.send_all(connection.send(h11.Data(data=response.body)) or b"")
            await stream.send_all(connection.send(h11.EndOfMessage()) or b"")
            if unread:
                # Closing with the client's body unread would reset the connection, and the
                # client might never read the 413: end our side, then read (bounded) what is left.
                await stream.send_eof()
                left = MAX_DISCARD_BYTES
                while left > 0 and (data := await stream.receive_some(4096)):
                    left -= len(data)
    except (
        h11.RemoteProtocolError,
        trio.BrokenResourceError,
        trio.ClosedResourceError,
    ):
        pass
    finally:
        await stream.aclose()


async def serve_http(
    host: str,
    port: int,
    handler: Handler,
    max_body: int = 0,
    prepare: Prepare | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` until cancelled; bodies over `max_body` bytes get 413. `prepare`, if
    given, is awaited before the handler (the handler itself never waits)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_answer, handler, max_body, prepare), listeners)
