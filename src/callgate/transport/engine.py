"""The `wsproto` connection engine: WebSocket frames without a task or a channel per message.

trio-websocket gives every connection a reader task that hands each message to the handler
through a memory channel, and sends each outgoing message with its own lock and `send_all`. That
costs about four times the whole per-message budget of the reference server (docs/performance.md).
This engine drives wsproto directly: `get_message` reads the socket and decodes every frame of
that read inline, and `send_messages` writes everything a connection has queued in one `send_all`.

The upgrade is answered here too (`WsprotoRequest`): the front has parsed and checked the request
head already (head.py, upgrade.py), so the 101 is written directly, instead of wsproto parsing the
head a second time (a third of a connect storm's HTTP work); only wsproto's post-handshake state
machine is kept.

It implements the transport's whole `Engine` interface (connection.py), as trio_engine.py does
for trio-websocket, so `[server] engine` picks one or the other and nothing else changes.

The socket is read and written without waiting (`os.read` / `os.write` on its descriptor, which
trio keeps non-blocking) where trio would take a trip through the scheduler for each call; the
descriptor is asked of trio's socket at every use, so a closed socket reads as -1 (EBADF), never
as a descriptor the kernel has given to somebody else since.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from http import HTTPStatus

import trio
from trio_websocket import CloseReason, ConnectionClosed
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError, generate_accept_token

from callgate.errors import CLOSED_BY_CLIENT, PROTOCOL_FAILURES, CloseCode
from callgate.errors import CloseConnection as Close
from callgate.protocol.frames import fast_frames, text_frame
from callgate.transport.reactor import Reactor

RECEIVE_BYTES = 65536
# A read at least this long was probably part of a burst, with more already waiting.
_LONG_READ = 2048
# A server's ping frame with no payload (FIN, opcode 0x9, unmasked, length 0).
_HEARTBEAT_PING = b"\x89\x00"


class WsprotoConnection:
    # Slots: a server holds tens of thousands of these, mostly idle.
    __slots__ = (
        "_binary",
        "_buffer",
        "_count_frame",
        "_drained",
        "_early",
        "_failure",
        "_fast",
        "_heartbeat_answered",
        "_inbox",
        "_inline",
        "_max_message_size",
        "_pongs",
        "_protocol",
        "_reactor",
        "_send_done",
        "_sending",
        "_size",
        "_socket",
        "_stream",
        "_text",
        "_too_big",
        "_unsent",
        "closed",
    )

    def __init__(self, stream: trio.abc.Stream, protocol: Connection, max_message_size: int):
        self._stream = stream
        self._protocol = protocol
        self._max_message_size = max_message_size
        # One write at a time: `_sending` is the lock, `_send_done` (made only when somebody
        # has to wait) wakes the waiters. Lighter than a trio lock, which every idle
        # connection would carry.
        self._sending = False
        self._send_done: trio.Event | None = None
        # Messages read and decoded, oldest first, waiting for `get_message`.
        self._inbox: list[str | bytes] = []
        self._text: list[str] = []
        self._binary: list[bytes] = []
        self._size = 0
        # A message grew past `max_message_size`: once the messages before it are taken,
        # `get_message` raises the 1009 for the transport to close with (after the dialect's
        # farewell: a Socket.IO client is told `closing` and `41` first, contract 11).
        self._too_big = False
        self._pongs: dict[bytes, trio.Event] = {}
        # Told of a pong that answers no awaited `ping` (see `try_ping_now`).
        self._heartbeat_answered: Callable[[], None] | None = None
        self.closed: CloseReason | None = None
        # Complete, unfragmented text frames and pongs are decoded here; the first frame of
        # any other kind hands this connection's input to wsproto for good (see fast_frames).
        self._fast = True
        self._buffer = bytearray()
        # trio's socket, read and written without waiting (`_read_now`, `_write_now`); None over
        # TLS (an SSLStream has its own buffers).
        self._socket: trio.socket.SocketType | None = (
            stream.socket if isinstance(stream, trio.SocketStream) else None
        )
        # The last read was short: the socket was empty after it (see `_receive`).
        self._drained = True
        # Bytes that came with the upgrade request, read before the socket (see `feed`).
        self._early = b""
        # Bytes written before any frame: the 101 (see `WsprotoRequest.accept`), or what of a
        # frame `try_send_now` could not write at once. The next write sends them first, and
        # the connection sends them before it waits for the client (`get_message`).
        self._unsent = b""
        # With a reactor (`attach_reactor`): the handler of messages read while parked, and
        # what it raised, for this connection's task to raise in its place.
        self._reactor: Reactor | None = None
        self._inline: Callable[[str], bool] | None = None
        self._failure: Exception | None = None
        # Told of every frame that carries no whole message (`count_frames`).
        self._count_frame: Callable[[], bool] | None = None

    # -- receiving ---------------------------------------------------------------------------

    def attach_reactor(self, reactor: Reactor, inline: Callable[[str], bool]) -> None:
        """From now on, while this connection waits for a message, it waits in `reactor`, and
        the messages that arrive meanwhile go to `inline` in the reactor's task.

        `inline(text)` handles one text message without waiting and returns True, or returns
        False before doing anything: the message then goes to `get_message` as usual. What it
        raises is raised by `get_message`, in this connection's task, after the messages before.
        """
        if self._socket is not None and reactor.running:
            self._reactor, self._inline = reactor, inline

    def detach_reactor(self) -> None:
        self._reactor = self._inline = None

    def count_frames(self, counter: Callable[[], bool] | None) -> None:
        """From now on `counter()` is called for every frame the client sends that carries no
        whole message: a ping, a pong that answers no ping of ours, and each fragment of a
        message but its last (the message itself is counted when it is read). It returns False
        for a frame over the rate (a ping is then not answered), and may raise
        (CloseConnection), which `get_message` raises. None stops it.

        Such frames cost wsproto's parsing each, as a message does, and were free: a client
        could send them without end (empty continuation frames, pings) and never meet a limit.
        Whole text frames and pongs the fast path reads (before any frame it leaves to wsproto)
        are not counted here.
        """
        self._count_frame = counter

    def _frame_admitted(self) -> bool:
        counter = self._count_frame
        return counter is None or counter()

    async def get_message(self) -> str | bytes:
        """The next message. Raises: ConnectionClosed; CloseConnection 1009 for a message over
        `max_message_size` (nothing of it is read any more); or what the inline handler raised.
        """
        while True:
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            if self._inbox:
                return self._inbox.pop(0)
            if self._too_big:
                raise Close(CloseCode.MESSAGE_TOO_BIG, "message too big")
            if self.closed is not None:
                raise ConnectionClosed(self.closed)
            if self._unsent and not self._sending:
                # Not read with the 101 still here: a browser waits for it before it sends `auth`.
                await self._send(b"")
                continue
            try:
                data = await self._receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if data is None:  # the reactor filled the inbox, or has a failure to raise
                continue
            if not data:
                self._set_closed(1006, "connection lost")
                continue
            if self._fast:
                data = self._take_fast_frames(data)
                if not data:
                    continue
            try:
                self._protocol.receive_data(bytes(data))
            except RemoteProtocolError:
                self._set_closed(1002, "protocol error")
                continue
            await self._handle_events()

    def feed(self, data: bytes) -> None:
        """Bytes the client sent right behind its upgrade request: they are read first."""
        self._early += data

    async def _receive(self) -> bytes | bytearray | None:
        """The next bytes from the socket, with one trip through the scheduler, not two.

        trio's `receive_some` tries `recv` first and, on sparse traffic, nearly always gets
        EAGAIN (a system call and a Python exception), then waits, reads, and yields once more.
        Here, after a short read (the socket was drained, and signaling traffic is sparse) the
        connection waits for readability first and reads once; after a long one (a burst) it
        reads at once and then yields, so a busy connection cannot starve the others.
        """
        if self._early:
            data, self._early = self._early, b""
            return data
        sock = self._socket
        if sock is None:  # TLS: the SSLStream reads through its own buffers
            return await self._stream.receive_some(RECEIVE_BYTES)
        reactor = self._reactor
        if reactor is not None and self._fast and reactor.running:
            # Wait with every other idle connection; the reactor reads for us (on_readable).
            return await reactor.park(sock.fileno(), self)
        if not self._drained:
            try:
                data = _read_now(sock)
            except (BlockingIOError, InterruptedError):
                pass
            else:
                self._drained = len(data) < _LONG_READ
                await trio.lowlevel.checkpoint()
                return data
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = _read_now(sock)
            except (BlockingIOError, InterruptedError):
                continue  # woken without data after all: wait again
            self._drained = len(data) < _LONG_READ
            return data

    def on_readable(self) -> None:
        """The reactor saw this parked connection's socket readable: read it, and handle what
        came inline, or wake this connection's task to handle it."""
        reactor, inline, sock = self._reactor, self._inline, self._socket
        if reactor is None or inline is None or sock is None:
            return
        fd = sock.fileno()
        try:
            data = _read_now(sock)
        except (BlockingIOError, InterruptedError):
            return  # nothing after all; stay parked
        except OSError:
            data = b""
        if not data:
            reactor.wake(fd, b"")  # the end of the stream: the task closes the connection
            return
        rest = self._take_fast_frames(data)
        if rest:
            reactor.wake(fd, rest)  # a frame for wsproto, after the messages before it
            return
        inbox = self._inbox
        while inbox:
            message = inbox.pop(0)
            if isinstance(message, str):
                try:
                    handled = inline(message)
                except Exception as failure:  # the task raises it, in order
                    self._failure = failure
                    reactor.wake(fd, None)
                    return
                if handled:
                    if not reactor.holds(fd):
                        return  # the handler cancelled this connection: its task ends it
                    continue
            inbox.insert(0, message)  # the task takes it from here
            reactor.wake(fd, None)
            return

    def _take_fast_frames(self, data: bytes | bytearray) -> bytes:
        """Decode the common frames of `data` here; return what wsproto must see from now on."""
        if self._buffer:  # the start of a frame is waiting for the rest
            self._buffer += data
            data = self._buffer
        used, messages, pongs, rest_is_slow = fast_frames(data, self._max_message_size)
        self._inbox.extend(messages)
        for payload in pongs:
            self._pong(payload)
        if rest_is_slow:
            self._fast = False
            rest = bytes(data[used:])
            self._buffer = bytearray()
            return rest
        if data is self._buffer:
            del self._buffer[:used]
        elif used < len(data):  # usually every frame of a read is whole, and nothing is kept
            self._buffer = bytearray(data[used:])
        return b""

    async def _handle_events(self) -> None:
        for event in self._protocol.events():
            if isinstance(event, TextMessage | BytesMessage) and (
                event.frame_finished and not event.message_finished
            ):
                self._frame_admitted()  # a fragment: counted (over the rate: still joined)
            if isinstance(event, TextMessage):
                self._text.append(event.data)
                self._size += len(event.data)
                if self._size > self._max_message_size:
                    self._message_too_big()
                    return
                if event.message_finished:
                    self._inbox.append("".join(self._text))
                    self._text.clear()
                    self._size = 0
            elif isinstance(event, BytesMessage):
                # Refused whole by the transport (1003), but bounded here like text: a client
                # must not grow the server's memory with one endless fragmented message.
                self._binary.append(bytes(event.data))
                self._size += len(event.data)
                if self._size > self._max_message_size:
                    self._message_too_big()
                    return
                if event.message_finished:
                    self._inbox.append(b"".join(self._binary))
                    self._binary.clear()
                    self._size = 0
            elif isinstance(event, Ping):
                if self._frame_admitted() and self._protocol.state is ConnectionState.OPEN:
                    await self._send(self._protocol.send(event.response()))
            elif isinstance(event, Pong):
                if not self._pong(bytes(event.payload)):
                    # A pong that answers nothing: parsed by wsproto as a ping is, so counted
                    # as a ping is (else a ping, then pongs without end, went uncounted).
                    self._frame_admitted()
            elif isinstance(event, CloseConnection) and (
                self._protocol.state is ConnectionState.OPEN
            ):
                # Not the client's close: wsproto found its frames broken (invalid UTF-8, a
                # reserved bit, an unmasked frame...) and says so with a close event, the
                # connection still open. Fail it with that code (RFC 6455 7.1.7).
                code = event.code if event.code in PROTOCOL_FAILURES else 1002
                await self.aclose(code, PROTOCOL_FAILURES[code])
                return
            elif isinstance(event, CloseConnection):
                # The client's close. Closed first: the writer may run while the reply is sent,
                # and must not frame another message into a closing connection. Not with the
                # client's reason: that is its own text (up to 123 bytes), and reasons go to the
                # trail.
                self._set_closed(event.code, CLOSED_BY_CLIENT)
                if self._protocol.state is ConnectionState.REMOTE_CLOSING:
                    await self._send(self._protocol.send(event.response()))

    def _message_too_big(self) -> None:
        """Stop collecting the message: the transport closes 1009 (see `get_message`)."""
        self._too_big = True
        self._text.clear()
        self._binary.clear()
        self._size = 0

    def _pong(self, payload: bytes) -> bool:
        """Whether the pong answered something: a `ping`, or the heartbeat."""
        waiter = self._pongs.pop(payload, None)
        if waiter is not None:
            waiter.set()
        elif self._heartbeat_answered is not None:
            # The heartbeat's pong (or an unsolicited one: RFC 6455 5.5.3 lets a peer send
            # pongs as its own heartbeat, and any pong shows the peer is there).
            answered, self._heartbeat_answered = self._heartbeat_answered, None
            answered()
        else:
            return False
        return True

    def _set_closed(self, code: int, reason: str | None) -> None:
        if self.closed is None:
            self.closed = CloseReason(code, reason)

    # -- sending -------------------------------------------------------------------------------

    @property
    def has_more(self) -> bool:
        """Messages already read and decoded, waiting for `get_message`: a burst."""
        return bool(self._inbox)

    @property
    def backlog(self) -> bool:
        """Bytes of a frame `try_send_now` wrote only in part wait for the next `_send`."""
        return bool(self._unsent)

    def stage(self, data: bytes) -> None:
        """Bytes to go out first, with the next frame or before the next read (the 101)."""
        self._unsent += data

    def try_send_now(self, message: str) -> bool:
        """Write one text frame now, without waiting, when nothing else is being sent.

        True: the frame is the socket's, after what was staged (if it took only part, the rest
        is kept: `backlog`, and goes out first on the next `_send`). False: nothing was
        written; queue it.
        """
        if (
            self._socket is None
            or self._sending
            or self.closed is not None
            or self._protocol.state is not ConnectionState.OPEN
        ):
            return False
        data = self._unsent + text_frame(message)
        try:
            sent = _write_now(self._socket, data)
        except (BlockingIOError, InterruptedError):
            return False  # and what was staged stays staged
        except OSError:
            self._set_closed(1006, "connection lost")
            return True  # gone: the read side ends the connection; nothing more to send
        self._unsent = data[sent:]
        return True

    async def send_message(self, message: str) -> None:
        await self.send_messages([message])

    async def send_messages(self, messages: list[str]) -> None:
        """Frame every message and write them all at once. Raises: ConnectionClosed."""
        if self.closed is not None or self._protocol.state is not ConnectionState.OPEN:
            raise ConnectionClosed(self.closed or CloseReason(1006, "closing"))
        await self._send(b"".join(map(text_frame, messages)))

    def try_ping_now(self, answered: Callable[[], None]) -> bool:
        """The heartbeat's ping, written now without a task, a channel or a random payload: an
        idle connection's ping is a 2-byte write, and its pong is read by the reactor, which
        calls `answered`. False, having written nothing, when the socket is busy or the
        connection is not open (the caller then pings with `ping`)."""
        if (
            self._socket is None
            or self._sending
            or self._unsent
            or self.closed is not None
            or self._protocol.state is not ConnectionState.OPEN
        ):
            return False
        try:
            sent = _write_now(self._socket, _HEARTBEAT_PING)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._set_closed(1006, "connection lost")
            return True  # gone: the read side ends the connection
        if sent < len(_HEARTBEAT_PING):
            self._unsent = _HEARTBEAT_PING[sent:]  # the rest goes first on the next write
        self._heartbeat_answered = answered
        return True

    async def ping(self) -> None:
        """Send a ping and wait for its pong. Raises: ConnectionClosed."""
        payload = os.urandom(8)
        waiter = trio.Event()
        self._pongs[payload] = waiter
        if self.closed is not None or self._protocol.state is not ConnectionState.OPEN:
            raise ConnectionClosed(self.closed or CloseReason(1006, "closing"))
        await self._send(self._protocol.send(Ping(payload=payload)))
        await waiter.wait()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Send a close frame (once) and stop writing; the peer's reply ends the read side."""
        if self._protocol.state is ConnectionState.OPEN:
            self._set_closed(code, reason)
            try:
                await self._send(self._protocol.send(CloseConnection(code=code, reason=reason)))
            except ConnectionClosed:
                return
        self._set_closed(code, reason)

    async def _send(self, data: bytes) -> None:
        while self._sending:
            if self._send_done is None:
                self._send_done = trio.Event()
            await self._send_done.wait()
        self._sending = True
        try:
            if self._unsent:
                data, self._unsent = self._unsent + data, b""
            if self._socket is not None and data:
                # What the kernel takes at once needs no trip through trio (which yields after
                # every successful send); only a remainder waits for the socket.
                try:
                    sent = _write_now(self._socket, data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                data = data[sent:]
            if data:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._set_closed(1006, "connection lost")
            raise ConnectionClosed(self.closed) from None
        finally:
            self._sending = False
            if self._send_done is not None:
                self._send_done.set()
                self._send_done = None


def _read_now(sock: trio.socket.SocketType) -> bytes:
    """What the socket has, without waiting. Raises: BlockingIOError (nothing yet), OSError."""
    return os.read(sock.fileno(), RECEIVE_BYTES)


def _write_now(sock: trio.socket.SocketType, data: bytes) -> int:
    """As much of `data` as the socket takes now. Raises: BlockingIOError (none), OSError."""
    return os.write(sock.fileno(), data)


class WsprotoRequest:
    """A checked upgrade request (upgrade.py), before the handler accepts or rejects it.

    Spent once answered: it lets go of the key, which would otherwise stay with every open
    connection.
    """

    def __init__(
        self, stream: trio.abc.Stream, key: bytes, trailing: bytes, max_message_size: int
    ) -> None:
        self._stream = stream
        self._key: bytes | None = key
        self._trailing = trailing
        self._max_message_size = max_message_size

    def _spend(self) -> bytes:
        key = self._key
        if key is None:
            raise RuntimeError("the upgrade request was already answered")
        self._key = None
        return key

    async def accept(self) -> WsprotoConnection:
        """101 Switching Protocols (RFC 6455 4.2.2; no subprotocol, no extension).

        The 101 is staged, not written: it goes out in one write with the first frame, or
        before the connection first waits for the client. A client that signs in with its
        token in the header gets its 101 and its `session` in one segment, one system call
        instead of two (a tenth of a connect storm's system time); the bytes on the wire are
        the same.
        """
        accept_token = generate_accept_token(self._spend())
        protocol = Connection(ConnectionType.SERVER)
        connection = WsprotoConnection(self._stream, protocol, self._max_message_size)
        connection.stage(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_token + b"\r\n\r\n"
        )
        connection.feed(self._trailing)
        self._trailing = b""
        await trio.lowlevel.checkpoint()
        return connection

    async def reject(self, status_code: int, *, body: bytes = b"") -> None:
        self._spend()
        reason = HTTPStatus(status_code).phrase.encode() if status_code in _STATUSES else b""
        await self._stream.send_all(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status_code, reason, len(body), body)
        )


_STATUSES = {status.value for status in HTTPStatus}
