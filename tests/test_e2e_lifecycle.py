"""Token lifecycle and resilience on real sockets: refresh, expiry, resume, keys, revocation."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import Ping, TextMessage

from callgate.revocation import add_revocation
from conftest import (
    CANDIDATE,
    STEP,
    Client,
    Harness,
    call_request,
    make_settings,
    token_for,
)


async def talk(sender: Client, receiver: Client, to: str) -> None:
    await sender.send("ice-candidate", {"candidate": None, "callId": "ab", "to": to})
    await receiver.expect("ice-candidate", callId="ab")


# -- refresh and expiry ----------------------------------------------------------------------


async def test_refresh_before_expiry_keeps_the_connection_and_call(harness: Harness) -> None:
    await harness.start(make_settings(auth={"refresh_before": 1.5}))
    alice, bob = await harness.connected_call()
    # Renew to a token that expires in 2 s: the warning comes 1.5 s before that.
    await alice.send("auth", {"token": token_for("alice", ttl=2)})
    short = await alice.expect("session", user="alice")
    warning = await alice.expect("token-expiring")
    assert warning["data"]["expiresAt"] == short["data"]["expiresAt"]
    await alice.send("auth", {"token": token_for("alice", ttl=600)}, ref="renew")
    renewed = await alice.expect("session", user="alice")
    assert renewed["data"]["expiresAt"] > short["data"]["expiresAt"]
    assert renewed["data"]["sessionId"] != short["data"]["sessionId"]
    assert renewed["data"]["iceServers"]
    await alice.expect("ack")
    # The short token's `exp` passes (the server's clock for it is trio's, as this wait's is)
    # without a close or a warning.
    await alice.expect_silence(max(0.0, short["data"]["expiresAt"] - time.time()) + 0.1)
    await talk(alice, bob, "bob")
    # Two refreshes within a minute: the first written in full, the second summed with it
    # (docs/audit-log.md, *Repeated refusals*), written when alice's connection ends.
    await alice.ws.aclose()
    await bob.expect("call-end", callId="ab")
    await bob.ws.aclose()
    await harness.settle()
    refreshed = harness.audit.records("token.refreshed")
    assert sum(int(record.get("count", 1)) for record in refreshed) == 2


async def test_no_refresh_warns_then_closes_at_exp(harness: Harness) -> None:
    await harness.start(make_settings(auth={"refresh_before": 0.5}))
    alice = await harness.connect("alice", token=token_for("alice", ttl=1))
    await alice.expect("token-expiring")
    await alice.expect_closed(4001, "token expired")


async def test_refresh_with_another_users_token_closes_4003(gate: Harness) -> None:
    alice = await gate.connect("alice")
    await alice.send("auth", {"token": token_for("mallory")})
    await alice.expect_closed(4003, "identity change")


async def test_refresh_with_a_bad_token_is_refused_but_keeps_the_connection(gate: Harness) -> None:
    alice = await gate.connect("alice")
    await alice.send("auth", {"token": "garbage"}, ref=1)
    await alice.expect_error("forbidden", ref=1)
    await alice.send("user-connected", "alice", ref=2)
    await alice.expect("ack")


@pytest.mark.parametrize(
    "data", [None, "token", {}, {"token": ""}, {"token": 42}, {"token": "x" * 20_000}]
)
async def test_a_refresh_without_a_usable_token_is_an_invalid_token(
    gate: Harness, data: object
) -> None:
    """Contract 2: "an `auth` whose token is missing, empty or not a string is an invalid
    token", on a renewal too: refused as any bad token is (`forbidden`, `invalid token`), not as
    a malformed message, and the connection carries on."""
    alice = await gate.connect("alice")
    await alice.send("auth", data, ref=1)
    error = await alice.expect_error("forbidden", ref=1)
    assert error["data"]["message"] == "invalid token"
    await alice.expect_silence()
    assert gate.audit.records("auth.failed")[-1]["reason"] == "malformed"


# -- reconnect and resume ----------------------------------------------------------------------


async def resume(h: Harness, user: str, session_id: str, token: str | None = None) -> Client:
    client = await h.open()
    await client.send("auth", {"token": token or token_for(user), "resume": session_id})
    session = await client.expect("session")
    client.session = session["data"]
    return client


@pytest.mark.both_engines
async def test_drop_and_resume_within_grace_keeps_the_call(harness: Harness) -> None:
    await harness.start(make_settings(calls={"reconnect_grace": 30}))
    alice, bob = await harness.connected_call()
    await alice.ws.aclose()
    # bob keeps sending while alice is away: it waits for her.
    await bob.send("ice-candidate", {"candidate": None, "callId": "ab", "to": "alice"})
    alice2 = await resume(harness, "alice", alice.session["sessionId"])
    assert alice2.session["resumed"] is True
    await alice2.expect("ice-candidate", callId="ab", **{"from": "bob"})
    # The ICE restart is the only thing bob sees.
    restart = {"callId": "ab", "to": "bob", "description": {"type": "offer", "sdp": "v=0 restart"}}
    await alice2.send("call-renegotiate", restart)
    await bob.expect("call-renegotiate", **{"from": "alice"})
    await talk(bob, alice2, "alice")
    # The call went on, and nothing ended it (no terminal record, and no other call event).
    calls = [event for event in harness.audit.events() if event.startswith("call.")]
    assert calls == ["call.requested", "call.ringing", "call.answered", "call.renegotiated"]
    resumed = harness.audit.records("session.resumed")[0]
    assert resumed["previous_conn"] == alice.conn
    assert resumed["calls"] == 1
    assert resumed["delivered"] == 1


async def test_resume_after_the_grace_fails(harness: Harness) -> None:
    await harness.start(make_settings(calls={"reconnect_grace": 0.2}))
    alice, bob = await harness.connected_call()
    await alice.ws.aclose()
    await bob.expect("call-end", reason="peer_disconnected")
    late = await resume(harness, "alice", alice.session["sessionId"])
    assert late.session["resumed"] is False
    assert harness.audit.records("session.expired")[0]["dropped_messages"] == 0


async def test_resume_with_another_users_token_fails(harness: Harness) -> None:
    await harness.start(make_settings(calls={"reconnect_grace": 30}))
    alice, bob = await harness.connected_call()
    await alice.ws.aclose()
    thief = await resume(harness, "mallory", alice.session["sessionId"])
    assert thief.session["resumed"] is False
    await bob.expect_silence()
    # The real alice can still resume.
    alice2 = await resume(harness, "alice", alice.session["sessionId"])
    assert alice2.session["resumed"] is True


async def test_a_session_id_resumes_once(harness: Harness) -> None:
    await harness.start(make_settings(calls={"reconnect_grace": 30}))
    alice, _bob = await harness.connected_call()
    await alice.ws.aclose()
    alice2 = await resume(harness, "alice", alice.session["sessionId"])
    assert alice2.session["resumed"] is True
    await alice2.ws.aclose()
    replay = await resume(harness, "alice", alice.session["sessionId"])
    assert replay.session["resumed"] is False
    # The new session id from the resume is the one that works now.
    alice3 = await resume(harness, "alice", alice2.session["sessionId"])
    assert alice3.session["resumed"] is True


async def test_resume_by_header(harness: Harness) -> None:
    await harness.start(make_settings(calls={"reconnect_grace": 30}))
    alice, _bob = await harness.connected_call()
    await alice.ws.aclose()
    client = await harness.open(
        headers=[
            (b"authorization", f"Bearer {token_for('alice')}".encode()),
            (b"callgate-resume", alice.session["sessionId"].encode()),
        ]
    )
    await client.expect("session", resumed=True)


# -- keys ----------------------------------------------------------------------


def jwks_for(keys: dict[str, ec.EllipticCurvePrivateKey]) -> str:
    entries = []
    for kid, key in keys.items():
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        entries.append(jwk | {"kid": kid, "alg": "ES256", "use": "sig"})
    return json.dumps({"keys": entries})


def es256_token(user: str, kid: str, key: ec.EllipticCurvePrivateKey) -> str:
    claims = {"sub": user, "exp": int(time.time()) + 600}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


async def test_key_rotation_without_dropping_connections(harness: Harness, tmp_path: Path) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks = tmp_path / "jwks.json"
    jwks.write_text(jwks_for({"old": old}))
    await harness.start(
        make_settings(auth={"algorithms": ["HS256", "ES256"], "jwks_file": str(jwks)})
    )
    alice = await harness.connect("alice", token=es256_token("alice", "old", old))
    unknown = await harness.open()
    await unknown.send("auth", {"token": es256_token("bob", "new", new)})
    await unknown.expect_closed(4001, "invalid token")
    assert harness.audit.records("auth.failed")[-1]["reason"] == "unknown_kid"

    jwks.write_text(jwks_for({"new": new}))  # the file watcher picks it up
    assert harness.server is not None
    with trio.fail_after(STEP):
        while harness.server.hub.verifier.ring.for_kid("new") is None:
            await trio.sleep(0.05)
    await harness.connect("bob", token=es256_token("bob", "new", new))
    await alice.send("user-connected", "alice", ref=1)  # the old-key connection is still up
    await alice.expect("ack")
    stale = await harness.open()
    await stale.send("auth", {"token": es256_token("carol", "old", old)})
    await stale.expect_closed(4001, "invalid token")


# -- revocation ----------------------------------------------------------------------


async def test_revocation_cuts_a_live_connection_and_ends_its_call(
    harness: Harness, tmp_path: Path
) -> None:
    revocations = tmp_path / "revoked.json"
    await harness.start(make_settings(auth={"revocation_file": str(revocations)}))
    alice = await harness.connect("alice", token=token_for("alice", jti="stolen-token"))
    alice, bob = await harness.connected_call(alice)
    add_revocation(revocations, token_id="stolen-token")
    with trio.fail_after(2):  # "within a second", with room for a slow machine
        await bob.expect("call-end", callId="ab", reason="revoked", **{"from": "alice"})
    await alice.expect_closed(4003, "token revoked")
    ended = harness.audit.records("call.ended")[0]
    assert ended["reason"] == "revoked"
    again = await harness.open()
    await again.send("auth", {"token": token_for("alice", jti="stolen-token")})
    await again.expect_closed(4003, "token revoked")
    # A fresh token for the same user is fine: only that token was revoked.
    await harness.connect("alice", token=token_for("alice", jti="fresh"))


async def test_revoking_a_user_by_time(harness: Harness, tmp_path: Path) -> None:
    revocations = tmp_path / "revoked.json"
    await harness.start(make_settings(auth={"revocation_file": str(revocations)}))
    alice = await harness.connect("alice", token=token_for("alice"))
    add_revocation(revocations, user="alice", before=time.time() + 1)
    await alice.expect_closed(4003, "token revoked")


# -- hostile and slow clients ----------------------------------------------------------------------


@pytest.mark.both_engines
async def test_a_client_that_stops_reading_is_closed_and_others_carry_on(harness: Harness) -> None:
    await harness.start(make_settings(server={"outbound_queue": 8}))
    alice, _bob = await harness.connected_call()  # bob stops reading: nothing calls get_message
    carol = await harness.connect("carol")
    dave = await harness.connect("dave")
    await carol.send("call-request", call_request("cd", "carol", "dave"))
    await dave.expect("call-request")
    bulk = {"candidate": None, "callId": "ab", "to": "bob", "padding": "x" * 60_000}
    done = trio.Event()

    async def flood() -> None:
        for _ in range(2000):  # bounded: at most ~120 MB over loopback
            if done.is_set():
                return
            await alice.send("ice-candidate", bulk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        await alice.expect("call-end", callId="ab", reason="peer_disconnected")
        done.set()
    answer = {"callId": "cd", "to": "carol", "answer": {"type": "answer", "sdp": "v=0"}}
    await dave.send("call-answer", answer)
    await carol.expect("call-answer")
    closes = [r for r in harness.audit.records("conn.close") if r.get("user") == "bob"]
    assert closes[0]["close_code"] == 1008


async def raw_upgrade(port: int, headers: dict[str, str]) -> tuple[trio.SocketStream, bytes]:
    lines = [
        "GET /ws HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    with trio.fail_after(STEP):
        reply = await stream.receive_some(4096)
    return stream, reply


@pytest.mark.both_engines
async def test_keepalive_drops_a_silent_peer(harness: Harness) -> None:
    await harness.start(make_settings(server={"ping_interval": 0.2}))
    assert harness.server is not None
    stream, reply = await raw_upgrade(
        harness.server.port, {"Authorization": f"Bearer {token_for('ghost')}"}
    )
    async with stream:
        assert reply.startswith(b"HTTP/1.1 101")
        with trio.fail_after(STEP):  # we never answer the pings
            while not harness.audit.records("conn.close"):
                await trio.sleep(0.05)
    close = harness.audit.records("conn.close")[0]
    assert close["reason"] == "keepalive timeout"


@pytest.mark.both_engines
async def test_origin_allow_list(harness: Harness) -> None:
    """A page of another origin is closed `4003` (contract section 9) right after the upgrade,
    which a browser's page can read, unlike the status of a failed upgrade (contract section
    2's reason for completing the upgrade of a refused token). Nothing it sends is read: a
    valid token in the header signs nobody in."""
    await harness.start(make_settings(server={"allowed_origins": ["https://app.example"]}))
    bearer = (b"authorization", f"Bearer {token_for('alice')}".encode())
    evil = await harness.open(headers=[(b"origin", b"https://evil.example"), bearer])
    assert await evil.expect_closed(4003, "origin not allowed") == []
    anonymous = await harness.open(headers=[(b"origin", b"https://evil.example")])
    assert await anonymous.expect_closed(4003, "origin not allowed") == []
    assert not harness.audit.records("auth.ok")
    refused = harness.audit.records("conn.refused")
    assert [record["code"] for record in refused] == [4003, 4003]
    allowed = await harness.open(headers=[(b"origin", b"https://app.example"), bearer])
    await allowed.expect("session", user="alice")
    no_origin = await harness.connect("bob")  # an app, not a browser: no Origin at all
    assert no_origin.session["user"] == "bob"


@pytest.mark.both_engines
async def test_connection_caps(harness: Harness) -> None:
    await harness.start(
        make_settings(server={"max_connections_per_user": 2, "max_connections_per_address": 3})
    )
    await harness.connect("alice")
    await harness.connect("alice")
    third = await harness.open(
        headers=[(b"authorization", f"Bearer {token_for('alice')}".encode())]
    )
    await third.expect_closed(4029, "too many connections")
    await harness.connect("bob")
    fourth = await harness.open()
    await fourth.expect_error("rate_limited")
    await fourth.expect_closed(4029)


@pytest.mark.both_engines
async def test_keepalive_keeps_a_peer_that_answers(harness: Harness) -> None:
    """Three pings come and are answered, and the connection stays, silent but for them."""
    await harness.start(make_settings(server={"ping_interval": 0.1}))
    assert harness.server is not None
    stream, reply = await raw_upgrade(
        harness.server.port, {"Authorization": f"Bearer {token_for('alice')}"}
    )
    async with stream:
        head, _, rest = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        ws = WSConnection(ConnectionType.CLIENT)
        ws.receive_data(rest)
        texts: list[str] = []
        pings = 0
        payloads: set[bytes] = set()

        async def until(done: Callable[[], bool]) -> None:
            """Read, answering each ping, until `done()`; a close or end fails the test."""
            nonlocal pings
            with trio.fail_after(STEP):
                while True:
                    for event in ws.events():
                        if isinstance(event, Ping):
                            pings += 1
                            payloads.add(bytes(event.payload))
                            await stream.send_all(ws.send(event.response()))
                        elif isinstance(event, TextMessage):
                            texts.append(event.data)
                        else:
                            raise AssertionError(f"unexpected {event!r} after {pings} pings")
                    if done():
                        return
                    data = await stream.receive_some(4096)
                    assert data, f"the server hung up after {pings} pings"
                    ws.receive_data(data)

        await until(lambda: pings >= 3)
        # A probe the server must ack: nothing but the session came before it.
        probe = {"event": "user-connected", "data": "alice", "ref": "probe"}
        await stream.send_all(ws.send(TextMessage(data=json.dumps(probe))))
        await until(lambda: len(texts) >= 2)
        assert [json.loads(text)["event"] for text in texts] == ["session", "ack"]
        assert not harness.audit.records("conn.close")
        if harness.engine == "wsproto":
            # The heartbeat's cheap path (engine.try_ping_now): an empty ping written at once,
            # not a task per ping with a random payload to match its pong.
            assert payloads == {b""}


def _task_names() -> list[str]:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    names, nurseries = [], list(root.child_nurseries)
    while nurseries:
        for task in nurseries.pop().child_tasks:
            names.append(task.name)
            nurseries.extend(task.child_nurseries)
    return names


async def test_an_idle_connection_costs_one_task(gate: Harness) -> None:
    """Memory per idle connection (docs/performance.md): the writer starts with the first frame
    that has to wait, and keepalive and expiry are entries of one shared heap, not tasks."""
    before = Counter(_task_names())
    for n in range(10):
        await gate.connect(f"idle{n}")
    grown = Counter(_task_names()) - before
    handler = "trio._highlevel_serve_listeners._run_handler"  # the connection's own task
    server_tasks = {name: n for name, n in grown.items() if "callgate" in name or name == handler}
    if gate.engine == "wsproto":  # its frames went straight to the socket: no writer
        assert server_tasks == {handler: 10}, grown
    else:  # trio-websocket: a writer each (and the library's reader tasks)
        assert server_tasks == {
            handler: 10,
            "callgate.transport.connection.Connection._run_writer": 10,
        }


async def _parked(gate: Harness, wsproto: int) -> None:
    """Wait (bounded) until the reactor holds `wsproto` connections (none on trio-websocket)."""
    expected = wsproto if gate.engine == "wsproto" else 0
    assert gate.server is not None
    with trio.fail_after(STEP):
        while gate.server.hub.parked_connections != expected:
            await trio.sleep(0.01)


async def test_idle_connections_wait_in_the_reactor_and_stay_there(gate: Harness) -> None:
    """Sparse forwarding (docs/performance.md): on wsproto a signed-in connection waits in the
    reactor, and what arrives meanwhile is handled there: a call set up, a candidate forwarded,
    a bad frame answered, all without the connection leaving it. A token refresh, which waits
    for verification, goes to the connection's own task, which then parks again."""
    alice, bob = await gate.connected_call(call_id="c")
    await _parked(gate, 2)
    await alice.send("ice-candidate", {"candidate": CANDIDATE, "callId": "c", "to": "bob"})
    await bob.expect("ice-candidate", **{"from": "alice"})
    await alice.ws.send_message("{ not json")
    await alice.expect_error("invalid_message")
    await _parked(gate, 2)
    await alice.send("auth", {"token": token_for("alice", ttl=7200)}, ref=7)
    await alice.expect("session", user="alice")
    await alice.expect("ack")
    await _parked(gate, 2)
    await alice.send("call-end", {"callId": "c", "to": "bob"})
    await bob.expect("call-end")
    await alice.ws.aclose()
    await _parked(gate, 1)
    await bob.ws.aclose()
    await gate.settle()
    await _parked(gate, 0)
