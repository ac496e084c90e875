"""The command line: token minting, config checks, refusing the dev secret off loopback."""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from callgate.auth import TokenVerifier
from callgate.cli import main
from callgate.client import connect
from callgate.config import load_settings
from callgate.transport.server import listen_problem

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


def test_serve_refuses_development_audit_signing_key_off_loopback() -> None:
    result = serve_off_loopback(
        CALLGATE_AUTH_SECRET="an-operator-secret-that-is-long-enough!!",
        CALLGATE_AUDIT_KEY="an-operator-audit-key-that-is-long-enough",
    )
    assert result.returncode == 2
    assert "audit.signing_key" in result.stderr
    assert "CALLGATE_AUDIT_SIGNING_KEY" in result.stderr


# -- start-up failures: one line naming the setting, exit status 2 ---------------------------------

OWN_SECRET = "an-operator-secret-that-is-long-enough!!"
OWN_AUDIT_KEY = "an-operator-audit-key-that-is-long-enough"


def write_config(tmp_path: Path, **sections: dict[str, str]) -> Path:
    """A config of the operator's own (no development keys) on loopback, any free ports;
    `sections` adds or replaces keys (values in TOML, `{tmp}` standing for `tmp_path`)."""
    tables: dict[str, dict[str, str]] = {
        "server": {"port": "0"},
        "auth": {"secret": f"'{OWN_SECRET}'"},
        "audit": {"path": "'{tmp}/audit.log'", "key": f"'{OWN_AUDIT_KEY}'"},
        "metrics": {"port": "0"},
    }
    for name, keys in sections.items():
        tables[name] = {**tables.get(name, {}), **keys}
    config = tmp_path / "c.toml"
    config.write_text(
        "".join(
            f"[{name}]\n"
            + "".join(f"{key} = {value.format(tmp=tmp_path)}\n" for key, value in keys.items())
            for name, keys in tables.items()
        )
    )
    return config


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callgate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str], *named: str) -> str:
    """The failure is one line on stderr, naming each of `named`; exit status 2."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("callgate: "), lines
    for name in named:
        assert name in lines[0], (name, lines[0])
    assert result.returncode == 2, result.stderr
    return lines[0]


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A loopback port another server holds (this test, for its length)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("section", ["server", "metrics"])
def test_a_port_in_use(tmp_path: Path, occupied_port: int, section: str) -> None:
    config = write_config(tmp_path, **{section: {"port": str(occupied_port)}})
    result = run_cli("serve", "--config", str(config))
    line = assert_one_line_exit_2(result, f"{section}.port", f"127.0.0.1:{occupied_port}")
    assert "in use" in line


def test_a_privileged_port(tmp_path: Path) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 1))
        except PermissionError:
            pass
        else:
            pytest.skip("this user may listen on privileged ports")
    result = run_cli("serve", "--config", str(write_config(tmp_path, server={"port": "1"})))
    assert "permission" in assert_one_line_exit_2(result, "server.port", "127.0.0.1:1")


@pytest.mark.parametrize(
    ("sections", "named"),
    [
        ({"server": {"host": "'192.0.2.1'"}}, ["server.host", "192.0.2.1"]),
        ({"metrics": {"host": "'no-such-host.invalid'"}}, ["metrics.host", "no-such-host"]),
        (
            {"tls": {"cert_file": "'{tmp}/none.pem'", "key_file": "'{tmp}/c.toml'"}},
            ["tls.cert_file", "none.pem"],
        ),
        ({"tls": {"cert_file": "'{tmp}/c.toml'", "key_file": "'{tmp}/c.toml'"}}, ["tls."]),
        ({"auth": {"revocation_file": "'{tmp}'"}}, ["auth.revocation_file", "{tmp}"]),
        ({"auth": {"jwks_file": "'{tmp}/none.json'"}}, ["auth.jwks_file", "none.json"]),
        ({"auth": {"key_files": "{{k1 = '{tmp}/none.pem'}}"}}, ["auth.key_files.k1", "none.pem"]),
        (
            {"auth": {"algorithms": "['RS256']", "public_key_file": "'{tmp}/none.pem'"}},
            ["auth.public_key_file", "none.pem"],
        ),
        ({"audit": {"path": "'{tmp}'"}}, ["audit.path", "{tmp}"]),
        ({"audit": {"path": "'{tmp}/c.toml/audit.log'"}}, ["audit.path", "c.toml/audit.log"]),
        ({"server": {"port": "'many'"}}, ["server.port"]),
    ],
)
def test_every_start_up_failure_is_one_line(
    tmp_path: Path, sections: dict[str, dict[str, str]], named: list[str]
) -> None:
    result = run_cli("serve", "--config", str(write_config(tmp_path, **sections)))
    assert_one_line_exit_2(result, *(name.format(tmp=tmp_path) for name in named))


def test_a_config_file_missing_or_not_toml(tmp_path: Path) -> None:
    assert_one_line_exit_2(run_cli("serve", "--config", str(tmp_path / "none.toml")), "none.toml")
    (tmp_path / "bad.toml").write_text("[server\n")
    result = run_cli("serve", "--config", str(tmp_path / "bad.toml"))
    assert_one_line_exit_2(result, "bad.toml", "not valid TOML")


def test_a_command_line_port_out_of_range(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(write_config(tmp_path)), "--port", "70000")
    assert_one_line_exit_2(result, "--port")


def test_an_environment_override_names_its_variable(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    result = run_cli("serve", "--config", config, CALLGATE_SERVER_PORT="abc")
    assert_one_line_exit_2(result, "CALLGATE_SERVER_PORT:")
    result = run_cli("serve", "--config", config, CALLGATE_AUTH_SECRET="short")
    line = assert_one_line_exit_2(result, "CALLGATE_AUTH_SECRET:")
    assert "short" not in line.split("CALLGATE_AUTH_SECRET:", 1)[1]  # a secret is never echoed
    result = run_cli("serve", "--config", config, CALLGATE_AUTH_KEY_FILES="{nope")
    assert_one_line_exit_2(result, "CALLGATE_AUTH_KEY_FILES:")


# -- what a started server tells its user ---------------------------------------------------------

ROOT = Path(__file__).parent.parent


async def read_log(process: trio.Process, until: str) -> list[dict[str, Any]]:
    """The server's log records (JSON lines on stderr) up to the one whose event is `until`;
    other lines (a script's own text) as `{"text": line}`."""
    assert process.stderr is not None
    records: list[dict[str, Any]] = []
    buffer = b""
    with trio.fail_after(30):
        while True:
            chunk = await process.stderr.receive_some(4096)
            assert chunk, records
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    records.append({"text": line.decode()})
                if records[-1].get("event") == until:
                    return records


@asynccontextmanager
async def running(command: list[str], env: dict[str, str]) -> AsyncIterator[trio.Process]:
    process = await trio.lowlevel.open_process(
        command,
        stdout=subprocess.DEVNULL,  # the audit trail, on standard output in the shipped config
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )
    try:
        yield process
    finally:
        process.terminate()
        with trio.fail_after(30):
            await process.wait()


async def assert_token_hint_works(hint: dict[str, Any], server_env: dict[str, str]) -> None:
    """Run the command the server suggests, in an environment that has only the variables it
    names: the token it prints signs in."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("CALLGATE_")}
    env.update({name: server_env[name] for name in hint.get("with_environment", [])})
    minted = await trio.run_process(
        shlex.split(hint["command"]), capture_stdout=True, capture_stderr=True, env=env
    )
    with trio.fail_after(10):
        async with connect(hint["connect"], minted.stdout.decode().strip()) as client:
            assert client.session.user == "alice"


@pytest.mark.parametrize(
    ("env", "at_fault"),
    [
        ({}, ["auth.secret", "audit.key", "audit.signing_key"]),
        # The case: the operator's own secret, only the shipped audit keys left.
        ({"CALLGATE_AUTH_SECRET": OWN_SECRET}, ["audit.key", "audit.signing_key"]),
    ],
)
async def test_the_start_up_warning_names_the_development_key(
    tmp_path: Path, env: dict[str, str], at_fault: list[str]
) -> None:
    config = tmp_path / "shipped.toml"
    config.write_text(SHIPPED.read_text().replace("port = 8765", "port = 0").replace("9464", "0"))
    command = [sys.executable, "-m", "callgate", "serve", "--config", str(config)]
    async with running(command, env) as process:
        records = await read_log(process, until="get a token in another terminal")
        warnings = [r for r in records if r.get("level") == "warning"]
        assert [w["event"].split(" ", 1)[0] for w in warnings] == at_fault
        for warning, setting in zip(warnings, at_fault, strict=True):
            variable = "CALLGATE_" + setting.replace(".", "_").upper()
            assert variable in warning["fix"]
        hint = records[-1]
        assert hint["connect"] == next(r["url"] for r in records if r.get("event") == "listening")
        assert str(config) in hint["command"]
        await assert_token_hint_works(hint, env)


async def test_scripts_serve_says_where_it_listens() -> None:
    # Another port than the one in the shipped config, as `scripts/serve --port 0` gives.
    env = {"CALLGATE_METRICS_PORT": "0"}
    async with running([str(ROOT / "scripts" / "serve"), "--port", "0"], env) as process:
        records = await read_log(process, until="get a token in another terminal")
    text = "\n".join(r["text"] for r in records if "text" in r)
    assert text and ":8765" not in text
    hint = records[-1]
    url = next(r["url"] for r in records if r.get("event") == "listening")
    assert hint["connect"] == url and not url.endswith(":8765/ws")


@pytest.mark.parametrize(
    ("error", "named"),
    [
        (OSError(errno.EADDRINUSE, "Address in use"), ["server.port:", "in use"]),
        (PermissionError(errno.EACCES, "Permission denied"), ["server.port:", "ports below 1024"]),
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign"), ["server.host:", "not an address"]),
        (socket.gaierror(socket.EAI_NONAME, "Name unknown"), ["server.host:", "cannot resolve"]),
        (OSError(errno.EINVAL, "Invalid argument"), ["server.host, server.port:", "Invalid"]),
    ],
)
def test_why_an_address_cannot_be_listened_on(error: OSError, named: list[str]) -> None:
    # The privileged port above is skipped where tests run as root: each cause, named here.
    problem = listen_problem(("server.host", "server.port"), "127.0.0.1", 80, error)
    assert "127.0.0.1" in problem
    for name in named:
        assert name in problem
