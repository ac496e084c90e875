"""The admin API: every endpoint authorised and not, malformed input, the effect on real clients,
and the audit records; the operator events in the core; the CLI; the OpenAPI document."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import structlog
import trio

from callgate.cli import admin_request
from callgate.config import Settings
from callgate.core.actions import Audit, Close, Deliver
from callgate.core.events import Authenticated, MessageReceived, OperatorEndedCall
from callgate.core.events import OperatorDisconnectedUser as Disconnect
from callgate.core.policy import CallRules, NoThrottle
from callgate.core.switchboard import Switchboard
from callgate.protocol.messages import CallAnswer, CallRequest
from callgate.transport.admin import ROUTES
from callgate.transport.http import Request, Response, serve_http
from conftest import (
    STEP,
    Client,
    ClusterHarness,
    Harness,
    call_request,
    exchange_raw,
    make_settings,
    read_log_line,
    server_config,
    token_for,
)

ADMIN_KEY = "admin-key-for-tests-only-32-bytes-long!!"
OPENAPI = Path(__file__).parent.parent / "docs" / "admin-openapi.json"


def with_admin(settings: Settings | None = None, **admin: Any) -> Settings:
    settings = settings or make_settings()
    section = {"enabled": True, "port": 0, "keys": {"ops": ADMIN_KEY}, **admin}
    return Settings.model_validate({**settings.model_dump(), "admin": section})


def admin_url(h: Harness, node: int = 0) -> str:
    server = h.nodes[node] if isinstance(h, ClusterHarness) else h.server
    assert server is not None and server.admin_port is not None
    return f"http://127.0.0.1:{server.admin_port}"


async def api(
    h: Harness,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    key: str = ADMIN_KEY,
    node: int = 0,
) -> tuple[int, dict[str, Any]]:
    with trio.fail_after(STEP):
        return await trio.to_thread.run_sync(
            admin_request, admin_url(h, node), key, method, path, body
        )


def admin_records(h: Harness) -> list[dict[str, Any]]:
    return [r for r in h.audit.records() if r["event"].startswith("admin.")]


async def connected_call(h: Harness, alice: Client, bob: Client, call_id: str = "ab") -> None:
    await alice.send("call-request", call_request(call_id, alice.session["user"], "bob"))
    await bob.expect("call-request")
    answer = {"callId": call_id, "to": alice.session["user"], "answer": {"type": "answer"}}
    await bob.send("call-answer", {**answer, "answer": {"type": "answer", "sdp": "v=0"}})
    await alice.expect("call-answer")


# -- authentication -----------------------------------------------------------------------------

ACTIONS = sorted((method, path) for path, methods in ROUTES.items() for method in methods)


async def test_every_endpoint_refuses_requests_without_the_admin_key(harness: Harness) -> None:
    await harness.start(with_admin())
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await connected_call(harness, alice, bob)
    body = {"reason": "r", "call_id": "ab", "user": "alice"}
    for method, path in ACTIONS:
        sent = body if method == "POST" else None
        assert (await api(harness, method, path, sent, key=""))[0] == 401
        assert (await api(harness, method, path, sent, key="x" * 40))[0] == 401
        status, answer = await api(harness, method, path, sent, key=token_for("alice"))
        assert (status, answer) == (403, {"error": "a client token is not an admin credential"})
    denied = harness.audit.records("admin.denied")
    assert [r["code"] for r in denied] == [401, 401, 403] * len(ACTIONS)
    assert all(r["addr"] == "127.0.0.1" for r in denied)
    # Nothing was done: the call goes on, nobody was closed, the node still accepts.
    assert [r["event"] for r in admin_records(harness)] == ["admin.denied"] * 3 * len(ACTIONS)
    await alice.expect_silence()
    await bob.expect_silence()
    assert harness.server is not None and harness.server.hub.accepting
    assert len(harness.server.board.calls) == 1


async def test_the_admin_listener_is_off_by_default_and_needs_keys(harness: Harness) -> None:
    server = await harness.start()
    assert server.admin_port is None
    with pytest.raises(Exception, match=r"admin\.keys"):
        make_settings(admin={"enabled": True})


# -- reading ------------------------------------------------------------------------------------


async def test_lists_with_filters_and_paging(harness: Harness) -> None:
    await harness.start(with_admin())
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await connected_call(harness, alice, bob)
    carol = await harness.connect("carol")
    await harness.connect("dave")
    await carol.send("call-request", call_request("cd", "carol", "dave"))
    await harness.clients[-1].expect("call-request")
    pending = await harness.open()  # not signed in

    status, page = await api(harness, "GET", "/v1/connections")
    assert status == 200 and page["total"] == 5 and page["next_cursor"] is None
    assert {row["user"] for row in page["items"]} == {"alice", "bob", "carol", "dave", None}
    assert all(row["addr"] == "127.0.0.1" and row["age"] >= 0 for row in page["items"])
    _, only = await api(harness, "GET", "/v1/connections?user=alice")
    assert [row["id"] for row in only["items"]] == [alice.conn]
    _, waiting = await api(harness, "GET", "/v1/connections?state=unauthenticated")
    assert [row["state"] for row in waiting["items"]] == ["unauthenticated"]
    _, first = await api(harness, "GET", "/v1/connections?limit=2")
    assert len(first["items"]) == 2 and first["next_cursor"] == "2"
    _, rest = await api(harness, "GET", "/v1/connections?limit=2&cursor=4")
    assert len(rest["items"]) == 1 and rest["next_cursor"] is None
    _, old = await api(harness, "GET", "/v1/connections?min_age=3600")
    assert old["items"] == []

    _, users = await api(harness, "GET", "/v1/users")
    assert [(row["user"], len(row["devices"]), row["calls"]) for row in users["items"]] == [
        ("alice", 1, 1),
        ("bob", 1, 1),
        ("carol", 1, 1),
        ("dave", 1, 1),
    ]
    _, calls = await api(harness, "GET", "/v1/calls")
    assert [(row["call_id"], row["state"]) for row in calls["items"]] == [
        ("ab", "connected"),
        ("cd", "ringing"),
    ]
    _, ringing = await api(harness, "GET", "/v1/calls?state=ringing&user=dave")
    assert [row["call_id"] for row in ringing["items"]] == ["cd"]
    _, none = await api(harness, "GET", "/v1/calls?user=alice&state=ringing")
    assert none["items"] == []
    _, status_ = await api(harness, "GET", "/v1/status")
    assert status_ == {"node": None, "accepting": True, "ready": True, "connections": 5, "calls": 2}
    assert admin_records(harness) == []  # reading is not an action
    await pending.ws.aclose()


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("GET", "/v1/calls?state=bogus", None, "state: one of ringing, connected"),
        ("GET", "/v1/calls?limit=0", None, "limit: a whole number from 1 to 1000"),
        ("GET", "/v1/connections?cursor=-1", None, "cursor: a whole number"),
        # `str.isdigit` takes these; `int` refuses the superscript (a 500) and reads the other
        ("GET", "/v1/calls?limit=%C2%B2", None, "limit: a whole number from 1 to 1000"),
        ("GET", "/v1/connections?cursor=%D9%A3", None, "cursor: a whole number"),
        ("GET", "/v1/connections?min_age=soon", None, "min_age: a number of seconds"),
        ("GET", "/v1/users?nope=1", None, "unknown parameter 'nope'"),
        ("GET", "/v1/users?user=a&user=b", None, "user: give it once"),
        ("POST", "/v1/calls/end", {"call_id": "ab"}, "missing field 'reason'"),
        ("POST", "/v1/calls/end", {"call_id": "ab", "reason": " "}, "reason: say why"),
        ("POST", "/v1/calls/end", {"call_id": "ab", "reason": "a\nb"}, "reason: one line"),
        ("POST", "/v1/calls/end", {"call_id": "ab", "reason": "x" * 201}, "reason: one line"),
        ("POST", "/v1/calls/end", {"call_id": 7, "reason": "r"}, "call_id: a string"),
        ("POST", "/v1/calls/end", {"call_id": "ab", "reason": "r", "x": 1}, "unknown field 'x'"),
        ("POST", "/v1/users/disconnect", {"user": "", "reason": "r"}, "user: a string"),
        ("POST", "/v1/drain", {"reason": "r", "grace": -1}, "grace: a number of seconds"),
        ("POST", "/v1/drain", {"reason": "r", "grace": True}, "grace: a number of seconds"),
    ],
)
async def test_malformed_requests_get_400_with_a_message(
    harness: Harness, method: str, path: str, body: dict[str, Any] | None, message: str
) -> None:
    await harness.start(with_admin())
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await connected_call(harness, alice, bob)
    status, answer = await api(harness, method, path, body)
    assert status == 400 and answer["error"].startswith(message), answer
    assert admin_records(harness) == []
    await alice.expect_silence()
    assert harness.server is not None and harness.server.hub.accepting


async def test_bodies_methods_and_paths_that_are_not_the_api(harness: Harness) -> None:
    server = await harness.start(with_admin())
    assert server.admin_port is not None
    auth = f"Authorization: Bearer {ADMIN_KEY}\r\n"

    def post(path: str, body: bytes) -> bytes:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len(body)}\r\n\r\n"
        return head.encode() + body

    answer = await exchange_raw(server.admin_port, post("/v1/drain", b"not json"))
    assert answer.startswith(b"HTTP/1.1 400 ") and b"the body must be a JSON object" in answer
    answer = await exchange_raw(server.admin_port, post("/v1/drain", b"[1]"))
    assert answer.startswith(b"HTTP/1.1 400 ")
    answer = await exchange_raw(server.admin_port, post("/v1/drain", b"{" + b" " * 9000 + b"}"))
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert (await api(harness, "GET", "/v1/drain"))[0] == 405
    assert (await api(harness, "GET", "/v2/anything"))[0] == 404
    assert await exchange_raw(server.admin_port, b"BROKEN\r\n\r\n") == b""
    assert server.hub.accepting and admin_records(harness) == []


# -- acting -------------------------------------------------------------------------------------


async def test_ending_a_call_tells_both_sides_and_is_audited_once(harness: Harness) -> None:
    await harness.start(with_admin())
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await connected_call(harness, alice, bob)
    body = {"call_id": "ab", "reason": "abuse report 1234"}
    status, answer = await api(harness, "POST", "/v1/calls/end", body)
    assert status == 200 and answer["ended"]["caller"] == "alice"
    await alice.expect("call-end", callId="ab", reason="ended_by_operator", **{"from": "bob"})
    await bob.expect("call-end", callId="ab", reason="ended_by_operator", **{"from": "alice"})
    [record] = admin_records(harness)
    assert record["event"] == "admin.call_end"
    assert (record["operator"], record["reason"], record["call_id"]) == (
        "ops",
        "abuse report 1234",
        "ab",
    )
    ended = harness.audit.records("call.ended")
    assert [(r["reason"], r["answered"]) for r in ended] == [("ended_by_operator", True)]
    # Once: the call is gone, and another request for it ends nothing.
    assert await api(harness, "POST", "/v1/calls/end", body) == (404, {"error": "no such call"})
    assert len(admin_records(harness)) == 1
    await alice.expect_silence()
    await bob.expect_silence()


async def test_a_call_id_shared_by_two_pairs_needs_a_user(harness: Harness) -> None:
    await harness.start(with_admin())
    alice, bob = await harness.connect("alice"), await harness.connect("bob")
    carol, dave = await harness.connect("carol"), await harness.connect("dave")
    await alice.send("call-request", call_request("same", "alice", "bob"))
    await bob.expect("call-request")
    await carol.send("call-request", call_request("same", "carol", "dave"))
    await dave.expect("call-request")
    body = {"call_id": "same", "reason": "stuck"}
    status, answer = await api(harness, "POST", "/v1/calls/end", body)
    assert status == 409 and "name one of its users" in answer["error"]
    assert (await api(harness, "POST", "/v1/calls/end", {**body, "user": "dave"}))[0] == 200
    await carol.expect("call-end", reason="ended_by_operator")
    await dave.expect("call-end", reason="ended_by_operator")
    await alice.expect_silence()
    await bob.expect_silence()


async def test_disconnecting_a_user_closes_every_device_with_4010(harness: Harness) -> None:
    await harness.start(with_admin())
    alice = await harness.connect("alice")
    phone = await harness.connect("alice")
    bob = await harness.connect("bob")
    await connected_call(harness, alice, bob)
    body = {"user": "alice", "reason": "account compromised"}
    status, answer = await api(harness, "POST", "/v1/users/disconnect", body)
    assert status == 200 and answer["close_code"] == 4010 and len(answer["devices"]) == 2
    await alice.expect_closed(4010, "disconnected by operator")
    await phone.expect_closed(4010, "disconnected by operator")
    await bob.expect("call-end", callId="ab", reason="ended_by_operator")
    [record] = admin_records(harness)
    assert (record["event"], record["user"], record["devices"], record["operator"]) == (
        "admin.disconnect",
        "alice",
        2,
        "ops",
    )
    assert [r["reason"] for r in harness.audit.records("call.ended")] == ["ended_by_operator"]
    missing = await api(harness, "POST", "/v1/users/disconnect", body)
    assert missing == (404, {"error": "the user has no device"})


async def test_drain_and_undrain(harness: Harness) -> None:
    settings = make_settings(metrics={"enabled": True, "port": 0})
    server = await harness.start(with_admin(settings))
    assert server.metrics_port is not None
    readyz = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
    alice = await harness.connect("alice")
    status, answer = await api(harness, "POST", "/v1/drain", {"reason": "deploy", "grace": 600})
    assert (status, answer) == (200, {"accepting": False, "grace": 600.0})
    assert b" 503 " in (await exchange_raw(server.metrics_port, readyz)).split(b"\r\n")[0]
    target = urlsplit(harness.url)
    assert target.port is not None
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert (await exchange_raw(target.port, upgrade)).startswith(b"HTTP/1.1 503 ")
    await alice.expect_silence()  # the grace has not run out: she stays
    assert (await api(harness, "POST", "/v1/undrain", {"reason": "deploy cancelled"}))[0] == 200
    assert b" 200 " in (await exchange_raw(server.metrics_port, readyz)).split(b"\r\n")[0]
    bob = await harness.connect("bob")
    await alice.expect_silence(0.1)  # the cancelled drain closes nobody
    assert (await api(harness, "POST", "/v1/drain", {"reason": "deploy", "grace": 0}))[0] == 200
    await alice.expect_closed(1001, "server draining")
    await bob.expect_closed(1001, "server draining")
    events = [(r["event"], r["reason"], r["operator"]) for r in admin_records(harness)]
    assert events == [
        ("admin.drain", "deploy", "ops"),
        ("admin.undrain", "deploy cancelled", "ops"),
        ("admin.drain", "deploy", "ops"),
    ]


async def test_reload_applies_revocations_and_reports_a_broken_file(
    harness: Harness, tmp_path: Path
) -> None:
    revoked = tmp_path / "revoked.json"
    revoked.write_text('{"tokens": [], "users": {}}')
    server = await harness.start(with_admin(make_settings(auth={"revocation_file": str(revoked)})))
    alice = await harness.connect("alice", token=token_for("alice", jti="j1"))
    revoked.write_text('{"tokens": ["j1"], "users": {}}')
    status, answer = await api(harness, "POST", "/v1/reload", {"reason": "incident 7"})
    assert (status, answer) == (200, {"ok": True, "keys": "reloaded", "revocations": "reloaded"})
    await alice.expect_closed(4003, "token revoked")
    revoked.write_text("not json")
    status, answer = await api(harness, "POST", "/v1/reload", {"reason": "incident 7"})
    assert status == 200 and answer["ok"] is False and "revoked.json" in answer["revocations"]
    assert server.hub.revocations.tokens == frozenset({"j1"})  # the previous list is kept
    assert [r["event"] for r in admin_records(harness)] == ["admin.reload", "admin.reload"]


# -- cluster mode -------------------------------------------------------------------------------


async def test_operator_actions_reach_the_node_that_holds_the_target(
    cluster: ClusterHarness,
) -> None:
    await cluster.start(with_admin())
    alice = await cluster.connect("alice", node=1)
    bob = await cluster.connect("bob", node=2)
    await connected_call(cluster, alice, bob)
    _, calls = await api(cluster, "GET", "/v1/calls", node=0)  # the cluster's calls
    assert [row["call_id"] for row in calls["items"]] == ["ab"]
    body = {"call_id": "ab", "reason": "stuck call"}
    assert (await api(cluster, "POST", "/v1/calls/end", body, node=0))[0] == 200
    await alice.expect("call-end", reason="ended_by_operator")
    await bob.expect("call-end", reason="ended_by_operator")
    assert [r["reason"] for r in cluster.audit.records("call.ended")] == ["ended_by_operator"]
    body = {"user": "bob", "reason": "abuse"}
    assert (await api(cluster, "POST", "/v1/users/disconnect", body, node=0))[0] == 200
    await bob.expect_closed(4010, "disconnected by operator")
    await alice.expect_silence()
    assert [r["event"] for r in admin_records(cluster)] == ["admin.call_end", "admin.disconnect"]


# -- the core -----------------------------------------------------------------------------------


def test_the_core_ends_an_operator_call_once_and_leaves_ambiguity_alone() -> None:
    board = Switchboard(CallRules(ring_timeout=30), NoThrottle())
    for conn, user in (("a1", "alice"), ("b1", "bob"), ("c1", "carol"), ("d1", "dave")):
        board.handle(Authenticated(conn, user), 1.0)
    for conn, caller, callee in (("a1", "alice", "bob"), ("c1", "carol", "dave")):
        data = call_request("x", caller, callee)
        board.handle(MessageReceived(conn, CallRequest("x", caller, callee, "video", data)), 1.0)
    answer = {"callId": "x", "to": "alice", "answer": {"type": "answer", "sdp": "v=0"}}
    board.handle(MessageReceived("b1", CallAnswer("x", "alice", answer)), 2.0)
    assert board.handle(OperatorEndedCall("x"), 3.0) == []  # two calls are named x
    assert board.handle(OperatorEndedCall("nope", "alice"), 3.0) == []
    actions = board.handle(OperatorEndedCall("x", "bob"), 5.0)
    ends = [(a.conn, a.data["reason"]) for a in actions if isinstance(a, Deliver)]
    assert ends == [("a1", "ended_by_operator"), ("b1", "ended_by_operator")]
    [ended] = [a for a in actions if isinstance(a, Audit)]
    assert (ended.event, ended.fields["reason"], ended.fields["duration_ms"]) == (
        "call.ended",
        "ended_by_operator",
        3000,
    )
    assert board.handle(OperatorEndedCall("x", "bob"), 6.0) == []
    closes = board.handle(Disconnect("carol", 4010, "disconnected by operator"), 7.0)
    assert [a for a in closes if isinstance(a, Close)] == [
        Close("c1", 4010, "disconnected by operator")
    ]
    assert ("d1", "ended_by_operator") in [
        (a.conn, a.data["reason"]) for a in closes if isinstance(a, Deliver)
    ]


# -- the command line and the document ----------------------------------------------------------


async def test_the_admin_command_wraps_the_api(harness: Harness) -> None:
    await harness.start(with_admin())
    alice = await harness.connect("alice")
    command = [sys.executable, "-m", "callgate", "admin", "--url", admin_url(harness)]
    env = {**os.environ, "CALLGATE_ADMIN_KEY": ADMIN_KEY}
    with trio.fail_after(30):
        listed = await trio.run_process(
            [*command, "connections", "--user", "alice"], capture_stdout=True, env=env
        )
        assert [row["id"] for row in json.loads(listed.stdout)["items"]] == [alice.conn]
        refused = await trio.run_process(
            [*command, "disconnect", "alice", "--reason", "test"],
            capture_stderr=True,
            env={**env, "CALLGATE_ADMIN_KEY": "y" * 40},
            check=False,
        )
        assert refused.returncode == 1 and b"401" in refused.stderr
        done = await trio.run_process(
            [*command, "disconnect", "alice", "--reason", "test"], capture_stdout=True, env=env
        )
        assert json.loads(done.stdout)["close_code"] == 4010
    await alice.expect_closed(4010)
    no_key = {k: v for k, v in env.items() if k != "CALLGATE_ADMIN_KEY"}
    with trio.fail_after(30):
        missing = await trio.run_process(
            [*command, "status"], capture_stderr=True, env=no_key, check=False
        )
    assert missing.returncode == 2 and b"CALLGATE_ADMIN_KEY" in missing.stderr


def test_the_openapi_document_describes_every_endpoint() -> None:
    document = json.loads(OPENAPI.read_text())
    assert document["openapi"].startswith("3.")
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
        if method in ("get", "post")
    }
    assert documented == set(ACTIONS)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert {"200", "400", "401", "403"} <= set(operation["responses"]), (method, path)


async def test_a_failing_handler_answers_500_and_the_listener_goes_on(
    nursery: trio.Nursery,
) -> None:
    calls = 0

    def handler(request: Request) -> Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return Response(200, b"text/plain", b"fine")

    with structlog.testing.capture_logs() as logs:
        port = await nursery.start(serve_http, "127.0.0.1", 0, handler)
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        assert (await exchange_raw(port, request)).startswith(b"HTTP/1.1 500 ")
        assert (await exchange_raw(port, request)).endswith(b"fine")
    assert [entry["event"] for entry in logs] == ["HTTP handler failed"]


async def test_callgate_serve_announces_the_admin_api_from_the_environment(
    tmp_path: Path,
) -> None:
    """The keys arrive as operators do it: CALLGATE_ADMIN_KEYS, a JSON object."""
    config = server_config(tmp_path)
    config.write_text(config.read_text() + "[admin]\nenabled = true\nport = 0\n")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CALLGATE_ADMIN_KEYS": json.dumps({"ops": ADMIN_KEY}),
    }
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "callgate", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        announced = await read_log_line(process, "admin API listening")
        assert announced["operators"] == ["ops"]
        with trio.fail_after(STEP):
            status, answer = await trio.to_thread.run_sync(
                admin_request, announced["url"], ADMIN_KEY, "GET", "/v1/status", None
            )
        assert status == 200 and answer["accepting"] is True
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP):
            await process.wait()
