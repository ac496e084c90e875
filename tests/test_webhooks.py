"""Signed webhooks, sent by the real server to a real HTTP receiver on 127.0.0.1.

The receiver is a small h11 server in this file; what it answers (204, 500, nothing at all) is
up to each test. Tests run on a mock clock (as tests/test_chaos.py does), so timeouts and
back-off waits take trio time, not real time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from standardwebhooks.webhooks import Webhook

from callgate.config import load_settings
from callgate.errors import ConfigError
from callgate.webhooks import new_hook, webhooks_of
from conftest import (
    CANDIDATE,
    SDP_ANSWER,
    SECRET,
    STEP,
    Harness,
    call_request,
    make_settings,
    token_for,
)
from test_e2e_operations import self_signed

WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
CALL_STEPS = ["call.requested", "call.ringing", "call.answered", "call.ended"]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Jumps to the next deadline once every task has waited 5 ms of real time (test_chaos)."""
    return trio.testing.MockClock(autojump_threshold=0.005)


def verify(secret: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The receiver's check, as docs/protocol.md shows it, without any library.

    Raises: ValueError when the signature does not match or the timestamp is over 5 minutes off.
    """
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = headers["webhook-signature"].split(" ")
    if not any(hmac.compare_digest(expected, signature) for signature in offered):
        raise ValueError("bad signature")
    if abs(time.time() - int(headers["webhook-timestamp"])) > 300:
        raise ValueError("timestamp too far from now")
    parsed = json.loads(body)
    assert isinstance(parsed, dict)
    return parsed


def test_the_signature_scheme_matches_the_published_example() -> None:
    """The Standard Webhooks specification's example (spec/standard-webhooks.md, "Signature
    scheme"): the library callgate signs with, and the documented check, both agree with it."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    from datetime import UTC, datetime

    signed_at = datetime.fromtimestamp(1614265330, UTC)
    assert Webhook(secret).sign("msg_p5jXN8AQM9LWM0D4loKWxJek", signed_at, body) == expected
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, b"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330." + body, hashlib.sha256)
    assert "v1," + base64.b64encode(mac.digest()).decode() == expected


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def json(self) -> dict[str, Any]:
        parsed = json.loads(self.body)
        assert isinstance(parsed, dict)
        return parsed

    @property
    def type(self) -> str:
        return str(self.json["type"])


Answer = Callable[[Received, int], Awaitable[int]]


async def accept(request: Received, attempt: int) -> int:
    return 204


class Receiver:
    """A webhook endpoint: records every request, applies each id's side effect once."""

    def __init__(self, answer: Answer = accept) -> None:
        self.answer = answer
        self.requests: list[Received] = []
        self.applied: list[Received] = []  # side effects, deduplicated by webhook-id
        self.accepted: list[Received] = []  # answered 2xx, in the order they were answered
        self._changed = trio.Event()
        self.url = ""
        self.connections = 0  # connections that ended (TLS handshakes that failed too)

    async def serve(
        self,
        tls: ssl.SSLContext | None = None,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.url = f"{'https://localhost' if tls else 'http://127.0.0.1'}:{port}/hooks"
        task_status.started(self.url)
        if tls is None:
            await trio.serve_listeners(self._connection, listeners)
        else:
            secure = [trio.SSLListener(listener, tls) for listener in listeners]
            await trio.serve_listeners(self._connection, secure)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        connection = h11.Connection(h11.SERVER)
        headers: dict[str, str] = {}
        body = b""
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    connection.receive_data(bytes(data))
                elif isinstance(event, h11.Request):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    body = b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    status = await self._received(Received(headers, body))
                    response = h11.Response(status_code=status, headers=[("content-length", "0")])
                    await stream.send_all(connection.send(response) or b"")
                    await stream.send_all(connection.send(h11.EndOfMessage()) or b"")
                    connection.start_next_cycle()
                else:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            self.connections += 1

    async def _received(self, request: Received) -> int:
        attempt = sum(1 for seen in self.requests if seen.id == request.id)
        self.requests.append(request)
        if all(seen.id != request.id for seen in self.applied):
            self.applied.append(request)
        self._notify()
        status = await self.answer(request, attempt)
        if 200 <= status < 300:
            self.accepted.append(request)
            self._notify()
        return status

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, done: Callable[[], bool]) -> None:
        with trio.fail_after(STEP * 10):
            while not done():
                await self._changed.wait()

    def delivered(self, kind: str) -> list[dict[str, Any]]:
        return [r.json["data"] for r in self.accepted if r.type == kind]


async def start(
    harness: Harness,
    receiver: Receiver,
    calls: dict[str, Any] | None = None,
    tls: ssl.SSLContext | None = None,
    **webhooks: Any,
) -> None:
    await harness.nursery.start(receiver.serve, tls)
    settings = make_settings(
        webhooks={"url": receiver.url, "secret": WEBHOOK_SECRET, **webhooks},
        calls={"ring_timeout": 600, **(calls or {})},
    )
    await harness.start(settings)


async def full_call(harness: Harness, call_id: str, caller: str, callee: str) -> None:
    """A whole call: request, ring, answer, ICE both ways, hang up."""
    alice = await harness.connect(caller)
    bob = await harness.connect(callee)
    await alice.send("call-request", call_request(call_id, caller, callee))
    await bob.expect("call-request")
    await alice.send("ice-candidate", {"candidate": CANDIDATE, "callId": call_id, "to": callee})
    await bob.expect("ice-candidate")
    answer = {"callId": call_id, "to": caller, "answer": {"type": "answer", "sdp": SDP_ANSWER}}
    await bob.send("call-answer", answer)
    await alice.expect("call-answer")
    await bob.send("ice-candidate", {"candidate": CANDIDATE, "callId": call_id, "to": caller})
    await alice.expect("ice-candidate")
    await alice.send("call-end", {"callId": call_id, "to": callee})
    await bob.expect("call-end")


async def sent(harness: Harness) -> None:
    """Every webhook queued so far has been delivered or given up (the sender says so)."""
    assert harness.server is not None and harness.server.webhooks is not None
    with trio.fail_after(STEP * 10):
        await harness.server.webhooks.drain()


def sample(harness: Harness, name: str, **labels: str) -> float:
    assert harness.server is not None
    value = harness.server.hub.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_a_call_is_told_in_order_signed_and_without_media_or_tokens(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    receiver = Receiver()
    await start(harness, receiver)
    await full_call(harness, "w1", "alice", "bob")
    await receiver.until(lambda: len(receiver.accepted) == 4)
    assert [r.type for r in receiver.accepted] == CALL_STEPS
    for request in receiver.requests:
        # Both the documented check and the Standard Webhooks library accept every request.
        payload = verify(WEBHOOK_SECRET, request.headers, request.body)
        assert Webhook(WEBHOOK_SECRET).verify(request.body, request.headers) == payload
        assert request.headers["webhook-id"].startswith("msg_")
        assert request.headers["content-type"] == "application/json"
        with pytest.raises(ValueError, match="bad signature"):
            verify(WEBHOOK_SECRET, request.headers, request.body + b" ")
        for secret in ("secret-answer-marker", "marker-ice", "198.51.100.7", "v=0", SECRET):
            assert secret.encode() not in request.body
    ended = receiver.delivered("call.ended")[0]
    assert ended["callId"] == "w1" and ended["caller"] == "alice" and ended["callee"] == "bob"
    assert ended["reason"] == "hangup" and ended["answered"] is True and ended["by"] == "alice"
    assert isinstance(ended["durationMs"], int)
    assert receiver.delivered("call.ringing")[0]["devices"] == 1
    assert len({r.id for r in receiver.requests}) == 4  # a fresh id per webhook
    await sent(harness)
    assert sample(harness, "callgate_webhooks_delivered_total") == 4


async def test_a_failed_attempt_is_retried_with_the_same_id_and_applied_once(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    async def fail_twice(request: Received, attempt: int) -> int:
        return 500 if attempt < 2 else 204

    receiver = Receiver(fail_twice)
    await start(harness, receiver, backoff=1, retries=3)
    await full_call(harness, "w1", "alice", "bob")
    await receiver.until(lambda: len(receiver.accepted) == 4)
    await sent(harness)
    assert len(receiver.requests) == 12  # three attempts each, under one id each
    assert [r.type for r in receiver.applied] == CALL_STEPS  # the side effects happen once
    assert [r.type for r in receiver.accepted] == CALL_STEPS
    assert sample(harness, "callgate_webhook_attempts_total", result="5xx") == 8
    assert sample(harness, "callgate_webhook_attempts_total", result="2xx") == 4


async def test_an_attempt_without_an_answer_times_out_and_is_retried(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    async def hang_first(request: Received, attempt: int) -> int:
        if attempt == 0:
            await trio.sleep_forever()
        return 204

    receiver = Receiver(hang_first)
    await start(harness, receiver, timeout=3, backoff=1)
    await full_call(harness, "w1", "alice", "bob")
    await receiver.until(lambda: len(receiver.accepted) == 4)
    assert [r.type for r in receiver.accepted] == CALL_STEPS
    assert len(receiver.applied) == 4
    await sent(harness)
    assert sample(harness, "callgate_webhook_attempts_total", result="timeout") == 4


async def test_webhooks_of_one_call_stay_in_order_while_other_calls_go_on(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    """Call a's `call.ringing` is held at the receiver: what follows it in call a waits for it,
    and calls b, c and d are told in full meanwhile, though there are only two senders."""
    release = trio.Event()

    async def hold_a(request: Received, attempt: int) -> int:
        if request.json["data"]["callId"] == "a" and request.type == "call.ringing":
            await release.wait()
        return 204

    def steps(call_id: str) -> list[str]:
        return [r.type for r in receiver.accepted if r.json["data"]["callId"] == call_id]

    receiver = Receiver(hold_a)
    await start(harness, receiver, workers=2, timeout=120)
    async with trio.open_nursery() as nursery:
        for n, call_id in enumerate("abcd"):
            nursery.start_soon(full_call, harness, call_id, f"caller{n}", f"callee{n}")
    await receiver.until(lambda: all(len(steps(call_id)) == 4 for call_id in "bcd"))
    assert steps("a") == ["call.requested"]  # its ringing is held, and the rest waits
    release.set()
    await receiver.until(lambda: len(receiver.accepted) == 16)
    for call_id in "abcd":
        assert steps(call_id) == CALL_STEPS, (call_id, steps(call_id))


async def test_a_dead_receiver_slows_no_call_and_the_queue_is_bounded(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    async def never(request: Received, attempt: int) -> int:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    receiver = Receiver(never)
    await start(harness, receiver, queue_size=3, workers=1, timeout=60)
    assert harness.server is not None and harness.server.webhooks is not None
    # Calls go on as ever while nothing the receiver is sent is ever answered.
    await full_call(harness, "w1", "alice", "bob")
    await full_call(harness, "w2", "carol", "dave")
    assert harness.server.webhooks.queued == 3  # waiting or in flight: the bound
    dropped = 8 - 3
    assert sample(harness, "callgate_webhook_drops_total", reason="queue_full") == dropped
    (first,) = harness.audit.records("webhook.dropped")
    assert first["reason"] == "queue_full" and first["msg_event"] == "call.ended"
    assert sample(harness, "callgate_webhooks_delivered_total") == 0


async def test_a_webhook_nobody_accepts_is_given_up_counted_and_audited(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    async def refuse(request: Received, attempt: int) -> int:
        return 500

    receiver = Receiver(refuse)
    await start(harness, receiver, retries=1, backoff=1, events=["call.requested"], workers=1)
    alice = await harness.connect("alice")
    for call_id in ("g1", "g2"):
        await alice.send("call-request", call_request(call_id, "alice", "nobody"))
        await alice.expect("call-reject", reason="unavailable")
    await receiver.until(lambda: len(receiver.requests) == 4)
    await sent(harness)
    assert sample(harness, "callgate_webhook_drops_total", reason="gave_up") == 2
    records = harness.audit.records("webhook.dropped")
    assert records[0]["reason"] == "gave_up" and records[0]["msg_event"] == "call.requested"
    assert records[0]["call_id"] == "g1"


async def test_a_receiver_whose_certificate_does_not_check_out_is_never_sent_anything(
    harness: Harness, clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    cert_file, key_file, _ = self_signed(tmp_path)  # trusted by nobody
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_file, key_file)
    receiver = Receiver()
    await start(harness, receiver, tls=tls, retries=1, events=["call.requested"])
    alice = await harness.connect("alice")
    await alice.send("call-request", call_request("t1", "alice", "nobody"))
    await alice.expect("call-reject", reason="unavailable")
    await sent(harness)
    assert receiver.requests == [] and receiver.connections >= 1  # handshakes, refused
    assert sample(harness, "callgate_webhook_attempts_total", result="error") == 2
    assert sample(harness, "callgate_webhook_drops_total", reason="gave_up") == 1


async def test_pending_and_missed_calls_are_told(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    receiver = Receiver()
    await start(harness, receiver, calls={"offline": "notify", "ring_timeout": 5})
    alice = await harness.connect("alice")
    await alice.send("call-request", call_request("p1", "alice", "bob", "voice"))
    await alice.expect("call-pending")
    await alice.expect("call-reject", reason="unavailable")
    await receiver.until(lambda: len(receiver.accepted) == 4)
    types = [r.type for r in receiver.accepted]
    assert types == ["call.requested", "call.pending", "call.ended", "call.missed"]
    assert receiver.delivered("call.pending")[0] == {
        "callId": "p1",
        "caller": "alice",
        "callee": "bob",
        "media": "voice",
    }
    assert receiver.delivered("call.missed")[0]["reason"] == "unavailable"
    assert receiver.delivered("call.ended")[0]["reason"] == "unavailable"


async def test_sign_in_refusals_are_told_when_asked_for(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    receiver = Receiver()
    await start(harness, receiver, events=["signin.refused"])
    stranger = await harness.open()
    forged = token_for("alice", secret="another-secret-that-is-long-enough!!")
    await stranger.send("auth", {"token": forged})
    await stranger.expect_closed(4001)
    await receiver.until(lambda: len(receiver.accepted) == 1)
    assert receiver.delivered("signin.refused") == [{"reason": "bad_signature"}]
    assert forged.encode() not in receiver.accepted[0].body


def test_what_each_audit_record_becomes() -> None:
    call = {"call_id": "c", "caller": "a", "callee": "b", "media": "video"}
    assert webhooks_of("call.rejected", {**call, "conn": "x", "reason": "declined"}) == [
        ("call.rejected", "call:a:c", {"callId": "c", "caller": "a", "callee": "b",
                                       "media": "video", "reason": "declined"}),
        ("call.ended", "call:a:c", {"callId": "c", "caller": "a", "callee": "b", "media": "video",
                                    "reason": "declined", "answered": False, "durationMs": 0}),
    ]  # fmt: skip
    (busy,) = webhooks_of("call.busy", {**call, "reason": "glare"})
    assert busy[0] == "call.ended" and busy[2]["reason"] == "glare"
    (limited,) = webhooks_of("call.rate_limited", {**call, "reason": "call_request_pair"})
    assert limited[2]["reason"] == "rate_limited"
    assert webhooks_of("call.renegotiated", call) == []
    assert webhooks_of("conn.open", {"conn": "x"}) == []
    hook = new_hook("call.ended", "call:a:c", {"callId": "c"}, 1_800_000_000.5)
    assert json.loads(hook.body) == {
        "type": "call.ended",
        "timestamp": "2027-01-15T08:00:00.500Z",
        "data": {"callId": "c"},
    }


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"url": "http://hooks.example.com/x", "secret": WEBHOOK_SECRET}, "webhooks.url"),
        ({"url": "https://hooks.example.com/x"}, "webhooks.secret"),
        ({"url": "https://hooks.example.com/x", "secret": "MfKQ9r8GKYqrTwjUPD8IL"}, "secret"),
        ({"url": "https://h.example.com", "secret": "whsec_c2hvcnQ="}, "secret"),
        ({"url": "ftp://hooks.example.com/x", "secret": WEBHOOK_SECRET}, "url"),
        ({"events": '["call.exploded"]'}, "events"),
    ],
)
def test_bad_webhook_settings_are_refused_by_name(values: dict[str, str], named: str) -> None:
    environ = {"CALLGATE_AUTH_SECRET": SECRET}
    environ |= {f"CALLGATE_WEBHOOKS_{key.upper()}": value for key, value in values.items()}
    with pytest.raises(ConfigError, match=named):
        load_settings(None, environ=environ)


def test_plain_http_only_to_loopback_or_when_allowed() -> None:
    environ = {"CALLGATE_AUTH_SECRET": SECRET, "CALLGATE_WEBHOOKS_SECRET": WEBHOOK_SECRET}
    for url, allow in (("http://127.0.0.1:9/x", "false"), ("http://hooks.internal/x", "true")):
        settings = load_settings(
            None,
            environ={
                **environ,
                "CALLGATE_WEBHOOKS_URL": url,
                "CALLGATE_WEBHOOKS_ALLOW_HTTP": allow,
            },
        )
        assert settings.webhooks.url == url


async def test_refused_sign_ins_take_at_most_a_tenth_of_the_queue(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    """Strangers cause `signin.refused`: with the receiver stuck, their webhooks fill at most a
    tenth of the queue, and a call's webhooks still find room."""

    async def never(request: Received, attempt: int) -> int:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    receiver = Receiver(never)
    events = ["signin.refused", "call.requested", "call.ringing", "call.answered", "call.ended"]
    await start(harness, receiver, queue_size=10, workers=1, timeout=60, events=events)
    assert harness.server is not None and harness.server.webhooks is not None
    forged = token_for("alice", secret="another-secret-that-is-long-enough!!")
    for _ in range(3):
        stranger = await harness.open()
        await stranger.send("auth", {"token": forged})
        await stranger.expect_closed(4001)
    assert harness.server.webhooks.queued == 1
    assert sample(harness, "callgate_webhook_drops_total", reason="queue_full") == 2
    await full_call(harness, "s1", "alice", "bob")
    assert harness.server.webhooks.queued == 1 + 4  # every step of the call found room
