"""Every error code of contract section 5 and every close code callgate uses, on real sockets.

Each refusal is also checked not to disturb another user's call.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request, TextMessage
from wsproto.events import CloseConnection as WsCloseConnection
from wsproto.events import Event as WsEvent

from conftest import (
    SDP_ANSWER,
    SECRET,
    STEP,
    Client,
    FailsOn,
    Harness,
    call_request,
    make_settings,
    token_for,
)

SDP_ANSWER_OBJECT = {"type": "answer", "sdp": SDP_ANSWER}


async def still_works(alice: Client, bob: Client) -> None:
    await alice.send("ice-candidate", {"candidate": None, "callId": "ab", "to": "bob"})
    await bob.expect("ice-candidate", callId="ab")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_message"),
        ("[1, 2]", "invalid_message"),
        ('{"data": {}}', "invalid_message"),
        ('{"event": "call-request", "data": {"id": "x"}, "ref": 3}', "invalid_message"),
        ('{"event": "call-request", "data": []}', "invalid_message"),
        ('{"event": "dance", "data": {}, "ref": "r"}', "unknown_event"),
        ('{"event": "session", "data": {}}', "unknown_event"),
        (
            '{"event": "ice-candidate", "data": {"callId": "a b", "to": "x", "candidate": null}}',
            "invalid_message",
        ),
        ('{"event": "call-end", "data": {"callId": "c", "to": "\\u0007bell"}}', "invalid_message"),
        ('{"event": "call-end", "data": {"callId": "c", "to": "\\ud800"}}', "invalid_message"),
    ],
)
@pytest.mark.both_engines
async def test_bad_frames_get_an_error_and_the_connection_stays(
    gate: Harness, frame: str, code: str
) -> None:
    alice, bob = await gate.connected_call()
    await alice.ws.send_message(frame)
    message = await alice.expect("error", code=code)
    parsed = json.loads(frame) if frame.startswith("{") else {}
    assert message.get("ref") == parsed.get("ref")
    assert message["data"]["message"]
    await still_works(alice, bob)


async def test_spoofed_from_is_forbidden(gate: Harness) -> None:
    alice, bob = await gate.connected_call()
    carol = await gate.connect("carol")
    await carol.send("call-request", call_request("x", "alice", "bob"), ref=1)
    await carol.expect_error("forbidden", ref=1)
    await bob.expect_silence()
    await still_works(alice, bob)
    denied = gate.audit.records("authz.denied")[0]
    assert denied["user"] == "carol" and denied["reason"] == "forbidden"


async def test_message_to_someone_not_your_peer_is_forbidden(gate: Harness) -> None:
    alice, bob = await gate.connected_call()
    carol = await gate.connect("carol")
    await alice.send("ice-candidate", {"candidate": None, "callId": "ab", "to": "carol"}, ref=2)
    await alice.expect_error("forbidden", ref=2)
    await carol.expect_silence()
    await still_works(alice, bob)


async def test_answering_a_call_you_were_not_called_on(gate: Harness) -> None:
    alice, bob = await gate.connected_call()
    carol = await gate.connect("carol")
    answer = {"callId": "ab", "to": "alice", "answer": {"type": "answer", "sdp": "v=0"}}
    await carol.send("call-answer", answer, ref="c")
    await carol.expect_error("unknown_call", ref="c")
    # Same answer for an id that does not exist at all: ids cannot be probed.
    await carol.send("call-answer", answer | {"callId": "nope"}, ref="d")
    await carol.expect_error("unknown_call", ref="d")
    await still_works(alice, bob)


async def test_caller_answering_own_call_is_forbidden(gate: Harness) -> None:
    alice = await gate.connect("alice")
    bob = await gate.connect("bob")
    await alice.send("call-request", call_request("c", "alice", "bob"))
    await bob.expect("call-request")
    answer = {"callId": "c", "to": "bob", "answer": {"type": "answer", "sdp": "v=0"}}
    await alice.send("call-answer", answer, ref=1)
    await alice.expect_error("forbidden", ref=1)


async def test_second_call_while_in_one_is_forbidden(gate: Harness) -> None:
    alice, bob = await gate.connected_call()
    await gate.connect("carol")
    await alice.send("call-request", call_request("second", "alice", "carol"), ref=1)
    await alice.expect_error("forbidden", ref=1)
    await still_works(alice, bob)


async def test_reused_live_call_id_is_call_exists(harness: Harness) -> None:
    await harness.start(make_settings(calls={"max_calls_per_user": 2}))
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await alice.send("call-request", call_request("same", "alice", "bob"))
    await bob.expect("call-request")
    await alice.send("call-request", call_request("same", "alice", "bob"), ref=1)
    await alice.expect_error("call_exists", ref=1)


async def test_user_connected_only_for_yourself(gate: Harness) -> None:
    alice = await gate.connect("alice")
    await alice.send("user-connected", "alice", ref=1)
    await alice.expect("ack")
    await alice.send("user-connected", "bob", ref=2)
    await alice.expect_error("forbidden", ref=2)


@pytest.mark.parametrize(
    "data", ['"Alice"', '""', '"x\\u0007"', "42", "null", "{}", '["alice"]', '{"user": "alice"}']
)
async def test_user_connected_with_any_other_value_is_forbidden(gate: Harness, data: str) -> None:
    """Contract 3: `user-connected` "is accepted only when its data equals the authenticated
    user...; any other value is `forbidden`": a value that is no user id at all too."""
    alice = await gate.connect("alice")
    await alice.ws.send_message('{"event": "user-connected", "ref": 3, "data": ' + data + "}")
    await alice.expect_error("forbidden", ref=3)
    await alice.ws.send_message('{"event": "user-connected", "ref": 4}')  # no data at all
    await alice.expect_error("forbidden", ref=4)
    await alice.expect_silence()


async def test_call_request_flood_is_rate_limited_and_others_unaffected(harness: Harness) -> None:
    await harness.start(
        make_settings(limits={"call_request": "3/minute", "call_request_pair": "100/minute"})
    )
    alice, bob = await harness.connected_call()
    await harness.connect("carol")
    mallory = await harness.connect("mallory")
    for attempt in range(3):
        await mallory.send("call-request", call_request(f"m{attempt}", "mallory", "dave"))
        await mallory.expect("call-reject", reason="unavailable")
    await mallory.send("call-request", call_request("m3", "mallory", "carol"), ref="r")
    error = await mallory.expect_error("rate_limited", ref="r")
    assert error["data"]["retryAfter"] >= 1
    assert harness.audit.records("call.rate_limited")[0]["reason"] == "call_request"
    await still_works(alice, bob)


async def test_pair_limit(harness: Harness) -> None:
    await harness.start(make_settings(limits={"call_request_pair": "1/minute"}))
    mallory = await harness.connect("mallory")
    await mallory.send("call-request", call_request("m1", "mallory", "dave"))
    await mallory.expect("call-reject", reason="unavailable")
    await mallory.send("call-request", call_request("m2", "mallory", "dave"))
    await mallory.expect_error("rate_limited")
    await mallory.send("call-request", call_request("m3", "mallory", "erin"))
    await mallory.expect("call-reject", reason="unavailable")  # another callee is fine


@pytest.mark.both_engines
async def test_message_flood_closes_4029(harness: Harness) -> None:
    await harness.start(make_settings(limits={"messages": "5/minute", "flood": "3/minute"}))
    alice, bob = await harness.connected_call()
    mallory = await harness.connect("mallory")
    for n in range(5):
        await mallory.send("user-connected", "mallory", ref=n)
        await mallory.expect("ack")
    for n in range(3):
        await mallory.send("user-connected", "mallory", ref=f"x{n}")
        error = await mallory.expect_error("rate_limited", ref=f"x{n}")
        assert error["data"]["retryAfter"] >= 1
    await mallory.send("user-connected", "mallory")
    await mallory.expect_closed(4029)
    await still_works(alice, bob)


async def test_handshake_limit_per_address(harness: Harness) -> None:
    await harness.start(make_settings(limits={"handshakes": "2/minute"}))
    await harness.connect("a")
    await harness.connect("b")
    third = await harness.open(headers=[(b"authorization", f"Bearer {token_for('c')}".encode())])
    error = await third.expect_error("rate_limited")
    assert error["data"]["retryAfter"] >= 1
    await third.expect_closed(4029)


@pytest.mark.both_engines
async def test_binary_frame_closes_1003(gate: Harness) -> None:
    alice, bob = await gate.connected_call()
    await bob.ws.send_message(b"\x00\x01")
    await bob.expect_closed(1003)
    await alice.expect("call-end", reason="peer_disconnected")


@pytest.mark.both_engines
async def test_too_big_frame_closes_1009(harness: Harness) -> None:
    await harness.start(make_settings(server={"max_message_bytes": 4096}))
    alice = await harness.connect("alice")
    # 2000 characters but 6000 bytes: the limit is in bytes, not characters.
    await alice.send("user-connected", "alice", ref="é" * 2000)
    await alice.expect_closed(1009)
    bob = await harness.connect("bob")
    await bob.send("user-connected", "b" * 5000)
    await bob.expect_closed(1009)


@pytest.mark.both_engines
async def test_wrong_path_is_404(gate: Harness) -> None:
    assert gate.server is not None
    upgrade = (
        "GET /other HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    async with await trio.open_tcp_stream("127.0.0.1", gate.server.port) as stream:
        await stream.send_all(upgrade.encode())
        with trio.fail_after(STEP):
            reply = await stream.receive_some(4096)
    assert reply.startswith(b"HTTP/1.1 404")


@pytest.mark.parametrize(
    ("request_head", "reply_starts"),
    [
        pytest.param(  # no Sec-WebSocket-Key
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
            b"HTTP/1.1 400",
            id="broken-upgrade-400",
        ),
        pytest.param(b"GARBAGE\r\n\r\n", None, id="not-http-no-answer"),
    ],
)
@pytest.mark.both_engines
async def test_what_a_request_that_is_no_upgrade_gets(
    gate: Harness, request_head: bytes, reply_starts: bytes | None
) -> None:
    """docs/protocol.md section 1: a broken upgrade gets 400; a head that is not HTTP/1.x is
    closed without an answer. Either way the socket is closed."""
    assert gate.server is not None
    async with await trio.open_tcp_stream("127.0.0.1", gate.server.port) as stream:
        await stream.send_all(request_head)
        reply = b""
        with trio.fail_after(STEP):
            while chunk := await stream.receive_some(4096):
                reply += chunk
    if reply_starts is None:
        assert reply == b""
    else:
        assert reply.startswith(reply_starts)


# -- authentication ----------------------------------------------------------------------


def _rsa_pem() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, public


def _bad_tokens(public_pem: bytes) -> dict[str, str]:
    now = int(time.time())
    return {
        "alg none": _unsigned({"sub": "eve", "exp": now + 60}, "none"),
        "alg none uppercase": _unsigned({"sub": "eve", "exp": now + 60}, "NONE"),
        # HS/RS confusion: the server's *public* key used as an HMAC secret.
        "hs with public key": _hmac_raw({"sub": "eve", "exp": now + 60}, public_pem),
        "expired": token_for("eve", ttl=-120),
        "not yet valid": token_for("eve", nbf=now + 600),
        "issued in the future": jwt.encode(
            {"sub": "eve", "exp": now + 9000, "iat": now + 3600}, SECRET, algorithm="HS256"
        ),
        "wrong audience": token_for("eve", aud="other-service"),
        "wrong issuer": token_for("eve", iss="https://evil.example"),
        "missing sub": jwt.encode({"exp": now + 60}, SECRET, algorithm="HS256"),
        "missing exp": jwt.encode({"sub": "eve"}, SECRET, algorithm="HS256"),
        "sub not a string": jwt.encode({"sub": 42, "exp": now + 60}, SECRET, algorithm="HS256"),
        "sub with control chars": token_for("eve\nadmin"),
        "wrong secret": token_for("eve", secret="another-secret-that-is-long-enough!!"),
        "garbage": "definitely.not.a-jwt",
        "empty segments": "..",
        "binary junk": "\u00ff\u0000abc",
    }


def _unsigned(claims: dict[str, object], alg: str) -> str:
    def b64(raw: bytes) -> str:
        return jwt.utils.base64url_encode(raw).decode()

    header = json.dumps({"alg": alg, "typ": "JWT"}).encode()
    return b64(header) + "." + b64(json.dumps(claims).encode()) + "."


def _hmac_raw(claims: dict[str, object], key: bytes) -> str:
    """An HS256 token signed with arbitrary bytes (pyjwt refuses PEM keys as HMAC secrets)."""
    import hashlib
    import hmac

    def b64(raw: bytes) -> str:
        return jwt.utils.base64url_encode(raw).decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


@pytest.fixture
def rsa_keys(tmp_path: Path) -> tuple[rsa.RSAPrivateKey, str]:
    key, public = _rsa_pem()
    path = tmp_path / "public.pem"
    path.write_bytes(public)
    return key, str(path)


@pytest.mark.both_engines
async def test_every_bad_token_class_is_refused_4001(
    harness: Harness, rsa_keys: tuple[rsa.RSAPrivateKey, str]
) -> None:
    key, public_file = rsa_keys
    settings = make_settings(
        auth={
            "algorithms": ["HS256", "RS256"],
            "public_key_file": public_file,
            "issuer": "https://issuer.example",
            "audience": "callgate",
        }
    )
    await harness.start(settings)
    with open(public_file, "rb") as handle:
        public_pem = handle.read()
    good = jwt.encode(
        {
            "sub": "ok",
            "exp": int(time.time()) + 60,
            "iss": "https://issuer.example",
            "aud": "callgate",
        },
        key,
        algorithm="RS256",
    )
    await harness.connect("ok", token=good)  # the RS256 path works
    for name, token in _bad_tokens(public_pem).items():
        by_message = await harness.open()
        await by_message.send("auth", {"token": token})
        expected = "token expired" if name == "expired" else "invalid token"
        try:
            await by_message.expect_closed(4001, expected)
        except AssertionError as failure:
            raise AssertionError(f"token class {name!r} was not refused") from failure
    assert harness.audit.records("auth.failed")
    for record in harness.audit.records("auth.failed"):
        assert set(record) <= {"ts", "event", "conn", "addr", "reason", "seq", "mac"}


@pytest.mark.both_engines
async def test_bad_header_token_is_refused_after_upgrade(gate: Harness) -> None:
    client = await gate.open(headers=[(b"authorization", b"Bearer nope")])
    await client.expect_closed(4001, "invalid token")


async def test_a_bearer_header_without_a_token_is_an_invalid_token(gate: Harness) -> None:
    """Contract 2: an empty token is an invalid token. `Authorization: Bearer` with nothing
    after it waited for an `auth` message and closed `auth timeout` seconds later."""
    client = await gate.open(headers=[(b"authorization", b"Bearer")])
    await client.expect_closed(4001, "invalid token")
    assert gate.audit.records("auth.failed")[-1]["reason"] == "malformed"


async def test_another_authorization_scheme_leaves_the_auth_message(gate: Harness) -> None:
    """A browser behind HTTP basic authentication sends `Authorization: Basic` with its
    upgrade: not a token, so it signs in with its first message as browsers do."""
    client = await gate.open(headers=[(b"authorization", b"Basic YWxpY2U6c2VjcmV0")])
    await client.send("auth", {"token": token_for("alice")}, ref=1)
    await client.expect("session", user="alice")
    await client.expect("ack")


async def test_query_token_refused_unless_enabled(harness: Harness) -> None:
    await harness.start()
    client = await harness.open(url=harness.url + "?token=" + token_for("alice"))
    await client.expect_closed(4001, "invalid token")
    assert harness.audit.records("auth.failed")[0]["reason"] == "query_token_refused"


async def test_query_token_when_enabled(harness: Harness) -> None:
    await harness.start(make_settings(auth={"allow_query_token": True}))
    client = await harness.open(url=harness.url + "?token=" + token_for("alice"))
    await client.expect("session", user="alice")


@pytest.mark.both_engines
async def test_auth_message_then_session(gate: Harness) -> None:
    client = await gate.open()
    await client.send("auth", {"token": token_for("alice")}, ref="login")
    session = await client.expect("session", user="alice")
    assert session["data"]["connectionId"] and session["data"]["sessionId"]
    assert session["data"]["iceServers"] == [{"urls": ["stun:stun.example.org:3478"]}]
    assert session["data"]["expiresAt"] > time.time()
    await client.expect("ack")


async def test_anything_before_auth_closes_4001(gate: Harness) -> None:
    client = await gate.open()
    await client.send("call-request", call_request("c", "alice", "bob"))
    await client.expect_closed(4001, "authentication required")


@pytest.mark.both_engines
async def test_auth_timeout(harness: Harness) -> None:
    await harness.start(make_settings(server={"auth_timeout": 0.2}))
    client = await harness.open()
    await client.expect_closed(4001, "auth timeout")


async def test_connection_closes_when_token_expires(gate: Harness) -> None:
    alice = await gate.connect("alice", token=token_for("alice", ttl=1))
    await alice.expect_closed(4001, "token expired")


async def test_turn_credentials_in_session(harness: Harness) -> None:
    await harness.start(
        make_settings(
            ice={
                "turn_urls": ["turn:turn.example.org:3478?transport=udp"],
                "turn_secret": "turn-shared-secret",
                "turn_ttl": 600,
            }
        )
    )
    alice = await harness.connect("alice")
    turn = alice.session["iceServers"][1]
    expiry, user = turn["username"].split(":")
    assert user == "alice" and 0 < int(expiry) - time.time() <= 601
    assert turn["credential"] and "turn-shared-secret" not in json.dumps(alice.session)


async def test_socketio_long_polling_gets_a_clear_400(gate: Harness) -> None:
    assert gate.server is not None
    async with await trio.open_tcp_stream("127.0.0.1", gate.server.port) as stream:
        await stream.send_all(
            b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        with trio.fail_after(STEP):
            reply = b""
            while chunk := await stream.receive_some(4096):
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"application/json" in head
    assert "transports: ['websocket']" in json.loads(body)["message"]


@pytest.mark.both_engines
async def test_an_endless_fragmented_binary_message_is_cut_off(harness: Harness) -> None:
    """Fragments of one binary message past max_message_bytes close 1009 (before the 1003)."""
    await harness.start(make_settings(server={"max_message_bytes": 4096}))
    alice = await harness.connect("alice")
    stream = alice.stream

    # A binary frame with FIN unset (a first fragment), masked as clients must, 3,000 bytes,
    # then continuation fragments: together well past the limit.
    def frame(opcode: int, payload: bytes, fin: bool) -> bytes:
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head = bytes([(0x80 if fin else 0) | opcode, 0x80 | 126]) + len(payload).to_bytes(2, "big")
        return head + mask + masked

    await stream.send_all(frame(0x2, b"x" * 3000, fin=False))
    await stream.send_all(frame(0x0, b"x" * 3000, fin=False))
    await alice.expect_closed(1009)


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One client frame (RFC 6455 5.2), masked as clients must, of at most 125 bytes."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask + masked


# Frames that carry no whole message: a WebSocket ping, and each fragment of a message but its
# last. None of them was counted once: a client could send them as fast as its link allowed
# (a million empty continuation frames took a second client's round trip from 0.5 ms to
# 200-900 ms), signed in or not, and never meet a limit.
FRAME_FLOODS = {
    "pings": masked_frame(0x9, b"ping") * 500,
    "empty continuation frames": masked_frame(0x1, b"{", fin=False)
    + masked_frame(0x0, b"", fin=False) * 500,
    "one-byte fragments": masked_frame(0x1, b"[", fin=False)
    + masked_frame(0x0, b"1", fin=False) * 500,
    # Pongs that answer no ping of the server's. Behind a ping (or any frame the fast path
    # leaves to wsproto) every later frame is parsed by wsproto, pongs as pings are.
    "unsolicited pongs": masked_frame(0x9, b"ping") + masked_frame(0xA, b"pong") * 500,
}
FLOOD_LIMITS = {"messages": "20/second", "flood": "5/10 seconds"}


@pytest.mark.parametrize("flood", sorted(FRAME_FLOODS))
async def test_a_flood_of_frames_without_a_message_closes_4029(
    harness: Harness, flood: str
) -> None:
    """Every ping and every fragment counts against `[limits] messages`, as a message does;
    past it the frames count towards `flood`, and a client that keeps on is closed 4029."""
    await harness.start(make_settings(limits=FLOOD_LIMITS))
    alice, bob = await harness.connected_call()
    await alice.stream.send_all(FRAME_FLOODS[flood])
    await alice.expect_closed(4029, "rate limit exceeded")
    await bob.expect("call-end", callId="ab", reason="peer_disconnected")


@pytest.mark.parametrize("flood", sorted(FRAME_FLOODS))
async def test_a_flood_of_frames_before_sign_in_closes_4029(harness: Harness, flood: str) -> None:
    """Before sign-in too: nothing the server answers (a pong) or keeps (a fragment) is free."""
    await harness.start(make_settings(limits=FLOOD_LIMITS))
    anonymous = await harness.open()
    await anonymous.stream.send_all(FRAME_FLOODS[flood])
    await anonymous.expect_closed(4029, "rate limit exceeded")


async def test_a_message_in_a_few_fragments_and_a_few_pings_are_within_the_limits(
    harness: Harness,
) -> None:
    """What a client does within the limit still works: a message in fragments is one message
    (its fragments count, and it is acknowledged), and pings are answered."""
    await harness.start(make_settings(limits=FLOOD_LIMITS))
    alice = await harness.connect("alice")
    text = json.dumps({"event": "user-connected", "data": "alice", "ref": "in-pieces"}).encode()
    pieces = [text[:10], text[10:20], text[20:]]
    await alice.stream.send_all(
        masked_frame(0x1, pieces[0], fin=False)
        + masked_frame(0x9, b"between fragments")
        + masked_frame(0x0, pieces[1], fin=False)
        + masked_frame(0x0, pieces[2])
    )
    assert await alice.recv() == {"event": "ack", "ref": "in-pieces"}
    for _ in range(3):
        with trio.fail_after(STEP):
            await alice.ws.ping()
    await alice.expect_silence()


@pytest.mark.both_engines
async def test_half_open_handshakes_per_address_are_capped(harness: Harness) -> None:
    """A slowloris: sockets that never finish their request head. Past the per-address cap,
    new ones are closed at once; the server keeps serving others."""
    running = await harness.start(
        make_settings(server={"max_connections_per_address": 3, "auth_timeout": 30})
    )
    silent = [await trio.open_tcp_stream("127.0.0.1", running.port) for _ in range(3)]
    extra = await trio.open_tcp_stream("127.0.0.1", running.port)
    with trio.fail_after(STEP):
        assert await extra.receive_some(1024) == b""  # closed without a word
    # Another address is served meanwhile.
    other = await trio.open_tcp_stream("127.0.0.1", running.port, local_address="127.0.0.2")
    await other.send_all(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(STEP):
        assert (await other.receive_some(1024)).startswith(b"HTTP/1.1 404")
    for stream in [*silent, extra, other]:
        await stream.aclose()


@pytest.mark.both_engines
async def test_a_request_head_that_does_not_arrive_in_time_is_closed(harness: Harness) -> None:
    """A socket whose head is late (half a head, then nothing) is closed after `auth_timeout`
    (and at most a quarter more), and no longer counts against its address."""
    running = await harness.start(
        make_settings(server={"max_connections_per_address": 1, "auth_timeout": 0.4})
    )
    late = await trio.open_tcp_stream("127.0.0.1", running.port)
    await late.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    with trio.fail_after(STEP):
        assert await late.receive_some(1024) == b""  # closed without a word
    # Its slot is free again: the one connection this address may have in handshake is served.
    again = await trio.open_tcp_stream("127.0.0.1", running.port)
    await again.send_all(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(STEP):
        assert (await again.receive_some(1024)).startswith(b"HTTP/1.1 404")
    for stream in (late, again):
        await stream.aclose()


async def test_an_error_echoes_no_more_than_a_short_excerpt(gate: Harness) -> None:
    """A token sent as an event name (a client that put it in the wrong field) does not come
    back in the error: at most 32 printable ASCII characters of it."""
    alice = await gate.connect("alice")
    token = token_for("alice")
    await alice.send(token, {}, ref=1)
    error = await alice.expect_error("unknown_event", ref=1)
    message = error["data"]["message"]
    assert token[32:64] not in message and len(message) < 60, message
    await alice.send("\x1b[2J\u202edance", {})
    message = (await alice.expect_error("unknown_event"))["data"]["message"]
    assert message.isascii() and message.isprintable() and "dance" in message, message


@pytest.mark.both_engines
async def test_a_repeated_authorization_header_is_refused_after_upgrade(gate: Harness) -> None:
    """Two `Authorization` headers: we would read the first, a proxy may read the last. Neither
    counts; the upgrade completes and closes 4001, and the audit trail says why."""
    client = await gate.open(
        headers=[
            (b"authorization", f"Bearer {token_for('alice')}".encode()),
            (b"authorization", f"Bearer {token_for('mallory')}".encode()),
        ]
    )
    await client.expect_closed(4001, "invalid token")
    [failed] = gate.audit.records("auth.failed")
    assert failed["reason"] == "repeated_authorization"
    await gate.connect("alice")  # one header still signs in


class _RawClient:
    """A WebSocket client on a socket with a small receive buffer, driven by wsproto: it can
    stop reading, and later read what the server sent byte for byte, close frame included."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._events: list[WsEvent] = []

    @classmethod
    async def open(cls, port: int, token: str) -> _RawClient:
        sock = trio.socket.socket()
        # Set before connecting: a fixed, small window, so the server's queue fills early.
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 16384)
        await sock.connect(("127.0.0.1", port))
        client = cls(trio.SocketStream(sock))
        bearer = (b"authorization", f"Bearer {token}".encode())
        request = Request(host="127.0.0.1", target="/ws", extra_headers=[bearer])
        await client.stream.send_all(client.ws.send(request))
        assert isinstance(await client.next_event(), AcceptConnection)
        return client

    async def next_event(self) -> WsEvent:
        with trio.fail_after(STEP):
            while not self._events:
                data = await self.stream.receive_some(65536)
                self.ws.receive_data(bytes(data) if data else None)
                self._events.extend(self.ws.events())
        return self._events.pop(0)

    async def recv(self) -> dict[str, Any]:
        event = await self.next_event()
        assert isinstance(event, TextMessage) and event.message_finished, event
        parsed = json.loads(event.data)
        assert isinstance(parsed, dict)
        return parsed

    async def send(self, event: str, data: dict[str, Any]) -> None:
        text = json.dumps({"event": event, "data": data})
        await self.stream.send_all(self.ws.send(Message(data=text)))


async def _a_reader_that_stops_is_closed_1008(harness: Harness, outbound_queue: int) -> None:
    """alice and bob in a call; bob stops reading while alice sends 400 frames of 60 KB
    (24 MB: several times what the server's socket buffer, at most 4 MiB here, and bob's
    32 KiB window hold), acked once the server has handled them all. When bob reads again he
    finds the frames that were on their way, whole, then a close frame with 1008 (not 1000,
    and not a frame cut off in the middle), and alice's call ends."""
    running = await harness.start(
        make_settings(
            server={"outbound_queue": outbound_queue, "close_timeout": STEP, "ping_interval": 0}
        )
    )
    alice = await harness.connect("alice")
    bob = await _RawClient.open(running.port, token_for("bob"))
    assert (await bob.recv())["event"] == "session"
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    assert (await bob.recv())["event"] == "call-request"
    await bob.send("call-answer", {"callId": "ab", "to": "alice", "answer": SDP_ANSWER_OBJECT})
    await alice.expect("call-answer")
    bulk = {"candidate": None, "callId": "ab", "to": "bob", "padding": "x" * 60_000}
    for n in range(400):
        await alice.send("ice-candidate", bulk, ref=n if n == 399 else None)
    assert await alice.recv() == {"event": "ack", "ref": 399}
    delivered = 0
    while True:
        event = await bob.next_event()
        if isinstance(event, WsCloseConnection):
            break
        assert isinstance(event, TextMessage), event
        delivered += event.message_finished
    assert (event.code, event.reason) == (1008, "client too slow: outbound queue full")
    assert 0 < delivered < 400
    await bob.stream.send_all(bob.ws.send(event.response()))
    await bob.stream.aclose()
    await alice.expect("call-end", callId="ab", reason="peer_disconnected")


@pytest.mark.both_engines
async def test_a_client_that_stops_reading_is_told_1008(harness: Harness) -> None:
    """The close code the docs promise reaches the wire, once the 8-frame queue overflowed;
    the audit trail says 1008 too."""
    await _a_reader_that_stops_is_closed_1008(harness, outbound_queue=8)
    closes = [r for r in harness.audit.records("conn.close") if r.get("user") == "bob"]
    assert [r["close_code"] for r in closes] == [1008]


@pytest.mark.both_engines
async def test_an_internal_error_closes_1011(
    gate: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contract 9: `1011` internal error. A connection whose handling fails is closed with it
    (and its peer's call ends as for any drop), not dropped without a close frame (1006)."""
    assert gate.server is not None
    hub = gate.server.hub
    monkeypatch.setattr(hub, "_dispatch", FailsOn(hub._dispatch, "boom"))
    alice, bob = await gate.connected_call()
    with structlog.testing.capture_logs() as logs:
        await alice.send("user-connected", "alice", ref="boom")
        await alice.expect_closed(1011, "internal error")
        await bob.expect("call-end", callId="ab", reason="peer_disconnected")
    assert [entry["event"] for entry in logs] == ["connection failed"]


async def test_a_client_that_stops_reading_is_closed_by_the_size_of_its_queue(
    harness: Harness,
) -> None:
    """`outbound_queue` counts frames: 400 frames of 60 KB fit in a queue of 1,024, and the
    server held them all (24 MB) for a client that never read. The queue is also bounded in size
    (`outbound_queue_bytes`, 1 MiB by default): past it the client is closed 1008 as for a full
    queue, and the server holds about that much for it, not 400 frames."""
    await _a_reader_that_stops_is_closed_1008(harness, outbound_queue=1024)
