"""One client socket: its identity, its dialect, its bounded outbox and its writer.

A `Connection` speaks one wire dialect (protocol/dialects.py: native JSON envelopes or
Engine.IO/Socket.IO framing) over one engine (the `Engine` interface below, implemented whole by
both: engine.py for wsproto, trio_engine.py for trio-websocket). Senders never wait: a frame goes
straight to the socket when it can (`push`), else through a bounded memory channel drained by the
writer task (both made with the first such frame), and a full channel means the client is not
reading, so that connection alone is closed (1008, see `_overflow`). Full means `queue_size`
frames, or `queue_bytes` characters of frames: a count of frames alone let a client that does not
read have 256 frames of 64 KB each held for it. `ConnectionHub` (hub.py) runs
a connection's life.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio
from trio_websocket import CloseReason, ConnectionClosed

from callgate.auth import Identity
from callgate.errors import CloseCode, CloseConnection, ErrorCode
from callgate.protocol.codec import FieldLimits
from callgate.protocol.dialects import Credentials, Dialect, Incoming
from callgate.protocol.messages import Envelope, Ref
from callgate.ratelimit import ConnectionLimits
from callgate.transport.timers import Deadline

if TYPE_CHECKING:
    from callgate.transport.reactor import Reactor


def _always() -> bool:
    return True


_NO_LIMITS = ConnectionLimits([], [])


class _Flush:
    """Queued after a frame the socket took only in part: the writer sends the rest."""


_FLUSH = _Flush()


@dataclass(frozen=True, slots=True)
class _CloseRequest:
    code: int
    reason: str


class Engine(Protocol):
    """A WebSocket connection as the transport uses it, implemented whole by both engines: no
    part of it is probed for (`[server] engine` picks one; nothing else changes)."""

    @property
    def closed(self) -> CloseReason | None:
        """Why the connection closed, once it has."""
        ...

    async def get_message(self) -> str | bytes:
        """The next message. Raises: ConnectionClosed."""
        ...

    async def send_messages(self, messages: list[str]) -> None:
        """Write these text frames, in order (at once where the engine can). Raises:
        ConnectionClosed."""
        ...

    def try_send_now(self, message: str) -> bool:
        """Write one text frame now without waiting, or return False having written nothing."""
        ...

    @property
    def backlog(self) -> bool:
        """Part of a frame `try_send_now` wrote is still to go: the writer must flush it."""
        ...

    @property
    def has_more(self) -> bool:
        """More messages were read with the last one and wait for `get_message` (a burst)."""
        ...

    def try_ping_now(self, answered: Callable[[], None]) -> bool:
        """Send a WebSocket ping now, without waiting, and call `answered` when a pong comes;
        or return False having sent nothing (then `ping`). The heartbeat's cheap path."""
        ...

    async def ping(self) -> None:
        """Send a WebSocket ping and wait for its pong. Raises: ConnectionClosed."""
        ...

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...

    def attach_reactor(self, reactor: Reactor, inline: Callable[[str], bool]) -> None:
        """Wait for messages in `reactor`, handing them to `inline` (reactor.py), if the engine
        can; an engine that cannot keeps waiting in its own task."""
        ...

    def detach_reactor(self) -> None: ...

    def count_frames(self, counter: Callable[[], bool] | None) -> None:
        """Call `counter` for every frame that carries no whole message (a ping, a pong that
        answers nothing, a fragment but the last), if the engine can see them: False means over
        the rate (a ping then goes unanswered); what it raises, `get_message` raises. None
        stops counting."""
        ...


class PeerGone(Exception):
    """The client's socket closed under us (trio-websocket's ConnectionClosed, translated)."""


class ClientLeft(PeerGone):
    """The client said goodbye in its dialect (a Socket.IO DISCONNECT, an Engine.IO close) on
    a socket that is still open: the server closes it with 1000 (`leave`)."""


class Connection:
    """One client socket: its id, its identity once authenticated, and its bounded outbox."""

    def __init__(
        self,
        conn_id: str,
        ws: Engine,
        dialect: Dialect,
        addr: str,
        queue_size: int,
        close_timeout: float = 3.0,
        *,
        queue_bytes: int = 1 << 20,
    ) -> None:
        self.id = conn_id
        self.ws = ws
        self.dialect = dialect
        self.addr = addr
        self.opened_at = time.time()  # unix time, for the admin API's ages
        self.identity: Identity | None = None
        # Its message and flood windows (set by the hub from the configured limits).
        self.limits = _NO_LIMITS
        # Where the writer and pings run: the hub's nursery for this connection (`run_in`),
        # whose cancel scope `abort` cancels.
        self.nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._aborted = False
        # The outbox overflowed: the writer sends the close (1008) after the frame in hand, and
        # the connection gets `close_timeout` seconds for it (see `_overflow`).
        self._overflowed = False
        # ... and the close is the overflow's own, so the writer sends its farewell first.
        self._farewell_owed = False
        self._close_timeout = close_timeout
        # Its entries in the hub's `Deadlines`: the heartbeat, and the token's expiry.
        # Cancelled when the connection ends.
        self.keepalive: Deadline | None = None
        self.expiry: Deadline | None = None
        # A heartbeat ping is out and its pong has not come back yet; when it went out.
        self.ping_outstanding = False
        self.pinged_at = 0.0
        self.close_code: int | None = None
        self.close_reason = ""
        self.writer_done = trio.Event()
        # The outbox and its writer task exist from the first frame that has to wait for the
        # socket: an idle connection whose frames all went straight out has neither.
        self._queue_size = queue_size
        self._outbox: trio.MemorySendChannel[str | _CloseRequest | _Flush] | None = None
        # Frames queued and not yet written. At 0 the writer has nothing in hand, so a frame
        # may go straight to the socket without overtaking any (see `push`).
        self._in_flight = 0
        # Their size, in characters (bytes, for the ASCII text of nearly every frame), and the
        # most it may reach: one frame over it is queued only when nothing else is.
        self._queued_chars = 0
        self._queue_chars = queue_bytes
        # False once the outbox overflowed: from then on nothing goes straight out either.
        self._direct = True
        # Set by the hub: False while it handles a burst of messages from one read, when the
        # writer's one write per batch beats a write per message.
        self.may_write_now: Callable[[], bool] = _always

    @property
    def user(self) -> str | None:
        return self.identity.user if self.identity is not None else None

    # -- the dialect: how this connection reads and renders messages ------------------------

    def send_event(self, event: str, data: Mapping[str, Any]) -> None:
        self.push(self.dialect.event(event, data))

    def send_ack(self, ref: Ref) -> None:
        ack = self.dialect.ack(ref)
        if ack is not None:
            self.push(ack)

    def send_error(
        self, code: ErrorCode, message: str, ref: Ref | None = None, retry_after: int | None = None
    ) -> None:
        self.push(self.dialect.error(code, message, ref, retry_after))

    def read_sign_in(
        self, text: str, limits: FieldLimits, upgrade: Credentials | None = None
    ) -> Credentials | None:
        """A frame read before sign-in: the credentials in it (or `upgrade`'s, the upgrade's
        own, where the dialect takes them), or None once it is answered.

        Raises: AuthError (no sign-in), ClientLeft (the client said goodbye).
        """
        reading = self.dialect.sign_in(text, limits, upgrade)
        if isinstance(reading, Credentials):
            return reading
        self._obey(reading)
        return None

    def read_message(self, text: str, limits: FieldLimits) -> Envelope | None:
        """A frame as an envelope, or None for frames that carry none (pings, pongs).

        Raises: ProtocolError, ClientLeft.
        """
        reading = self.dialect.read(text, limits)
        self._obey(reading)
        return reading.envelope

    def _obey(self, reading: Incoming) -> None:
        """Do what a frame asks of the connection besides its message. Raises: ClientLeft."""
        if reading.left:
            raise ClientLeft
        if reading.pong:
            self.ping_outstanding = False
        if reading.reply is not None:
            self.push(reading.reply)

    def peek_ref(self, text: str) -> Ref | None:
        return self.dialect.peek_ref(text)

    def close(self, code: int, reason: str) -> None:
        """Close once everything queued before has been sent, after the dialect's farewell."""
        if self.close_code is None:
            self._close_after(self.dialect.farewell(code, reason), code, reason)

    def _close_after(self, last: list[str], code: int, reason: str) -> None:
        for text in last:
            self.push(text)
        if self.close_code is None:  # (unless those frames overflowed the outbox: `_overflow`)
            self.close_code, self.close_reason = code, reason
            self._enqueue(_CloseRequest(code, reason))

    def leave(self) -> None:
        """Close 1000 after everything queued, with no farewell: the client left (ClientLeft)."""
        if self.close_code is None:
            self._close_after([], CloseCode.NORMAL, "client disconnected")

    def refuse(
        self, code: int, reason: str, error: tuple[ErrorCode, str, int | None] | None = None
    ) -> None:
        """Turn the client away before it signed in: what the dialect says then (the `error`
        event, if any; a Socket.IO CONNECT_ERROR), and the close."""
        if self.close_code is None:
            rendered = (
                None if error is None else self.dialect.error(error[0], error[1], None, error[2])
            )
            self._close_after(self.dialect.refusal(code, reason, rendered), code, reason)

    # -- queueing ----------------------------------------------------------------------------

    def push(self, text: str) -> None:
        """Send one frame without waiting: straight to the socket when nothing is queued before
        it and the socket takes it whole (the wsproto engine), else through the writer. A full
        queue aborts this connection.

        Writing straight away saves waking the writer task for each message of sparse traffic,
        the common case of signaling. During a burst (`may_write_now` is False) frames queue,
        and the writer sends each connection's share of the burst in one write.
        """
        if (
            self._in_flight == 0
            and self._direct
            and self.may_write_now()
            and self.ws.try_send_now(text)
        ):
            if self.ws.backlog:
                self._enqueue(_FLUSH)  # the socket took part of it: the writer sends the rest
            return
        self._enqueue(text)

    def run_in(self, nursery: trio.Nursery) -> None:
        """The nursery this connection's life runs in: `abort` cancels it, and all inside.

        Its own cancel scope, not one more around it: a cancel scope costs as much as a
        token's signature check in a connect storm (trio enters each through a generator).
        """
        self.nursery, self._scope = nursery, nursery.cancel_scope
        if self._aborted:
            self._scope.cancel()

    def abort(self, code: int, reason: str) -> None:
        """Stop now, without draining the queue (the client is gone, or out of time)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self._aborted = True
        if self._scope is not None:
            self._scope.cancel()

    def _enqueue(self, item: str | _CloseRequest | _Flush) -> None:
        if self._overflowed:
            return  # nothing more for a client that does not read: only the close
        outbox = self._outbox or self._start_writer()
        if outbox is None:
            return  # the connection is already finishing
        size = len(item) if isinstance(item, str) else 0  # a close or flush always fits
        if size and self._queued_chars and self._queued_chars + size > self._queue_chars:
            self._overflow()
            return
        try:
            outbox.send_nowait(item)
            self._in_flight += 1
            self._queued_chars += size
        except trio.WouldBlock:
            self._overflow()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the connection is already finishing

    def _overflow(self) -> None:
        """The outbox is full: the client is not reading. Close it with 1008.

        Not by cancelling its writer: stopped in the middle of a frame, it would leave the
        stream where no close frame can follow (the client would read the close as the rest of
        that frame). The writer finishes the write in hand, drops everything queued behind it
        and sends the farewell and the close. The client has `close_timeout` seconds to read
        that far; then the whole connection is cancelled, and the socket closed without more.
        """
        self._overflowed = True
        self._direct = False  # no frame goes straight out any more either
        if self.close_code is None:
            self.close_code = CloseCode.POLICY_VIOLATION
            self.close_reason = "client too slow: outbound queue full"
            self._farewell_owed = True
        if self._scope is not None:
            deadline = trio.current_time() + self._close_timeout
            self._scope.deadline = min(self._scope.deadline, deadline)

    def _start_writer(self) -> trio.MemorySendChannel[str | _CloseRequest | _Flush] | None:
        if self.nursery is None:
            return None
        outbox, inbox = trio.open_memory_channel[str | _CloseRequest | _Flush](self._queue_size)
        try:
            self.nursery.start_soon(self._run_writer, inbox)
        except RuntimeError:  # the nursery has closed: the connection is over
            self.nursery = None
            return None
        self._outbox = outbox
        return outbox

    def start_ping(self) -> None:
        """Send a WebSocket ping; `ping_outstanding` stays True until its pong arrives."""
        if self.nursery is None or self.ping_outstanding:
            return
        self.ping_outstanding = True
        if self.ws.try_ping_now(self._pong_arrived):
            if self.ws.backlog:
                self._enqueue(_FLUSH)  # the socket took one byte: the writer sends the other
            return  # most pings: a write now, the pong read by the reactor
        try:
            self.nursery.start_soon(self._ping)
        except RuntimeError:
            self.nursery = None

    def _pong_arrived(self) -> None:
        self.ping_outstanding = False

    async def _ping(self) -> None:
        # A short task (it lives for one round trip), so an idle connection sleeps without one.
        try:
            await self.ws.ping()
        except ConnectionClosed:
            return
        self.ping_outstanding = False

    async def _run_writer(
        self, inbox: trio.MemoryReceiveChannel[str | _CloseRequest | _Flush]
    ) -> None:
        """Drain the outbox; everything queued when the writer wakes goes to the engine in one
        `send_messages`, so a burst costs one write on wsproto, not one per message."""
        try:
            async for first in inbox:
                if self._overflowed:
                    break
                batch: list[str | _CloseRequest | _Flush] = [first]
                while len(batch) < 256:
                    try:
                        batch.append(inbox.receive_nowait())
                    except trio.WouldBlock:
                        break
                texts: list[str] = []
                flush = False
                for item in batch:
                    if isinstance(item, _CloseRequest):
                        if texts:
                            await self.ws.send_messages(texts)
                        await self.ws.aclose(item.code, item.reason)
                        return
                    if isinstance(item, str):
                        texts.append(item)
                    else:
                        flush = True
                if texts or flush:  # (a `_Flush` alone: what the socket did not take at once)
                    await self.ws.send_messages(texts)
                self._in_flight -= len(batch)
                self._queued_chars -= sum(map(len, texts))
                if self._overflowed:
                    break  # the frames queued behind the batch in hand are dropped
            if self._overflowed and self.close_code is not None:
                if self._farewell_owed:
                    await self.ws.send_messages(
                        self.dialect.farewell(self.close_code, self.close_reason)
                    )
                await self.ws.aclose(self.close_code, self.close_reason)
        except ConnectionClosed:
            return
        finally:
            self.writer_done.set()

    async def receive(self) -> str:
        """The next text frame.

        Raises:
            PeerGone: the client closed or the socket broke.
            CloseConnection: a binary frame (1003).
        """
        try:
            message = await self.ws.get_message()
        except ConnectionClosed:
            raise PeerGone from None
        if isinstance(message, bytes):
            raise CloseConnection(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
        return message
