"""Shared test harness: the real server on 127.0.0.1:0 and real WebSocket clients."""

from __future__ import annotations

import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from jsonschema import Draft202012Validator
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

from callgate.audit import AuditLog, StreamSink
from callgate.auth import mint_token
from callgate.config import Settings, load_settings
from callgate.transport.server import RunningServer, serve

SCHEMA = Draft202012Validator(
    json.loads((Path(__file__).parent.parent / "docs" / "audit-log.schema.json").read_text())
)
SECRET = "test-secret-that-is-long-enough-for-hs256!"
AUDIT_KEY = b"audit-key-for-tests-only-32-bytes-long!"
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


class Client:
    """A real WebSocket client with strict expectations: the next message must be the one named."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.session: dict[str, Any] = {}

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

    async def expect_closed(self, code: int, reason: str | None = None) -> None:
        """Every remaining message is read (and must not be a call event), then the close."""
        with trio.fail_after(STEP):
            while True:
                try:
                    await self.ws.get_message()
                except ConnectionClosed as closed:
                    assert closed.reason is not None
                    assert closed.reason.code == code, closed.reason
                    if reason is not None:
                        assert closed.reason.reason == reason, closed.reason
                    return

    async def expect_silence(self, seconds: float = 0.2) -> None:
        """No message arrives within `seconds` (used only to prove nothing was sent)."""
        with trio.move_on_after(seconds):
            message = await self.ws.get_message()
            raise AssertionError(f"unexpected message {message!r}")


ClientFactory = Callable[..., Awaitable[Client]]


ENGINES = ["trio-websocket", "wsproto"]


class Harness:
    def __init__(self, nursery: trio.Nursery, engine: str | None = None) -> None:
        self.nursery = nursery
        self.engine = engine
        self.audit = AuditCapture()
        self.server: RunningServer | None = None
        self.clients: list[Client] = []

    async def start(self, settings: Settings | None = None) -> RunningServer:
        settings = settings or make_settings()
        if self.engine is not None:
            server = {**settings.server.model_dump(), "engine": self.engine}
            settings = Settings.model_validate({**settings.model_dump(), "server": server})
        running: RunningServer = await self.nursery.start(serve, settings, self.audit.log)
        self.server = running
        return running

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    async def open(
        self, *, headers: list[tuple[bytes, bytes]] | None = None, url: str | None = None
    ) -> Client:
        ws = await connect_websocket_url(
            self.nursery, url or self.url, extra_headers=headers or [], max_message_size=2**22
        )
        client = Client(ws)
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


@pytest.fixture(params=ENGINES)
async def harness(nursery: trio.Nursery, request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """Every end-to-end test runs on both connection engines."""
    h = Harness(nursery, engine=request.param)
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
            await client.ws._stream.aclose()


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
