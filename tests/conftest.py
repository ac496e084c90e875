"""Shared test harness: the real server on 127.0.0.1:0 and real WebSocket clients."""

from __future__ import annotations

import io
import itertools
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import pytest
import redis
import structlog
import trio
from jsonschema import Draft202012Validator
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

import callgate
from callgate.audit import AuditLog, StreamSink, load_private_key
from callgate.auth import mint_token
from callgate.config import Settings, load_settings
from callgate.core.events import Event, MessageReceived
from callgate.transport.server import RunningServer, serve


def pytest_report_header() -> str:
    return f"callgate hot path: {callgate.IMPLEMENTATION} (see src/callgate/_accel.py)"


SCHEMA = Draft202012Validator(
    json.loads((Path(__file__).parent.parent / "docs" / "audit-log.schema.json").read_text())
)
SECRET = "test-secret-that-is-long-enough-for-hs256!"
AUDIT_KEY = b"audit-key-for-tests-only-32-bytes-long!"
# The Ed25519 key that signs test servers' checkpoints (base64 of its seed), and its public half.
AUDIT_SIGNING_KEY = "dGVzdC1vbmx5IGF1ZGl0IHNpZ25pbmcga2V5IHNlZWQ="
AUDIT_PRIVATE_KEY = load_private_key(AUDIT_SIGNING_KEY)
AUDIT_PUBLIC_KEY = AUDIT_PRIVATE_KEY.public_key()
# Generous bound on how long one network step may take on a slow, shared CI machine.
STEP = 10.0


def make_settings(**sections: dict[str, Any]) -> Settings:
    """Test settings: loopback, port 0, generous limits unless a test narrows them."""
    base: dict[str, dict[str, Any]] = {
        "auth": {"secret": SECRET},
        "limits": {
            "handshakes": "100000/minute",
            "messages": "100000/second",
            "call_request": "1000/minute",
            "call_request_pair": "1000/minute",
        },
        "ice": {"stun_urls": ["stun:stun.example.org:3478"]},
        # Dropped devices end their calls at once unless a test is about resuming.
        "calls": {"reconnect_grace": 0},
        "metrics": {"enabled": False},
        "server": {"host": "127.0.0.1", "port": 0, "auth_timeout": 5, "close_timeout": 2},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return load_settings(None, environ=_toml_free(base))


def _toml_free(sections: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Express settings as CALLGATE_* variables: exercises the same path operators use."""
    env: dict[str, str] = {}
    for section, values in sections.items():
        for key, value in values.items():
            name = f"CALLGATE_{section}_{key}".upper()
            env[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return env


def assert_valid_record(record: dict[str, Any]) -> None:
    """Every audit record the suite sees must match the published schema."""
    errors = sorted(SCHEMA.iter_errors(record), key=lambda e: list(e.path))
    assert not errors, (record, [error.message for error in errors])


def token_for(user: str, ttl: int = 3600, secret: str = SECRET, **claims: Any) -> str:
    return mint_token(secret, user, ttl=ttl, now=int(time.time()), **claims)


class AuditView(Protocol):
    """What tests read of an audit trail: one server's, or a cluster's merged."""

    @property
    def text(self) -> str: ...

    def records(self, event: str | None = None) -> list[dict[str, Any]]: ...

    def events(self) -> list[str]: ...


class AuditCapture:
    """The audit log of one test server, kept in memory and parsed on demand."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.log = AuditLog(StreamSink(self.stream), key=AUDIT_KEY, strict=True)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in self.text.splitlines()]
        return [row for row in rows if event is None or row["event"] == event]

    def events(self) -> list[str]:
        return [row["event"] for row in self.records()]


async def connect_ws(
    nursery: trio.Nursery,
    url: str,
    *,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_message_size: int = 2**22,
) -> tuple[WebSocketConnection, trio.abc.Stream]:
    """A trio-websocket client and the stream under it, through its public `wrap_client_stream`
    (a test may drop the stream to vanish without a close frame: trio-websocket's client also
    keeps it open after a close the server started)."""
    target = urlsplit(url)
    host, port = target.hostname or "127.0.0.1", target.port or 80
    stream: trio.abc.Stream
    if target.scheme == "wss":
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)
    else:
        stream = await trio.open_tcp_stream(host, port)
    resource = target.path + (f"?{target.query}" if target.query else "")
    ws = await wrap_client_stream(
        nursery,
        stream,
        host,
        resource,
        extra_headers=extra_headers or [],
        max_message_size=max_message_size,
    )
    return ws, stream


async def exchange_raw(port: int, data: bytes) -> bytes:
    """Send raw bytes to 127.0.0.1:`port`; everything the server answers before it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    answer = b""
    with trio.fail_after(STEP):
        await stream.send_all(data)
        while chunk := await stream.receive_some(65536):
            answer += chunk
    await stream.aclose()
    return answer


class Client:
    """A real WebSocket client with strict expectations: the next message must be the one named."""

    def __init__(self, ws: WebSocketConnection, stream: trio.abc.Stream) -> None:
        self.ws = ws
        self.stream = stream  # the TCP (or TLS) stream under `ws`
        self.session: dict[str, Any] = {}
        # Cluster harness: waits until every node has caught up after each message read.
        self.after_receive: Callable[[], Awaitable[None]] | None = None

    @property
    def conn(self) -> str:
        return str(self.session["connectionId"])

    async def send(self, event: str, data: Any = None, ref: Any = None) -> None:
        message: dict[str, Any] = {"event": event}
        if data is not None:
            message["data"] = data
        if ref is not None:
            message["ref"] = ref
        await self.ws.send_message(json.dumps(message))

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(STEP):
            message = await self.ws.get_message()
        if self.after_receive is not None:
            await self.after_receive()
        parsed = json.loads(message)
        assert isinstance(parsed, dict)
        return parsed

    async def expect(self, event: str, **data: Any) -> dict[str, Any]:
        """The next message is `event`; every given data field has the given value."""
        message = await self.recv()
        assert message["event"] == event, message
        for key, value in data.items():
            assert message.get("data", {}).get(key) == value, (key, message)
        return message

    async def expect_error(self, code: str, ref: Any = None) -> dict[str, Any]:
        message = await self.expect("error", code=code)
        assert message.get("ref") == ref, message
        return message

    async def expect_closed(self, code: int, reason: str | None = None) -> list[dict[str, Any]]:
        """The server closes this connection with `code` (and `reason`, if given).

        Every message that arrives before the close is read and returned, and none of them may
        be a call event (PROTOCOL section 3): a connection being closed is told nothing more
        about calls. A caller that expects other messages first (an `error`, a
        `token-expiring`) asserts on what this returns.
        """
        before: list[dict[str, Any]] = []
        with trio.fail_after(STEP):
            while True:
                try:
                    text = await self.ws.get_message()
                except ConnectionClosed as closed:
                    assert closed.reason is not None
                    assert closed.reason.code == code, (closed.reason, before)
                    if reason is not None:
                        assert closed.reason.reason == reason, (closed.reason, before)
                    return before
                message = json.loads(text)
                assert isinstance(message, dict), message
                assert message.get("event") not in CALL_EVENTS, (message, before)
                before.append(message)

    async def expect_silence(self, seconds: float = 0.0) -> None:
        """Nothing has been sent to this client: proved by a probe, not by waiting.

        `seconds`, when given, first lets that much trio time pass, for a deadline to be
        reached (a token's `exp`, rounds of keepalive): the server's timers due by then have
        run before it reads the probe. The probe is a `user-connected` naming this client's
        own user, with a fresh `ref`, which the server must ack. It handles one connection's
        messages in order and sends each connection's messages in order, so the ack being the
        next message proves nothing was sent to this client before it. What the caller expects
        not to cause a message must have been handled first: a reply to it, or to its sender,
        already read.
        """
        if seconds:
            await trio.sleep(seconds)
        user = self.session.get("user")
        assert user, "expect_silence probes with user-connected: the client must be signed in"
        ref = f"silence-probe-{next(_probes)}"
        try:
            await self.send("user-connected", user, ref=ref)
            message = await self.recv()
        except ConnectionClosed as closed:
            raise AssertionError(f"closed instead of silent: {closed.reason}") from None
        assert message == {"event": "ack", "ref": ref}, f"unexpected message {message!r}"


# The call events of the contract (PROTOCOL section 3).
CALL_EVENTS = frozenset(
    {"call-request", "call-answer", "call-reject", "call-end", "ice-candidate", "call-renegotiate"}
)
# Refs of `expect_silence` probes: unique within a test run.
_probes = itertools.count(1)


class FailsOn:
    """A dispatch that fails (a bug) on the message with one `ref`, else passes events on."""

    def __init__(self, inner: Any, ref: str | int) -> None:
        self._inner, self._ref = inner, ref

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def dispatch(self, event: Event, *, forwarded: bool = False) -> None:
        if isinstance(event, MessageReceived) and event.ref == self._ref:
            raise RuntimeError("a bug")
        self._inner.dispatch(event, forwarded=forwarded)


ClientFactory = Callable[..., Awaitable[Client]]


# The default engine runs every end-to-end test; the other one runs the conformance subset, the
# tests marked `both_engines`: framing, handshakes, close codes, keepalive, TLS, drain, a call.
DEFAULT_ENGINE = "wsproto"
OTHER_ENGINES = ["trio-websocket"]


class Harness:
    def __init__(self, nursery: trio.Nursery, engine: str | None = None) -> None:
        self.nursery = nursery
        self.engine = engine
        self.capture = AuditCapture()
        self.audit: AuditView = self.capture
        self.server: RunningServer | None = None
        self.clients: list[Client] = []

    async def start(self, settings: Settings | None = None) -> RunningServer:
        settings = settings or make_settings()
        if self.engine is not None:
            server = {**settings.server.model_dump(), "engine": self.engine}
            settings = Settings.model_validate({**settings.model_dump(), "server": server})
        running: RunningServer = await self.nursery.start(serve, settings, self.capture.log)
        self.server = running
        return running

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def live_calls(self) -> int:
        """How many calls the server holds."""
        assert self.server is not None
        return len(self.server.board.calls)

    def armed_timers(self) -> int:
        assert self.server is not None
        return self.server.hub.armed_timers

    def holds_devices(self) -> bool:
        assert self.server is not None
        return bool(self.server.board.devices())

    async def open(
        self, *, headers: list[tuple[bytes, bytes]] | None = None, url: str | None = None
    ) -> Client:
        ws, stream = await connect_ws(self.nursery, url or self.url, extra_headers=headers)
        client = Client(ws, stream)
        self.clients.append(client)
        return client

    async def connect(self, user: str, *, token: str | None = None) -> Client:
        """A device of `user`, authenticated by header, with its `session` already read."""
        bearer = token or token_for(user)
        client = await self.open(headers=[(b"authorization", f"Bearer {bearer}".encode())])
        session = await client.expect("session", user=user)
        client.session = session["data"]
        return client

    async def connected_call(
        self, alice: Client | None = None, call_id: str = "ab"
    ) -> tuple[Client, Client]:
        """alice and bob in an answered call `call_id` (alice may be a device already open)."""
        alice = alice or await self.connect("alice")
        bob = await self.connect("bob")
        await alice.send("call-request", call_request(call_id, "alice", "bob"))
        await bob.expect("call-request")
        answer = {"callId": call_id, "to": "alice", "answer": {"type": "answer", "sdp": "v=0"}}
        await bob.send("call-answer", answer)
        await alice.expect("call-answer")
        return alice, bob

    async def settle(self) -> None:
        """Wait until the server has processed every disconnect (no sleeps-and-hope)."""
        assert self.server is not None
        with trio.fail_after(STEP):
            while not self.server.board.is_idle() or self.server.hub.connection_count:
                await trio.sleep(0.01)


REDIS_URL = os.environ.get("CALLGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CLUSTER_KEY = "cluster-key-for-tests-only-32-bytes-long!"


def require_redis(url: str) -> None:
    """Fail (not skip) the test when no Redis answers at `url`: the cluster tests need one."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"no Redis at {url}: scripts/test starts one on 127.0.0.1:6379")
    finally:
        client.close()


def cluster_settings(settings: Settings, name: str, **overrides: Any) -> Settings:
    """`settings` as a node of the test cluster `name`: short heartbeats, quick failure checks."""
    cluster = {
        "enabled": True,
        "redis_url": REDIS_URL,
        "name": name,
        "key": CLUSTER_KEY,
        "heartbeat_interval": 0.2,
        "node_timeout": 1.0,
        **overrides,
    }
    return Settings.model_validate({**settings.model_dump(), "cluster": cluster})


def _stream_id(value: bytes) -> tuple[int, int]:
    milliseconds, _, sequence = value.partition(b"-")
    return int(milliseconds), int(sequence or 0)


def delete_cluster_keys(redis_url: str, name: str) -> None:
    """Remove every key of the throw-away cluster `name`."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{name}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class ClusterHarness(Harness):
    """The same tests, on three cluster nodes sharing one Redis; devices are dealt round-robin.

    `audit` merges the nodes' trails. Each client waits, after every message it reads, until
    all nodes have applied the same log position, so a test that reads the audit trail right
    after a message sees what every node wrote about it.
    """

    NODES = 3

    def __init__(self, nursery: trio.Nursery, redis_url: str = REDIS_URL) -> None:
        super().__init__(nursery)
        self.redis_url = redis_url
        self.name = f"test-{secrets.token_hex(4)}"
        self.nodes: list[RunningServer] = []
        self.captures = [AuditCapture() for _ in range(self.NODES)]
        self.audit = MergedAudit(self.captures)
        self._next = 0
        self._running: list[tuple[trio.CancelScope, trio.Event]] = []

    async def start(
        self, settings: Settings | None = None, **cluster_overrides: Any
    ) -> RunningServer:
        require_redis(self.redis_url)
        self.settings = cluster_settings(
            settings or make_settings(), self.name, redis_url=self.redis_url, **cluster_overrides
        )
        for capture in self.captures:
            self.nodes.append(await self.nursery.start(self._run_node, self.settings, capture))
        self.server = self.nodes[0]
        return self.server

    async def add_node(self, settings: Settings | None = None) -> RunningServer:
        """One more node, joining the running cluster (with other settings, if given)."""
        capture = AuditCapture()
        self.captures.append(capture)
        if settings is not None:
            settings = cluster_settings(settings, self.name, redis_url=self.redis_url)
        node: RunningServer = await self.nursery.start(
            self._run_node, settings or self.settings, capture
        )
        self.nodes.append(node)
        return node

    async def _run_node(
        self,
        settings: Settings,
        capture: AuditCapture,
        *,
        task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        stopped, scope = trio.Event(), trio.CancelScope()
        self._running.append((scope, stopped))
        try:
            with scope:
                await serve(settings, capture.log, task_status=task_status)
        finally:
            stopped.set()

    async def stop(self) -> None:
        """Stop every node, then remove the cluster's keys from Redis."""
        for scope, _ in self._running:
            scope.cancel()
        with trio.move_on_after(STEP):
            for _, stopped in self._running:
                await stopped.wait()
        delete_cluster_keys(self.redis_url, self.name)

    def node_url(self, index: int) -> str:
        return self.nodes[index].url

    async def connect(
        self, user: str, *, token: str | None = None, node: int | None = None
    ) -> Client:
        """A device of `user` on node `node`, or on the next node in turn."""
        if node is None:
            node, self._next = self._next % self.NODES, self._next + 1
        url = self.nodes[node].url
        bearer = token or token_for(user)
        client = await self.open(headers=[(b"authorization", f"Bearer {bearer}".encode())], url=url)
        session = await client.expect("session", user=user)
        client.session = session["data"]
        return client

    async def open(
        self, *, headers: list[tuple[bytes, bytes]] | None = None, url: str | None = None
    ) -> Client:
        client = await super().open(headers=headers, url=url)
        client.after_receive = self.in_step
        return client

    async def in_step(self) -> None:
        """Wait until no node has a decision queued or running, an order unsent, or an inbox
        entry unread: what one message caused anywhere in the cluster has happened."""
        with trio.fail_after(STEP):
            while True:
                nodes = [  # the running nodes (a test may have stopped one: it waits for none)
                    node.hub.cluster
                    for node, (_, stopped) in zip(self.nodes, self._running, strict=False)
                    if node.hub.cluster is not None and not stopped.is_set()
                ]
                if not all(node.available for node in nodes):
                    return  # a test of Redis going away: nothing to wait for
                if all(node.quiet for node in nodes) and not self._unread(nodes):
                    return
                await trio.sleep(0.005)

    def _unread(self, nodes: list[Any]) -> int:
        """Inboxes with an entry after what their node has read."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            unread = 0
            for node in nodes:
                newest: Any = client.xrevrange(f"{self.name}:in:{node.node_id}", count=1)
                if newest and _stream_id(newest[0][0]) > _stream_id(node.inbox_position):
                    unread += 1
            return unread
        finally:
            client.close()

    async def settle(self) -> None:
        """Wait until no connection, call, device or timer is left anywhere in the cluster
        (missed calls stay: they are kept for users who are not there, by design)."""
        with trio.fail_after(STEP):
            while any(node.hub.connection_count for node in self.nodes) or self.leftovers():
                await trio.sleep(0.01)

    def live_calls(self) -> int:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return len(list(client.scan_iter(match=f"{self.name}:c:*")))
        finally:
            client.close()

    def armed_timers(self) -> int:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return int(client.zcard(f"{self.name}:timers"))
        finally:
            client.close()

    def holds_devices(self) -> bool:
        return any(key.startswith(f"{self.name}:u:") for key in self.leftovers())

    def leftovers(self) -> list[str]:
        """What the shared state still holds of devices, calls and timers."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            left = [key.decode() for key in client.scan_iter(match=f"{self.name}:c:*")]
            timers: Any = client.zrange(f"{self.name}:timers", 0, -1)
            left += [f"timer {member.decode()}" for member in timers]
            for key in client.scan_iter(match=f"{self.name}:u:*"):
                raw = client.get(key)
                if raw is not None and json.loads(raw[64:])["devices"]:
                    left.append(key.decode())
            return left
        finally:
            client.close()


class MergedAudit:
    """The audit trails of several nodes, read as one (by time, then node)."""

    def __init__(self, captures: list[AuditCapture]) -> None:
        self.captures = captures

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        rows = [row for capture in self.captures for row in capture.records(event)]
        return sorted(rows, key=lambda row: str(row["ts"]))

    def events(self) -> list[str]:
        return [row["event"] for row in self.records()]

    @property
    def text(self) -> str:
        return "".join(capture.text for capture in self.captures)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """End-to-end tests run on the default engine, those marked `both_engines` on the other one
    too, and modules with `ON_CLUSTER = True` on a cluster too."""
    if "harness" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("both_engines") is not None
        modes = [
            DEFAULT_ENGINE,
            *(OTHER_ENGINES if both else []),
            *(["cluster"] if getattr(metafunc.module, "ON_CLUSTER", False) else []),
        ]
        metafunc.parametrize("harness", modes, indirect=True)


@asynccontextmanager
async def checked(h: Harness) -> AsyncIterator[Harness]:
    """Run a test on `h`, then fail it on any logged crash or off-schema audit record."""
    with structlog.testing.capture_logs() as logs:
        yield h
    # The server contains a crashing connection and only logs it: that must fail the test.
    crashes = [entry for entry in logs if entry.get("log_level") in {"error", "critical"}]
    assert not crashes, crashes
    for record in h.audit.records():
        assert_valid_record(record)
    with trio.move_on_after(STEP):
        for client in h.clients:
            await client.ws.aclose()
            # trio-websocket's client side keeps its TCP stream open after a close that the
            # server started (it waits for the server's TCP close, then never closes its own).
            await client.stream.aclose()
    if isinstance(h, ClusterHarness):
        await h.stop()


@pytest.fixture
async def harness(nursery: trio.Nursery, request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """An end-to-end test's server: on an engine, or a cluster (`pytest_generate_tests`)."""
    h = ClusterHarness(nursery) if request.param == "cluster" else Harness(nursery, request.param)
    async with checked(h):
        yield h


@pytest.fixture
async def cluster(nursery: trio.Nursery) -> AsyncIterator[ClusterHarness]:
    """Three cluster nodes on the test Redis (started by the test, with its settings)."""
    h = ClusterHarness(nursery)
    async with checked(h):
        yield h


@pytest.fixture
async def gate(harness: Harness) -> Harness:
    """A harness with a server started on the test settings."""
    await harness.start()
    return harness


SDP_OFFER = (
    "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=secret-offer-marker\r\n"
)
SDP_ANSWER = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=secret-answer-marker\r\n"
CANDIDATE = {
    "candidate": "candidate:842163049 1 udp 1677729535 198.51.100.7 46154 typ srflx marker-ice",
    "sdpMid": "0",
    "sdpMLineIndex": 0,
    "usernameFragment": "frag",
}


def call_request(call_id: str, caller: str, callee: str, media: str = "video") -> dict[str, Any]:
    return {
        "id": call_id,
        "from": caller,
        "to": callee,
        "type": media,
        "offer": {"type": "offer", "sdp": SDP_OFFER},
        "timestamp": 1_795_000_000_000,
    }


def server_config(tmp_path: Path) -> Path:
    """A config file for a server run as a subprocess (`callgate serve`), logging to tmp_path."""
    config = tmp_path / "callgate.toml"
    config.write_text(
        "[server]\nhost = '127.0.0.1'\nport = 0\ndrain_timeout = 5\n"
        f"[auth]\nsecret = '{SECRET}'\n"
        f"revocation_file = '{tmp_path / 'revoked.json'}'\n"
        f"[audit]\npath = '{tmp_path / 'audit.log'}'\nkey = '{AUDIT_KEY.decode()}'\n"
        f"signing_key = '{AUDIT_SIGNING_KEY}'\n"
        f"anchor_path = '{tmp_path / 'anchor' / 'audit.anchor'}'\n"
        "[calls]\nreconnect_grace = 0\n"
        "[metrics]\nport = 0\n"
        "[limits]\nhandshakes = '1000/minute'\n"
    )
    return config


async def read_log_line(process: trio.Process, event: str) -> dict[str, Any]:
    """Read a server subprocess's stderr up to the JSON log line of `event`, and parse it
    (what comes after it in the same read is dropped)."""
    assert process.stderr is not None
    marker = f'"{event}"'.encode()
    buffer = b""
    with trio.fail_after(30):
        while marker not in buffer:
            chunk = await process.stderr.receive_some(4096)
            assert chunk, buffer
            buffer += chunk
    line = json.loads(next(line for line in buffer.splitlines() if marker in line))
    assert isinstance(line, dict)
    return line


async def start_server_process(
    config: Path, env: dict[str, str] | None = None
) -> tuple[trio.Process, str]:
    """`callgate serve` in a subprocess; returns it once it listens, with its URL."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "callgate", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    try:
        listening = await read_log_line(process, "listening")
        # The operator's first line says which build runs: the one this test process chose too.
        assert listening["hot_path"] == callgate.IMPLEMENTATION
    except BaseException:
        process.kill()  # a server that did not come up as expected is not left running
        with trio.CancelScope(shield=True):
            await process.wait()
        raise
    return process, listening["url"]


async def signed_in(
    nursery: trio.Nursery, url: str, token: str, ssl_context: ssl.SSLContext | None = None
) -> Client:
    """A client of a server outside the harness (a subprocess, TLS), its `session` read."""
    ws, stream = await connect_ws(
        nursery,
        url,
        ssl_context=ssl_context,
        extra_headers=[(b"authorization", f"Bearer {token}".encode())],
    )
    client = Client(ws, stream)
    client.session = (await client.expect("session"))["data"]
    return client
