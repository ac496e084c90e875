"""`serve`: the listening socket, the switchboard, every connection, and what reloads them.

Everything runs in one nursery. Connections run in their own nursery, beside the listener, so that
a graceful shutdown can stop accepting (cancel the listener) while the connections drain.
"""

from __future__ import annotations

import errno
import socket
import ssl
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from limits.storage import RedisStorage
from prometheus_client import CONTENT_TYPE_LATEST

from callgate.audit import AuditLog
from callgate.auth import TokenVerifier
from callgate.cluster.node import ClusterNode
from callgate.config import Settings
from callgate.core.policy import CallRules
from callgate.core.switchboard import Switchboard
from callgate.errors import ConfigError
from callgate.keys import MAX_JWKS_BYTES, load_keyring, parse_jwks
from callgate.log import get_logger
from callgate.protocol.dialects import NativeDialect, SocketIODialect
from callgate.ratelimit import RateLimiter
from callgate.revocation import RevocationList, load_revocations
from callgate.transport.admin import MAX_ADMIN_BODY, AdminApi
from callgate.transport.http import Route, get_routes, serve_http
from callgate.transport.hub import ConnectionHub
from callgate.transport.listener import FrontSettings, serve_front
from callgate.transport.proxy import TrustedProxies
from callgate.transport.upgrade import UpgradeRules
from callgate.webhooks import WebhookSender

log = get_logger("callgate.server")
# How often watched files are checked for changes: revocations take effect within a second.
WATCH_INTERVAL = 0.5


@dataclass(slots=True)
class RunningServer:
    """What `nursery.start(serve, ...)` returns once the server is listening."""

    host: str
    port: int
    path: str
    tls: bool
    board: Switchboard
    hub: ConnectionHub
    reload: Callable[[], None]
    _listener: trio.CancelScope
    metrics_port: int | None = None
    webhooks: WebhookSender | None = None
    admin_port: int | None = None

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{host_port(self.host, self.port)}{self.path}"

    async def shutdown(self) -> None:
        """Stop accepting, close every connection with 1001, within `drain_timeout`."""
        self._listener.cancel()
        await self.hub.shutdown()
        if self.webhooks is not None:
            # What the drain wrote (every call's end) goes out if the receiver answers within
            # one attempt's time; what is still queued then is lost (webhooks live in memory).
            with trio.move_on_after(self.webhooks.attempt_timeout):
                await self.webhooks.drain()


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    tls = settings.tls
    if tls.cert_file is None or tls.key_file is None:
        return None
    # ssl names neither the file nor the setting when one is missing: check each first.
    for setting, path in (("tls.cert_file", tls.cert_file), ("tls.key_file", tls.key_file)):
        try:
            path.open("rb").close()
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls.cert_file, tls.key_file: {tls.cert_file} and {tls.key_file} are not a PEM"
            f" certificate chain and its private key ({exc.strerror or exc})"
        ) from None
    return context


def host_port(host: str, port: int) -> str:
    """`host:port` as a URL or a message writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_problem(where: tuple[str, str], host: str, port: int, error: OSError) -> str:
    """Why `host:port` cannot be listened on, naming the setting to change: `where` names the
    settings of the host and of the port (`("metrics.host", "metrics.port")`)."""
    host_setting, port_setting = where
    address = host_port(host, port)
    if isinstance(error, socket.gaierror):
        return f"{host_setting}: cannot resolve {host!r} ({error.strerror})"
    if error.errno == errno.EADDRINUSE:
        return (
            f"{port_setting}: {address} is already in use by another process;"
            " choose another port or stop that process"
        )
    if error.errno == errno.EACCES:
        return (
            f"{port_setting}: permission denied to listen on {address}"
            " (ports below 1024 need privileges); choose a port from 1024 up"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{host_setting}: {host} is not an address of this machine ({address})"
    return f"{host_setting}, {port_setting}: cannot listen on {address}: {error.strerror or error}"


@contextmanager
def listening_on(where: tuple[str, str], host: str, port: int) -> Iterator[None]:
    """Turn a failure to listen (port in use, privileged port, foreign host) into a ConfigError
    naming the setting (`listen_problem`): the start-up failure users cause most, in one line.

    The OSError may come wrapped in the ExceptionGroup of the listener's own nursery.
    """
    try:
        yield
    except (OSError, ExceptionGroup) as exc:
        error = exc
        while isinstance(error, ExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if not isinstance(error, OSError):
            raise
        raise ConfigError(listen_problem(where, host, port, error)) from None


def _watched_files(settings: Settings) -> list[Path]:
    auth = settings.auth
    files = [auth.public_key_file, auth.jwks_file, *auth.key_files.values()]
    return [path for path in files if path is not None]


def _file_state(paths: list[Path]) -> tuple[tuple[int, int] | None, ...]:
    states: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            stat = path.stat()
            states.append((stat.st_mtime_ns, stat.st_size))
        except OSError:
            states.append(None)
    return tuple(states)


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http(s) only, by config
        data: bytes = response.read(MAX_JWKS_BYTES + 1)
        return data


class _Reloader:
    """Keys and revocations: reloaded when their files change, on SIGHUP, and (remote JWKS)
    periodically and on an unknown `kid`, never blocking the event loop on the network."""

    def __init__(self, settings: Settings, hub: ConnectionHub) -> None:
        self._settings = settings
        self._hub = hub
        self._wake = trio.Event()
        self._last_fetch = -float("inf")
        self._fetch_lock = trio.Lock()

    def request(self) -> None:
        self._wake.set()

    def reload_keys(self, *, told: bool = False) -> str | None:
        """Reload the key files now; what went wrong, or None. `told`: the caller reports a
        failure to an operator (the admin API), so it is logged as a warning, not an error."""
        try:
            ring = load_keyring(self._settings.auth)
        except ConfigError as exc:
            failed = log.warning if told else log.error
            failed("keys not reloaded; keeping the previous ones", error=str(exc))
            return str(exc)
        self._hub.verifier.ring = ring.with_remote(self._hub.verifier.ring.remote)
        log.info("keys reloaded", kids=sorted(ring.by_kid))
        return None

    def reload_revocations(self, *, told: bool = False) -> str | None:
        """Reload the revocation file now; what went wrong, or None (`told`: as for keys)."""
        path = self._settings.auth.revocation_file
        if path is None:
            return None
        try:
            revocations = load_revocations(path)
        except ConfigError as exc:
            failed = log.warning if told else log.error
            failed("revocations not reloaded; keeping the previous list", error=str(exc))
            return str(exc)
        self._hub.apply_revocations(revocations)
        return None

    async def refresh_remote(self) -> bool:
        """Fetch the JWKS URL, at most once per `jwks_min_refresh`. True if keys changed."""
        url = self._settings.auth.jwks_url
        if url is None:
            return False
        async with self._fetch_lock:
            if trio.current_time() - self._last_fetch < self._settings.auth.jwks_min_refresh:
                return False
            self._last_fetch = trio.current_time()
            try:
                raw = await trio.to_thread.run_sync(_fetch, url, abandon_on_cancel=True)
                keys = parse_jwks(raw, frozenset(self._settings.auth.algorithms), "auth.jwks_url")
            except (OSError, ConfigError) as exc:
                log.error("jwks_url not fetched; keeping the previous keys", error=str(exc))
                return False
            before = self._hub.verifier.ring.remote
            self._hub.verifier.ring = self._hub.verifier.ring.with_remote(keys)
            return set(keys) != set(before)

    async def watch_files(self) -> None:
        keys = _watched_files(self._settings)
        revocation = self._settings.auth.revocation_file
        key_state, revocation_state = (
            _file_state(keys),
            _file_state([revocation] if revocation else []),
        )
        while True:
            with trio.move_on_after(WATCH_INTERVAL):
                await self._wake.wait()
            forced = self._wake.is_set()
            self._wake = trio.Event()
            now_keys = _file_state(keys)
            now_revocation = _file_state([revocation] if revocation else [])
            if forced or now_keys != key_state:
                key_state = now_keys
                self.reload_keys()
            if forced or now_revocation != revocation_state:
                revocation_state = now_revocation
                self.reload_revocations()
            if forced:
                await self.refresh_remote()

    async def poll_remote(self) -> None:
        while True:
            await self.refresh_remote()
            await trio.sleep(self._settings.auth.jwks_cache_ttl)


async def serve(
    settings: Settings,
    audit: AuditLog,
    *,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled.

    Raises:
        ConfigError: a key, revocation or TLS file cannot be used (checked before listening), or
            an address cannot be listened on (the message names the setting).
    """
    verifier = TokenVerifier.from_settings(
        settings.auth, max_user_id_length=settings.validation.max_user_id_length
    )
    ssl_context = _ssl_context(settings)
    revocations = (
        load_revocations(settings.auth.revocation_file) if settings.auth.revocation_file else None
    )
    rules = CallRules(
        ring_timeout=settings.calls.ring_timeout,
        max_calls_per_user=settings.calls.max_calls_per_user,
        reconnect_grace=settings.calls.reconnect_grace,
        resume_buffer=settings.calls.resume_buffer,
        offline=settings.calls.offline,
        missed_calls=settings.calls.missed_calls,
        missed_call_max_age=settings.calls.missed_call_max_age,
        missed_calls_total=settings.calls.missed_calls_total,
        report_missed=(
            settings.calls.missed_calls > 0
            or settings.calls.offline == "notify"
            or settings.webhooks.url is not None
        ),
    )
    limiter = (
        _cluster_limiter(settings) if settings.cluster.enabled else RateLimiter(settings.limits)
    )
    # A single server's switchboard. A cluster node decides on shared state (cluster/node.py);
    # this one stays empty there.
    board = Switchboard(rules, limiter)
    try:
        await _serve(
            settings, audit, board, rules, verifier, limiter, revocations, ssl_context, task_status
        )
    finally:
        limiter.close()


async def _serve(
    settings: Settings,
    audit: AuditLog,
    board: Switchboard,
    rules: CallRules,
    verifier: TokenVerifier,
    limiter: RateLimiter,
    revocations: RevocationList | None,
    ssl_context: ssl.SSLContext | None,
    task_status: trio.TaskStatus[RunningServer],
) -> None:
    async with trio.open_nursery() as nursery:
        hub = ConnectionHub(settings, board, verifier, limiter, audit, nursery)
        if revocations is not None:
            hub.revocations = revocations
        if settings.cluster.enabled:
            node = ClusterNode(
                settings.cluster,
                rules,
                hub.executor,
                hub.signed_in,
                limiter,
                settings.server.max_connections_per_user,
                hub.adopt_revocations,
                hub.evict_all,
                hub.reactor,
            )
            hub.attach_cluster(node)
            nursery.start_soon(node.run)
            with trio.move_on_after(settings.cluster.apply_timeout):
                await node.joined.wait()
            if node.available:
                log.info("joined the cluster", node=node.node_id)
            else:
                log.warning("cluster store not reachable yet; sign-ins are refused until it is")
            if revocations is not None:
                # This node's list goes to every node (the last one written wins), and replaces
                # whatever a snapshot brought in before it.
                hub.apply_revocations(revocations)
        webhooks = None
        if settings.webhooks.url is not None:
            webhooks = WebhookSender(settings.webhooks, hub.metrics, hub.executor.audit)
            await nursery.start(webhooks.run)
            audit.observer = webhooks.observe_audit  # the records the trail holds
        reloader = _Reloader(settings, hub)
        if settings.auth.jwks_url is not None:
            hub.refresh_remote_keys = reloader.refresh_remote
            nursery.start_soon(reloader.poll_remote)
        nursery.start_soon(reloader.watch_files)
        nursery.start_soon(_audit_ticks, audit)
        connections = await nursery.start(_connections_nursery)
        listener = trio.CancelScope()
        socketio = settings.socketio
        upgrade_rules = UpgradeRules(
            native_path=settings.server.path,
            native=NativeDialect(),
            socketio=SocketIODialect(
                socketio.ping_interval, socketio.ping_timeout, settings.server.max_message_bytes
            )
            if socketio.enabled
            else None,
            allowed_origins=frozenset(settings.server.allowed_origins),
            trusted_proxies=TrustedProxies(settings.server.trusted_proxies),
            proxy_header=settings.server.proxy_header,
        )
        front = FrontSettings(
            rules=upgrade_rules,
            engine=settings.server.engine,
            # trio-websocket counts characters; the byte limit is checked per message too.
            max_message_size=settings.server.max_message_bytes,
            handshake_timeout=settings.server.auth_timeout,
            close_timeout=settings.server.close_timeout,
            max_pending_per_address=settings.server.max_connections_per_address,
            proxy_protocol=settings.server.proxy_protocol,
            tls_after_proxy=ssl_context if settings.server.proxy_protocol else None,
        )
        server = settings.server
        with listening_on(("server.host", "server.port"), server.host, server.port):
            port = await nursery.start(
                partial(
                    _listen,
                    listener,
                    partial(
                        serve_front,
                        settings.server.host,
                        settings.server.port,
                        ssl_context,
                        front,
                        hub.handle,
                        connections,
                        reuse_port=server.reuse_port,
                    ),
                )
            )
        metrics_port = None
        if settings.metrics.enabled:
            metrics = settings.metrics
            with listening_on(("metrics.host", "metrics.port"), metrics.host, metrics.port):
                metrics_port = await nursery.start(
                    serve_http, metrics.host, metrics.port, get_routes(_routes(hub))
                )
        admin_port = None
        if settings.admin.enabled:
            admin = settings.admin
            api = AdminApi(
                settings,
                board,
                hub,
                partial(reloader.reload_keys, told=True),
                partial(reloader.reload_revocations, told=True),
            )
            with listening_on(("admin.host", "admin.port"), admin.host, admin.port):
                admin_port = await nursery.start(
                    serve_http, admin.host, admin.port, api.handle, MAX_ADMIN_BODY, api.prepare
                )
        task_status.started(
            RunningServer(
                settings.server.host,
                port,
                settings.server.path,
                ssl_context is not None,
                board,
                hub,
                reloader.request,
                listener,
                metrics_port,
                webhooks,
                admin_port,
            )
        )


def _cluster_limiter(settings: Settings) -> RateLimiter:
    """Call limits shared by the cluster's nodes, in Redis; the rest stay per node."""
    cluster = settings.cluster
    shared = RedisStorage(
        cluster.redis_url,
        key_prefix=f"{cluster.name}:limits",
        wrap_exceptions=True,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
    )
    return RateLimiter(settings.limits, call_storage=shared)


def _routes(hub: ConnectionHub) -> dict[str, Route]:
    def metrics(_: str) -> tuple[int, bytes, bytes]:
        return 200, CONTENT_TYPE_LATEST.encode(), hub.metrics.exposition()

    def healthz(_: str) -> tuple[int, bytes, bytes]:
        return 200, b"text/plain", b"ok\n"

    def readyz(_: str) -> tuple[int, bytes, bytes]:
        # Ready only while accepting: a draining node, or a cluster node that cannot reach
        # Redis, leaves the load balancer's rotation.
        if hub.ready:
            return 200, b"text/plain", b"ready\n"
        return 503, b"text/plain", b"draining\n" if not hub.accepting else b"cluster unavailable\n"

    return {"/metrics": metrics, "/healthz": healthz, "/readyz": readyz}


async def _audit_ticks(audit: AuditLog) -> None:
    """Time-based audit checkpoints, even when no record is being written."""
    while True:
        await trio.sleep(1)
        audit.tick()


async def _connections_nursery(
    *, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED
) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


async def _listen(
    scope: trio.CancelScope,
    run: Callable[..., object],
    *,
    task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await run(task_status=task_status)  # type: ignore[misc]
