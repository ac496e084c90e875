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
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
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
# --cluster: one node against two cluster nodes on Redis, every callee on the other node.
CLUSTER_TARGETS = ("callgate", "cluster-2-nodes")
REDIS_URL = os.environ.get("CALLGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


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


def cluster_plan(smoke: bool) -> list[Workload]:
    """Cross-node forwarding: W1 and W2 with the sender on one node and the receiver on another."""
    if smoke:
        return [
            Workload("W1", "cross-node smoke", {"pairs": 2, "window": 4, "seconds": 0.5}),
            Workload("W2", "cross-node smoke", {"pairs": 2, "rate": 200, "seconds": 0.5}),
        ]
    return [
        Workload(
            "W1", "saturated, 50 pairs x 32 in flight", {"pairs": 50, "window": 32, "seconds": 5}
        ),
        Workload("W2", "sparse, 2,000 msg/s", {"pairs": 50, "rate": 2000, "seconds": 5}),
        Workload("W2", "sparse, 10,000 msg/s", {"pairs": 50, "rate": 10000, "seconds": 5}),
    ]


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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


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


def pinned(core: str, command: list[str]) -> list[str]:
    return ["taskset", "-c", core, *command] if shutil.which("taskset") else command


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
            "CALLGATE_AUDIT_PATH": str(workdir / f"audit-{port}.log"),
            # Metrics stay on; on a port of their own per server, not the shipped 9464 that any
            # other callgate on the machine may hold.
            "CALLGATE_METRICS_PORT": "0",
        }


class Server:
    def __init__(
        self,
        target: str,
        port: int,
        workdir: Path,
        callgate: Callgate,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.target = target
        self.port = port
        self.hot_path: str | None = None
        if target == "reference":
            command = ["node", str(BENCH / "reference" / "server.mjs"), str(port)]
            env = dict(os.environ)
            ready = "listening"
        else:
            command = [
                *callgate.command,
                "serve",
                "--config",
                str(SHIPPED_CONFIG),
                "--port",
                str(port),
            ]
            env = callgate.environment(port, workdir) | (extra_env or {})
            if target == TRIO_WEBSOCKET:
                env["CALLGATE_SERVER_ENGINE"] = "trio-websocket"
            ready = '"listening"'
        self.process = subprocess.Popen(  # noqa: S603 - our own commands
            pinned(SERVER_CORE, command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            preexec_fn=_raise_fd_limit,
        )
        self.output: collections.deque[str] = collections.deque(maxlen=50)
        self.drain: threading.Thread | None = None
        try:
            self._wait_until_listening(ready, callgate.hot_path)
        except BaseException:
            self.stop()
            raise
        # Keep reading what the server logs, so a full pipe never blocks it mid-run.
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()

    def _wait_until_listening(self, ready: str, hot_path: str | None) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            self.output.append(line)
            if not line:
                raise BenchError(f"{self.target} exited before listening: {self.log()}")
            if ready not in line:
                continue
            if self.target == "reference":
                return
            self.hot_path = json.loads(line).get("hot_path")
            if hot_path is not None and self.hot_path != hot_path:
                raise BenchError(
                    f"{self.target} runs the hot path {self.hot_path!r}, not {hot_path!r}: this"
                    " is not the build the bench measures. bench/run installs it with"
                    f" bench/install.py; its listening line: {line.strip()}"
                )
            return
        raise BenchError(f"{self.target} did not listen within 30 s: {self.log()}")

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    def log(self) -> str:
        return "".join(self.output)[-3000:]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}" + ("" if self.target == "reference" else "/ws")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.drain is not None:
            self.drain.join(5)  # the pipe is at its end once the process is gone
        assert self.process.stdout is not None
        self.process.stdout.close()


def start_cluster(port: int, workdir: Path, callgate: Callgate) -> list[Server]:
    """Two nodes of a fresh cluster on the Redis at REDIS_URL, both on the server core."""
    name = f"bench-{port}"
    env = {
        "CALLGATE_CLUSTER_ENABLED": "true",
        "CALLGATE_CLUSTER_REDIS_URL": REDIS_URL,
        "CALLGATE_CLUSTER_NAME": name,
        "CALLGATE_CLUSTER_KEY": SECRET,
    }
    first = Server("cluster-2-nodes", port, workdir, callgate, env)
    try:
        return [first, Server("cluster-2-nodes", port + 1, workdir, callgate, env)]
    except BaseException:
        first.stop()
        raise


def drop_cluster(port: int) -> None:
    """Remove the throw-away cluster's keys from Redis."""
    import redis  # only the cluster run needs Redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"bench-{port}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class Processes:
    """The CPU time and memory of one server, or the sum over a cluster's nodes."""

    def __init__(self, servers: list[Server]) -> None:
        self.pids = [server.process.pid for server in servers]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def rss(self) -> int:
        return sum(rss_kib(pid) for pid in self.pids)


def run_workload(servers: list[Server], workload: Workload) -> dict[str, Any]:
    server = servers[0]
    config = {
        "target": "reference" if server.target == "reference" else "callgate",
        "url": server.url,
        "peer_url": servers[-1].url,
        "secret": SECRET,
        "workload": workload.name,
        **workload.config,
    }
    measure = Processes(servers)
    generator = subprocess.Popen(  # noqa: S603
        pinned(LOADGEN_CORE, ["node", str(BENCH / "loadgen" / "loadgen.mjs"), json.dumps(config)]),
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_raise_fd_limit,
    )
    assert generator.stdout is not None
    measured: dict[str, Any] = {}
    rss_before = measure.rss()
    for line in generator.stdout:
        message = json.loads(line)
        phase = message.get("phase")
        if phase == "start":
            measured["cpu_start"], measured["rss_start"] = measure.cpu(), measure.rss()
        elif phase == "end":
            measured["cpu_end"] = measure.cpu()
        elif phase == "idle":
            measured["rss_idle"] = measure.rss()
        elif "result" in message or "error" in message:
            measured.update(message)
    generator.wait(30)
    result: dict[str, Any] = dict(measured.get("result") or {})
    if "error" in measured:
        result["error"] = measured["error"]
    cpu = measured.get("cpu_end", 0.0) - measured.get("cpu_start", 0.0)
    result["server_cpu_s"] = round(cpu, 4)
    units = result.get("messages") or result.get("connections") or result.get("calls")
    if units:
        per = "conn" if "connections" in result else "call" if "calls" in result else "msg"
        result[f"cpu_us_per_{per}"] = round(cpu * 1e6 / units, 2)
    if "rss_idle" in measured and result.get("connections"):
        grown = measured["rss_idle"] - measured.get("rss_start", rss_before)
        result["kib_per_idle_conn"] = round(grown / result["connections"], 2)
        result["server_rss_kib"] = measured["rss_idle"]
    if "rss_idle" in measured and "idle" in result:
        result["server_rss_mib"] = round(measured["rss_idle"] / 1024, 1)
    return result


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
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            result["error"] = errors[0]
        merged.append({"workload": name, "label": label, "target": target, "result": result})
    return merged


def cluster_table(rows: list[dict[str, Any]]) -> str:
    """One node against two cluster nodes (sender and receiver on different nodes)."""
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["workload"], row["label"]), {})[row["target"]] = row["result"]
    lines = [
        "| workload | metric | one node | two nodes, cross-node | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for (name, label), results in by_key.items():
        single, cluster = results.get("callgate", {}), results.get("cluster-2-nodes", {})
        for key, title in METRICS:
            if key in single or key in cluster:
                a, b = cluster.get(key), single.get(key)
                lines.append(
                    f"| {name} {label} | {title} | {_fmt(b)} | {_fmt(a)} | {_ratio(a, b)} |"
                )
        for target, result in results.items():
            if "error" in result:
                lines.append(f"| {name} {label} | error ({target}) | {result['error']} | | |")
    return "\n".join(lines)


def _ratio(ours: Any, theirs: Any) -> str:
    numbers = isinstance(ours, int | float) and isinstance(theirs, int | float)
    return f"{ours / theirs:.2f}x" if numbers and theirs else "-"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
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
        help="instead: one node against two cluster nodes on Redis (sender and receiver apart)",
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
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--name", help="results file name (default: latest, or smoke)")
    args = parser.parse_args()
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
    workloads = plan(args.smoke, args.big)
    if args.scaling or args.only == "W5":
        workloads += scaling(args.smoke)
    if args.cluster:
        workloads = cluster_plan(args.smoke)
    workloads = [w for w in workloads if not args.only or w.name == args.only]
    if not workloads:
        print(f"bench/run: no workload named {args.only!r} in this plan")
        return 2
    targets: tuple[str, ...] = CLUSTER_TARGETS if args.cluster else TARGETS
    if args.trio_websocket and not args.cluster:
        targets = (*targets, TRIO_WEBSOCKET)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    port = 18700
    with tempfile.TemporaryDirectory() as workdir:
        try:  # the build and the config first, before minutes of workloads: one start
            Server("callgate", port, Path(workdir), callgate).stop()
        except BenchError as error:
            print(f"bench/run: FAILED: {error}", file=sys.stderr)
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
            port += 2
            try:
                if target == "cluster-2-nodes":
                    servers = start_cluster(port, Path(workdir), callgate)
                else:
                    servers = [Server(target, port, Path(workdir), callgate)]
            except BenchError as error:
                print(f"bench/run: FAILED: {error}", file=sys.stderr)
                return 2
            try:
                result = run_workload(servers, workload)
            finally:
                for server in servers:
                    server.stop()
                if target == "cluster-2-nodes":
                    drop_cluster(port)
            row = {
                "workload": workload.name,
                "label": workload.label,
                "target": target,
                "config": workload.config,
                "result": result,
            }
            if servers[0].hot_path is not None:
                row["hot_path"] = servers[0].hot_path
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    name = args.name or ("smoke" if args.smoke else "cluster" if args.cluster else "latest")
    (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    repeats = f"; medians of {args.repeat} runs each, taken in turn" if args.repeat > 1 else ""
    markdown = (
        f"Run {when} on {machine}; server on core {SERVER_CORE}, load generator on core"
        f" {LOADGEN_CORE}{repeats}.\n{describe_build(callgate, rows)}\n\n"
        f"{cluster_table(medians(rows)) if args.cluster else table(medians(rows))}\n"
    )
    (args.out / f"{name}.md").write_text(markdown)
    print(markdown)
    return 1 if any("error" in r["result"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
