"""bench/run: callgate and the Socket.IO reference, side by side, on this machine, in one run.

callgate runs as a user runs it: the `callgate` command of a `pip install .` (bench/install.py,
which bench/run calls first), `callgate serve --config config/callgate.toml` with the shipped
file unchanged, and only the limits of bench/raised-limits.toml raised, through their environment
overrides, plus what every deployment sets (its own token secret and audit key, the audit file).
Its listening line must report the compiled hot path, or the run stops (--any-hot-path: the test
suite's smoke run, which uses the development build as it stands).

Each workload starts a fresh server pinned to one core (`taskset -c 1`) and a load generator pinned
to another (`taskset -c 0`), both on loopback. The server's CPU time (user + system, from
/proc/PID/stat) is sampled when the generator starts and ends its measured phase; its memory
(VmRSS) before the storm and once every client is connected and idle. Results go to
bench/results/latest.jsonl (one line per server and workload) and bench/results/latest.md.

--cluster instead measures scale-out under one fixed load (cluster_plan): one node with cluster
mode off, clusters of --nodes nodes on Redis with every callee on another node than its caller,
three nodes with one of them outside the traffic, and `serve --workers N`; nodes are configured
only through the shipped config's [cluster] keys, and no process is pinned. Per node: CPU per
message, memory with idle clients spread over the nodes; then the targets as ratios, PASS/FAIL.
Results go to bench/results/cluster.{jsonl,md}.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import platform
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).parent
ROOT = BENCH.parent
# The configuration a user starts from, unchanged, and the bench's overrides of its limits.
SHIPPED_CONFIG = ROOT / "config" / "callgate.toml"
RAISED_LIMITS = BENCH / "raised-limits.toml"
SECRET = "bench-secret-that-is-long-enough-for-hs256-keys"  # noqa: S105 - loopback benchmark only
AUDIT_KEY = "bench-audit-key-that-is-at-least-32-bytes"
TICK = os.sysconf("SC_CLK_TCK")
SERVER_CORE, LOADGEN_CORE = "1", "0"
# callgate as shipped (the wsproto engine) and the reference; --trio-websocket adds the other
# engine, selected by its one setting.
TARGETS = ("reference", "callgate")
TRIO_WEBSOCKET = "callgate-trio-websocket"
# Each callgate column of the table, and its ratio column.
COLUMNS = {
    "callgate": ("callgate (wsproto, as shipped)", "ratio"),
    TRIO_WEBSOCKET: ("callgate (trio-websocket)", "ratio trio-websocket"),
}
# --cluster: one node with cluster mode off, then clusters of --nodes nodes on Redis (every callee
# on another node than its caller), a cluster with a node outside the traffic, and --workers;
# K idle clients spread over the nodes.
CLUSTER_NODES = "1,2,4"
CLUSTER_IDLE = 4_000
CLUSTER_RATE = 2_000
# A run where the machine was this busy (every process on every core) measured nodes that waited
# for a core: they read more per wake-up, so their CPU per message is lower than it would be.
SATURATED = 90  # percent
REDIS_URL = os.environ.get("CALLGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


Row = dict[str, Any]  # one run of one workload on one server (or cluster): a line of NAME.jsonl


class BenchError(Exception):
    """The run cannot measure what it claims to (a server that will not start, the wrong build)."""


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    config: dict[str, Any]


def scaling(smoke: bool) -> list[Workload]:
    """W5, the scaling curve: W2 at 2,000 msg/s with 1k, 10k and the most idle clients allowed."""
    sizes = [20] if smoke else [1_000, 10_000, big_storm_size() - 1_000]
    rate, seconds = (200, 0.5) if smoke else (2_000, 5)
    return [
        Workload(
            "W5",
            f"2,000 msg/s with {idle:,} idle clients" if not smoke else "scaling smoke",
            {
                "idle": idle,
                "pairs": 50 if not smoke else 2,
                "rate": rate,
                "seconds": seconds,
                "limit_s": 300,
            },
        )
        for idle in sizes
    ]


def cluster_plan(smoke: bool, rate: int = CLUSTER_RATE) -> Workload:
    """The cluster run's one fixed load: W2's sparse forwarding at `rate` (the targets' 2,000
    msg/s unless asked), every callee on another node than its caller, while K idle clients are
    spread evenly over the nodes (W5's shape). Each run ends once every message sent has
    arrived (at most drain_s later)."""
    if smoke:
        config = {"pairs": 4, "rate": 200, "seconds": 0.5, "idle": 24, "settle_ms": 100}
        return Workload("W5", "cross-node smoke", config | {"drain_s": 2})
    config = {"pairs": 50, "rate": rate, "seconds": 10, "idle": CLUSTER_IDLE, "settle_ms": 1000}
    label = f"{rate:,} msg/s cross-node, {CLUSTER_IDLE:,} idle clients"
    return Workload("W5", label, config | {"drain_s": 10})


def plan(smoke: bool, big: bool) -> list[Workload]:
    if smoke:  # seconds in all: proves the machinery works, measures nothing
        return [
            Workload("W1", "saturated forwarding", {"pairs": 2, "window": 4, "seconds": 0.5}),
            Workload("W2", "sparse forwarding 200/s", {"pairs": 2, "rate": 200, "seconds": 0.5}),
            Workload("W3", "connect storm, 50 clients", {"clients": 50, "idle_ms": 200}),
            Workload("W4", "call setup", {"pairs": 2, "calls": 5}),
        ]
    workloads = [
        Workload(
            "W1",
            "saturated forwarding, 50 pairs x 32 in flight",
            {"pairs": 50, "window": 32, "seconds": 5},
        ),
        Workload("W2", "sparse forwarding, 2,000 msg/s", {"pairs": 50, "rate": 2000, "seconds": 5}),
        Workload(
            "W2", "sparse forwarding, 10,000 msg/s", {"pairs": 50, "rate": 10000, "seconds": 5}
        ),
        Workload("W3", "connect storm, 10,000 clients", {"clients": 10000}),
        Workload("W4", "call setup, 3 KB SDP", {"pairs": 50, "calls": 40}),
    ]
    if big:
        clients = big_storm_size()
        label = f"connect storm, {clients:,} clients" + (
            "" if clients == 50_000 else " (this machine's per-process file limit)"
        )
        workloads.append(Workload("W3", label, {"clients": clients, "limit_s": 300}))
    return workloads


def cpu_times(pid: int) -> tuple[float, float]:
    """Seconds of CPU (user + system), and of them in the kernel (system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user, system = int(fields[11]), int(fields[12])  # utime, stime
    return (user + system) / TICK, system / TICK


def cpu_seconds(pid: int) -> float:
    return cpu_times(pid)[0]


def wakeups(pid: int) -> int:
    """How often the process's main thread (its event loop) went to sleep and was woken."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all the machine's cores since boot, whoever used them."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle, iowait = fields[3], fields[4]  # user nice system idle iowait irq softirq steal
    return sum(fields) - idle - iowait, sum(fields)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _raise_fd_limit() -> None:
    """As many file descriptors as the machine lets a process have (its hard limit)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def big_storm_size() -> int:
    """50,000 clients, or as many as one process may hold open here (some machines cap it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 50_000 if hard == resource.RLIM_INFINITY else min(50_000, hard - 1_000)


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now: runs of the bench (the test suite's smoke
    run among them, in other trees) share the machine, so no fixed range is safe."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pinned(core: str | None, command: list[str]) -> list[str]:
    """`command` on one core (None: wherever the scheduler puts it)."""
    return ["taskset", "-c", core, *command] if core and shutil.which("taskset") else command


def overrides(path: Path = RAISED_LIMITS) -> dict[str, str]:
    """A TOML overlay of the shipped config as the CALLGATE_<SECTION>_<KEY> variables that apply
    it. Each key must be one the shipped file sets: callgate ignores a variable it does not know,
    so a misspelt key would leave its limit as shipped without a word."""
    with SHIPPED_CONFIG.open("rb") as handle:
        shipped = tomllib.load(handle)
    with path.open("rb") as handle:
        overlay = tomllib.load(handle)
    variables = {}
    for section, values in overlay.items():
        for key, value in values.items():
            if key not in shipped.get(section, {}):
                raise BenchError(f"{path}: [{section}] {key} is not a key of {SHIPPED_CONFIG}")
            name = f"CALLGATE_{section}_{key}".upper()
            if isinstance(value, bool):
                variables[name] = "true" if value else "false"
            elif isinstance(value, list):
                variables[name] = json.dumps(value)
            else:
                variables[name] = str(value)
    return variables


@dataclass(frozen=True)
class Callgate:
    """The callgate under test: the command that runs it, and the hot path it must report."""

    command: list[str]
    hot_path: str | None  # None: any (the smoke run)
    overlay: dict[str, str]  # overrides(): the raised limits

    def environment(self, port: int, workdir: Path) -> dict[str, str]:
        """The shipped config's overrides for one server: nothing but the raised limits and what
        every deployment sets. No CALLGATE_ variable of the caller's leaks in (CALLGATE_PURE=1
        excepted: it measures the same build interpreted)."""
        inherited = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CALLGATE_") or k == "CALLGATE_PURE"
        }
        return {
            **inherited,
            **self.overlay,
            "CALLGATE_AUTH_SECRET": SECRET,  # the load generator signs its tokens with it
            "CALLGATE_AUDIT_KEY": AUDIT_KEY,
            # A file of its own: a port may come back later in the run, a trail must not.
            "CALLGATE_AUDIT_PATH": str(workdir / f"audit-{port}-{secrets.token_hex(4)}.log"),
            # Metrics stay on; on a port of their own per server, not the shipped 9464 that any
            # other callgate on the machine may hold.
            "CALLGATE_METRICS_PORT": "0",
        }


class Server:
    """One server process (a callgate node, or the reference), started and listening.

    `serve_args` go after `callgate serve ...` (`--workers 2`); `listeners` is how many listening
    lines to wait for (one per worker process); `core` the core it is pinned to (None: none).
    `wait=False` returns at once: call `wait_until_listening()` before use (start_cluster starts
    its nodes side by side).
    """

    def __init__(
        self,
        target: str,
        port: int,
        workdir: Path,
        callgate: Callgate,
        extra_env: dict[str, str] | None = None,
        *,
        serve_args: tuple[str, ...] = (),
        listeners: int = 1,
        core: str | None = SERVER_CORE,
        wait: bool = True,
    ) -> None:
        self.target = target
        self.port = port
        self.hot_path: str | None = None
        self.expected_hot_path = callgate.hot_path
        self.listeners = listeners
        if target == "reference":
            command = ["node", str(BENCH / "reference" / "server.mjs"), str(port)]
            env = dict(os.environ)
            self.ready = "listening"
        else:
            command = [
                *callgate.command,
                "serve",
                "--config",
                str(SHIPPED_CONFIG),
                "--port",
                str(port),
                *serve_args,
            ]
            env = callgate.environment(port, workdir) | (extra_env or {})
            if target == TRIO_WEBSOCKET:
                env["CALLGATE_SERVER_ENGINE"] = "trio-websocket"
            self.ready = '"listening"'
        self.output: collections.deque[str] = collections.deque(maxlen=50)
        self.listening: list[str] = []
        self.ended = False
        self.changed = threading.Condition()
        self.process = subprocess.Popen(  # noqa: S603 - our own commands
            pinned(core, command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            preexec_fn=_raise_fd_limit,
        )
        # Read what the server logs from the start, so a full pipe never blocks it mid-run and a
        # silent server cannot block the wait below.
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()
        if wait:
            self.wait_until_listening()

    def wait_until_listening(self) -> None:
        """Raises BenchError (after stopping the server) unless it listens within 30 s with the
        hot path it must report."""
        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_until_listening(self) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.listening or self.ended, timeout=30)
            if not self.listening:
                if self.ended:
                    raise BenchError(f"{self.target} exited before listening: {self.log()}")
                raise BenchError(f"{self.target} did not listen within 30 s: {self.log()}")
            # Worker processes each say they listen; a few seconds for the others.
            self.changed.wait_for(
                lambda: len(self.listening) >= self.listeners or self.ended, timeout=10
            )
            if self.ended:
                raise BenchError(f"{self.target} exited after it listened: {self.log()}")
            line = self.listening[0]
        if self.target == "reference":
            return
        self.hot_path = json.loads(line).get("hot_path")
        hot_path = self.expected_hot_path
        if hot_path is not None and self.hot_path != hot_path:
            raise BenchError(
                f"{self.target} runs the hot path {self.hot_path!r}, not {hot_path!r}: this"
                " is not the build the bench measures. bench/run installs it with"
                f" bench/install.py; its listening line: {line.strip()}"
            )

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.output.append(line)
                if self.ready in line:
                    self.listening.append(line)
                    self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def log(self) -> str:
        return "".join(self.output)[-3000:]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}" + ("" if self.target == "reference" else "/ws")

    def stop(self) -> None:
        # Worker processes of `--workers` end with their parent; any left after it are killed.
        children = [(pid, started(pid)) for pid in process_tree(self.process.pid)[1:]]
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pid, when in children:
            if when is not None and started(pid) == when:
                with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                    os.kill(pid, signal.SIGKILL)
        self.drain.join(5)  # the pipe is at its end once the processes are gone
        assert self.process.stdout is not None
        self.process.stdout.close()


def started(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None if it is gone: with the pid, it
    names one process (a pid is reused)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_tree(root: int) -> list[int]:
    """`root` and every process under it (a server of `--workers` processes), root first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return tree


@dataclass(frozen=True)
class Layout:
    """One column of the cluster run: the processes, and where the load generator's clients go."""

    target: str  # the rows' name for it
    title: str  # its column in the table
    nodes: int  # node processes started (1 without cluster mode)
    cluster: bool  # [cluster] enabled
    traffic_nodes: int  # the traffic's pairs go round the first this many nodes
    workers: int = 1  # `callgate serve --workers N` (one process started, N listening)

    @property
    def idle_nodes(self) -> int:
        """The workload's idle clients go round the first this many nodes: every node, but in
        a cluster with a node outside the traffic only the traffic's (the others hold none)."""
        return self.traffic_nodes


ONE_NODE = "one-node"
IDLE_NODE = "idle-node"


def cluster_layouts(nodes: list[int], workers: int) -> list[Layout]:
    """One node with cluster mode off, then a cluster of each size in `nodes`, then three nodes
    with the traffic on two (the idle-node share), then `--workers` if asked for (0: not)."""
    layouts = [Layout(ONE_NODE, "one node, cluster off", 1, False, 1)]
    layouts += [
        Layout(f"cluster-{n}", f"cluster, {n} node{'s' if n > 1 else ''}", n, True, n)
        for n in nodes
    ]
    # The node with no client in the traffic holds no client at all: its CPU is what the
    # traffic of the others costs it (and its own heartbeats), not pings to idle clients, and its
    # memory what it keeps for the other nodes' clients.
    layouts.append(Layout(IDLE_NODE, "cluster, 3 nodes, traffic on 2", 3, True, 2))
    if workers > 1:
        title = f"`serve --workers {workers}`"
        layouts.append(Layout(f"workers-{workers}", title, 1, True, 1, workers=workers))
    return layouts


def serves_workers(callgate: Callgate) -> bool:
    """Whether this callgate's `serve` has --workers (its `--help` says so)."""
    run = subprocess.run(  # noqa: S603 - our own command
        [*callgate.command, "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "--workers" in run.stdout


def start_cluster(layout: Layout, workdir: Path, callgate: Callgate) -> Cluster:
    """The layout's processes, started side by side; the nodes of a cluster on the Redis at
    REDIS_URL under a fresh name, configured only through the shipped config's [cluster] keys
    (enabled, redis_url, name, key) as environment overrides. Pinned to no core: four nodes of
    the replicated design need more than one core at the cluster run's load, and the workers of
    `--workers` are there to use several."""
    first_port = free_port()
    name = f"bench-{first_port}-{secrets.token_hex(4)}"  # in no other name, not even a later run's
    env = (
        {
            "CALLGATE_CLUSTER_ENABLED": "true",
            "CALLGATE_CLUSTER_REDIS_URL": REDIS_URL,
            "CALLGATE_CLUSTER_NAME": name,
            "CALLGATE_CLUSTER_KEY": SECRET,
        }
        if layout.cluster
        else {}
    )
    extra = ("--workers", str(layout.workers)) if layout.workers > 1 else ()
    servers: list[Server] = []
    try:
        # One at a time, each port picked just before its node starts: a node's link listener
        # binds a port of the kernel's choosing as it starts, which could be the port picked
        # for a node not started yet.
        for index in range(layout.nodes):
            server = Server(
                layout.target,
                first_port if index == 0 else free_port(),
                workdir,
                callgate,
                env,
                serve_args=extra,
                listeners=layout.workers,
                core=None,
                wait=False,
            )
            servers.append(server)
            server.wait_until_listening()
    except BaseException:
        for server in servers:
            server.stop()
        if layout.cluster:
            drop_cluster(name)
        raise
    return Cluster(layout, servers, name if layout.cluster else None)


@dataclass(frozen=True)
class Cluster:
    layout: Layout
    servers: list[Server]
    name: str | None  # of the cluster in Redis; None with cluster mode off

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        if self.name is not None:
            drop_cluster(self.name)


def starts(callgate: Callgate, workdir: Path) -> bool:
    """The build and the config, tried with one start before minutes of workloads."""
    try:
        Server("callgate", free_port(), workdir, callgate).stop()
    except BenchError as error:
        print(f"bench/run: FAILED: {error}", file=sys.stderr)
        return False
    return True


def drop_cluster(name: str) -> None:
    """Delete every Redis key of the throw-away cluster `name`.

    Self-contained on purpose (redis-py's SCAN and DEL, nothing of callgate.cluster): the
    cluster's code and its key layout change, while its name stays in every key, as a prefix
    `name:` or a hash tag `{name}`. The bench's names end in a random part, so no other
    cluster's key matches `*name*`.
    """
    import redis  # only the cluster run needs Redis

    pattern = "*" + "".join(f"\\{c}" if c in "*?[]\\" else c for c in name) + "*"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


class Processes:
    """The CPU time and memory of each process of a server, or of each node of a cluster."""

    def __init__(self, servers: list[Server]) -> None:
        self.pids = [pid for server in servers for pid in process_tree(server.process.pid)]

    def cpu(self) -> list[float]:
        return [cpu_seconds(pid) for pid in self.pids]

    def rss(self) -> list[int]:
        return [rss_kib(pid) for pid in self.pids]

    def kernel(self) -> tuple[float, int]:
        """Seconds in the kernel and wake-ups, all processes together."""
        return sum(cpu_times(p)[1] for p in self.pids), sum(wakeups(p) for p in self.pids)


def run_workload(
    servers: list[Server],
    workload: Workload,
    layout: Layout | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    """One run of the load generator against `servers`; with a cluster `layout`, its clients go
    where the layout says and the result has per-node figures too. With `profile`, py-spy
    samples each server process during the measured traffic only (not the sign-ins before it),
    into raw flame-graph files there."""
    server = servers[0]
    config = {
        "target": "reference" if server.target == "reference" else "callgate",
        "url": server.url,
        "secret": SECRET,
        "workload": workload.name,
        **workload.config,
    }
    if layout is not None:
        config["urls"] = [s.url for s in servers]
        config["traffic_nodes"] = layout.traffic_nodes
        config["idle_nodes"] = layout.idle_nodes
    measure = Processes(servers)
    generator = subprocess.Popen(  # noqa: S603
        pinned(
            None if layout else LOADGEN_CORE,
            ["node", str(BENCH / "loadgen" / "loadgen.mjs"), json.dumps(config)],
        ),
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_raise_fd_limit,
    )
    assert generator.stdout is not None
    measured: dict[str, Any] = {}
    profilers: list[subprocess.Popen[bytes]] = []
    rss_before = measure.rss()
    for line in generator.stdout:
        message = json.loads(line)
        phase = message.get("phase")
        if phase == "start":
            if profile is not None:
                profilers = start_profilers(measure.pids, workload, profile, layout)
            measured["cpu_start"], measured["rss_start"] = measure.cpu(), measure.rss()
            measured["kernel_start"] = measure.kernel()
            measured["wall_start"], measured["machine_start"] = time.monotonic(), machine_ticks()
        elif phase == "end":
            measured["cpu_end"] = measure.cpu()
            measured["kernel_end"] = measure.kernel()
            measured["wall_end"], measured["machine_end"] = time.monotonic(), machine_ticks()
        elif phase == "idle":
            measured["rss_idle"] = measure.rss()
        elif "result" in message or "error" in message:
            measured.update(message)
    generator.wait(30)
    for profiler in profilers:
        try:
            profiler.wait(30)
        except subprocess.TimeoutExpired:
            profiler.kill()  # a profile is a side product: never left running
    result: dict[str, Any] = dict(measured.get("result") or {})
    if "error" in measured:
        result["error"] = measured["error"]
    starts, ends = measured.get("cpu_start"), measured.get("cpu_end")
    node_cpu = [e - s for s, e in zip(starts, ends, strict=True)] if starts and ends else []
    cpu = sum(node_cpu)
    result["server_cpu_s"] = round(cpu, 4)
    units = result.get("messages") or result.get("connections") or result.get("calls")
    if units:
        per = "conn" if "connections" in result else "call" if "calls" in result else "msg"
        result[f"cpu_us_per_{per}"] = round(cpu * 1e6 / units, 2)
        if "kernel_end" in measured and cpu > 0:
            (sys_start, woke_start), (sys_end, woke_end) = (
                measured["kernel_start"],
                measured["kernel_end"],
            )
            result["kernel_share"] = round((sys_end - sys_start) / cpu, 3)
            result[f"wakeups_per_{per}"] = round((woke_end - woke_start) / units, 2)
    rss_idle = measured.get("rss_idle")
    if rss_idle and result.get("connections"):
        grown = sum(rss_idle) - sum(measured.get("rss_start", rss_before))
        result["kib_per_idle_conn"] = round(grown / result["connections"], 2)
        result["server_rss_kib"] = sum(rss_idle)
    if rss_idle and "idle" in result:
        result["server_rss_mib"] = round(sum(rss_idle) / 1024, 1)
    if layout is not None:
        result["processes"] = len(measure.pids)
        if "wall_end" in measured:
            result["server_cores"] = round(cpu / (measured["wall_end"] - measured["wall_start"]), 2)
            # Everything on the machine (the generator, Redis, anyone else's work): near 100%,
            # the nodes wait for a core, take more per read and so spend less per message.
            (busy_start, total_start), (busy_end, total_end) = (
                measured["machine_start"],
                measured["machine_end"],
            )
            if total_end > total_start:
                busy = (busy_end - busy_start) / (total_end - total_start)
                result["machine_busy_pct"] = round(100 * busy, 1)
        if units and node_cpu:
            result["node_cpu_us_per_msg"] = [round(c * 1e6 / units, 2) for c in node_cpu]
            share = outsider_share(node_cpu, layout)
            if share is not None:  # 0.0 too: a node outside the traffic may spend nothing
                result["idle_share"] = share
        if rss_idle:
            result["node_rss_mib"] = [round(kib / 1024, 1) for kib in rss_idle]
            grown = [after - before for before, after in zip(rss_before, rss_idle, strict=True)]
            if result.get("idle") and layout.idle_nodes == layout.nodes:
                # Every node's growth over the clients of the whole cluster: a node that holds
                # only its own connections grows by K/N of them, so this stays flat in N; a node
                # that holds every user grows by K, and this grows with N.
                result["kib_per_client"] = round(sum(grown) / result["idle"], 2)
            if result.get("idle") and (share := outsider_share(grown, layout)):
                # What a node keeps for the other nodes' clients, against a node that holds them.
                result["idle_memory_share"] = share
    return result


def start_profilers(
    pids: list[int], workload: Workload, folder: Path, layout: Layout | None
) -> list[subprocess.Popen[bytes]]:
    """py-spy on each process for the traffic's seconds (`--gil`: only what holds the GIL, so
    waiting for the network is left out); `pip install py-spy` first, it is not a dependency."""
    spy = shutil.which("py-spy") or "py-spy"  # (main checked that it is there)
    folder.mkdir(parents=True, exist_ok=True)
    seconds = max(1, int(workload.config.get("seconds", 10)) - 1)
    name = layout.target if layout is not None else workload.name
    return [
        subprocess.Popen(  # noqa: S603
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(seconds),
                "--gil",
                "--rate",
                "400",
                "--format",
                "raw",
                "--output",
                str(folder / f"{name}-{index}-{int(time.time())}.raw"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for index, pid in enumerate(pids)
    ]


def outsider_share(figures: Sequence[float], layout: Layout) -> float | None:
    """The most any node outside the traffic (and holding no client) spent, as a fraction of the
    mean of the traffic's nodes; None unless the layout has such a node."""
    busy, outside = figures[: layout.traffic_nodes], figures[layout.traffic_nodes :]
    if not outside or layout.workers > 1 or sum(busy) <= 0:
        return None
    return round(max(0, max(outside)) / (sum(busy) / len(busy)), 4)


METRICS = [
    ("rate", "msg/s or conn/s"),
    ("cpu_us_per_msg", "server CPU µs/msg"),
    ("cpu_us_per_conn", "server CPU µs/conn"),
    ("cpu_us_per_call", "server CPU µs/call"),
    ("kib_per_idle_conn", "KiB per idle conn"),
    ("server_rss_mib", "server memory MiB"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
]


def table(rows: list[dict[str, Any]]) -> str:
    """callgate (on each engine measured) and the reference side by side, with ratios."""
    present = {row["target"] for row in rows}
    ours = [target for target in COLUMNS if target in present]
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["workload"], row["label"]), {})[row["target"]] = row["result"]
    titles = [COLUMNS[t][0] for t in ours] + ["reference"] + [COLUMNS[t][1] for t in ours]
    lines = [
        "| workload | metric | " + " | ".join(titles) + " |",
        "|---|---|" + "---:|" * (2 * len(ours) + 1),
    ]
    for (name, label), results in by_key.items():
        theirs = results.get("reference", {})
        for key, title in METRICS:
            if not any(key in r for r in results.values()):
                continue
            values = [results.get(t, {}).get(key) for t in ours]
            cells = [_fmt(v) for v in values] + [_fmt(theirs.get(key))]
            cells += [_ratio(v, theirs.get(key)) for v in values]
            lines.append(f"| {name} {label} | {title} | " + " | ".join(cells) + " |")
        for target, result in results.items():
            if "error" in result:
                blank = " |" * (2 * len(ours))
                lines.append(f"| {name} {label} | error ({target}) | {result['error']} |{blank}")
    return "\n".join(lines)


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per workload and server: the median of each figure over the repeated runs."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["workload"], row["label"], row["target"]), []).append(row)
    merged = []
    for (name, label, target), runs in groups.items():
        results = [run["result"] for run in runs]
        result: dict[str, Any] = {"runs": len(runs)}
        for key in results[0]:
            values = [r[key] for r in results if isinstance(r.get(key), int | float)]
            if values:
                result[key] = statistics.median(values)
            lists = [r[key] for r in results if isinstance(r.get(key), list)]
            if lists and len({len(v) for v in lists}) == 1:  # per node: node by node
                result[key] = [statistics.median(v) for v in zip(*lists, strict=True)]
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            result["error"] = errors[0]
        merged.append({"workload": name, "label": label, "target": target, "result": result})
    return merged


# The cluster run's table: (result key, row title); per-node keys hold one figure per node.
CLUSTER_METRICS = [
    ("processes", "node processes"),
    ("delivered", "messages delivered / sent"),
    ("cpu_us_per_msg", "server CPU µs/msg, all nodes together"),
    ("server_cores", "cores busy with the nodes during the traffic"),
    ("machine_busy_pct", "machine busy %, all processes and cores (saturated from 90)"),
    ("node_cpu_us_per_msg", "server CPU µs/msg, per node"),
    ("kernel_share", "share of that CPU spent in the kernel"),
    ("wakeups_per_msg", "event-loop wake-ups per message, all nodes together"),
    ("idle_share", "CPU of the node with no client in the traffic / a busy node's"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("node_rss_mib", "memory per node MiB, idle clients spread over the nodes"),
    ("kib_per_client", "memory KiB per idle client, all nodes together"),
    ("idle_memory_share", "memory grown on the node with no client / on a node with half"),
]


@dataclass(frozen=True)
class Target:
    """A target of the cluster run: the ratio of one figure of one column to another's."""

    what: str
    key: str
    ours: str  # target (column) measured
    theirs: str | None  # the column it is divided by; None: the figure is a ratio already
    limit: float
    traffic: bool = True  # measured during the traffic (a saturated machine distorts it)


def cluster_targets(rate: str) -> list[Target]:
    """docs/performance.md, "Across nodes": what the routing design must show, all in one run."""
    return [
        Target(
            "total CPU per cross-node message, 4 nodes / 2 nodes",
            "cpu_us_per_msg",
            "cluster-4",
            "cluster-2",
            1.15,
        ),
        Target(
            "CPU of a node with no client in the traffic / a busy node's",
            "idle_share",
            IDLE_NODE,
            None,
            0.10,
        ),
        Target(
            f"cross-node CPU per message at {rate} msg/s, 2 nodes / one node with cluster off",
            "cpu_us_per_msg",
            "cluster-2",
            ONE_NODE,
            2.0,
        ),
        Target(
            f"cross-node p99 at {rate} msg/s, 2 nodes / one node with cluster off",
            "p99_ms",
            "cluster-2",
            ONE_NODE,
            2.0,
        ),
        # Memory grows with a node's own connections, not the cluster's. Per client, all nodes
        # together: c + N r with c a node's cost per own connection and r what every node keeps
        # per user of the cluster, so 4 nodes / 2 = (c + 4r) / (c + 2r): 1 when r = 0, and 1.05
        # lets r be 2.5% of c. RSS is steady here (the replicated design measured 1.10-1.11 in
        # five runs).
        Target(
            "memory per idle client, all nodes together, 4 nodes / 2 nodes",
            "kib_per_client",
            "cluster-4",
            "cluster-2",
            1.05,
            traffic=False,
        ),
        # The same seen directly: K clients on two nodes, memory grown on the third (K r) over
        # that of one of the two (K c / 2 + K r).
        Target(
            "memory grown on a node with no client / on a node with half of them",
            "idle_memory_share",
            IDLE_NODE,
            None,
            0.05,
            traffic=False,
        ),
    ]


def cluster_table(rows: list[dict[str, Any]], layouts: list[Layout], rate: str) -> str:
    """Every layout side by side (medians of the runs in `rows`), then the targets as ratios
    of those medians with PASS/FAIL, and, when the run was repeated, each round's own ratio:
    this machine moves between runs by about as much as the targets' margins, so a reader
    sees the spread, not only its middle."""
    rounds: dict[str, list[dict[str, Any]]] = {}
    for row in rows:  # in the order run: a column's k-th row is from round k
        rounds.setdefault(row["target"], []).append(row["result"])
    results = {row["target"]: row["result"] for row in medians(rows)}
    for result in results.values():
        if "messages" in result and "sent" in result:
            result["delivered"] = f"{_fmt(result['messages'])} / {_fmt(result['sent'])}"
    columns = [layout for layout in layouts if layout.target in results]
    lines = [
        "| metric | " + " | ".join(layout.title for layout in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for key, title in CLUSTER_METRICS:
        cells = [results[layout.target].get(key) for layout in columns]
        if any(cell is not None for cell in cells):
            lines.append(f"| {title} | " + " | ".join(_fmt(cell) for cell in cells) + " |")
    for layout in columns:
        if "error" in results[layout.target]:
            lines.append(f"| error ({layout.title}) | {results[layout.target]['error']} |")
    lines += [
        "",
        "| target | measured | each round | limit | result | caveat |",
        "|---|---:|---:|---:|---|---|",
    ]
    titles = {layout.target: layout.title for layout in columns}
    for target in cluster_targets(rate):
        ours = results.get(target.ours, {}).get(target.key)
        theirs = 1 if target.theirs is None else results.get(target.theirs, {}).get(target.key)
        numbers = isinstance(ours, int | float) and isinstance(theirs, int | float) and theirs
        if numbers:
            ratio = ours / theirs
            verdict = "PASS" if ratio <= target.limit else "FAIL"
            measured = f"{ratio:.2f}x" if target.theirs else f"{ratio:.2f}"
        else:
            verdict, measured = "not measured", "-"
        each = ", ".join(f"{ratio:.2f}" for ratio in round_ratios(rounds, target))
        limit = f"<= {target.limit:.2f}" + ("x" if target.theirs else "")
        saturated = [
            titles[column]
            for column in (target.ours, target.theirs)
            if target.traffic
            and column in titles
            and results[column].get("machine_busy_pct", 0) >= SATURATED
        ]
        caveat = f"machine saturated in: {'; '.join(saturated)}" if saturated else ""
        lines.append(
            f"| {target.what} | {measured} | {each or '-'} | {limit} | {verdict} | {caveat} |"
        )
    return "\n".join(lines)


def round_ratios(rounds: dict[str, list[dict[str, Any]]], target: Target) -> list[float]:
    """`target`'s ratio in each round of a repeated run (none for a single run, or a round
    where either figure is missing)."""
    ours = rounds.get(target.ours, [])
    theirs = rounds.get(target.theirs, []) if target.theirs is not None else [{}] * len(ours)
    if min(len(ours), len(theirs)) < 2:
        return []
    ratios = []
    for mine, other in zip(ours, theirs, strict=False):
        a, b = mine.get(target.key), 1 if target.theirs is None else other.get(target.key)
        if isinstance(a, int | float) and isinstance(b, int | float) and b:
            ratios.append(a / b)
    return ratios


def _ratio(ours: Any, theirs: Any) -> str:
    numbers = isinstance(ours, int | float) and isinstance(theirs, int | float)
    return f"{ours / theirs:.2f}x" if numbers and theirs else "-"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _git(*args: str) -> str:
    run = subprocess.run(  # noqa: S603 - fixed arguments
        ["git", "-C", str(ROOT), *args],  # noqa: S607 - git from PATH, as a developer runs it
        capture_output=True,
        text=True,
        check=False,
    )
    return run.stdout.strip()


def describe_build(callgate: Callgate, rows: list[dict[str, Any]]) -> str:
    """Which callgate ran: the command (bench/.venv's is bench/install.py's `pip install .`), the
    commit it was installed from, and the hot path its servers reported."""
    command = shlex.join(
        os.path.relpath(part) if os.sep in part else part for part in callgate.command
    )
    source = _git("rev-parse", "--short", "HEAD")
    if _git("status", "--porcelain", "--", "src"):
        source += " with uncommitted changes in src/"
    paths = sorted({str(row["hot_path"]) for row in rows if row.get("hot_path")})
    return (
        f"callgate: `{command}` from commit {source or 'unknown'}, hot path"
        f" {', '.join(paths) or 'unknown'}; {os.path.relpath(SHIPPED_CONFIG, ROOT)} as shipped"
        f" with {os.path.relpath(RAISED_LIMITS, ROOT)}."
    )


def node_counts(text: str) -> list[int]:
    """--nodes: cluster sizes, comma-separated ("1,2,4")."""
    try:
        counts = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of node counts: {text!r}") from None
    if not counts or counts[0] < 1 or counts[-1] > 8:
        raise argparse.ArgumentTypeError(f"node counts go from 1 to 8: {text!r}")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: seconds, for CI")
    parser.add_argument("--big", action="store_true", help="also W3 with 50,000 clients")
    parser.add_argument("--only", help="run only this workload (W1..W5; W5 implies --scaling)")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="also W5: 2,000 msg/s with up to 18,000 idle clients (CPU per message, memory)",
    )
    parser.add_argument(
        "--trio-websocket",
        action="store_true",
        help="also callgate on its other engine, trio-websocket (the one setting changed)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="instead: cross-node forwarding on clusters of --nodes nodes on Redis, one node"
        " with cluster mode off, a node outside the traffic, and --workers, side by side",
    )
    parser.add_argument(
        "--nodes",
        type=node_counts,
        default=node_counts(CLUSTER_NODES),
        help=f"--cluster: the cluster sizes measured (default {CLUSTER_NODES})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="--cluster: also `callgate serve --workers N` (default 2; 0: not), skipped with a"
        " note when this callgate's serve has no --workers",
    )
    parser.add_argument(
        "--rate",
        type=int,
        default=CLUSTER_RATE,
        help=f"--cluster: the load's messages a second (default {CLUSTER_RATE:,}, the one the"
        " targets are set at; another rate shows how the ratios move with load)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every workload this many times on every server, in turn; tables show medians",
    )
    parser.add_argument(
        "--callgate",
        default=str(Path(sys.executable).parent / "callgate"),
        help="the command that runs callgate (default: the `callgate` beside this Python;"
        " bench/run passes bench/.venv's, which bench/install.py installs)",
    )
    parser.add_argument(
        "--any-hot-path",
        action="store_true",
        help="accept a callgate that does not run the compiled hot path (the suite's smoke run)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="--cluster: py-spy (not a dependency: pip install it) samples every node during"
        " the measured traffic into raw flame-graph files in this folder",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--name", help="results file name (default: latest, or smoke)")
    args = parser.parse_args()
    if not args.cluster and (args.profile is not None or args.rate != CLUSTER_RATE):
        parser.error("--profile and --rate go with --cluster")
    if args.profile is not None and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy on PATH (pip install py-spy; not a dependency)")
    # CALLGATE_PURE=1 measures the same installed build interpreted; otherwise it must be compiled.
    expected = "forced-pure" if os.environ.get("CALLGATE_PURE") == "1" else "compiled"
    try:
        overlay = overrides()
    except BenchError as error:
        print(f"bench/run: FAILED: {error}", file=sys.stderr)
        return 2
    callgate = Callgate(
        shlex.split(args.callgate), None if args.any_hot_path else expected, overlay
    )
    if not args.callgate.strip() or not shutil.which(callgate.command[0]):
        print(f"bench/run: no callgate command {args.callgate!r} (bench/run installs one)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cluster:
        return run_cluster(args, callgate)
    workloads = plan(args.smoke, args.big)
    if args.scaling or args.only == "W5":
        workloads += scaling(args.smoke)
    workloads = [w for w in workloads if not args.only or w.name == args.only]
    if not workloads:
        print(f"bench/run: no workload named {args.only!r} in this plan")
        return 2
    targets: tuple[str, ...] = TARGETS
    if args.trio_websocket:
        targets = (*targets, TRIO_WEBSOCKET)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as workdir:
        if not starts(callgate, Path(workdir)):
            return 2
        runs = [
            (workload, target)
            for workload in workloads
            # Rounds alternate the servers, so a noisy moment of a shared machine is spread
            # over all of them instead of falling on one.
            for _ in range(args.repeat)
            for target in targets
        ]
        for workload, target in runs:
            try:
                server = Server(target, free_port(), Path(workdir), callgate)
            except BenchError as error:
                print(f"bench/run: FAILED: {error}", file=sys.stderr)
                return 2
            try:
                result = run_workload([server], workload)
            finally:
                server.stop()
            rows.append(record(workload, target, result, server))
    name = args.name or ("smoke" if args.smoke else "latest")
    return write_results(args, name, callgate, rows, table(medians(rows)))


def record(
    workload: Workload,
    target: str,
    result: dict[str, Any],
    server: Server,
    layout: Layout | None = None,
) -> Row:
    """One run's row of the results file, printed as it is taken."""
    row: Row = {
        "workload": workload.name,
        "label": workload.label,
        "target": target,
        "config": workload.config,
        "result": result,
    }
    if layout is not None:  # where the clients were
        row["layout"] = dataclasses.asdict(layout) | {"idle_nodes": layout.idle_nodes}
    if server.hot_path is not None:
        row["hot_path"] = server.hot_path
    print(json.dumps(row), flush=True)
    return row


def write_results(
    args: argparse.Namespace,
    name: str,
    callgate: Callgate,
    rows: list[Row],
    tables: str,
    notes: str = "",
    where: str = f"server on core {SERVER_CORE}, load generator on core {LOADGEN_CORE}",
) -> int:
    """NAME.jsonl (every run) and NAME.md (the tables) under --out; 1 if a run failed."""
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    repeats = f"; medians of {args.repeat} runs each, taken in turn" if args.repeat > 1 else ""
    notes = f"{notes}\n" if notes else ""
    markdown = (
        f"Run {when} on {machine}; {where}{repeats}.\n{describe_build(callgate, rows)}\n"
        f"{notes}\n{tables}\n"
    )
    (args.out / f"{name}.md").write_text(markdown)
    print(markdown)
    return 1 if any("error" in r["result"] for r in rows) else 0


def run_cluster(args: argparse.Namespace, callgate: Callgate) -> int:
    """--cluster: every layout (cluster_layouts) under the one load of cluster_plan, in turn."""
    workload = cluster_plan(args.smoke, args.rate)
    layouts = cluster_layouts(args.nodes, args.workers)
    notes = []
    if args.workers > 1 and not serves_workers(callgate):
        note = f"workers-{args.workers} skipped: this callgate's `serve --help` has no --workers."
        print(f"bench/run: {note}", flush=True)
        notes.append(note)
        layouts = [layout for layout in layouts if layout.workers == 1]
    elif args.workers > 1:
        notes.append(
            f"`serve --workers {args.workers}` counts every process under the command (the"
            " parent too); its clients all go to its one port, so which worker holds a callee"
            " is the kernel's choice."
        )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as workdir:
        if not starts(callgate, Path(workdir)):
            return 2
        # Rounds alternate the layouts, so a noisy moment of a shared machine is spread over
        # all of them instead of falling on one.
        for layout in [layout for _ in range(args.repeat) for layout in layouts]:
            try:
                cluster = start_cluster(layout, Path(workdir), callgate)
            except BenchError as error:
                print(f"bench/run: FAILED: {error}", file=sys.stderr)
                return 2
            try:
                result = run_workload(cluster.servers, workload, layout, args.profile)
            finally:
                cluster.stop()
            rows.append(record(workload, layout.target, result, cluster.servers[0], layout))
    rate = f"{workload.config['rate']:,}"
    idle = workload.config["idle"]
    notes.insert(
        0,
        f"One load for every column: {rate} msg/s of `ice-candidate` over"
        f" {workload.config['pairs']} pairs in a call, each callee on another node than its"
        f" caller (with one node, on it), while {idle:,} idle clients are spread evenly over"
        " the nodes (in the idle-node column over its two traffic nodes: the third holds no"
        " client at all)."
        " CPU and memory from /proc per node process.",
    )
    where = f"no process pinned to a core (nodes, load generator, Redis at {redact(REDIS_URL)})"
    name = args.name or ("smoke" if args.smoke else "cluster")
    return write_results(
        args,
        name,
        callgate,
        rows,
        cluster_table(rows, layouts, rate),
        " ".join(notes),
        where,
    )


def redact(url: str) -> str:
    """A Redis URL without its password."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


if __name__ == "__main__":
    raise SystemExit(main())
