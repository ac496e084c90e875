"""The listening socket and the HTTP front: which protocol a new connection speaks.

callgate reads each request head itself (httptools, bounded in size and time), checks it once
(upgrade.py: the route, the WebSocket headers, the origin) and answers what it refuses with a JSON
body, as the contract asks (Engine.IO long-polling must be told to use the WebSocket transport).
An upgrade then goes to the configured engine: on `wsproto` the checked request itself
(`WsprotoRequest`), so the head is parsed once; on `trio-websocket` the bytes already read are
replayed into trio-websocket's public `wrap_server_stream`, which parses them again.
"""

from __future__ import annotations

import errno
import json
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Protocol

import trio
from trio_websocket import wrap_server_stream

from callgate.log import get_logger
from callgate.transport.connection import Engine
from callgate.transport.engine import WsprotoRequest
from callgate.transport.head import BadHead, HeadParser, RequestHead
from callgate.transport.proxy import (
    V1_PREFIX,
    V2_SIGNATURE,
    BadForwarding,
    ProxyHeaderParser,
    looks_like_proxy_header,
)
from callgate.transport.trio_engine import TrioWebSocketRequest
from callgate.transport.upgrade import Refusal, Upgrade, UpgradeRules, read_upgrade

log = get_logger("callgate.listener")
MAX_HEAD_BYTES = 16384


class UpgradeRequest(Protocol):
    """A checked WebSocket upgrade the handler accepts (101) or rejects, on either engine."""

    async def accept(self) -> Engine: ...

    async def reject(self, status_code: int, *, body: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Accepted:
    """What the front tells the connection handler about a new WebSocket."""

    request: UpgradeRequest
    addr: str  # the client's: the TCP peer, or what a trusted proxy says (upgrade.addr)
    upgrade: Upgrade


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


async def _read_head(
    stream: trio.abc.Stream, received: bytes = b""
) -> tuple[bytes, RequestHead, bytes] | None:
    """Everything read, the request head, and the bytes after the head; None for a broken or
    oversized head, or a client that left. `received`: bytes of the request already read."""
    parser = HeadParser(MAX_HEAD_BYTES)
    data = received
    while True:
        if not data:
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
        data = b""


async def _read_proxy_header(
    stream: trio.abc.Stream, peer: str, front: FrontSettings
) -> tuple[str, bytes] | None:
    """With `[server] proxy_protocol` on: the client's address and the bytes after the PROXY
    header, which a trusted proxy must send and nobody else may; None to refuse (close)."""
    trusted = peer in front.rules.trusted_proxies
    parser = ProxyHeaderParser()
    received = b""
    while True:
        data = bytes(await stream.receive_some(4096))
        if not data:
            return None
        if not trusted:
            received += data
            if looks_like_proxy_header(received):
                if len(received) < len(V2_SIGNATURE) and not received.startswith(V1_PREFIX):
                    continue  # too few bytes to tell yet
                log.warning("PROXY header from an untrusted peer refused", addr=peer)
                return None
            return peer, received
        try:
            header = parser.feed(data)
        except BadForwarding as bad:
            log.warning("PROXY header refused", addr=peer, error=str(bad))
            return None
        if header is not None:
            return header.source or peer, header.rest


async def _respond(stream: trio.abc.Stream, status: int, message: str) -> None:
    body = json.dumps({"code": status, "message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    await stream.send_all(head.encode() + body)


@dataclass(frozen=True, slots=True)
class FrontSettings:
    rules: UpgradeRules
    engine: str
    max_message_size: int
    handshake_timeout: float
    close_timeout: float
    # Handshakes in progress per client address; more are closed at once (slowloris). Not
    # counted for a trusted proxy, whose clients are told apart only once their heads are read.
    max_pending_per_address: int = 256
    # `[server] proxy_protocol`: trusted proxies open every connection with a PROXY header.
    proxy_protocol: bool = False
    # With PROXY protocol and TLS: the TLS context, for the handshake after the PROXY header
    # (the listener is then plain TCP).
    tls_after_proxy: ssl.SSLContext | None = None


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

    def admit(self, addr: str, stream: trio.abc.Stream, *, capped: bool = True) -> bool:
        count = self._counts.get(addr, 0)
        if capped and count >= self._limit:
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
    stream: trio.abc.Stream, front: FrontSettings, peer: str
) -> tuple[trio.abc.Stream, bytes, Upgrade, bytes] | None:
    """The head of a WebSocket upgrade: the stream to go on with (TLS begins after a PROXY
    header), the head's raw bytes (without a PROXY header), what it asks for (the client's
    address included), and the bytes after it; None when it was answered here (404, 400) or
    is broken."""
    early = b""
    if front.proxy_protocol:
        proxied = await _read_proxy_header(stream, peer, front)
        if proxied is None:
            return None
        peer, early = proxied
        if front.tls_after_proxy is not None:
            # The PROXY header comes in the clear, before the TLS handshake (HAProxy's spec).
            stream = trio.SSLStream(
                _Replay(stream, early),
                front.tls_after_proxy,
                server_side=True,
                https_compatible=True,
            )
            early = b""
    head = await _read_head(stream, early)
    if head is None:
        return None
    raw, request, trailing = head
    upgrade = read_upgrade(request, front.rules, peer)
    if isinstance(upgrade, Refusal):
        await _respond(stream, upgrade.status, upgrade.message)
        return None
    return stream, raw, upgrade, trailing


async def _serve_stream(
    front: FrontSettings,
    pending: _PendingHandshakes,
    handler: Handler,
    stream: trio.abc.Stream,
) -> None:
    try:
        addr = _peer(stream)
    except OSError:  # gone before we could ask who it was
        addr = ""
    capped = addr not in front.rules.trusted_proxies
    if not addr or not pending.admit(addr, stream, capped=capped):
        # Too many half-open handshakes from one address: a slowloris, not a browser.
        with trio.move_on_after(front.close_timeout, shield=True):
            await stream.aclose()
        return
    accepted = stream
    try:
        try:
            # Bounded in time by `pending.expire`, which closes the socket of a late head.
            routed = await _read_upgrade(stream, front, addr)
        finally:
            pending.release(addr, accepted)
        if routed is None:
            return
        stream, raw, upgrade, trailing = routed
        del routed
        if front.engine == "wsproto":
            request = WsprotoRequest(stream, upgrade.key, trailing, front.max_message_size)
            # The request has what it needs; this frame lives as long as the connection.
            raw = trailing = b""
            await handler(Accepted(request, upgrade.addr, upgrade))
            return
        async with trio.open_nursery() as nursery:
            replayed: TrioWebSocketRequest | None = None
            with trio.move_on_after(front.handshake_timeout):
                replayed = TrioWebSocketRequest(
                    await wrap_server_stream(
                        nursery, _Replay(stream, raw), max_message_size=front.max_message_size
                    )
                )
            if replayed is None:
                nursery.cancel_scope.cancel()
                return
            try:
                await handler(Accepted(replayed, upgrade.addr, upgrade))
            finally:
                with trio.move_on_after(front.close_timeout):
                    await replayed.aclose()
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
    reuse_port: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen until cancelled; connections run in `handler_nursery`, so they outlive the listener
    (a graceful shutdown stops accepting first, then drains). `reuse_port`: share the port with
    other processes (`[server] reuse_port`, `callgate serve --workers`)."""
    pending = _PendingHandshakes(front.max_pending_per_address, front.handshake_timeout)
    serve = partial(_serve_stream, front, pending, handler)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pending.expire)
        if reuse_port:
            sockets = await open_reuse_port_listeners(port, host=host)
            task_status.started(sockets[0].socket.getsockname()[1])
            listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(sockets)
            if ssl_context is not None and front.tls_after_proxy is None:
                listeners = [
                    trio.SSLListener(plain, ssl_context, https_compatible=True) for plain in sockets
                ]
            await trio.serve_listeners(serve, listeners, handler_nursery=handler_nursery)
        elif ssl_context is None or front.tls_after_proxy is not None:
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


# What trio.open_tcp_listeners asks of listen(): the largest backlog, which the kernel caps at
# net.core.somaxconn.
_BACKLOG = 0xFFFF


async def open_reuse_port_listeners(port: int, *, host: str) -> list[trio.SocketListener]:
    """What `trio.open_tcp_listeners` opens, each socket bound with `SO_REUSEPORT` as well, so
    that other processes (callgate's workers) listen on the same port and the kernel spreads
    new connections over them.

    trio's public API has no way to set a socket option before `bind` (python-trio/trio#281,
    open): this repeats its few lines (one listener per address of `host`, `SO_REUSEADDR`,
    IPv6 sockets v6-only) on trio's public socket layer.

    Raises: OSError, as `trio.open_tcp_listeners` does (the port is taken by a socket without
    `SO_REUSEPORT`, or by another user's).
    """
    addresses = await trio.socket.getaddrinfo(
        host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, address in addresses:
            try:
                sock = trio.socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue  # an IPv6 address on a host without IPv6, as trio skips it
                raise
            try:
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                sock.setsockopt(trio.socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == trio.socket.AF_INET6:
                    sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(_BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    if not listeners:
        raise OSError(errno.EAFNOSUPPORT, f"no address family of {host!r} is supported here")
    return listeners
