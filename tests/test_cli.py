"""The command line: token minting, config checks, refusing the dev secret off loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from callgate.auth import TokenVerifier
from callgate.cli import main
from callgate.config import load_settings

SHIPPED = Path(__file__).parent.parent / "config" / "callgate.toml"


def test_token_command_mints_a_verifiable_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "alice", "--ttl", "120", "--config", str(SHIPPED)]) == 0
    token = capsys.readouterr().out.strip()
    settings = load_settings(SHIPPED, environ={})
    identity = TokenVerifier.from_settings(settings.auth).verify(token)
    assert identity.user == "alice"


def test_check_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["check-config", str(SHIPPED)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = -1\n")
    assert main(["check-config", str(bad)]) == 2
    assert "server.port" in capsys.readouterr().err


def serve_off_loopback(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callgate", "serve", "--config", str(SHIPPED), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )


def test_serve_refuses_development_secret_off_loopback() -> None:
    result = serve_off_loopback()
    assert result.returncode == 2
    assert "development secret" in result.stderr


def test_serve_refuses_development_audit_key_off_loopback() -> None:
    result = serve_off_loopback(CALLGATE_AUTH_SECRET="an-operator-secret-that-is-long-enough!!")
    assert result.returncode == 2
    assert "audit.key" in result.stderr
    assert "CALLGATE_AUDIT_KEY" in result.stderr
