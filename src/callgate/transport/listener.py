"""The listening socket and the HTTP front: which protocol a new connection speaks.

trio-websocket answers any request it cannot upgrade with an empty `400`, but the contract asks
for more: Engine.IO long-polling must get a JSON body that says to use the WebSocket transport. So
callgate reads the request head itself (httptools, bounded in size and time), answers what is not a
WebSocket for it, and hands upgrades to trio-websocket with the bytes already read replayed; on
the `wsproto` engine, the parsed head itself goes to `engine.upgrade_request`, so it is parsed once.

This uses three of trio-websocket's internals, the same ones its own `serve_websocket` uses per
connection (`WebSocketConnection(stream, WSConnection(SERVER))`, `_reader_task`, `_get_request`).
The version is pinned in requirements.lock, and a test of every route guards the seam.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection

from callgate.log import get_logger
from callgate.transport.engine import upgrade_request
from callgate.transport.head import BadHead, HeadParser, RequestHead

log = get_logger("callgate.listener")
MAX_HEAD_BYTES = 16384
SOCKETIO_PATH = "/socket.io/"


class Dialect(Enum):
    NATIVE = "native"  # callgate's JSON envelopes (contract sections 1-10)
    SOCKETIO = "socketio"  # Engine.IO v4 / Socket.IO v5 framing (contract section 11)


class UpgradeRequest(Protocol):
    """A WebSocket upgrade the handler may accept or reject (either engine's)."""

    @property
    def path(self) -> str: ...

    @property
    def headers(self) -> list[tuple[bytes, bytes]]: ...

    async def accept(self) -> Any: ...

    async def reject(self, status_code: int, *, body: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Accepted:
    """What the front tells the connection handler about a new WebSocket."""

    request: UpgradeRequest
    addr: str
    dialect: Dialect


Handler = Callable[[Accepted], Awaitable[None]]


class _Replay(trio.abc.Stream):
    """A stream whose first read returns bytes that were already read from it."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


def _peer(stream: trio.abc.Stream) -> str:
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(inner, trio.SocketStream):
        return str(inner.socket.getpeername()[0])
    return "unknown"


async def _read_head(stream: trio.abc.Stream) -> tuple[bytes, RequestHead, bytes] | None:
    """Everything read, the request head, and the bytes after the head; None for a broken or
    oversized head, or a client that left."""
    parser = HeadParser(MAX_HEAD_BYTES)
    received = b""
    while True:
        data = bytes(await stream.receive_some(4096))
        if not data:
            return None
        received += data
        try:
            head = parser.feed(data)
        except BadHead:
            return None
        if head is not None:
            return received, head, parser.trailing


async def _respond(stream: trio.abc.Stream, status: int, message: str) -> None:
    body = json.dumps({"code": status, "message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {'Bad Request' if status == 400 else 'Not Found'}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    await stream.send_all(head.encode() + body)


def _route(request: RequestHead, native_path: str, *, socketio: bool) -> Dialect | tuple[int, str]:
    target = urlsplit(request.target.decode("ascii", "replace"))
    if target.path == native_path:
        return Dialect.NATIVE
    if target.path == SOCKETIO_PATH and socketio:
        query = parse_qs(target.query)
        upgrade = any(
            name.lower() == b"upgrade" and value.lower() == b"websocket"
            for name, value in request.headers
        )
        if query.get("EIO") == ["4"] and query.get("transport") == ["websocket"] and upgrade:
            return Dialect.SOCKETIO
        return (
            400,
            "callgate serves Socket.IO over WebSocket only (Engine.IO v4): connect with"
            " io(url, {transports: ['websocket']})",
        )
    return 404, "not found"


@dataclass(frozen=True, slots=True)
class FrontSettings:
    native_path: str
    socketio: bool
    engine: str
    max_message_size: int
    handshake_timeout: float
    close_timeout: float
    # Handshakes in progress per client address; more are closed at once (slowloris).
    max_pending_per_address: int = 256


class _PendingHandshakes:
    """Sockets that have not finished their request head yet: at most `limit` per address,
    and each closed once it has been at it for `timeout` seconds (a slowloris).

    One task (`expire`) closes the late ones, instead of a trio cancel scope with a deadline
    around every head: entering such a scope was 3% of a connect storm. A late socket is
    closed under its reader, whose read then fails as if the client had gone.
    """

    def __init__(self, limit: int, timeout: float) -> None:
        self._limit = limit
        self._timeout = timeout
        self._counts: dict[str, int] = {}
        # When each pending socket was admitted; insertion order is admission order.
        self._admitted: dict[trio.abc.Stream, float] = {}

    def admit(self, addr: str, stream: trio.abc.Stream) -> bool:
        count = self._counts.get(addr, 0)
        if count >= self._limit:
            return False
        self._counts[addr] = count + 1
        self._admitted[stream] = trio.current_time()
        return True

    def release(self, addr: str, stream: trio.abc.Stream) -> None:
        self._admitted.pop(stream, None)
        count = self._counts.get(addr, 0) - 1
        if count > 0:
            self._counts[addr] = count
        else:
            self._counts.pop(addr, None)

    async def expire(self) -> None:
        """Close every socket whose head is late, until cancelled. A head gets `timeout`
        seconds and at most a quarter more (the check runs every quarter of it, or second)."""
        period = min(1.0, self._timeout / 4)
        while True:
            await trio.sleep(period)
            cutoff = trio.current_time() - self._timeout
            late = []
            for stream, admitted in self._admitted.items():  # oldest first
                if admitted > cutoff:
                    break
                late.append(stream)
            for stream in late:
                del self._admitted[stream]  # its reader releases the address's count
                _close_under_reader(stream)


def _close_under_reader(stream: trio.abc.Stream) -> None:
    """Close a stream's socket now, from another task: a task blocked reading it wakes with
    ClosedResourceError (trio's `notify_closing`)."""
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(inner, trio.SocketStream):
        inner.socket.close()


async def _read_upgrade(
    stream: trio.abc.Stream, front: FrontSettings
) -> tuple[bytes, RequestHead, bytes, Dialect] | None:
    """The head of a WebSocket upgrade: its raw bytes, the parsed request, the bytes after it,
    and its dialect; None when it was answered here (404, 400) or is broken."""
    head = await _read_head(stream)
    if head is None:
        return None
    raw, request, trailing = head
    route = _route(request, front.native_path, socketio=front.socketio)
    if isinstance(route, tuple):
        await _respond(stream, *route)
        return None
    return raw, request, trailing, route


async def _serve_stream(
    front: FrontSettings, pending: _PendingHandshakes, handler: Handler, stream: trio.abc.Stream
) -> None:
    websocket_request: WebSocketRequest | None = None
    try:
        addr = _peer(stream)
    except OSError:  # gone before we could ask who it was
        addr = ""
    if not addr or not pending.admit(addr, stream):
        # Too many half-open handshakes from one address: a slowloris, not a browser.
        with trio.move_on_after(front.close_timeout, shield=True):
            await stream.aclose()
        return
    try:
        try:
            # Bounded in time by `pending.expire`, which closes the socket of a late head.
            routed = await _read_upgrade(stream, front)
        finally:
            pending.release(addr, stream)
        if routed is None:
            return
        raw, request, trailing, dialect = routed
        del routed
        if front.engine == "wsproto":
            upgrade = upgrade_request(request, trailing, stream, front.max_message_size)
            # The request has what it needs; this frame lives as long as the connection.
            raw = trailing = b""
            del request
            if upgrade is None:
                await _respond(stream, 400, "not a WebSocket upgrade")
                return
            await handler(Accepted(upgrade, addr, dialect))
            return
        connection = WebSocketConnection(
            _Replay(stream, raw),
            WSConnection(ConnectionType.SERVER),
            max_message_size=front.max_message_size,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection._reader_task)
            with trio.move_on_after(front.handshake_timeout):
                websocket_request = await connection._get_request()
            if websocket_request is None:
                nursery.cancel_scope.cancel()
                return
            try:
                await handler(Accepted(websocket_request, addr, dialect))
            finally:
                with trio.move_on_after(front.close_timeout):
                    await connection.aclose()
                nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
        pass  # the client went away (or failed the TLS handshake)
    except Exception:
        log.exception("connection front failed")
    finally:
        with trio.move_on_after(front.close_timeout, shield=True):
            await stream.aclose()


async def serve_front(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    front: FrontSettings,
    handler: Handler,
    handler_nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen until cancelled; connections run in `handler_nursery`, so they outlive the listener
    (a graceful shutdown stops accepting first, then drains)."""
    pending = _PendingHandshakes(front.max_pending_per_address, front.handshake_timeout)
    serve = partial(_serve_stream, front, pending, handler)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pending.expire)
        if ssl_context is None:
            plain = await trio.open_tcp_listeners(port, host=host)
            task_status.started(plain[0].socket.getsockname()[1])
            await trio.serve_listeners(serve, plain, handler_nursery=handler_nursery)
        else:
            secure = await trio.open_ssl_over_tcp_listeners(
                port, ssl_context, host=host, https_compatible=True
            )
            inner = secure[0].transport_listener
            if not isinstance(inner, trio.SocketListener):  # the SSL listener wraps TCP
                raise TypeError(f"unexpected listener {inner!r}")
            task_status.started(inner.socket.getsockname()[1])
            await trio.serve_listeners(serve, secure, handler_nursery=handler_nursery)
