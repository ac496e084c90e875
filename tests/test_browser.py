"""Real WebRTC calls between headless Chromium pages, through the demo app and the server.

Needs Debian's chromium and Node (tests/browser: playwright-core, which downloads no browser).
Where they cannot be had the test skips loudly; under CI (CI=true) it fails instead, because CI
is where it must run (.ci/run installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from callgate.config import DEVELOPMENT_SECRET, Settings
from callgate.demo import serve_demo
from callgate.transport.server import RunningServer, serve
from conftest import SDP_ANSWER, Harness, checked, make_settings

DRIVER = Path(__file__).parent / "browser" / "call.mjs"
NODE, CHROMIUM = shutil.which("node"), shutil.which("chromium")
READY = NODE and CHROMIUM and (DRIVER.parent / "node_modules" / "playwright-core").is_dir()
# One driver run: a browser start, two pages, a call or two, on a slow shared machine.
RUN_LIMIT = 180


def require_browser() -> None:
    if READY:
        return
    why = "Chromium, Node or playwright-core missing (.ci/run and scripts/test install them)"
    if os.environ.get("CI"):
        pytest.fail(f"the browser end-to-end test must run in CI: {why}")
    pytest.skip(f"SKIPPED LOUDLY: no real-browser test on this machine: {why}")


def demo_settings(port: int = 0) -> Settings:
    # A grace long enough for a page reload on a slow machine (the shipped default is 15 s).
    return make_settings(
        auth={"secret": DEVELOPMENT_SECRET},
        ice={"stun_urls": []},
        calls={"reconnect_grace": 30},
        server={"port": port, "drain_timeout": 5},
    )


async def drive(
    demo_port: int,
    scenario: str,
    *args: str,
    steps: Callable[[str], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Run one scenario of call.mjs; `steps` does what the driver asks of the servers."""
    assert NODE is not None
    command = [NODE, str(DRIVER), f"http://127.0.0.1:{demo_port}/", scenario, *args]
    errors = bytearray()
    result: dict[str, Any] = {}
    with trio.fail_after(RUN_LIMIT):
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert process.stdin and process.stdout and process.stderr
        stderr = process.stderr
        try:
            async with trio.open_nursery() as nursery:

                async def drain() -> None:
                    async for chunk in stderr:  # the pages' console: read, or the pipe fills
                        errors.extend(chunk)

                nursery.start_soon(drain)
                buffer = b""
                async for chunk in process.stdout:
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        message = json.loads(line)
                        if "step" in message:
                            assert steps is not None, message
                            await steps(message["step"])
                            await process.stdin.send_all(b"ok\n")
                        else:
                            result = message
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
    tail = errors.decode(errors="replace")[-3000:]
    assert result, tail
    assert "error" not in result, (result, tail)
    return result


async def test_two_browsers_set_up_a_real_call(harness: Harness, tmp_path: Path) -> None:
    require_browser()
    settings = demo_settings()
    running = await harness.start(settings)
    port = await harness.nursery.start(serve_demo, settings, running.url, "127.0.0.1", 0)
    screenshot = tmp_path / "call.png"
    result = await drive(port, "call", str(screenshot))
    assert result["states"] == {"alice": "connected", "bob": "connected"}
    assert result["alice_bytes"] > 0 and result["bob_bytes"] > 0  # media really flowed
    assert result["bob_status"] == "Call ended: alice hung up"
    assert screenshot.stat().st_size > 10_000

    events = harness.audit.events()
    for expected in ("call.requested", "call.ringing", "call.answered", "call.ended"):
        assert expected in events
    ended = harness.audit.records("call.ended")[0]
    assert (ended["caller"], ended["callee"], ended["media"]) == ("alice", "bob", "video")
    assert ended["reason"] == "hangup" and ended["duration_ms"] > 0
    text = harness.audit.text
    assert "v=0" not in text and "candidate:" not in text and SDP_ANSWER not in text


class DemoProcess:
    """What `callgate demo` runs, the signaling server and the page's server, on one engine,
    restartable on the same ports as a restarted `callgate demo` process would be."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.running: RunningServer | None = None
        self.demo_port = 0
        self._scope = trio.CancelScope()
        self._gone = trio.Event()

    async def start(self) -> None:
        settings = demo_settings(self.running.port if self.running else 0)
        scope, gone = trio.CancelScope(), trio.Event()

        async def run(*, task_status: trio.TaskStatus[tuple[RunningServer, int]]) -> None:
            try:
                with scope:
                    async with trio.open_nursery() as nursery:
                        running: RunningServer = await nursery.start(
                            serve, settings, self.harness.capture.log
                        )
                        port = await nursery.start(
                            serve_demo, settings, running.url, "127.0.0.1", self.demo_port
                        )
                        task_status.started((running, port))
            finally:
                gone.set()

        self.running, self.demo_port = await self.harness.nursery.start(run)
        self.harness.server = self.running
        self._scope, self._gone = scope, gone

    async def stop(self) -> None:
        """As on SIGTERM: calls end (`server_shutdown`), connections close 1001, then the
        process is gone, the page's server with it."""
        assert self.running is not None
        with trio.fail_after(15):
            await self.running.shutdown()
            self._scope.cancel()
            await self._gone.wait()


@pytest.fixture
async def demo(nursery: trio.Nursery) -> AsyncIterator[DemoProcess]:
    """The scenarios below are the page's behaviour: one engine is enough for them."""
    harness = Harness(nursery)
    async with checked(harness):
        process = DemoProcess(harness)
        await process.start()
        yield process


async def test_an_offline_callee_is_named_and_the_ended_call_gets_nothing_more(
    demo: DemoProcess,
) -> None:
    require_browser()
    result = await drive(demo.demo_port, "offline")
    assert "bob is not online" in result["status"], result
    # The page sent nothing for the refused call once it was refused, so nothing was refused.
    assert result["sent_after_reject"] == [], result
    assert result["errors"] == [], result
    assert result["dialer_shown"] is True
    assert result["after_sign_out"] == {"signin": True, "kept": 0, "ws": None}
    assert "call.unavailable" in demo.harness.audit.events()


async def test_a_reload_mid_call_resumes_the_call_and_media_flows_again(
    demo: DemoProcess,
) -> None:
    require_browser()
    result = await drive(demo.demo_port, "reload")
    assert result["alice_session"]["resumed"] is True, result
    assert result["call_id_after"] == result["call_id"]
    assert result["states"] == {"alice": "connected", "bob": "connected"}
    # Media flows again both ways after the reload: bytes and decoded video frames grow.
    for user in ("alice", "bob"):
        for phase in ("media_after", "media_after_bob"):  # alice's reload, then bob's
            grown = result[phase][user]
            assert grown["bytes"] > 20_000 and grown["frames"] > 10, result
    assert result["bob_resumed"] is True
    assert result["bob_status"] == "Call ended: alice hung up"

    audit = demo.harness.audit
    assert audit.events().count("session.resumed") == 2
    assert "call.renegotiated" in audit.events()
    # One call, from the answer to the hang-up: the reload did not end it.
    ended = audit.records("call.ended")
    assert [(row["call_id"], row["reason"]) for row in ended] == [(result["call_id"], "hangup")]


async def test_a_reload_while_it_rings_keeps_the_call_on_either_side(demo: DemoProcess) -> None:
    require_browser()
    result = await drive(demo.demo_port, "ringing")
    assert result["alice_while_ringing"] == "Calling bob...", result
    for user in ("alice", "bob"):
        assert result["media"][user]["bytes"] > 20_000 and result["media"][user]["frames"] > 10
    assert demo.harness.audit.events().count("session.resumed") == 2


async def test_the_pages_come_back_by_themselves_after_a_server_restart(
    demo: DemoProcess,
) -> None:
    require_browser()

    async def steps(name: str) -> None:
        if name == "stop":
            await demo.stop()
        elif name == "start":
            await demo.start()
        else:
            raise AssertionError(name)

    result = await drive(demo.demo_port, "restart", steps=steps)
    for user in ("alice", "bob"):
        down, up = result["down"][user], result["up"][user]
        # The reason stays on the page while it retries, and the retry says when.
        assert down["status"] == "Call ended: the server is restarting", result
        assert "server is restarting" in down["notice"] and "reconnecting in" in down["notice"]
        assert up["connection"] == f"online as {user}", result
        assert "Reconnected" in up["notice"], result
    ended = demo.harness.audit.records("call.ended")
    assert [row["reason"] for row in ended][:1] == ["server_shutdown"]


def test_the_demo_refuses_anything_but_the_development_secret_on_loopback() -> None:
    from callgate.demo import check_demo_allowed
    from callgate.errors import ConfigError

    with pytest.raises(ConfigError):
        check_demo_allowed(make_settings())  # the tests' own secret
    with pytest.raises(ConfigError):
        check_demo_allowed(
            make_settings(auth={"secret": DEVELOPMENT_SECRET}, server={"host": "0.0.0.0"})
        )
    check_demo_allowed(make_settings(auth={"secret": DEVELOPMENT_SECRET}))
