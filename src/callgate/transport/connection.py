"""One client socket, in either dialect: its identity, its bounded outbox and its writer.

`Connection` renders callgate's native JSON envelopes; `SocketIOConnection` the same messages in
Engine.IO v4 / Socket.IO v5 framing (contract section 11). Senders never wait: a frame goes
straight to the socket when it can (`push`), else through a bounded memory channel drained by the
writer task (both made with the first such frame), and a full channel means the client is not
reading, so that connection alone is closed (1008, see `_overflow`). `ConnectionHub` (hub.py) runs
a connection's life.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

import trio
from trio_websocket import CloseReason, ConnectionClosed

from callgate.auth import Identity
from callgate.errors import CloseCode, CloseConnection, ErrorCode
from callgate.protocol import socketio as sio
from callgate.protocol.codec import (
    FieldLimits,
    ProtocolError,
    decode,
    decode_object,
    encode,
    encode_error,
    peek_ref,
)
from callgate.protocol.messages import Envelope, Ref
from callgate.ratelimit import ConnectionLimits
from callgate.transport.timers import Deadline


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


class MessageSocket(Protocol):
    """The part of a WebSocket connection the transport uses (either engine's)."""

    closed: CloseReason | None

    async def get_message(self) -> str | bytes: ...

    async def send_message(self, message: str) -> None: ...

    async def ping(self) -> None: ...

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...


@runtime_checkable
class DirectWriter(Protocol):
    """An engine that can write a frame at once, without a task (the wsproto engine)."""

    @property
    def backlog(self) -> bool: ...

    def try_send_now(self, message: str) -> bool: ...


_WRITES_DIRECTLY: dict[type, bool] = {}


def _direct_writer(ws: object) -> DirectWriter | None:
    """`ws` if its engine writes directly; the protocol check, which is slow (typing inspects
    the class), is made once per engine class."""
    kind = type(ws)
    direct = _WRITES_DIRECTLY.get(kind)
    if direct is None:
        direct = _WRITES_DIRECTLY[kind] = isinstance(ws, DirectWriter)
    return cast(DirectWriter, ws) if direct else None


class PeerGone(Exception):
    """The client's socket closed under us (trio-websocket's ConnectionClosed, translated)."""


class Connection:
    """One client socket: its id, its identity once authenticated, and its bounded outbox."""

    def __init__(
        self,
        conn_id: str,
        ws: MessageSocket,
        addr: str,
        queue_size: int,
        close_timeout: float = 3.0,
    ) -> None:
        self.id = conn_id
        self.ws = ws
        self.addr = addr
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
        # Its entries in the hub's `Deadlines`: the keepalive (or Engine.IO heartbeat), and the
        # token's expiry. Cancelled when the connection ends.
        self.keepalive: Deadline | None = None
        self.expiry: Deadline | None = None
        # A ping is out and its pong has not come back yet.
        self.ping_outstanding = False
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
        self._direct = _direct_writer(ws)
        # Set by the hub: False while it handles a burst of messages from one read, when the
        # writer's one write per batch beats a write per message.
        self.may_write_now: Callable[[], bool] = _always

    @property
    def user(self) -> str | None:
        return self.identity.user if self.identity is not None else None

    # -- the dialect: how this connection renders messages (native JSON envelopes) ---------

    def send_event(self, event: str, data: Mapping[str, Any]) -> None:
        self.push(encode(event, data))

    def send_ack(self, ref: Ref) -> None:
        self.push(encode("ack", None, ref))

    def send_error(
        self, code: ErrorCode, message: str, ref: Ref | None = None, retry_after: int | None = None
    ) -> None:
        self.push(encode_error(code, message, ref, retry_after))

    def decode_frame(self, text: str, limits: FieldLimits) -> Envelope | None:
        """A frame as an envelope, or None for frames that carry none (Socket.IO pongs).

        Raises: ProtocolError, PeerGone.
        """
        return decode(text, limits)

    def peek_ref(self, text: str) -> Ref | None:
        return peek_ref(text)

    def farewell(self, code: int, reason: str) -> list[str]:
        """The frames that go out before a close frame with `code` (none in this dialect)."""
        return []

    def close(self, code: int, reason: str) -> None:
        """Close once everything queued before has been sent, after the dialect's farewell."""
        if self.close_code is None:
            self._close_after(self.farewell(code, reason), code, reason)

    def _close_after(self, last: list[str], code: int, reason: str) -> None:
        for text in last:
            self.push(text)
        if self.close_code is None:  # (unless those frames overflowed the outbox: `_overflow`)
            self.close_code, self.close_reason = code, reason
            self._enqueue(_CloseRequest(code, reason))

    def refuse(
        self, code: int, reason: str, error: tuple[ErrorCode, str, int | None] | None = None
    ) -> None:
        """Turn the client away before it signed in: the `error` event (if any), then the close."""
        if self.close_code is None:
            if error is not None:
                self.send_error(error[0], error[1], None, error[2])
            self.close(code, reason)

    # -- queueing ----------------------------------------------------------------------------

    def push(self, text: str) -> None:
        """Send one frame without waiting: straight to the socket when nothing is queued before
        it and the socket takes it whole (the wsproto engine), else through the writer. A full
        queue aborts this connection.

        Writing straight away saves waking the writer task for each message of sparse traffic,
        the common case of signaling. During a burst (`may_write_now` is False) frames queue,
        and the writer sends each connection's share of the burst in one write.
        """
        direct = self._direct
        if (
            self._in_flight == 0
            and direct is not None
            and self.may_write_now()
            and direct.try_send_now(text)
        ):
            if direct.backlog:
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
        try:
            outbox.send_nowait(item)
            self._in_flight += 1
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
        self._direct = None  # no frame goes straight out any more either
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
        try:
            self.nursery.start_soon(self._ping)
        except RuntimeError:
            self.nursery = None

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
        """Drain the outbox; everything queued when the writer wakes goes out in one write where
        the engine can batch (wsproto), so a burst costs one `send_all`, not one per message."""
        send_batch = getattr(self.ws, "send_messages", None)
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
                for item in batch:
                    if isinstance(item, _CloseRequest):
                        await self._flush(texts, send_batch)
                        await self.ws.aclose(item.code, item.reason)
                        return
                    if isinstance(item, str):
                        texts.append(item)
                    elif not texts and send_batch is not None:
                        await send_batch([])  # _Flush: what the socket did not take at once
                await self._flush(texts, send_batch)
                self._in_flight -= len(batch)
                if self._overflowed:
                    break
            if self._overflowed and self.close_code is not None:
                if self._farewell_owed:
                    last = self.farewell(self.close_code, self.close_reason)
                    await self._flush(last, send_batch, dropping=False)
                await self.ws.aclose(self.close_code, self.close_reason)
        except ConnectionClosed:
            return
        finally:
            self.writer_done.set()

    async def _flush(self, texts: list[str], send_batch: Any, *, dropping: bool = True) -> None:
        """Write `texts`; one by one (trio-websocket), the rest are `dropping` once the outbox
        has overflowed."""
        if not texts:
            return
        if send_batch is not None:
            await send_batch(texts)
            texts.clear()
            return
        for text in texts:
            if dropping and self._overflowed:
                break  # the frames behind the one in hand are dropped (see `_overflow`)
            await self.ws.send_message(text)
        texts.clear()

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


# Close codes after which a Socket.IO client must not reconnect by itself (contract 11).
_NO_RECONNECT = {
    CloseCode.FORBIDDEN,
    CloseCode.RATE_LIMIT_ABUSE,
    CloseCode.UNSUPPORTED_DATA,
    CloseCode.MESSAGE_TOO_BIG,
}


class SocketIOConnection(Connection):
    """The same connection, framed as Engine.IO v4 / Socket.IO v5 (contract section 11)."""

    def __init__(
        self,
        conn_id: str,
        ws: MessageSocket,
        addr: str,
        queue_size: int,
        close_timeout: float = 3.0,
    ) -> None:
        super().__init__(conn_id, ws, addr, queue_size, close_timeout)
        # When the last Engine.IO ping went out (the heartbeat's cadence runs from there).
        self.pinged_at = 0.0

    def send_event(self, event: str, data: Mapping[str, Any]) -> None:
        self.push(sio.event_packet(event, data))

    def send_ack(self, ref: Ref) -> None:
        if isinstance(ref, int):
            self.push(sio.ack_packet(ref, {"ok": True}))

    def send_error(
        self, code: ErrorCode, message: str, ref: Ref | None = None, retry_after: int | None = None
    ) -> None:
        error: dict[str, Any] = {"code": code.value, "message": message}
        if retry_after is not None:
            error["retryAfter"] = retry_after
        if isinstance(ref, int):
            self.push(sio.ack_packet(ref, {"ok": False, "error": error}))
        else:
            self.push(sio.event_packet("error", error))

    def decode_frame(self, text: str, limits: FieldLimits) -> Envelope | None:
        kind, payload = text[:1], text[1:]
        if kind == sio.ENGINE_PONG:
            self.ping_outstanding = False
            return None
        if kind == sio.ENGINE_PING:
            self.push(sio.ENGINE_PONG + payload)
            return None
        if kind == sio.ENGINE_CLOSE:
            raise PeerGone
        if kind != sio.ENGINE_MESSAGE:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "not an Engine.IO message packet")
        packet = sio.parse_socket_packet(payload)
        if packet.kind == sio.DISCONNECT:
            raise PeerGone
        if packet.kind != sio.EVENT or packet.namespace != sio.MAIN_NAMESPACE:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "only events on the main namespace")
        return decode_object(sio.event_envelope(packet), limits)

    def peek_ref(self, text: str) -> Ref | None:
        try:
            return sio.parse_socket_packet(text[1:]).ack_id if text[:1] == "4" else None
        except ProtocolError:
            return None

    def farewell(self, code: int, reason: str) -> list[str]:
        # Say why first; then `41` (Socket.IO DISCONNECT) where the client must not come back.
        closing = sio.event_packet("closing", {"code": code, "reason": reason})
        return [closing, sio.disconnect_packet()] if code in _NO_RECONNECT else [closing]

    def refuse(
        self, code: int, reason: str, error: tuple[ErrorCode, str, int | None] | None = None
    ) -> None:
        """A failed CONNECT: CONNECT_ERROR with the reason, then the transport closes (no
        `closing` event, since the client never had a session)."""
        if self.close_code is None:
            self._close_after([sio.connect_error_packet(reason)], code, reason)
