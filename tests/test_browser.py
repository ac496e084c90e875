"""A real WebRTC call between two headless Chromium pages, through the demo app and the server.

Needs Debian's chromium and Node (tests/browser: playwright-core, which downloads no browser).
Where they cannot be had the test skips loudly; under CI (CI=true) it fails instead, because CI
is where it must run (.ci/run installs both).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import trio

from callgate.config import DEVELOPMENT_SECRET
from callgate.demo import serve_demo
from conftest import SDP_ANSWER, Harness, make_settings

DRIVER = Path(__file__).parent / "browser" / "call.mjs"
NODE, CHROMIUM = shutil.which("node"), shutil.which("chromium")
READY = NODE and CHROMIUM and (DRIVER.parent / "node_modules" / "playwright-core").is_dir()


def require_browser() -> None:
    if READY:
        return
    why = "Chromium, Node or playwright-core missing (.ci/run and scripts/test install them)"
    if os.environ.get("CI"):
        pytest.fail(f"the browser end-to-end test must run in CI: {why}")
    pytest.skip(f"SKIPPED LOUDLY: no real-browser test on this machine: {why}")


async def test_two_browsers_set_up_a_real_call(harness: Harness, tmp_path: Path) -> None:
    require_browser()
    assert NODE is not None
    settings = make_settings(auth={"secret": DEVELOPMENT_SECRET}, ice={"stun_urls": []})
    running = await harness.start(settings)
    port = await harness.nursery.start(serve_demo, settings, running.url, "127.0.0.1", 0)
    screenshot = tmp_path / "call.png"
    with trio.fail_after(120):
        finished = await trio.run_process(
            [NODE, str(DRIVER), f"http://127.0.0.1:{port}/", str(screenshot)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    lines = finished.stdout.decode().strip().splitlines()
    assert lines, finished.stderr.decode()[-2000:]
    result = json.loads(lines[-1])
    assert "error" not in result, (result, finished.stderr.decode()[-2000:])
    assert result["connected"] is True
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
