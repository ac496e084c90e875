"""`callgate serve --workers N`: N cluster nodes on one port (SO_REUSEPORT), one supervisor.

The real thing runs as it would for an operator: `callgate serve --workers 2` in a subprocess,
its workers joined through the real Redis at 127.0.0.1:6379 (a cluster name of its own per
test), every client on the one port. Nothing here depends on which worker the kernel hands a
connection to: each worker's audit trail says which connections it took.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from callgate.cli import main as cli_main
from callgate.config import Settings
from callgate.errors import ConfigError
from callgate.trail import verify_each
from callgate.workers import check_workers, worker_settings
from conftest import (
    AUDIT_KEY,
    AUDIT_PUBLIC_KEY,
    CANDIDATE,
    CLUSTER_KEY,
    REDIS_URL,
    STEP,
    Client,
    Harness,
    call_request,
    delete_cluster_keys,
    make_settings,
    require_redis,
    server_config,
    signed_in,
    token_for,
)

ADMIN_KEYS = {"ops": "an-operator-admin-key-that-is-long-enough"}


def cluster_on(settings: Settings) -> Settings:
    cluster = {"enabled": True, "key": CLUSTER_KEY}
    return Settings.model_validate({**settings.model_dump(), "cluster": cluster})


# -- what each worker runs, and what the parent refuses ----------------------------------------


def test_each_worker_gets_its_own_node_name_trail_and_ports() -> None:
    settings = cluster_on(
        make_settings(
            metrics={"enabled": True, "port": 9600},
            admin={"enabled": True, "port": 9700, "keys": json.dumps(ADMIN_KEYS)},
            audit={"path": "/var/log/callgate/audit.log"},
        )
    )
    named = Settings.model_validate(
        {**settings.model_dump(), "cluster": {**settings.cluster.model_dump(), "node_name": "edge"}}
    )
    third = worker_settings(named, 3)
    assert third.server.reuse_port and not named.server.reuse_port
    assert third.server.port == named.server.port  # the one port all of them share
    assert (third.metrics.port, third.admin.port) == (9603, 9703)
    assert third.audit.path == "/var/log/callgate/audit.log.w3"
    assert third.cluster.node_name == "edge-w3"
    # Without a node name: the host's, reduced to what a node name may hold, within 32.
    unnamed = worker_settings(settings, 12).cluster.node_name
    assert unnamed is not None and unnamed.endswith("-w12") and len(unnamed) <= 32
    long = {**settings.cluster.model_dump(), "node_name": "n" * 32}
    assert (
        worker_settings(
            Settings.model_validate({**settings.model_dump(), "cluster": long}), 7
        ).cluster.node_name
        == "n" * 29 + "-w7"
    )
    # Port 0 stays 0: each worker's metrics listener takes a free port of its own.
    assert worker_settings(cluster_on(make_settings(metrics={"port": 0})), 1).metrics.port == 0


@pytest.mark.parametrize(
    ("sections", "clustered", "said"),
    [
        ({}, False, "--workers 2: needs [cluster] enabled = true: each worker would otherwise be"),
        ({"audit": {"path": "-"}}, True, "audit.path: with --workers 2 each worker writes its"),
        (
            {
                "metrics": {"enabled": True, "port": 9464},
                "admin": {"enabled": True, "port": 9465, "keys": json.dumps(ADMIN_KEYS)},
            },
            True,
            "metrics.port, admin.port: with --workers 2 the workers listen on 9464-9465 and"
            " 9465-9466, which overlap (worker i uses metrics.port + i and admin.port + i);"
            " move admin.port to 9466 or above",
        ),
        (
            {"metrics": {"enabled": True, "port": 65535}},
            True,
            "metrics.port: with --workers 2 worker i listens on metrics.port + i, up to 65536",
        ),
    ],
    ids=["no cluster", "audit on stdout", "ports overlap", "ports past 65535"],
)
def test_what_workers_cannot_run_with_is_refused_naming_the_fix(
    sections: dict[str, dict[str, Any]], clustered: bool, said: str
) -> None:
    settings = make_settings(**{"audit": {"path": "audit.log"}, **sections})
    with pytest.raises(ConfigError) as refused:
        check_workers(cluster_on(settings) if clustered else settings, 2)
    assert str(refused.value).startswith(said)
    check_workers(cluster_on(make_settings(audit={"path": "audit.log"})), 2)  # as a contrast


def test_without_linux_so_reuseport_workers_and_reuse_port_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("callgate.workers.reuse_port_supported", lambda: False)
    monkeypatch.setattr("callgate.config.reuse_port_supported", lambda: False)
    with pytest.raises(ConfigError, match="--workers 2: needs Linux's SO_REUSEPORT"):
        check_workers(cluster_on(make_settings(audit={"path": "audit.log"})), 2)
    with pytest.raises(ConfigError, match=r"CALLGATE_SERVER_REUSE_PORT: .*SO_REUSEPORT"):
        make_settings(server={"reuse_port": True})


def test_a_number_of_workers_out_of_bounds_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for count in ("0", "257", "many"):
        with pytest.raises(SystemExit) as usage:
            cli_main(["serve", "--workers", count])
        assert usage.value.code == 2
        assert "a number of workers from 1 to 256" in capsys.readouterr().err


def test_workers_without_a_cluster_are_refused_in_one_line(tmp_path: Path) -> None:
    config = server_config(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "callgate", "serve", "--config", str(config), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "callgate: --workers 2: needs [cluster] enabled = true: each worker would otherwise be"
        " a separate switchboard that cannot see the other workers' users; set up the cluster"
        " (redis_url, key; docs/cluster.md) or run one worker"
    ]


async def test_reuse_port_lets_two_servers_listen_on_one_port() -> None:
    """`[server] reuse_port` alone (what each worker runs with): a second server binds the same
    port, and a socket without SO_REUSEPORT still cannot."""
    async with trio.open_nursery() as nursery:
        first, second = Harness(nursery), Harness(nursery)
        running = await first.start(make_settings(server={"reuse_port": True}))
        other = await second.start(make_settings(server={"reuse_port": True, "port": running.port}))
        assert other.port == running.port
        with socket.socket() as plain, pytest.raises(OSError, match="in use") as taken:
            plain.bind(("127.0.0.1", running.port))
        assert taken.value.errno == errno.EADDRINUSE
        client = await signed_in(nursery, running.url, token_for("alice"))
        await client.ws.aclose()
        await client.stream.aclose()
        nursery.cancel_scope.cancel()


# -- `callgate serve --workers 2`, a real process on the real Redis ----------------------------


class Output:
    """The stderr of `serve --workers` (the parent's lines and every worker's), read as it
    comes, so that no writer ever blocks on a full pipe."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.garbled: list[bytes] = []
        self.ended = False
        self._more = trio.Event()

    async def read(self, process: trio.Process) -> None:
        assert process.stderr is not None
        buffer = b""
        while chunk := await process.stderr.receive_some(65536):
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    self.garbled.append(line)  # two processes' lines run together?
            self._more.set()
            self._more = trio.Event()
        self.ended = True  # every process that held the pipe has exited
        self._more.set()

    async def find(self, event: str, **fields: Any) -> dict[str, Any]:
        """The first line of `event` with these fields, once it is written."""
        with trio.fail_after(30):
            while True:
                for line in self.lines:
                    if line.get("event") == event and all(
                        line.get(key) == value for key, value in fields.items()
                    ):
                        return line
                assert not self.ended, (event, fields, self.lines, self.garbled)
                await self._more.wait()

    async def end(self) -> None:
        """Every process that held the pipe has exited, and every line was whole JSON."""
        with trio.fail_after(STEP):
            while not self.ended:
                await self._more.wait()
        assert self.garbled == []


@asynccontextmanager
async def serve_workers(
    tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[tuple[trio.Process, Output, dict[str, Any]]]:
    """`callgate serve --workers 2` on port 0, in a cluster of its own; the process, its
    output, and the parent's `workers listening` line. Its Redis keys are removed after."""
    require_redis(REDIS_URL)
    name = f"test-{secrets.token_hex(4)}"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CALLGATE_CLUSTER_ENABLED": "true",
        "CALLGATE_CLUSTER_REDIS_URL": REDIS_URL,
        "CALLGATE_CLUSTER_NAME": name,
        "CALLGATE_CLUSTER_KEY": CLUSTER_KEY,
        "CALLGATE_CLUSTER_NODE_NAME": "box",
        "CALLGATE_CLUSTER_HEARTBEAT_INTERVAL": "0.2",
        "CALLGATE_CLUSTER_NODE_TIMEOUT": "1.0",
    }
    config = server_config(tmp_path)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "callgate", "serve", "--config", str(config), "--workers", "2"],
        stderr=subprocess.PIPE,
        env=env,
    )
    output = Output()
    nursery.start_soon(output.read, process)
    try:
        yield process, output, await output.find("workers listening")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        delete_cluster_keys(REDIS_URL, name)


async def ready(metrics: str) -> str:
    """`/readyz` of a worker's metrics port: `ready` once it has caught up with the cluster."""

    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{metrics}/readyz", timeout=STEP) as response:  # noqa: S310
                return response.status, response.read().decode()
        except urllib.error.HTTPError as refused:
            return refused.code, ""

    with trio.fail_after(STEP):
        while True:
            status, body = await trio.to_thread.run_sync(get)
            if status == 200:
                return body
            await trio.sleep(0.05)


def connections_of(trail: Path) -> set[str]:
    """The connections a worker took, from its audit trail (`conn.open` comes before `session`)."""
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    return {record["conn"] for record in records if record["event"] == "conn.open"}


async def test_two_workers_share_one_port_carry_a_call_and_stop_on_sigterm(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with serve_workers(tmp_path, nursery) as (process, output, listening):
        url, workers = listening["url"], listening["workers"]
        # Port 0: the parent chose one port, and both workers listen on it.
        port = urlsplit(url).port
        assert port
        for index in (0, 1):
            line = await output.find("listening", worker=index)
            assert line["url"] == url
            assert line["audit"] == f"{tmp_path / 'audit.log'}.w{index}"
        assert [worker["node"] for worker in workers] == ["box-w0", "box-w1"]
        assert len({worker["pid"] for worker in workers}) == 2
        assert len({worker["metrics"] for worker in workers}) == 2
        for worker in workers:
            assert await ready(worker["metrics"]) == "ready\n"

        users = [f"u{number}" for number in range(20)]
        clients = {user: await signed_in(nursery, url, token_for(user)) for user in users}
        taken = [connections_of(tmp_path / f"audit.log.w{index}") for index in (0, 1)]
        worker_of = {user: int(client.conn in taken[1]) for user, client in clients.items()}
        assert all(client.conn in taken[worker_of[user]] for user, client in clients.items())
        assert not taken[0] & taken[1]
        # The kernel spreads connections: 20 on one worker would be 1 chance in 500,000.
        caller = next(user for user in users if worker_of[user] == 0)
        callee = next(user for user in users if worker_of[user] == 1)
        await a_call(clients[caller], clients[callee], caller, callee)

        process.send_signal(signal.SIGTERM)
        for client in clients.values():
            await client.expect_closed(1001)
            await client.stream.aclose()
        with trio.fail_after(STEP):
            assert await process.wait() == 0
        await output.end()  # no worker is left holding the parent's stderr
        for index in (0, 1):
            await output.find("stopped", worker=index)
        await output.find("every worker stopped")

    # Two trails, one per worker, each intact and signed to its last record.
    trails = sorted(tmp_path.glob("audit.log*"))
    assert [path.name for path in trails] == ["audit.log.w0", "audit.log.w1"]
    verdicts = verify_each(
        trails,
        public_keys=[AUDIT_PUBLIC_KEY],
        hmac_key=AUDIT_KEY,
        anchors=[tmp_path / "anchor" / "audit.anchor"],  # shared: each line names its trail
    )
    assert [verdict.problems for verdict in verdicts] == [[], []]
    assert len({verdict.trail for verdict in verdicts}) == 2


async def a_call(caller: Client, callee: Client, caller_user: str, callee_user: str) -> None:
    """A whole call between two clients: request, answer, ICE both ways, hang-up."""
    await caller.send("call-request", call_request("w-call", caller_user, callee_user))
    await callee.expect("call-request", id="w-call", **{"from": caller_user})
    answer = {"type": "answer", "sdp": "v=0"}
    await callee.send("call-answer", {"callId": "w-call", "to": caller_user, "answer": answer})
    await caller.expect("call-answer", callId="w-call", **{"from": callee_user})
    for sender, receiver, to in ((caller, callee, callee_user), (callee, caller, caller_user)):
        await sender.send("ice-candidate", {"callId": "w-call", "to": to, "candidate": CANDIDATE})
        await receiver.expect("ice-candidate", callId="w-call")
    await callee.send("call-end", {"callId": "w-call", "to": caller_user})
    await caller.expect("call-end", callId="w-call", **{"from": callee_user})


async def test_a_dead_worker_is_restarted_and_workers_outlive_no_supervisor(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with serve_workers(tmp_path, nursery) as (process, output, listening):
        doomed = listening["workers"][1]
        os.kill(doomed["pid"], signal.SIGKILL)
        died = await output.find("worker exited; restarting it", worker=1)
        assert (died["pid"], died["exit"]) == (doomed["pid"], "SIGKILL")
        again = await output.find("worker restarted", worker=1)
        assert again["pid"] != doomed["pid"] and again["url"] == listening["url"]
        assert again["node"] == "box-w1"
        assert await ready(again["metrics"]) == "ready\n"
        client = await signed_in(nursery, listening["url"], token_for("alice"))

        # The supervisor killed outright: both workers drain on their own and exit.
        process.kill()
        await process.wait()
        for index in (0, 1):
            await output.find("the supervisor is gone: draining as on SIGTERM", worker=index)
        await client.expect_closed(1001)
        await client.stream.aclose()
        await output.end()
        for index in (0, 1):
            await output.find("stopped", worker=index)
