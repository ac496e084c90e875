"""Socket.IO v4 compatibility, tested against the real socket.io-client 4.8 run by Node.

The client lives in tests/socketio (installed by `npm ci` from its lockfile: scripts/test does
this). A Socket.IO client and a native client call each other through the same core.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

from callgate.protocol import socketio as sio
from callgate.protocol.codec import ProtocolError
from conftest import (
    SDP_ANSWER,
    STEP,
    Client,
    ClusterHarness,
    FailsOn,
    Harness,
    call_request,
    connect_ws,
    make_settings,
    token_for,
)

DRIVER = Path(__file__).parent / "socketio" / "driver.mjs"
NODE = shutil.which("node")
INSTALLED = (DRIVER.parent / "node_modules" / "socket.io-client").is_dir()
needs_node = pytest.mark.skipif(
    NODE is None or not INSTALLED,
    reason="socket.io-client is not installed: run `npm ci` in tests/socketio (scripts/test does)",
)


class SocketIOClient:
    """One socket.io-client in a Node process; `expect` reads what it reports, in order."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    @classmethod
    async def start(cls, nursery: trio.Nursery, url: str) -> SocketIOClient:
        assert NODE is not None
        base = url.replace("ws://", "http://").removesuffix("/ws")
        process = await nursery.start(
            lambda task_status: trio.run_process(
                [NODE, str(DRIVER), base],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                check=False,
                task_status=task_status,
            )
        )
        client = cls(process)
        await client.expect("ready")
        return client

    async def command(self, op: str, **fields: Any) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all((json.dumps({"op": op, **fields}) + "\n").encode())

    async def next(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        with trio.fail_after(STEP):
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some(65536)
                assert chunk, "the Node client exited"
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    async def expect(self, kind: str, **fields: Any) -> dict[str, Any]:
        message = await self.next()
        assert message["type"] == kind, message
        for key, value in fields.items():
            assert message.get(key) == value, (key, message)
        return message

    async def expect_event(self, event: str, **data: Any) -> dict[str, Any]:
        message = await self.expect("event", event=event)
        for key, value in data.items():
            assert message["data"].get(key) == value, (key, message)
        return dict(message["data"])

    async def stop(self) -> None:
        self.process.kill()


async def connected_socketio(
    h: Harness, user: str, url: str | None = None, **options: Any
) -> SocketIOClient:
    client = await SocketIOClient.start(h.nursery, url or h.url)
    await client.command("connect", token=token_for(user), **options)
    await client.expect("auth_called")
    await client.expect("connect")
    session = await client.expect_event("session", user=user)
    assert session["sessionId"]
    return client


@needs_node
@pytest.mark.both_engines
async def test_socketio_client_calls_native_client(gate: Harness) -> None:
    alice = await connected_socketio(gate, "alice")
    bob = await gate.connect("bob")
    await alice.command(
        "emit", event="call-request", data=call_request("c1", "alice", "bob"), ack=True
    )
    ack = await alice.expect("ack", event="call-request")
    assert ack["result"] == {"ok": True}
    ring = await bob.expect("call-request", id="c1")
    assert ring["data"]["from"] == "alice"
    answer = {"callId": "c1", "to": "alice", "answer": {"type": "answer", "sdp": SDP_ANSWER}}
    await bob.send("call-answer", answer)
    got = await alice.expect_event("call-answer", callId="c1")
    assert got["from"] == "bob" and got["answer"]["sdp"] == SDP_ANSWER
    await alice.command(
        "emit", event="ice-candidate", data={"candidate": None, "callId": "c1", "to": "bob"}
    )
    await bob.expect("ice-candidate", **{"from": "alice"})
    await bob.send("call-end", {"callId": "c1", "to": "alice"})
    await alice.expect_event("call-end", callId="c1")
    await alice.stop()


@needs_node
async def test_native_client_calls_socketio_client(gate: Harness) -> None:
    alice = await gate.connect("alice")
    bob = await connected_socketio(gate, "bob")
    await alice.send("call-request", call_request("c2", "alice", "bob", "voice"))
    ring = await bob.expect_event("call-request", id="c2", type="voice")
    assert ring["from"] == "alice"
    answer = {"callId": "c2", "to": "alice", "answer": {"type": "answer", "sdp": SDP_ANSWER}}
    await bob.command("emit", event="call-answer", data=answer)
    await alice.expect("call-answer", **{"from": "bob"})
    await alice.ws.aclose()
    await bob.expect_event("call-end", reason="peer_disconnected")
    await bob.stop()


@needs_node
async def test_socketio_and_native_clients_on_two_cluster_nodes(cluster: ClusterHarness) -> None:
    """Cluster mode serves Socket.IO clients through the same log: a call across nodes."""
    await cluster.start()
    alice = await connected_socketio(cluster, "alice", url=cluster.node_url(0))
    bob = await cluster.connect("bob", node=1)
    await alice.command("emit", event="call-request", data=call_request("c3", "alice", "bob"))
    ring = await bob.expect("call-request", id="c3")
    assert ring["data"]["from"] == "alice"
    answer = {"callId": "c3", "to": "alice", "answer": {"type": "answer", "sdp": SDP_ANSWER}}
    await bob.send("call-answer", answer)
    await alice.expect_event("call-answer", callId="c3")
    await bob.send("call-end", {"callId": "c3", "to": "alice"})
    await alice.expect_event("call-end", callId="c3")
    await alice.stop()
    # alice's node may deliver the hang-up before bob's, which writes the record, applies it.
    await cluster.in_step()
    [ended] = cluster.audit.records("call.ended")
    assert ended["reason"] == "hangup"


@needs_node
async def test_bad_token_is_connect_error(gate: Harness) -> None:
    client = await SocketIOClient.start(gate.nursery, gate.url)
    await client.command("connect", token="not-a-token")
    await client.expect("auth_called")
    await client.expect("connect_error", message="invalid token")
    expired = await SocketIOClient.start(gate.nursery, gate.url)
    await expired.command("connect", token=token_for("x", ttl=-100))
    await expired.expect("auth_called")
    await expired.expect("connect_error", message="token expired")
    for process in (client, expired):
        await process.stop()


@needs_node
async def test_other_namespaces_are_refused(gate: Harness) -> None:
    client = await SocketIOClient.start(gate.nursery, gate.url)
    await client.command("connect", namespace="/admin", token=token_for("alice"))
    await client.expect("auth_called")
    await client.expect("connect_error", message="Invalid namespace")
    await client.stop()


@needs_node
async def test_acks_and_errors(gate: Harness) -> None:
    alice = await connected_socketio(gate, "alice")
    end = {"callId": "nope", "to": "bob"}
    await alice.command("emit", event="call-end", data=end, ack=True)
    ack = await alice.expect("ack", event="call-end")
    assert ack["result"]["ok"] is False
    assert ack["result"]["error"]["code"] == "unknown_call"
    await alice.command("emit", event="call-end", data=end)  # no ack: an `error` event instead
    error = await alice.expect_event("error", code="unknown_call")
    assert error["message"]
    await alice.command("emit", event="user-connected", data="alice", ack=True)
    assert (await alice.expect("ack"))["result"] == {"ok": True}
    await alice.stop()


@needs_node
async def test_reconnects_with_a_fresh_token_from_its_auth_callback(harness: Harness) -> None:
    await harness.start(make_settings(auth={"refresh_before": 0}))
    client = await SocketIOClient.start(harness.nursery, harness.url)
    await client.command("connect", token=token_for("alice", ttl=1), reconnection=True)
    await client.expect("auth_called", left=1)
    await client.expect("connect")
    first = await client.expect_event("session", user="alice")
    await client.command("token", token=token_for("alice", ttl=600))  # for the reconnection
    closing = await client.expect_event("closing", code=4001, reason="token expired")
    assert closing
    await client.expect("disconnect", reason="transport close")  # not "io server disconnect"
    await client.expect("auth_called", left=1)
    await client.expect("connect")
    second = await client.expect_event("session", user="alice")
    assert second["expiresAt"] > first["expiresAt"]
    await client.stop()


@needs_node
@pytest.mark.both_engines
async def test_forbidden_closes_tell_the_client_not_to_come_back(gate: Harness) -> None:
    alice = await connected_socketio(gate, "alice", reconnection=True)
    await alice.command("emit", event="auth", data={"token": token_for("mallory")})
    await alice.expect_event("closing", code=4003, reason="identity change")
    await alice.expect("disconnect", reason="io server disconnect")
    await alice.stop()


def test_long_polling_is_refused_in_the_docs() -> None:
    text = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    assert "long-polling" in text.lower()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            '2["call-end",{"callId":"c"}]',
            sio.SocketPacket(sio.EVENT, "/", None, ["call-end", {"callId": "c"}]),
        ),
        ('212["x",1]', sio.SocketPacket(sio.EVENT, "/", 12, ["x", 1])),
        ('0{"token":"t"}', sio.SocketPacket(sio.CONNECT, "/", None, {"token": "t"})),
        ("0/admin,", sio.SocketPacket(sio.CONNECT, "/admin", None, None)),
        ('2/admin,7["x"]', sio.SocketPacket(sio.EVENT, "/admin", 7, ["x"])),
        ("1", sio.SocketPacket(sio.DISCONNECT)),
    ],
)
def test_packet_parsing(payload: str, expected: sio.SocketPacket) -> None:
    assert sio.parse_socket_packet(payload) == expected


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "x",
        '51-["x",{"_placeholder":true,"num":0}]',
        "2[NaN]",
        "2{",
        "\u00b2{}",  # superscript two: str.isdigit() says yes, int() says no
        '2\u0661\u0662["x"]',  # Arabic-Indic 12: a regex digit class took it as ack id 12
        "2\uff11\uff12[]",  # fullwidth digits
        '0/admin{"token":"t"}',  # no ',' after the namespace: the token is not a namespace
        "0/" + "a" * 40 + ",",  # a namespace longer than an error may echo
        '2/admin room,["x"]',
        '21234567890123456["x"]',  # an ack id past 15 digits
    ],
)
def test_packets_refused(payload: str) -> None:
    with pytest.raises(ProtocolError):
        sio.parse_socket_packet(payload)


def test_a_malformed_payload_after_an_ack_id_is_answered_on_the_ack() -> None:
    with pytest.raises(ProtocolError) as refused:
        sio.parse_socket_packet("27[NaN]")
    assert refused.value.ref == 7


def test_rendering() -> None:
    assert sio.event_packet("session", {"a": 1}) == '42["session",{"a":1}]'
    assert sio.ack_packet(5, {"ok": True}) == '435[{"ok":true}]'
    assert sio.connect_error_packet("invalid token") == '44{"message":"invalid token"}'
    assert (
        sio.connect_error_packet("Invalid namespace", "/admin")
        == '44/admin,{"message":"Invalid namespace"}'
    )
    opened = json.loads(sio.open_packet("sid1", 25, 20, 65536)[1:])
    assert opened == {
        "sid": "sid1",
        "upgrades": [],
        "pingInterval": 25000,
        "pingTimeout": 20000,
        "maxPayload": 65536,
    }


@pytest.mark.both_engines
async def test_engine_heartbeat_drops_a_silent_client(harness: Harness) -> None:
    """A raw Engine.IO client that signs in and then never answers the server's pings."""

    await harness.start(make_settings(socketio={"ping_interval": 0.2, "ping_timeout": 0.2}))
    base = harness.url.removesuffix("/ws")
    ws, stream = await connect_ws(harness.nursery, base + "/socket.io/?EIO=4&transport=websocket")
    opened = json.loads((await ws.get_message())[1:])
    assert opened["pingInterval"] == 200 and opened["upgrades"] == []
    await ws.send_message("40" + json.dumps({"token": token_for("ghost")}))
    assert str(await ws.get_message()).startswith("40")
    assert str(await ws.get_message()).startswith('42["session"')
    with trio.fail_after(STEP):  # pings arrive; we never answer "3"
        while not any(
            r.get("reason") == "keepalive timeout" for r in harness.audit.records("conn.close")
        ):
            await trio.sleep(0.05)
    await stream.aclose()


async def test_refusals_before_sign_in_are_connect_errors(harness: Harness) -> None:
    """Past the per-user cap a Socket.IO client gets CONNECT_ERROR, not a `closing` event: it
    never had a session."""
    from trio_websocket import ConnectionClosed

    await harness.start(make_settings(server={"max_connections_per_user": 1}))
    await harness.connect("alice")
    ws, stream = await connect_ws(
        harness.nursery, harness.url.removesuffix("/ws") + "/socket.io/?EIO=4&transport=websocket"
    )
    assert str(await ws.get_message()).startswith("0{")
    await ws.send_message("40" + json.dumps({"token": token_for("alice")}))
    assert await ws.get_message() == '44{"message":"too many connections"}'
    with pytest.raises(ConnectionClosed), trio.fail_after(STEP):
        await ws.get_message()
    await stream.aclose()


async def test_a_frame_over_the_rate_limit_is_not_acted_on(harness: Harness) -> None:
    """The rate limit comes before decoding, and decoding a Socket.IO frame can act (a
    DISCONNECT packet ends the connection): over the limit, a frame only earns its
    rate_limited error. On wsproto this runs through the reactor's inline path."""

    await harness.start(
        make_settings(
            limits={"messages": "2/minute", "flood": "100/minute"},
            socketio={"ping_interval": 30},
        )
    )
    base = harness.url.removesuffix("/ws")
    ws = await connect_websocket_url(
        harness.nursery, base + "/socket.io/?EIO=4&transport=websocket"
    )
    await ws.get_message()  # the Engine.IO open packet
    await ws.send_message("40" + json.dumps({"token": token_for("limited")}))
    assert str(await ws.get_message()).startswith("40")
    assert str(await ws.get_message()).startswith('42["session"')
    # The CONNECT was the first message of the minute (counted since sign-in is), this the second.
    await ws.send_message('42["user-connected","limited"]')
    await ws.send_message("41")  # over the limit: refused, so not a disconnect
    with trio.fail_after(STEP):
        error = json.loads(str(await ws.get_message())[2:])
    assert error[0] == "error" and error[1]["code"] == "rate_limited", error
    assert harness.server is not None and harness.server.hub.connection_count == 1
    await ws.aclose()


SOCKETIO_PATH = "/socket.io/?EIO=4&transport=websocket"


async def raw_socketio(h: Harness) -> WebSocketConnection:
    """A raw Engine.IO client past the open packet; the harness closes it after the test."""
    ws, stream = await connect_ws(h.nursery, h.url.removesuffix("/ws") + SOCKETIO_PATH)
    h.clients.append(Client(ws, stream))
    assert (await next_packet(ws)).startswith("0{")
    return ws


async def raw_signed_in(h: Harness, user: str) -> WebSocketConnection:
    ws = await raw_socketio(h)
    await ws.send_message("40" + json.dumps({"token": token_for(user)}))
    assert (await next_packet(ws)).startswith("40{")
    assert (await next_packet(ws)).startswith('42["session"')
    return ws


async def next_packet(ws: WebSocketConnection) -> str:
    with trio.fail_after(STEP):
        return str(await ws.get_message())


async def next_event(ws: WebSocketConnection) -> list[Any]:
    packet = await next_packet(ws)
    assert packet.startswith("42"), packet
    event = json.loads(packet[2:])
    assert isinstance(event, list)
    return event


async def until_closed(ws: WebSocketConnection) -> tuple[list[str], int]:
    """Every packet still to come, and the close code after them."""
    packets: list[str] = []
    with trio.fail_after(STEP):
        while True:
            try:
                packets.append(str(await ws.get_message()))
            except ConnectionClosed as closed:
                assert closed.reason is not None
                return packets, closed.reason.code


async def test_non_ascii_digits_after_sign_in_are_an_error_and_the_call_goes_on(
    gate: Harness,
) -> None:
    """'4' + superscript two passes str.isdigit and then failed in int(): the connection
    closed 1000 with a traceback and the call went into the reconnect grace. Arabic-Indic
    digits after '42' were read as an ack id. Both are malformed packets: an `error`, no more."""
    alice = await raw_signed_in(gate, "alice")
    bob = await gate.connect("bob")
    await alice.send_message(
        "42" + json.dumps(["call-request", call_request("c5", "alice", "bob")])
    )
    await bob.expect("call-request", id="c5")
    answer = {"callId": "c5", "to": "alice", "answer": {"type": "answer", "sdp": SDP_ANSWER}}
    await bob.send("call-answer", answer)
    assert (await next_event(alice))[0] == "call-answer"
    for packet in ("4\u00b2{}", '42\u0661\u0662["user-connected","alice"]', "4\uff12[]"):
        await alice.send_message(packet)
        error = await next_event(alice)
        assert error[0] == "error" and error[1]["code"] == "invalid_message", (packet, error)
    await alice.send_message('427["user-connected","alice"]')
    assert await next_packet(alice) == '437[{"ok":true}]'
    candidate = {"candidate": None, "callId": "c5", "to": "bob"}
    await alice.send_message("42" + json.dumps(["ice-candidate", candidate]))
    await bob.expect("ice-candidate", callId="c5")


@pytest.mark.parametrize("packet", ["4\u00b2{}", '40\u0661{"token":"x"}', "\u00b2"])
async def test_a_malformed_packet_before_connect_closes_the_transport(
    gate: Harness, packet: str
) -> None:
    ws = await raw_socketio(gate)
    await ws.send_message(packet)
    packets, code = await until_closed(ws)
    assert (packets, code) == (['44{"message":"authentication required"}'], 4001)
    [failed] = gate.audit.records("auth.failed")
    assert failed["reason"] == "not_authenticated"


@pytest.mark.parametrize("packet", ["2", "40/admin,"])
async def test_pings_and_other_namespaces_before_sign_in_are_rate_limited(
    harness: Harness, packet: str
) -> None:
    """Each is answered (a pong, a CONNECT_ERROR), so each counts against `messages`; past it,
    `rate_limited`, and a client that goes on is closed 4029 as after sign-in."""
    await harness.start(make_settings(limits={"messages": "5/minute", "flood": "3/minute"}))
    ws = await raw_socketio(harness)
    answer = "3" if packet == "2" else '44/admin,{"message":"Invalid namespace"}'
    for _ in range(5):
        await ws.send_message(packet)
        assert await next_packet(ws) == answer
    # One at a time: a client still sending when the close comes may get a TCP reset instead.
    for _ in range(3):
        await ws.send_message(packet)
        error = await next_event(ws)
        assert error[0] == "error" and error[1]["code"] == "rate_limited", error
    await ws.send_message(packet)
    packets, code = await until_closed(ws)
    assert packets[-1] == '44{"message":"rate limit exceeded"}' and code == 4029, packets


async def test_no_error_echoes_a_token(gate: Harness) -> None:
    """`40/admin{"token":...}` (no ',') made the whole token the namespace, and the
    CONNECT_ERROR sent it back. Errors now echo at most a short, plain excerpt."""
    token = token_for("alice")
    ws = await raw_socketio(gate)
    await ws.send_message('40/admin{"token":"' + token + '"}')
    packets, code = await until_closed(ws)
    assert (packets, code) == (['44{"message":"authentication required"}'], 4001)
    # A real other namespace is still answered on that namespace, as socket.io-client expects.
    other = await raw_socketio(gate)
    await other.send_message('40/admin,{"token":"' + token + '"}')
    assert await next_packet(other) == '44/admin,{"message":"Invalid namespace"}'
    # After sign-in: the same packet, and a token as an event name.
    alice = await raw_signed_in(gate, "alice")
    for packet in ('40/admin{"token":"' + token + '"}', "42" + json.dumps([token, {}])):
        await alice.send_message(packet)
        error = await next_event(alice)
        assert error[0] == "error" and token[32:64] not in json.dumps(error), error
        assert len(error[1]["message"]) < 70, error


@pytest.mark.parametrize("fragmented", [False, True])
async def test_a_message_over_the_limit_is_said_goodbye_to_as_a_socketio_close(
    harness: Harness, fragmented: bool
) -> None:
    """Contract 11: a 1009 is preceded by `closing` and `41`, like every other close the
    client must not come back from. A frame (or fragments) larger than `max_message_bytes`
    in bytes was closed by the engine itself, with neither."""
    await harness.start(make_settings(server={"max_message_bytes": 4096}))
    alice = await raw_signed_in(harness, "alice")
    bob = await harness.connect("bob")
    await alice.send_message(
        "42" + json.dumps(["call-request", call_request("big", "alice", "bob")])
    )
    await bob.expect("call-request", id="big")
    big = "42" + json.dumps(["user-connected", "a" * 5000])
    if fragmented:
        # Four small frames of one message: each under the limit, the message over it.
        stream = harness.clients[0].stream
        await stream.send_all(_masked_frame(0x1, big[:2000].encode(), fin=False))
        await stream.send_all(_masked_frame(0x0, big[2000:4000].encode(), fin=False))
        await stream.send_all(_masked_frame(0x0, big[4000:].encode(), fin=True))
    else:
        await alice.send_message(big)
    packets, code = await until_closed(alice)
    assert packets == ['42["closing",{"code":1009,"reason":"message too big"}]', "41"]
    assert code == 1009
    await bob.expect("call-end", callId="big", reason="peer_disconnected")


def _masked_frame(opcode: int, payload: bytes, *, fin: bool) -> bytes:
    """One client frame (RFC 6455 5.2), masked with a zero key (the payload reads as is)."""
    size = len(payload)
    length = bytes([0x80 | size]) if size < 126 else b"\xfe" + size.to_bytes(2, "big")
    return bytes([(0x80 if fin else 0) | opcode]) + length + b"\x00\x00\x00\x00" + payload


@pytest.mark.parametrize(("packet", "signed_in"), [("41", True), ("1", True), ("1", False)])
@pytest.mark.both_engines
async def test_a_client_that_says_goodbye_gets_a_normal_close(
    gate: Harness, packet: str, signed_in: bool
) -> None:
    """A Socket.IO DISCONNECT or an Engine.IO close is a client leaving: the server closes the
    WebSocket with 1000 (contract 9: normal), not by dropping the TCP connection (1006)."""
    ws = await (raw_signed_in(gate, "alice") if signed_in else raw_socketio(gate))
    await ws.send_message(packet)
    assert await until_closed(ws) == ([], 1000)
    with trio.fail_after(STEP):  # (trio-websocket: written once the close handshake is done)
        while not gate.audit.records("conn.close"):
            await trio.sleep(0.01)
    [closed] = gate.audit.records("conn.close")
    assert closed["close_code"] == 1000


async def test_an_internal_error_is_a_closing_without_a_disconnect(
    gate: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contract 11: for 1011 the server emits `closing`, then just closes the transport (no
    `41`), so socket.io-client reconnects by itself."""
    assert gate.server is not None
    hub = gate.server.hub
    monkeypatch.setattr(hub, "_dispatch", FailsOn(hub._dispatch, 7))
    alice = await raw_signed_in(gate, "alice")
    with structlog.testing.capture_logs():
        await alice.send_message('427["user-connected","alice"]')
        packets, code = await until_closed(alice)
    assert (packets, code) == (['42["closing",{"code":1011,"reason":"internal error"}]'], 1011)


async def test_other_namespaces_after_sign_in_are_refused_on_their_namespace(
    gate: Harness,
) -> None:
    """Contract 11: any namespace but the main one gets CONNECT_ERROR `Invalid namespace`.
    socket.io-client multiplexes: `io(url + "/admin")` beside a connected main socket sends its
    CONNECT on the same transport, and waits for the answer on that namespace. A DISCONNECT of
    a namespace the client is not in leaves the main one alone."""
    alice = await raw_signed_in(gate, "alice")
    await alice.send_message('40/admin,{"token":"' + token_for("alice") + '"}')
    assert await next_packet(alice) == '44/admin,{"message":"Invalid namespace"}'
    await alice.send_message("41/admin,")
    await alice.send_message('427["user-connected","alice"]')
    assert await next_packet(alice) == '437[{"ok":true}]'


async def test_an_origin_not_allowed_is_a_connect_error(harness: Harness) -> None:
    """The Socket.IO form of the 4003 for an origin not allowed (contract 9 and 11)."""
    await harness.start(make_settings(server={"allowed_origins": ["https://app.example"]}))
    ws, stream = await connect_ws(
        harness.nursery,
        harness.url.removesuffix("/ws") + SOCKETIO_PATH,
        extra_headers=[(b"origin", b"https://evil.example")],
    )
    harness.clients.append(Client(ws, stream))
    (opened, *rest), code = await until_closed(ws)
    # Engine.IO's open packet first: a client reads no packet before it (see below).
    assert opened.startswith("0{"), opened
    assert (rest, code) == (['44{"message":"origin not allowed"}'], 4003)


@needs_node
async def test_a_real_client_of_an_origin_not_allowed_is_told_so(harness: Harness) -> None:
    """socket.io-client drops every packet that comes before Engine.IO's open packet: sent the
    CONNECT_ERROR and the close alone, it reported nothing (no `connect_error`, no `disconnect`)
    and waited for ever; with the HTTP 403 of before, it had at least seen a `connect_error`.
    After the open packet, it reads the refusal, and a CONNECT_ERROR tells it not to retry."""
    await harness.start(make_settings(server={"allowed_origins": ["https://app.example"]}))
    client = await SocketIOClient.start(harness.nursery, harness.url)
    await client.command(
        "connect", token=token_for("alice"), extraHeaders={"Origin": "https://evil.example"}
    )
    await client.expect("auth_called")
    await client.expect("connect_error", message="origin not allowed")
    await client.stop()
    [refused] = harness.audit.records("conn.refused")
    assert refused["code"] == 4003
    assert not harness.audit.records("auth.ok")


@pytest.mark.parametrize("connect_token", [None, "bob"], ids=["header-only", "connect-token"])
async def test_a_bearer_header_on_a_socketio_upgrade_waits_for_the_connect(
    harness: Harness, connect_token: str | None
) -> None:
    """A Node or React Native socket.io-client may also send `Authorization: Bearer` (its
    `extraHeaders`). Socket.IO signs in with the CONNECT packet (contract 11), which such a
    client sends all the same: it is answered `40{sid}` and `session`, never before it (an
    unsolicited `40` made the client's own CONNECT an `error`). A CONNECT that carries a
    token signs in with that token; one without uses the header's."""
    await harness.start(make_settings())
    ws, stream = await connect_ws(
        harness.nursery,
        harness.url.removesuffix("/ws") + SOCKETIO_PATH,
        extra_headers=[(b"authorization", f"Bearer {token_for('alice')}".encode())],
    )
    harness.clients.append(Client(ws, stream))
    assert (await next_packet(ws)).startswith("0{")
    payload = {} if connect_token is None else {"token": token_for(connect_token)}
    await ws.send_message("40" + json.dumps(payload))
    assert (await next_packet(ws)).startswith("40{")
    event, session = await next_event(ws)
    assert (event, session["user"]) == ("session", connect_token or "alice")
    # The next packet answers the next event: no `error` came for the CONNECT.
    await ws.send_message('421["user-connected",' + json.dumps(session["user"]) + "]")
    assert await next_packet(ws) == '431[{"ok":true}]'


@needs_node
async def test_a_real_client_with_an_authorization_header_signs_in_with_its_connect(
    gate: Harness,
) -> None:
    """socket.io-client with `extraHeaders: {Authorization}` (Node, React Native) and `auth`:
    its CONNECT's token signs it in, and no `error` event follows its CONNECT."""
    client = await connected_socketio(
        gate, "bob", extraHeaders={"Authorization": f"Bearer {token_for('alice')}"}
    )
    await client.command("emit", event="user-connected", data="bob", ack=True)
    ack = await client.expect("ack", event="user-connected")
    assert ack["result"] == {"ok": True}
    await client.stop()


@pytest.mark.parametrize("header_token", [False, True], ids=["connect-token", "header-token"])
async def test_a_resume_header_on_a_socketio_upgrade_is_honoured(
    harness: Harness, header_token: bool
) -> None:
    """`Callgate-Resume` on the upgrade (an app's `extraHeaders`) resumes as the native
    protocol's header does, whichever carries the token (the CONNECT, or `Authorization`);
    a `resume` in the CONNECT itself would take its place."""
    await harness.start(make_settings(calls={"reconnect_grace": 30}))
    alice, _bob = await harness.connected_call()
    await alice.ws.aclose()
    headers = [(b"callgate-resume", alice.session["sessionId"].encode())]
    if header_token:
        headers.append((b"authorization", f"Bearer {token_for('alice')}".encode()))
    ws, stream = await connect_ws(
        harness.nursery, harness.url.removesuffix("/ws") + SOCKETIO_PATH, extra_headers=headers
    )
    harness.clients.append(Client(ws, stream))
    assert (await next_packet(ws)).startswith("0{")
    await ws.send_message(
        "40" + ("{}" if header_token else json.dumps({"token": token_for("alice")}))
    )
    assert (await next_packet(ws)).startswith("40{")
    event, session = await next_event(ws)
    assert (event, session["user"], session["resumed"]) == ("session", "alice", True)
