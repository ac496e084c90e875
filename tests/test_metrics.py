"""The operator's view: Prometheus metrics move with real calls; health and readiness."""

from __future__ import annotations

import re

import trio

from conftest import STEP, Harness, call_request, make_settings, token_for


async def http_get(port: int, path: str) -> tuple[int, str]:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        with trio.fail_after(STEP):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in the exposition text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_counters_move_during_a_call(harness: Harness) -> None:
    running = await harness.start(
        make_settings(metrics={"enabled": True, "port": 0}, limits={"messages": "6/minute"})
    )
    assert running.metrics_port is not None
    port = running.metrics_port
    status, before = await http_get(port, "/metrics")
    assert status == 200
    assert sample(before, "callgate_calls_total", outcome="ended", reason="hangup") == 0

    alice, bob = await harness.connected_call()
    await alice.send("ice-candidate", {"candidate": None, "callId": "ab", "to": "bob"})
    await bob.expect("ice-candidate")
    _, during = await http_get(port, "/metrics")
    assert sample(during, "callgate_calls_active", state="connected") == 1
    assert sample(during, "callgate_connections", state="authenticated") == 2
    assert sample(during, "callgate_messages_forwarded_total", event="ice-candidate") == 1
    assert sample(during, "callgate_messages_forwarded_total", event="call-answer") == 1
    assert sample(during, "callgate_forward_latency_seconds_count") >= 3

    await alice.send("call-end", {"callId": "ab", "to": "bob"})
    await bob.expect("call-end")
    stranger = await harness.open()
    await stranger.send("auth", {"token": token_for("x", ttl=-100)})
    await stranger.expect_closed(4001)
    for _ in range(4):  # alice has sent 3 messages; the 7th is over 6/minute
        await alice.send("user-connected", "alice")
    await alice.expect_error("rate_limited")
    _, after = await http_get(port, "/metrics")
    assert sample(after, "callgate_calls_total", outcome="ended", reason="hangup") == 1
    assert sample(after, "callgate_calls_active", state="connected") == 0
    assert sample(after, "callgate_auth_failures_total", reason="expired") == 1
    assert sample(after, "callgate_rate_limited_total", kind="messages") == 1


async def test_health_and_readiness(harness: Harness) -> None:
    running = await harness.start(make_settings(metrics={"enabled": True, "port": 0}))
    assert running.metrics_port is not None
    assert await http_get(running.metrics_port, "/healthz") == (200, "ok\n")
    assert await http_get(running.metrics_port, "/readyz") == (200, "ready\n")
    assert (await http_get(running.metrics_port, "/nope"))[0] == 404
    alice = await harness.connect("alice")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(running.shutdown)
        await alice.expect_closed(1001)
    assert await http_get(running.metrics_port, "/readyz") == (503, "draining\n")
    assert (await http_get(running.metrics_port, "/healthz"))[0] == 200


async def test_call_outcomes_are_counted_by_reason(harness: Harness) -> None:
    running = await harness.start(make_settings(metrics={"enabled": True, "port": 0}))
    assert running.metrics_port is not None
    alice = await harness.connect("alice")
    await alice.send("call-request", call_request("c1", "alice", "nobody"))
    await alice.expect("call-reject", reason="unavailable")
    _, text = await http_get(running.metrics_port, "/metrics")
    assert sample(text, "callgate_calls_total", outcome="unavailable", reason="unavailable") == 1
