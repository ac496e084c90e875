"""The hub: every connection of a server, one task each, and the executor of the core's actions.

One task per WebSocket: handshake checks, authentication, the read loop, and a bounded writer.

Life of a connection
--------------------
1. Before the upgrade: the path (else 404), the `Origin` allow-list (else 403), and whether the
   server is still accepting (else 503).
2. After the upgrade, refusals close the *WebSocket* with a code, because browsers cannot read
   the status of a failed upgrade: too many connections from the address or the user, or too many
   handshakes (4029); a bad token (4001); a revoked token (4003).
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
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import trio
from limits.errors import StorageError

from callgate.auth import INVALID, Identity, TokenVerifier
from callgate.cluster.entries import NODE_SEPARATOR, Entry
from callgate.core.actions import (
    Ack,
    Action,
    Audit,
    CancelTimer,
    Close,
    Deliver,
    SendError,
    StartTimer,
)
from callgate.core.events import (
    Authenticated,
    Disconnected,
    Event,
    MessageReceived,
    RevocationChanged,
    ShuttingDown,
    TimerFired,
    TimerId,
    TokenRefreshed,
)
from callgate.errors import AuthError, CloseCode, CloseConnection, ErrorCode
from callgate.ice import ice_servers
from callgate.log import get_logger
from callgate.metrics import Metrics
from callgate.protocol import socketio as sio
from callgate.protocol.codec import (
    FieldLimits,
    ProtocolError,
    decode,
)
from callgate.protocol.messages import Auth, CallRequest, Envelope, Ref
from callgate.revocation import RevocationList
from callgate.transport.connection import Connection, PeerGone, SocketIOConnection
from callgate.transport.listener import Accepted, Dialect, UpgradeRequest
from callgate.transport.reactor import Reactor
from callgate.transport.timers import Deadline, Deadlines, Timers

if TYPE_CHECKING:
    from callgate.audit import AuditLog
    from callgate.cluster.link import ClusterLink
    from callgate.config import Settings
    from callgate.core.switchboard import Switchboard
    from callgate.ratelimit import RateLimiter

log = get_logger("callgate.connection")

RESUME_HEADER = b"callgate-resume"


def _header(request: UpgradeRequest, name: bytes) -> str | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _bearer_token(request: UpgradeRequest) -> str | None:
    value = _header(request, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


def _repeated(request: UpgradeRequest, name: bytes) -> bool:
    return sum(key.lower() == name for key, _ in request.headers) > 1


@dataclass(slots=True)
class _UpgradeAuth:
    """What authentication uses of the upgrade request (the request is spent on `accept`).

    Not frozen: `take_bearer` drops the token once read, so a connection does not carry its
    token (a secret) in memory for its whole life.
    """

    query: str
    bearer: str | None
    resume: str | None
    # More than one `Authorization` header: a proxy that reads the last one would disagree
    # with us (the first) about who connected, so the upgrade's credentials count for nothing.
    repeated: bool = False

    def take_bearer(self) -> str | None:
        bearer, self.bearer = self.bearer, None
        return bearer


def _trio_deadline(unix_time: float) -> float:
    """The trio-clock moment of a unix time (such as a token's `exp`)."""
    remaining = unix_time - time.time()
    return trio.current_time() + max(0.0, remaining) if math.isfinite(remaining) else math.inf


class _LeftForTask(Exception):
    """A message the reactor counted and decoded but cannot finish, because finishing it
    waits (a token refresh): raised in the connection's own task, which finishes it."""

    def __init__(self, envelope: Envelope) -> None:
        super().__init__("left for the connection's task")
        self.envelope = envelope


class ConnectionHub:
    """All connections of one server, the executor of the switchboard's actions, and the holder
    of what reloads change (keys, revocations)."""

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
        self._audit = audit
        # Every clock of the server in one heap and one task: the core's timers, and each
        # connection's keepalive, token expiry and Engine.IO heartbeat.
        self._deadlines = Deadlines()
        nursery.start_soon(self._deadlines.run)
        # Where idle wsproto connections wait for their next message (reactor.py).
        self._reactor: Reactor | None = None
        if settings.server.engine == "wsproto" and Reactor.supported():
            self._reactor = Reactor()
            nursery.start_soon(self._reactor.run)
        self._timers = Timers(self._deadlines, self._on_timer)
        self._live: dict[str, Connection] = {}  # authenticated
        self._all: dict[str, Connection] = {}  # accepted, authenticated or not
        self._per_address: Counter[str] = Counter()
        self._field_limits = FieldLimits(**settings.validation.model_dump())
        self.revocations = RevocationList()
        self.metrics = Metrics(self.live_counts)
        self.accepting = True
        # True while a message is handled that has more from the same read behind it.
        self._in_burst = False
        self._all_gone = trio.Event()
        # Called (and awaited) when a token names an unknown `kid`; set when jwks_url is used.
        self.refresh_remote_keys: Callable[[], Awaitable[bool]] | None = None
        # Cluster mode (`attach_cluster`): events go through the shared log, not straight in.
        self.cluster: ClusterLink | None = None

    def attach_cluster(self, link: ClusterLink) -> None:
        """From now on every core event goes through the cluster log; `link` applies entries."""
        self.cluster = link
        link.execute = self._execute_entry
        link.rejected = self._entry_rejected
        link.evicted = self._evicted
        link.restored = self._restored

    def _new_conn_id(self) -> str:
        token = secrets.token_urlsafe(12)
        return token if self.cluster is None else self.cluster.node_id + NODE_SEPARATOR + token

    @property
    def ready(self) -> bool:
        """Accepting, and (in cluster mode) the cluster log is reachable and caught up."""
        return self.accepting and (self.cluster is None or self.cluster.available)

    # -- inspection (tests) ------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self._all)

    @property
    def armed_timers(self) -> int:
        return len(self._timers)

    @property
    def parked_connections(self) -> int:
        """Connections waiting for their next message in the reactor (wsproto engine)."""
        return len(self._reactor) if self._reactor is not None else 0

    def live_counts(self) -> dict[str, dict[str, int]]:
        """Connections and calls by state, for the metrics gauges."""
        calls = {"ringing": 0, "connected": 0}
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
            live["cluster"] = {
                "available": int(self.cluster.available),
                "leader": int(self.cluster.is_leader),
                "pending_entries": self.cluster.pending,
            }
        return live

    # -- executing the core's decisions ------------------------------------------------------

    def audit(self, event: str, fields: Mapping[str, Any]) -> None:
        """Every audit record goes through here: the trail, and the metrics derived from it."""
        self._audit.write(event, fields)
        self.metrics.observe_audit(event, fields)

    def dispatch(self, event: Event, *, forwarded: bool = False) -> None:
        if self.cluster is not None:
            self.cluster.submit(event)
            return
        self.execute(self._board.handle(event, trio.current_time()), forwarded=forwarded)

    async def dispatch_and_wait(self, event: Event) -> None:
        """Dispatch, and in cluster mode wait (bounded) until the log has applied it here.

        Raises: CloseConnection 1013 when the cluster log does not apply it in time.
        """
        if self.cluster is None:
            self.dispatch(event)
            return
        seq = self.cluster.submit(event)
        with trio.move_on_after(self._settings.cluster.apply_timeout):
            await self.cluster.wait_applied(seq)
            return
        raise CloseConnection(CloseCode.TRY_AGAIN_LATER, "cluster unavailable")

    def _execute_entry(self, entry: Entry, actions: list[Action], own: bool) -> None:
        """A cluster entry was applied: do what concerns this node's connections."""
        if isinstance(entry.event, RevocationChanged):
            self._adopt_revocations(entry.event)
        forwarded = own and isinstance(entry.event, MessageReceived)
        self.execute(actions, forwarded=forwarded, own=own)

    def _entry_rejected(self, entry_id: str, reason: str) -> None:
        node = self.cluster.node_id if self.cluster is not None else None
        self.audit("cluster.rejected", {"node": node, "entry": entry_id, "reason": reason})

    def _restored(self) -> None:
        """The replica was loaded from a snapshot: arm its timers, adopt its revocations."""
        if self.cluster is None:
            return
        replica = self.cluster.replica
        self._timers.cancel_all()
        for timer, deadline in replica.timers.items():
            self._timers.start(timer, _trio_deadline(deadline))
        self._adopt_revocations(replica.revocations)

    def _adopt_revocations(self, event: RevocationChanged) -> None:
        """The cluster's list is now this node's too: its handshakes refuse those tokens."""
        self.revocations = RevocationList(event.token_ids, dict(event.users_before))

    def _evicted(self) -> None:
        for connection in list(self._live.values()):
            connection.close(CloseCode.GOING_AWAY, "node left the cluster")

    def execute(self, actions: list[Action], *, forwarded: bool = False, own: bool = True) -> None:
        """Carry out the core's actions; `forwarded` counts deliveries a client message caused.

        In cluster mode every node executes every entry's actions: each sends only to its own
        connections, and only the entry's origin (`own`) writes the audit records, so each
        record is written once in the cluster.
        """
        for action in actions:
            match action:
                case Deliver(conn=conn, event=event, data=data):
                    if (connection := self._live.get(conn)) is not None:
                        connection.send_event(event, data)
                    if forwarded:
                        self.metrics.count_forwarded(event)
                case Ack(conn=conn, ref=ref):
                    if (connection := self._live.get(conn)) is not None:
                        connection.send_ack(ref)
                case SendError(conn=conn, code=code, message=message, ref=ref, retry_after=retry):
                    if (connection := self._live.get(conn)) is not None:
                        connection.send_error(code, message, ref, retry)
                    if code is ErrorCode.RATE_LIMITED:
                        self._count_strike(conn)
                case Audit(event=event, fields=fields):
                    if own:
                        self.audit(event, fields)
                case Close(conn=conn, code=code, reason=reason):
                    connection = self._live.get(conn)
                    if connection is not None:
                        connection.close(code, reason)
                case StartTimer(timer=timer, deadline=deadline):
                    if self.cluster is not None:  # the cluster's core runs on the unix clock
                        deadline = _trio_deadline(deadline)
                    self._timers.start(timer, deadline)
                case CancelTimer(timer=timer):
                    self._timers.cancel(timer)
                    if self.cluster is not None:
                        self.cluster.timer_cancelled(timer)

    def _not_in_burst(self) -> bool:
        return not self._in_burst

    def _count_strike(self, conn_id: str) -> None:
        connection = self._live.get(conn_id)
        if connection is not None and connection.limits.is_flooding():
            connection.close(CloseCode.RATE_LIMIT_ABUSE, "rate limit exceeded")

    def _on_timer(self, timer: TimerId) -> None:
        if self.cluster is not None:
            self.cluster.timer_due(timer)
        else:
            self.dispatch(TimerFired(timer))

    # -- reloads and shutdown ----------------------------------------------------------------

    def apply_revocations(self, revocations: RevocationList) -> None:
        self.revocations = revocations
        self.dispatch(RevocationChanged(revocations.tokens, revocations.users))

    async def shutdown(self) -> None:
        """End every call, close every connection with 1001, wait up to `drain_timeout`.

        A cluster node ends no call: its devices disconnect, so their calls are held for
        `reconnect_grace` and the clients resume them on another node.
        """
        self.accepting = False
        if self.cluster is None:
            self.dispatch(ShuttingDown())
        for connection in list(self._all.values()):
            connection.close(CloseCode.GOING_AWAY, "server shutting down")
        with trio.move_on_after(self._settings.server.drain_timeout):
            if self._all:
                await self._all_gone.wait()
        for connection in list(self._all.values()):
            connection.abort(CloseCode.GOING_AWAY, "server shutting down")
        if self.cluster is not None:
            with trio.move_on_after(self._settings.server.close_timeout):
                await self.cluster.flush()

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
        request, addr = accepted.request, accepted.addr
        target = urlsplit(request.path)
        origin = _header(request, b"origin")
        if server.allowed_origins and origin is not None and origin not in server.allowed_origins:
            self.audit("conn.refused", {"addr": addr, "code": 403})
            await request.reject(403, body=b'{"message": "origin not allowed"}')
            return
        if not self.accepting:
            await request.reject(503, body=b'{"message": "server shutting down"}')
            return
        # What authentication needs from the request, read before `accept` spends it.
        upgrade = _UpgradeAuth(
            target.query,
            _bearer_token(request),
            _header(request, RESUME_HEADER),
            _repeated(request, b"authorization"),
        )
        kind = SocketIOConnection if accepted.dialect is Dialect.SOCKETIO else Connection
        connection = kind(
            conn_id, await request.accept(), addr, server.outbound_queue, server.close_timeout
        )
        connection.limits = self._limiter.for_connection()
        connection.may_write_now = self._not_in_burst
        self._all[conn_id] = connection
        self._per_address[addr] += 1
        self.audit("conn.open", {"conn": conn_id, "addr": addr})
        try:
            async with trio.open_nursery() as nursery:
                connection.run_in(nursery)  # the writer starts there with the first frame
                try:
                    await self._converse(connection, upgrade)
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
        connection.nursery = None
        detach = getattr(connection.ws, "detach_reactor", None)
        if detach is not None:
            detach()  # drops the handler, and with it the cycle back to the connection
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

    async def _converse(self, connection: Connection, upgrade: _UpgradeAuth) -> None:
        socketio = isinstance(connection, SocketIOConnection)
        try:
            self._admit_address(connection)
            if isinstance(connection, SocketIOConnection):
                self._engine_ping(connection)
                identity, resume = await self._authenticate_socketio(connection)
                ref: Ref | None = None
            else:
                identity, ref, resume = await self._authenticate(connection, upgrade)
            self._check_not_revoked(identity)
            if len(self._board.devices_of(identity.user)) >= (
                self._settings.server.max_connections_per_user
            ):
                self.metrics.rate_limited.labels("connections_per_user").inc()
                raise CloseConnection(CloseCode.RATE_LIMIT_ABUSE, "too many connections")
            if self.cluster is not None and not self.cluster.available:
                raise CloseConnection(CloseCode.TRY_AGAIN_LATER, "cluster unavailable")
        except CloseConnection as refused:
            if refused.close_code != CloseCode.RATE_LIMIT_ABUSE:
                detail = refused.detail if isinstance(refused, AuthError) else refused.reason
                self.audit(
                    "auth.failed",
                    {"conn": connection.id, "addr": connection.addr, "reason": detail},
                )
            connection.refuse(refused.close_code, refused.reason)
            raise
        connection.identity = identity
        self._live[connection.id] = connection
        if socketio:
            connection.push(sio.connected_packet(connection.id))
        await self.dispatch_and_wait(
            Authenticated(
                connection.id,
                identity.user,
                session_id=secrets.token_urlsafe(24),
                session=self._session_data(connection, identity),
                resume=resume,
                token_id=identity.token_id,
                issued_at=identity.issued_at,
            )
        )
        if ref is not None:
            connection.send_ack(ref)
        self.audit(
            "auth.ok",
            {"conn": connection.id, "user": identity.user, "expires_at": identity.expires_at},
        )
        self._arm_expiry(connection)
        if self._settings.server.ping_interval > 0 and not socketio:
            self._start_keepalive(connection)
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
            raise CloseConnection(CloseCode.RATE_LIMIT_ABUSE, "rate limit exceeded")

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
        self, connection: Connection, upgrade: _UpgradeAuth
    ) -> tuple[Identity, Ref | None, str | None]:
        """Raises: AuthError, CloseConnection, PeerGone."""
        query_tokens = parse_qs(upgrade.query).get("token")
        if query_tokens and not self._settings.auth.allow_query_token:
            raise AuthError(INVALID, "query_token_refused")
        if upgrade.repeated:
            raise AuthError(INVALID, "repeated_authorization")
        token = upgrade.take_bearer() or (query_tokens[0] if query_tokens else None)
        if token:
            return await self._verify(token), None, upgrade.resume
        with trio.move_on_after(self._settings.server.auth_timeout):
            text = await connection.receive()
            self._check_size(text)
            try:
                envelope = decode(text, self._field_limits)
            except ProtocolError:
                raise AuthError("authentication required", "not_authenticated") from None
            message = envelope.message
            if not isinstance(message, Auth):
                raise AuthError("authentication required", "not_authenticated")
            return await self._verify(message.token), envelope.ref, message.resume
        raise AuthError("auth timeout", "auth_timeout")

    async def _authenticate_socketio(
        self, connection: SocketIOConnection
    ) -> tuple[Identity, str | None]:
        """The Engine.IO open packet, then a CONNECT to the main namespace with `{token, resume}`.

        Raises: AuthError, CloseConnection, PeerGone.
        """
        socketio = self._settings.socketio
        connection.push(
            sio.open_packet(
                connection.id,
                socketio.ping_interval,
                socketio.ping_timeout,
                self._settings.server.max_message_bytes,
            )
        )
        with trio.move_on_after(self._settings.server.auth_timeout):
            while True:
                text = await connection.receive()
                self._check_size(text)
                # Counted as every message after sign-in is: pings and CONNECTs to other
                # namespaces are answered, so they could otherwise be sent without end.
                if not self._admit(connection, text):
                    continue
                if text[:1] in (sio.ENGINE_PING, sio.ENGINE_PONG, sio.ENGINE_CLOSE):
                    connection.decode_frame(text, self._field_limits)
                    continue
                try:
                    packet = sio.parse_socket_packet(text[1:]) if text[:1] == "4" else None
                except ProtocolError:
                    packet = None
                if packet is None or packet.kind != sio.CONNECT:
                    raise AuthError("authentication required", "not_authenticated")
                if packet.namespace != sio.MAIN_NAMESPACE:
                    connection.push(sio.connect_error_packet("Invalid namespace", packet.namespace))
                    continue
                auth = packet.payload if isinstance(packet.payload, dict) else {}
                token, resume = auth.get("token"), auth.get("resume")
                if not isinstance(token, str) or not token:
                    raise AuthError(INVALID, "malformed")
                return await self._verify(token), resume if isinstance(resume, str) else None
        raise AuthError("auth timeout", "auth_timeout")

    def _engine_ping(self, connection: SocketIOConnection) -> None:
        """Engine.IO pings every `ping_interval` (the client expects them, and drops a server
        that stops); no pong within `ping_timeout` of one drops the client."""
        socketio = self._settings.socketio

        def ping() -> None:
            connection.ping_outstanding = True
            connection.pinged_at = trio.current_time()
            connection.push(sio.ENGINE_PING)
            connection.keepalive = self._deadlines.call_at(
                connection.pinged_at + socketio.ping_timeout, check
            )

        def check() -> None:
            if connection.ping_outstanding:
                connection.abort(CloseCode.ABNORMAL, "ping timeout")
                return
            connection.keepalive = self._deadlines.call_at(
                connection.pinged_at + socketio.ping_interval, ping
            )

        connection.keepalive = self._deadlines.call_at(
            trio.current_time() + socketio.ping_interval, ping
        )

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

    async def _read_loop(self, connection: Connection) -> None:
        attach = getattr(connection.ws, "attach_reactor", None)
        if attach is not None and self._reactor is not None and self.cluster is None:
            # While it waits, the connection waits in the reactor, which hands each message
            # to `_take_inline` without waking this task (see reactor.py).
            attach(self._reactor, partial(self._take_inline, connection))
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

    def _take(self, connection: Connection, text: str, arrived: float) -> Envelope | None:
        """Everything of one message that needs no waiting: its size, the rate limit, decoding
        (in that order: a Socket.IO frame's decoding may answer or end the connection), and
        its dispatch. Returns the message the caller must still `_finish`: a token refresh,
        or any message in cluster mode.

        Raises: CloseConnection (too big; flooding).
        """
        self._check_size(text)
        if not self._admit(connection, text):
            return None
        try:
            envelope = connection.decode_frame(text, self._field_limits)
        except ProtocolError as bad:
            connection.send_error(bad.code, bad.message, bad.ref)
            return None
        if envelope is None:
            return None
        if isinstance(envelope.message, Auth) or self.cluster is not None:
            return envelope
        received = MessageReceived(connection.id, envelope.message, envelope.ref)
        self._in_burst = getattr(connection.ws, "has_more", False)
        try:
            self.dispatch(received, forwarded=True)
        finally:
            self._in_burst = False
        self.metrics.observe_forward_latency(time.perf_counter() - arrived)
        return None

    async def _finish(self, connection: Connection, envelope: Envelope) -> None:
        """The part of a message that waits: a token refresh, or a cluster submission."""
        if isinstance(envelope.message, Auth):
            await self._refresh(connection, envelope.message, envelope.ref)
        else:
            received = MessageReceived(connection.id, envelope.message, envelope.ref)
            await self._submit_to_cluster(connection, received)

    def _admit(self, connection: Connection, text: str) -> bool:
        """Count a message against the connection's rate; over it, say so and drop it.

        Raises: CloseConnection 4029 when the connection keeps flooding.
        """
        retry = connection.limits.admit_message()
        if retry is None:
            return True
        self.metrics.rate_limited.labels("messages").inc()
        connection.send_error(
            ErrorCode.RATE_LIMITED, "too many messages", connection.peek_ref(text), retry
        )
        if connection.limits.is_flooding():
            self.metrics.rate_limited.labels("flood").inc()
            raise CloseConnection(CloseCode.RATE_LIMIT_ABUSE, "rate limit exceeded")
        return False

    async def _submit_to_cluster(self, connection: Connection, received: MessageReceived) -> None:
        """A client message in cluster mode: counted against the shared limits here, once.

        Without Redis nothing can be decided for the cluster: the client is told to retry.
        """
        cluster = self.cluster
        unavailable = (ErrorCode.RATE_LIMITED, "cluster unavailable; try again", received.ref, 1)
        if cluster is None or not cluster.available:
            connection.send_error(*unavailable)
            return
        message, user = received.message, connection.user
        throttled = None
        # Counted only for a request the core will not refuse outright (not from yourself).
        if isinstance(message, CallRequest) and message.from_user == user != message.to:
            try:
                throttled = await trio.to_thread.run_sync(
                    self._limiter.admit_call, user, message.to, abandon_on_cancel=True
                )
            except StorageError:
                connection.send_error(*unavailable)
                return
        cluster.submit(received, throttled=throttled)

    async def _refresh(self, connection: Connection, message: Auth, ref: Ref | None) -> None:
        """A fresh token on an open connection (contract section 8).

        Raises: CloseConnection 4003 for another user's token or a revoked one.
        """
        current = connection.identity
        if current is None:
            return
        try:
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
        await self.dispatch_and_wait(
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
        deadline = _trio_deadline(unix_time)
        return self._deadlines.call_at(deadline, callback) if math.isfinite(deadline) else None

    def _start_keepalive(self, connection: Connection) -> None:
        """A ping every `ping_interval`; no pong by the next one drops the peer.

        The first ping comes at a random point of the first interval: clients that connected
        together (a reconnect storm) would otherwise all be pinged at once, every interval.
        A dead peer is still dropped within two intervals.
        """
        interval = self._settings.server.ping_interval

        def tick() -> None:
            if connection.ping_outstanding:
                # No pong within an interval: the peer is gone without a close (a phone that
                # lost its network). Its calls go into the reconnect grace.
                connection.abort(CloseCode.ABNORMAL, "keepalive timeout")
                return
            connection.start_ping()
            connection.keepalive = self._deadlines.call_at(trio.current_time() + interval, tick)

        first = interval * (0.5 + random.random() / 2)  # noqa: S311 - spreading load, not security
        connection.keepalive = self._deadlines.call_at(trio.current_time() + first, tick)
