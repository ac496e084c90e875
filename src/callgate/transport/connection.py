"""One task per WebSocket: handshake checks, authentication, the read loop, and a bounded writer.

Life of a connection
--------------------
1. The upgrade is accepted whenever the path is right: a refused token, a rate-limited address or
   a missing `auth` message close the *WebSocket* with a code (4001, 4029), because browsers cannot
   read the status of a failed upgrade.
2. Authentication: `Authorization: Bearer` on the upgrade, or a first `auth` message within
   `auth_timeout` (a `?token=` query parameter only when `allow_query_token` is on).
3. The read loop: size and type checks, the per-connection message limit, decoding, then the
   switchboard. The loop also ends at the token's `exp` (close 4001 `token expired`).
4. Everything sent to the client goes through a bounded memory channel drained by a writer task.
   Senders never wait: a full channel means the client is not reading, and that connection alone
   is aborted (close 1008), so one slow reader cannot slow anybody else.

Failures of one connection end that connection only: `ConnectionHub.handle` catches `Exception`
so that trio-websocket's server, which stops entirely when a handler raises, keeps serving.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from callgate.auth import INVALID, Identity, TokenVerifier
from callgate.core.actions import Ack, Action, Audit, CancelTimer, Deliver, SendError, StartTimer
from callgate.core.events import Authenticated, Disconnected, MessageReceived, TimerFired, TimerId
from callgate.errors import AuthError, CloseCode, CloseConnection, ErrorCode
from callgate.ice import ice_servers
from callgate.log import get_logger
from callgate.protocol.codec import (
    FieldLimits,
    ProtocolError,
    decode,
    encode,
    encode_error,
    peek_ref,
)
from callgate.protocol.messages import Auth, Ref
from callgate.transport.timers import Timers

if TYPE_CHECKING:
    from callgate.audit import AuditLog
    from callgate.config import Settings
    from callgate.core.switchboard import Switchboard
    from callgate.ratelimit import RateLimiter

log = get_logger("callgate.connection")


@dataclass(frozen=True, slots=True)
class _CloseRequest:
    code: int
    reason: str


class PeerGone(Exception):
    """The client's socket closed under us (trio-websocket's ConnectionClosed, translated)."""


class Connection:
    """One client socket: its id, its user once authenticated, and its bounded outbox."""

    def __init__(self, conn_id: str, ws: WebSocketConnection, addr: str, queue_size: int) -> None:
        self.id = conn_id
        self.ws = ws
        self.addr = addr
        self.user: str | None = None
        self.scope = trio.CancelScope()
        self.close_code: int | None = None
        self.close_reason = ""
        self.writer_done = trio.Event()
        self._outbox, self._outbox_reader = trio.open_memory_channel[str | _CloseRequest](
            queue_size
        )

    def push(self, text: str) -> None:
        """Queue one message without waiting; a full queue aborts this connection."""
        self._enqueue(text)

    def close(self, code: int, reason: str) -> None:
        """Close once everything queued before has been sent."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self._enqueue(_CloseRequest(code, reason))

    def abort(self, code: int, reason: str) -> None:
        """Stop now, without draining the queue (the client is not reading)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.scope.cancel()

    def _enqueue(self, item: str | _CloseRequest) -> None:
        try:
            self._outbox.send_nowait(item)
        except trio.WouldBlock:
            self.abort(CloseCode.POLICY_VIOLATION, "client too slow: outbound queue full")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the connection is already finishing

    async def run_writer(self) -> None:
        try:
            async for item in self._outbox_reader:
                if isinstance(item, _CloseRequest):
                    await self.ws.aclose(item.code, item.reason)
                    return
                await self.ws.send_message(item)
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


def _bearer_token(request: WebSocketRequest) -> str | None:
    for name, value in request.headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


def _remote_address(request: WebSocketRequest) -> str:
    remote = request.remote
    return str(getattr(remote, "address", remote))


class ConnectionHub:
    """All live connections of one server, and the executor of the switchboard's actions."""

    def __init__(
        self,
        settings: Settings,
        board: Switchboard,
        verifier: TokenVerifier,
        limiter: RateLimiter,
        audit: AuditLog,
        nursery: trio.Nursery,
    ) -> None:
        self._settings = settings
        self._board = board
        self._verifier = verifier
        self._limiter = limiter
        self._audit = audit
        self._timers = Timers(nursery, self._on_timer)
        self._connections: dict[str, Connection] = {}
        self._field_limits = FieldLimits(**settings.validation.model_dump())

    # -- inspection (tests) ------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def armed_timers(self) -> int:
        return len(self._timers)

    # -- executing the core's decisions ------------------------------------------------------

    def execute(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Deliver(conn=conn, event=event, data=data):
                    self._push(conn, encode(event, data))
                case Ack(conn=conn, ref=ref):
                    self._push(conn, encode("ack", None, ref))
                case SendError(conn=conn, code=code, message=message, ref=ref, retry_after=retry):
                    self._push(conn, encode_error(code, message, ref, retry))
                    if code is ErrorCode.RATE_LIMITED:
                        self._count_strike(conn)
                case Audit(event=event, fields=fields):
                    self._audit.write(event, fields)
                case StartTimer(timer=timer, deadline=deadline):
                    self._timers.start(timer, deadline)
                case CancelTimer(timer=timer):
                    self._timers.cancel(timer)

    def _push(self, conn_id: str, text: str) -> None:
        connection = self._connections.get(conn_id)
        if connection is not None:
            connection.push(text)

    def _count_strike(self, conn_id: str) -> None:
        connection = self._connections.get(conn_id)
        if connection is not None and self._limiter.is_flooding(conn_id):
            connection.close(CloseCode.RATE_LIMIT_ABUSE, "rate limit exceeded")

    def _on_timer(self, timer: TimerId) -> None:
        self.execute(self._board.handle(TimerFired(timer), trio.current_time()))

    # -- one connection ----------------------------------------------------------------------

    async def handle(self, request: WebSocketRequest) -> None:
        """trio-websocket's handler. Contains every failure of this connection."""
        conn_id = secrets.token_urlsafe(12)
        try:
            await self._serve(request, conn_id)
        except Exception:
            # The traceback has no locals (see callgate.log), so no token or SDP reaches it.
            log.exception("connection failed", conn=conn_id)

    async def _serve(self, request: WebSocketRequest, conn_id: str) -> None:
        server = self._settings.server
        target = urlsplit(request.path)
        if target.path != server.path:
            await request.reject(404, body=b'{"message": "not found"}')
            return
        addr = _remote_address(request)
        connection = Connection(conn_id, await request.accept(), addr, server.outbound_queue)
        self._audit.write("conn.open", {"conn": conn_id, "addr": addr})
        try:
            with connection.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(connection.run_writer)
                    try:
                        await self._converse(connection, request, target.query)
                    except PeerGone:
                        pass
                    except CloseConnection as close:
                        connection.close(close.close_code, close.reason)
                        # Let the writer flush what is queued (the error, say) and the close frame.
                        with trio.move_on_after(server.close_timeout):
                            await connection.writer_done.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self._forget(connection)

    def _forget(self, connection: Connection) -> None:
        """Synchronous cleanup: runs even when the connection was cancelled."""
        self._connections.pop(connection.id, None)
        if connection.user is not None:
            now = trio.current_time()
            self.execute(self._board.handle(Disconnected(connection.id), now))
        closed = connection.ws.closed
        code = connection.close_code or (closed.code if closed is not None else None)
        reason = connection.close_reason or (closed.reason if closed is not None else None)
        self._audit.write(
            "conn.close",
            {"conn": connection.id, "user": connection.user, "close_code": code, "reason": reason},
        )

    async def _converse(
        self, connection: Connection, request: WebSocketRequest, query: str
    ) -> None:
        retry = self._limiter.admit_handshake(connection.addr)
        if retry is not None:
            connection.push(
                encode_error(
                    ErrorCode.RATE_LIMITED,
                    "too many connections from your address",
                    retry_after=retry,
                )
            )
            raise CloseConnection(CloseCode.RATE_LIMIT_ABUSE, "rate limit exceeded")
        try:
            identity, ref = await self._authenticate(connection, request, query)
        except AuthError as refused:
            self._audit.write(
                "auth.failed",
                {"conn": connection.id, "addr": connection.addr, "reason": refused.detail},
            )
            raise
        self._admit(connection, identity, ref)
        with trio.move_on_at(_trio_deadline(identity.expires_at)):
            await self._read_loop(connection)
            return
        raise CloseConnection(CloseCode.UNAUTHENTICATED, "token expired")

    async def _authenticate(
        self, connection: Connection, request: WebSocketRequest, query: str
    ) -> tuple[Identity, Ref | None]:
        """Raises: AuthError, CloseConnection, PeerGone."""
        query_tokens = parse_qs(query).get("token")
        if query_tokens and not self._settings.auth.allow_query_token:
            raise AuthError(INVALID, "query_token_refused")
        token = _bearer_token(request) or (query_tokens[0] if query_tokens else None)
        if token:
            return self._verifier.verify(token), None
        with trio.move_on_after(self._settings.server.auth_timeout):
            text = await connection.receive()
            self._check_size(text)
            try:
                envelope = decode(text, self._field_limits)
            except ProtocolError:
                raise AuthError("authentication required", "not_authenticated") from None
            if not isinstance(envelope.message, Auth):
                raise AuthError("authentication required", "not_authenticated")
            return self._verifier.verify(envelope.message.token), envelope.ref
        raise AuthError("auth timeout", "auth_timeout")

    def _admit(self, connection: Connection, identity: Identity, ref: Ref | None) -> None:
        connection.user = identity.user
        self._connections[connection.id] = connection
        self.execute(
            self._board.handle(Authenticated(connection.id, identity.user), trio.current_time())
        )
        connection.push(encode("session", self._session_data(connection, identity)))
        if ref is not None:
            connection.push(encode("ack", None, ref))
        self._audit.write(
            "auth.ok",
            {"conn": connection.id, "user": identity.user, "expires_at": identity.expires_at},
        )

    def _session_data(self, connection: Connection, identity: Identity) -> dict[str, object]:
        now = int(time.time())
        return {
            "user": identity.user,
            "connectionId": connection.id,
            "sessionId": secrets.token_urlsafe(24),
            "expiresAt": identity.expires_at,
            "iceServers": ice_servers(self._settings.ice, identity.user, now=now),
        }

    def _check_size(self, text: str) -> None:
        limit = self._settings.server.max_message_bytes
        # Characters are at most 4 bytes: only encode when the text could be over the limit.
        if len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit:
            raise CloseConnection(CloseCode.MESSAGE_TOO_BIG, "message too big")

    async def _read_loop(self, connection: Connection) -> None:
        while True:
            text = await connection.receive()
            self._check_size(text)
            retry = self._limiter.admit_message(connection.id)
            if retry is not None:
                connection.push(
                    encode_error(ErrorCode.RATE_LIMITED, "too many messages", peek_ref(text), retry)
                )
                if self._limiter.is_flooding(connection.id):
                    raise CloseConnection(CloseCode.RATE_LIMIT_ABUSE, "rate limit exceeded")
                continue
            try:
                envelope = decode(text, self._field_limits)
            except ProtocolError as bad:
                connection.push(encode_error(bad.code, bad.message, bad.ref))
                continue
            if isinstance(envelope.message, Auth):
                # Token refresh on an open connection is contract section 8 (a later issue).
                connection.push(
                    encode_error(ErrorCode.FORBIDDEN, "already authenticated", envelope.ref)
                )
                continue
            event = MessageReceived(connection.id, envelope.message, envelope.ref)
            self.execute(self._board.handle(event, trio.current_time()))


def _trio_deadline(expires_at: int) -> float:
    """The trio-clock moment of a unix time (`exp`)."""
    remaining = expires_at - time.time()
    return trio.current_time() + max(0.0, remaining) if math.isfinite(remaining) else math.inf
