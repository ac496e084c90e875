"""The hub: every connection of a server, one task each, and the executor of the core's actions.

One task per WebSocket: handshake checks, authentication, the read loop, and a bounded writer.

Life of a connection
--------------------
1. Before the upgrade: the path (else 404), and whether the server is still accepting (else
   503).
2. After the upgrade, refusals close the *WebSocket* with a code, because browsers cannot read
   the status of a failed upgrade: too many connections from the address or the user, or too many
   handshakes (4029); an `Origin` not allowed (4003); a bad token (4001); a revoked token (4003).
3. Authentication: `Authorization: Bearer` on the upgrade, or a first `auth` message within
   `auth_timeout` (a `?token=` query parameter only when `allow_query_token` is on). A `resume`
   session id (in the `auth` message, or the `Callgate-Resume` header) lets the switchboard hand
   the new connection the calls of a dropped device.
4. The read loop: size and type checks, the per-connection message limit, decoding, then the
   switchboard. An `auth` message on an open connection renews the token (same user only).
5. Beside it: the writer, started with the first frame that has to wait for the socket; the
   expiry (`token-expiring` at `exp - refresh_before`, close 4001 at `exp`) and the keepalive
   (a ping every `ping_interval`; no pong by the next one drops the peer), which are entries
   of the hub's one clock heap (`Deadlines`), not tasks: an idle connection is one task.
6. A frame goes straight to the socket when nothing is queued before it (the wsproto engine),
   else through a bounded memory channel drained by the writer. Senders never wait: a full
   channel means the client is not reading, and that connection alone is closed (1008, within
   `close_timeout`), so one slow reader cannot slow anybody else.

Failures of one connection end that connection only: `ConnectionHub.handle` catches `Exception`,
so nothing a client does can reach the listener (whose nursery would otherwise stop serving).
The per-socket classes, in both dialects, are in connection.py.
"""

from __future__ import annotations

import math
import random
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING

import trio

from callgate.auth import INVALID, Identity, TokenVerifier
from callgate.core.events import (
    Authenticated,
    Disconnected,
    Event,
    MessageReceived,
    RevocationChanged,
    TokenRefreshed,
)
from callgate.errors import AuthError, CloseCode, CloseConnection, ErrorCode
from callgate.ice import ice_servers
from callgate.log import get_logger
from callgate.metrics import Metrics
from callgate.protocol.codec import FieldLimits, ProtocolError, valid_token
from callgate.protocol.dialects import Credentials
from callgate.protocol.messages import Auth, Envelope, Ref
from callgate.revocation import RevocationList
from callgate.transport.connection import ClientLeft, Connection, PeerGone
from callgate.transport.executor import Dispatch, Executor, LocalDispatch, trio_deadline
from callgate.transport.listener import Accepted
from callgate.transport.reactor import Reactor
from callgate.transport.timers import Deadline, Deadlines
from callgate.transport.upgrade import Upgrade

if TYPE_CHECKING:
    from callgate.audit import AuditLog
    from callgate.cluster.node import ClusterNode
    from callgate.config import Settings
    from callgate.core.switchboard import Switchboard
    from callgate.ratelimit import RateLimiter

log = get_logger("callgate.connection")
ORIGIN_NOT_ALLOWED = "origin not allowed"


class _LeftForTask(Exception):
    """A message the reactor counted and decoded but cannot finish, because finishing it
    waits (a token refresh): raised in the connection's own task, which finishes it."""

    def __init__(self, envelope: Envelope) -> None:
        super().__init__("left for the connection's task")
        self.envelope = envelope


class _TurnedAway(CloseConnection):
    """Refused before sign-in for where the client comes from, not for its token: audited as
    `conn.refused` (already), not as `auth.failed`."""


class ConnectionHub:
    """All connections of one server: their lives, from the accepted upgrade to the close, and
    what reloads change (keys, revocations). The core's actions are carried out by the
    executor (executor.py); events reach the core through `LocalDispatch`, or through the
    cluster once one is attached (cluster/node.py)."""

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
        self.verifier = verifier
        self._limiter = limiter
        # Every clock of the server in one heap and one task: the core's timers, and each
        # connection's heartbeat and token expiry.
        self._deadlines = Deadlines()
        nursery.start_soon(self._deadlines.run)
        # Where idle wsproto connections wait for their next message (reactor.py).
        self._reactor: Reactor | None = None
        if settings.server.engine == "wsproto" and Reactor.supported():
            self._reactor = Reactor()
            nursery.start_soon(self._reactor.run)
        self._live: dict[str, Connection] = {}  # authenticated
        self._all: dict[str, Connection] = {}  # accepted, authenticated or not
        self._per_address: Counter[str] = Counter()
        self._field_limits = FieldLimits(**settings.validation.model_dump())
        self.revocations = RevocationList()
        self.metrics = Metrics(self.live_counts)
        self.executor = Executor(self._live, self._deadlines, audit, self.metrics)
        self._dispatch: Dispatch = LocalDispatch(board, self.executor)
        self.accepting = True
        self._shutting_down = False
        # The moment a drain closes every connection (`drain`), while one is under way.
        self._drain_close: Deadline | None = None
        # True while a message is handled that has more from the same read behind it.
        self._in_burst = False
        self._all_gone = trio.Event()
        # Called (and awaited) when a token names an unknown `kid`; set when jwks_url is used.
        self.refresh_remote_keys: Callable[[], Awaitable[bool]] | None = None
        # Cluster mode (`attach_cluster`): events go through the cluster, not straight in.
        self.cluster: ClusterNode | None = None

    @property
    def reactor(self) -> Reactor | None:
        """Where idle connections wait (reactor.py); None on the trio-websocket engine."""
        return self._reactor

    def attach_cluster(self, node: ClusterNode) -> None:
        """From now on every core event goes through the cluster (cluster/node.py, made by
        server.py with this hub's executor: the cluster sits above the transport)."""
        self.cluster = self._dispatch = node

    def _new_conn_id(self) -> str:
        token = secrets.token_urlsafe(12)
        return token if self.cluster is None else self.cluster.new_conn_id(token)

    @property
    def ready(self) -> bool:
        """Accepting, and (in cluster mode) the cluster's Redis is reachable."""
        return self.accepting and self._dispatch.available

    # -- inspection (tests, metrics) -----------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self._all)

    @property
    def armed_timers(self) -> int:
        return len(self.executor.timers)

    @property
    def parked_connections(self) -> int:
        """Connections waiting for their next message in the reactor (wsproto engine)."""
        return len(self._reactor) if self._reactor is not None else 0

    @property
    def signed_in(self) -> Mapping[str, Connection]:
        """This node's authenticated connections, by id (read-only view, kept current)."""
        return self._live

    def live_counts(self) -> dict[str, dict[str, int]]:
        """Connections and calls by state, for the metrics gauges."""
        calls = {"pending": 0, "ringing": 0, "connected": 0}
        for call in self._board.calls:
            calls[call.state.name.lower()] += 1
        live = {
            "connections": {
                "unauthenticated": len(self._all) - len(self._live),
                "authenticated": len(self._live),
                "held": self._board.held_devices(),
            },
            "calls": calls,
        }
        if self.cluster is not None:
            live["cluster"] = self.cluster.live_counts()
        return live

    def audit(self, event: str, fields: dict[str, object]) -> None:
        self.executor.audit(event, fields)

    def dispatch(self, event: Event, *, forwarded: bool = False) -> None:
        self._dispatch.dispatch(event, forwarded=forwarded)

    # -- reloads and shutdown ----------------------------------------------------------------

    def apply_revocations(self, revocations: RevocationList) -> None:
        self.revocations = revocations
        self.dispatch(RevocationChanged(revocations.tokens, revocations.users))

    def adopt_revocations(self, event: RevocationChanged) -> None:
        """The cluster's list is now this node's too: its handshakes refuse those tokens."""
        self.revocations = RevocationList(event.token_ids, dict(event.users_before))

    def evict_all(self) -> None:
        for connection in list(self._live.values()):
            connection.close(CloseCode.GOING_AWAY, "node left the cluster")

    @property
    def connections(self) -> list[Connection]:
        """Every accepted connection of this node, signed in or not, oldest first."""
        return list(self._all.values())

    def drain(self, grace: float) -> None:
        """Stop taking sign-ins now (`/readyz` turns 503); in `grace` seconds close every
        connection with 1001, so the clients reconnect to other nodes. `undrain` undoes it."""
        self.accepting = False
        self._deadlines.cancel(self._drain_close)
        self._drain_close = self._deadlines.call_at(
            trio.current_time() + grace, self._close_drained
        )

    def _close_drained(self) -> None:
        self._drain_close = None
        for connection in list(self._all.values()):
            connection.close(CloseCode.GOING_AWAY, "server draining")

    def undrain(self) -> bool:
        """Take sign-ins again (False while the server shuts down: that is not undone)."""
        if self._shutting_down:
            return False
        self._deadlines.cancel(self._drain_close)
        self._drain_close = None
        self.accepting = True
        return True

    async def shutdown(self) -> None:
        """End every call (a single server), close every connection with 1001, and wait up to
        `drain_timeout` for them to go."""
        self._shutting_down = True
        self._deadlines.cancel(self._drain_close)
        self.accepting = False
        self._dispatch.shutting_down()
        for connection in list(self._all.values()):
            connection.close(CloseCode.GOING_AWAY, "server shutting down")
        with trio.move_on_after(self._settings.server.drain_timeout):
            if self._all:
                await self._all_gone.wait()
        for connection in list(self._all.values()):
            connection.abort(CloseCode.GOING_AWAY, "server shutting down")
        with trio.move_on_after(self._settings.server.close_timeout):
            await self._dispatch.flush()

    # -- one connection ----------------------------------------------------------------------

    async def handle(self, accepted: Accepted) -> None:
        """The front's handler. Contains every failure of this connection."""
        conn_id = self._new_conn_id()
        try:
            await self._serve(accepted, conn_id)
        except Exception:
            # The traceback has no locals (see callgate.log), so no token or SDP reaches it.
            log.exception("connection failed", conn=conn_id)

    async def _serve(self, accepted: Accepted, conn_id: str) -> None:
        server = self._settings.server
        upgrade, addr = accepted.upgrade, accepted.addr
        if not self.accepting:
            await accepted.request.reject(503, body=b'{"message": "server shutting down"}')
            return
        connection = Connection(
            conn_id,
            await accepted.request.accept(),
            upgrade.dialect,
            addr,
            server.outbound_queue,
            server.close_timeout,
            queue_bytes=server.outbound_queue_chars,
        )
        connection.limits = self._limiter.for_connection()
        connection.may_write_now = self._not_in_burst
        connection.ws.count_frames(partial(self._admit, connection, None))
        self._all[conn_id] = connection
        self._per_address[addr] += 1
        self.audit("conn.open", {"conn": conn_id, "addr": addr})
        try:
            async with trio.open_nursery() as nursery:
                connection.run_in(nursery)  # the writer starts there with the first frame
                try:
                    await self._converse(connection, upgrade)
                except ClientLeft:
                    connection.leave()  # a close frame (1000), not a dropped TCP connection
                    with trio.move_on_after(server.close_timeout):
                        await connection.writer_done.wait()
                except PeerGone:
                    pass
                except CloseConnection as close:
                    connection.close(close.close_code, close.reason)
                    # Let the writer flush what is queued (the error, say) and the close frame.
                    with trio.move_on_after(server.close_timeout):
                        await connection.writer_done.wait()
                except Exception:
                    # A bug: the client is told (1011, contract 9: reconnect with back-off),
                    # and `handle` logs it.
                    connection.close(CloseCode.INTERNAL_ERROR, "internal error")
                    with trio.move_on_after(server.close_timeout):
                        await connection.writer_done.wait()
                    raise
                nursery.cancel_scope.cancel()
        finally:
            self._forget(connection)

    def _forget(self, connection: Connection) -> None:
        """Synchronous cleanup: runs even when the connection was cancelled."""
        connection.nursery = None
        connection.ws.detach_reactor()  # drops the handler, and with it the cycle back to us
        connection.ws.count_frames(None)  # the same for the frame counter
        self._deadlines.cancel(connection.keepalive)
        self._deadlines.cancel(connection.expiry)
        self._all.pop(connection.id, None)
        self._per_address[connection.addr] -= 1
        if self._per_address[connection.addr] <= 0:
            del self._per_address[connection.addr]
        if self._live.pop(connection.id, None) is not None:
            self.dispatch(Disconnected(connection.id))
        if connection.close_code == CloseCode.POLICY_VIOLATION:
            self.metrics.queue_drops.inc()
        closed = connection.ws.closed
        code = connection.close_code or (closed.code if closed is not None else None)
        reason = connection.close_reason or (closed.reason if closed is not None else None)
        self.audit(
            "conn.close",
            {"conn": connection.id, "user": connection.user, "close_code": code, "reason": reason},
        )
        if not self._all:
            self._all_gone.set()
            self._all_gone = trio.Event()

    async def _converse(self, connection: Connection, upgrade: Upgrade) -> None:
        """Sign the client in, then read its messages until it leaves."""
        try:
            # The dialect's greeting first, even to a client turned away: a Socket.IO client
            # reads nothing before Engine.IO's open packet, so the CONNECT_ERROR of a refusal
            # sent without it is dropped, and the client waits, silent, for ever.
            for frame in connection.dialect.greeting(connection.id):
                connection.push(frame)
            self._admit_address(connection)
            self._admit_origin(connection, upgrade)
            self._start_heartbeat(connection)
            identity, credentials = await self._authenticate(connection, upgrade)
            self._check_not_revoked(identity)
            if len(self._board.devices_of(identity.user)) >= (
                self._settings.server.max_connections_per_user
            ):
                self.metrics.rate_limited.labels("connections_per_user").inc()
                raise CloseConnection(CloseCode.RATE_LIMIT_ABUSE, "too many connections")
            if not self._dispatch.available:
                raise CloseConnection(CloseCode.TRY_AGAIN_LATER, "cluster unavailable")
            if not self.accepting:  # a drain began while this client was signing in
                raise CloseConnection(CloseCode.GOING_AWAY, "server draining")
        except CloseConnection as refused:
            if not isinstance(refused, _TurnedAway) and (
                refused.close_code != CloseCode.RATE_LIMIT_ABUSE
            ):
                detail = refused.detail if isinstance(refused, AuthError) else refused.reason
                self.audit(
                    "auth.failed",
                    {"conn": connection.id, "addr": connection.addr, "reason": detail},
                )
            connection.refuse(refused.close_code, refused.reason)
            raise
        connection.identity = identity
        self._live[connection.id] = connection
        for frame in connection.dialect.welcome(connection.id):
            connection.push(frame)
        await self._dispatch.dispatch_and_wait(
            Authenticated(
                connection.id,
                identity.user,
                session_id=secrets.token_urlsafe(24),
                session=self._session_data(connection, identity),
                resume=credentials.resume,
                token_id=identity.token_id,
                issued_at=identity.issued_at,
                wall=time.time(),
            )
        )
        if credentials.ref is not None:
            connection.send_ack(credentials.ref)
        self.audit(
            "auth.ok",
            {"conn": connection.id, "user": identity.user, "expires_at": identity.expires_at},
        )
        self._arm_expiry(connection)
        await self._read_loop(connection)

    def _admit_address(self, connection: Connection) -> None:
        """Raises: CloseConnection 4029 when the address is over its connection cap or rate."""
        over_cap = (
            self._per_address[connection.addr] > self._settings.server.max_connections_per_address
        )
        retry = None if over_cap else self._limiter.admit_handshake(connection.addr)
        if over_cap or retry is not None:
            error = (ErrorCode.RATE_LIMITED, "too many connections from your address", retry or 1)
            connection.refuse(CloseCode.RATE_LIMIT_ABUSE, "rate limit exceeded", error)
            self.audit(
                "conn.refused", {"conn": connection.id, "addr": connection.addr, "code": 4029}
            )
            raise _TurnedAway(CloseCode.RATE_LIMIT_ABUSE, "rate limit exceeded")

    def _admit_origin(self, connection: Connection, upgrade: Upgrade) -> None:
        """Raises: CloseConnection 4003 for a browser page from an origin not allowed (contract
        9), before anything it sends is read or its token is looked at."""
        if upgrade.origin_refused:
            connection.refuse(CloseCode.FORBIDDEN, ORIGIN_NOT_ALLOWED)
            self.audit(
                "conn.refused", {"conn": connection.id, "addr": connection.addr, "code": 4003}
            )
            raise _TurnedAway(CloseCode.FORBIDDEN, ORIGIN_NOT_ALLOWED)

    def _check_not_revoked(self, identity: Identity) -> None:
        if self.revocations.revokes(identity.user, identity.token_id, identity.issued_at):
            raise CloseConnection(CloseCode.FORBIDDEN, "token revoked")

    async def _verify(self, token: str) -> Identity:
        """Verify, refreshing remote keys once when the token names an unknown `kid`."""
        try:
            return self.verifier.verify(token)
        except AuthError as refused:
            if refused.detail != "unknown_kid" or self.refresh_remote_keys is None:
                raise
            if not await self.refresh_remote_keys():
                raise
        return self.verifier.verify(token)

    async def _authenticate(
        self, connection: Connection, upgrade: Upgrade
    ) -> tuple[Identity, Credentials]:
        """The one sign-in flow of both dialects: the upgrade's credentials, else the first
        frames the dialect reads as a sign-in, within `auth_timeout`.

        Raises: AuthError, CloseConnection, PeerGone.
        """
        if upgrade.query_tokens and not self._settings.auth.allow_query_token:
            raise AuthError(INVALID, "query_token_refused")
        if upgrade.repeated_authorization:
            raise AuthError(INVALID, "repeated_authorization")
        bearer = upgrade.take_bearer()
        if bearer == "":  # `Authorization: Bearer` and no token: an empty token (contract 2)
            raise AuthError(INVALID, "malformed")
        token = bearer or (upgrade.query_tokens[0] if upgrade.query_tokens else None)
        if token and not connection.dialect.connects:
            return await self._verify(token), Credentials(token, upgrade.resume)
        # A dialect whose client signs in by a frame of its own all the same (Socket.IO) takes
        # what the upgrade carried (a token, a session to resume) where that frame has none.
        carried = Credentials(token or "", upgrade.resume) if token or upgrade.resume else None
        with trio.move_on_after(self._settings.server.auth_timeout):
            while True:
                text = await connection.receive()
                self._check_size(text)
                # Counted as every message after sign-in is: what a dialect answers before
                # sign-in (pings, CONNECTs to other namespaces) could otherwise go on without end.
                if not self._admit(connection, text):
                    continue
                credentials = connection.read_sign_in(text, self._field_limits, carried)
                if credentials is not None:
                    return await self._verify(credentials.token), credentials
        raise AuthError("auth timeout", "auth_timeout")

    def _session_data(self, connection: Connection, identity: Identity) -> dict[str, object]:
        return {
            "user": identity.user,
            "connectionId": connection.id,
            "expiresAt": identity.expires_at,
            "iceServers": ice_servers(self._settings.ice, identity.user, now=int(time.time())),
        }

    def _check_size(self, text: str) -> None:
        limit = self._settings.server.max_message_bytes
        # Characters are at most 4 bytes: only encode when the text could be over the limit.
        if len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit:
            raise CloseConnection(CloseCode.MESSAGE_TOO_BIG, "message too big")

    # -- reading -------------------------------------------------------------------------------

    async def _read_loop(self, connection: Connection) -> None:
        if self._reactor is not None:
            # While it waits, the connection waits in the reactor, which hands each message
            # to `_take_inline` without waking this task (see reactor.py); an engine that
            # cannot park keeps waiting here.
            connection.ws.attach_reactor(self._reactor, partial(self._take_inline, connection))
        while True:
            try:
                text = await connection.receive()
            except _LeftForTask as left:  # the reactor took it as far as it could
                await self._finish(connection, left.envelope)
                continue
            waiting = self._take(connection, text, time.perf_counter())
            if waiting is not None:
                await self._finish(connection, waiting)

    def _take_inline(self, connection: Connection, text: str) -> bool:
        """One message read by the reactor, handled in its task.

        Raises: `_LeftForTask` with a message that has to wait (a token refresh), already
        counted and decoded; CloseConnection, as `_read_loop` would. The engine raises either
        in the connection's task, after the messages before it.
        """
        waiting = self._take(connection, text, time.perf_counter())
        if waiting is not None:
            raise _LeftForTask(waiting)
        return True

    def _not_in_burst(self) -> bool:
        return not self._in_burst

    def _take(self, connection: Connection, text: str, arrived: float) -> Envelope | None:
        """Everything of one message that needs no waiting: its size, the rate limit, decoding
        (in that order: a Socket.IO frame's decoding may answer or end the connection), and
        its dispatch. Returns the message the caller must still `_finish`: a token refresh.

        Raises: CloseConnection (too big; flooding), PeerGone (the client said goodbye).
        """
        self._check_size(text)
        if not self._admit(connection, text):
            return None
        try:
            envelope = connection.read_message(text, self._field_limits)
        except ProtocolError as bad:
            connection.send_error(bad.code, bad.message, bad.ref)
            return None
        if envelope is None:
            return None
        if isinstance(envelope.message, Auth):
            return envelope
        received = MessageReceived(connection.id, envelope.message, envelope.ref)
        self._in_burst = connection.ws.has_more
        try:
            self.dispatch(received, forwarded=True)
        finally:
            self._in_burst = False
        self.metrics.observe_forward_latency(time.perf_counter() - arrived)
        return None

    async def _finish(self, connection: Connection, envelope: Envelope) -> None:
        """The part of a message that waits: a token refresh."""
        if isinstance(envelope.message, Auth):
            await self._refresh(connection, envelope.message, envelope.ref)

    def _admit(self, connection: Connection, text: str | None) -> bool:
        """Count a message against the connection's rate; over it, say so and drop it. `text`
        None: a frame that carries no whole message (a WebSocket ping, a pong that answers
        nothing, a fragment but the last), counted as a message is, from the first frame,
        signed in or not; over the rate nothing is sent (there is no message to answer).

        Raises: CloseConnection 4029 when the connection keeps flooding.
        """
        retry = connection.limits.admit_message()
        if retry is None:
            return True
        self.metrics.rate_limited.labels("messages").inc()
        if text is not None:
            connection.send_error(
                ErrorCode.RATE_LIMITED, "too many messages", connection.peek_ref(text), retry
            )
        if connection.limits.is_flooding():
            self.metrics.rate_limited.labels("flood").inc()
            raise CloseConnection(CloseCode.RATE_LIMIT_ABUSE, "rate limit exceeded")
        return False

    # -- a signed-in connection's token and heartbeat -------------------------------------------

    async def _refresh(self, connection: Connection, message: Auth, ref: Ref | None) -> None:
        """A fresh token on an open connection (contract section 8).

        Raises: CloseConnection 4003 for another user's token or a revoked one.
        """
        current = connection.identity
        if current is None:
            return
        try:
            if not valid_token(message.token):  # missing, empty, not a string: contract 2
                raise AuthError(INVALID, "malformed")
            identity = await self._verify(message.token)
        except AuthError as refused:
            # The current token still holds until its `exp`: the client may try again.
            connection.send_error(ErrorCode.FORBIDDEN, refused.reason, ref)
            self.audit(
                "auth.failed",
                {"conn": connection.id, "user": current.user, "reason": refused.detail},
            )
            return
        if identity.user != current.user:
            raise CloseConnection(CloseCode.FORBIDDEN, "identity change")
        self._check_not_revoked(identity)
        connection.identity = identity
        await self._dispatch.dispatch_and_wait(
            TokenRefreshed(
                connection.id,
                secrets.token_urlsafe(24),
                self._session_data(connection, identity),
                identity.token_id,
                identity.issued_at,
            )
        )
        if ref is not None:
            connection.send_ack(ref)
        self._arm_expiry(connection)  # the new token's `exp`

    def _arm_expiry(self, connection: Connection) -> None:
        """`token-expiring` at `exp - refresh_before`, close 4001 at `exp`; a refreshed token
        arms it again with its own `exp`."""
        self._deadlines.cancel(connection.expiry)
        connection.expiry = None
        identity = connection.identity
        if identity is None:
            return
        expires_at = identity.expires_at
        refresh_before = self._settings.auth.refresh_before

        def expired() -> None:
            connection.expiry = None
            connection.close(CloseCode.UNAUTHENTICATED, "token expired")

        def expiring() -> None:
            connection.send_event("token-expiring", {"expiresAt": expires_at})
            connection.expiry = self._at(expires_at, expired)

        connection.expiry = (
            self._at(expires_at - refresh_before, expiring)
            if (refresh_before > 0)
            else self._at(expires_at, expired)
        )

    def _at(self, unix_time: float, callback: Callable[[], None]) -> Deadline | None:
        deadline = trio_deadline(unix_time)
        return self._deadlines.call_at(deadline, callback) if math.isfinite(deadline) else None

    def _start_heartbeat(self, connection: Connection) -> None:
        """The one heartbeat of both dialects: a ping every `interval`; no pong within `timeout`
        of one drops the client. Native clients get WebSocket pings (`[server] ping_interval`,
        the timeout is the interval: the next ping finds the last one unanswered); Socket.IO
        clients Engine.IO's own (`[socketio] ping_interval` and `ping_timeout`), from the open.

        The first ping comes at a random point of the first interval for native clients:
        clients that connected together (a reconnect storm) would otherwise all be pinged at
        once, every interval. A Socket.IO client is told the interval in its open packet.
        """
        frame = connection.dialect.heartbeat_frame
        if frame is None:
            interval = timeout = self._settings.server.ping_interval
            first = interval * (0.5 + random.random() / 2)  # noqa: S311 - spreading load
        else:
            socketio = self._settings.socketio
            interval, timeout = socketio.ping_interval, socketio.ping_timeout
            first = interval
        if interval <= 0:
            return

        def ping() -> None:
            connection.pinged_at = trio.current_time()
            if frame is None:
                connection.start_ping()  # a WebSocket ping, answered by the engine's pong
            else:
                connection.ping_outstanding = True
                connection.push(frame)
            connection.keepalive = self._deadlines.call_at(connection.pinged_at + timeout, check)

        def check() -> None:
            if connection.ping_outstanding:
                # No pong in time: the peer is gone without a close (a phone that lost its
                # network). Its calls go into the reconnect grace.
                connection.abort(CloseCode.ABNORMAL, "keepalive timeout")
                return
            next_ping = connection.pinged_at + interval
            if next_ping <= trio.current_time():
                ping()  # native: the check is the next ping's moment, one entry per interval
            else:
                connection.keepalive = self._deadlines.call_at(next_ping, ping)

        connection.keepalive = self._deadlines.call_at(trio.current_time() + first, ping)
