"""bench/run: callgate and the Socket.IO reference, side by side, on this machine, in one run.

Each workload starts a fresh server pinned to one core (`taskset -c 1`) and a load generator pinned
to another (`taskset -c 0`), both on loopback. The server's CPU time (user + system, from
/proc/PID/stat) is sampled when the generator starts and ends its measured phase; its memory
(VmRSS) before the storm and once every client is connected and idle. Results go to
bench/results/latest.jsonl (one line per server and workload) and bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).parent
ROOT = BENCH.parent
SECRET = "bench-secret-that-is-long-enough-for-hs256-keys"  # noqa: S105 - loopback benchmark only
TICK = os.sysconf("SC_CLK_TCK")
SERVER_CORE, LOADGEN_CORE = "1", "0"
# callgate on each connection engine, and the reference.
TARGETS = ("reference", "callgate", "callgate-wsproto")
# --cluster: one node against two cluster nodes on Redis, every callee on the other node.
CLUSTER_TARGETS = ("callgate-wsproto", "cluster-2-nodes")
REDIS_URL = os.environ.get("CALLGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


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


class Server:
    def __init__(
        self, target: str, port: int, workdir: Path, extra_env: dict[str, str] | None = None
    ) -> None:
        self.target = target
        self.port = port
        env = {**os.environ, **(extra_env or {})}
        if target == "callgate-wsproto":
            env["CALLGATE_SERVER_ENGINE"] = "wsproto"
        if target == "reference":
            command = ["node", str(BENCH / "reference" / "server.mjs"), str(port)]
            ready = b"listening"
        else:
            command = [
                sys.executable,
                "-m",
                "callgate",
                "serve",
                "--config",
                str(BENCH / "callgate-bench.toml"),
                "--port",
                str(port),
            ]
            env |= {
                "CALLGATE_AUTH_SECRET": SECRET,
                "CALLGATE_AUDIT_PATH": str(workdir / f"audit-{port}.log"),
            }
            ready = b'"listening"'
        self.process = subprocess.Popen(  # noqa: S603 - our own commands
            pinned(SERVER_CORE, command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_raise_fd_limit,
        )
        deadline = time.monotonic() + 30
        assert self.process.stdout is not None
        output = b""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            output += line
            if not line:
                raise RuntimeError(f"{target} exited before listening: {output[-2000:]!r}")
            if ready in line:
                return
        raise RuntimeError(f"{target} did not start")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}" + ("" if self.target == "reference" else "/ws")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_cluster(port: int, workdir: Path) -> list[Server]:
    """Two wsproto nodes of a fresh cluster on the Redis at REDIS_URL, both on the server core."""
    name = f"bench-{port}"
    env = {
        "CALLGATE_SERVER_ENGINE": "wsproto",
        "CALLGATE_CLUSTER_ENABLED": "true",
        "CALLGATE_CLUSTER_REDIS_URL": REDIS_URL,
        "CALLGATE_CLUSTER_NAME": name,
        "CALLGATE_CLUSTER_KEY": SECRET,
    }
    first = Server("cluster-2-nodes", port, workdir, env)
    try:
        return [first, Server("cluster-2-nodes", port + 1, workdir, env)]
    except BaseException:
        first.stop()
        raise


def drop_cluster(port: int) -> None:
    from callgate.cluster.link import delete_cluster_keys  # only the cluster run needs Redis

    delete_cluster_keys(REDIS_URL, f"bench-{port}")


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
    """callgate on both engines and the reference side by side, with ratios to the reference."""
    metrics = METRICS
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["workload"], row["label"]), {})[row["target"]] = row["result"]
    lines = [
        "| workload | metric | callgate (trio-websocket) | callgate (wsproto) | reference"
        " | ratio trio-websocket | ratio wsproto |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (name, label), results in by_key.items():
        ours, fast = results.get("callgate", {}), results.get("callgate-wsproto", {})
        theirs = results.get("reference", {})
        for key, title in metrics:
            if not any(key in r for r in (ours, fast, theirs)):
                continue
            a, w, b = ours.get(key), fast.get(key), theirs.get(key)
            lines.append(
                f"| {name} {label} | {title} | {_fmt(a)} | {_fmt(w)} | {_fmt(b)}"
                f" | {_ratio(a, b)} | {_ratio(w, b)} |"
            )
        for target, result in results.items():
            if "error" in result:
                lines.append(f"| {name} {label} | error ({target}) | {result['error']} | | | | |")
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
        "| workload | metric | one node (wsproto) | two nodes, cross-node | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for (name, label), results in by_key.items():
        single, cluster = results.get("callgate-wsproto", {}), results.get("cluster-2-nodes", {})
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: seconds, for CI")
    parser.add_argument("--big", action="store_true", help="also W3 with 50,000 clients")
    parser.add_argument("--only", help="run only this workload (W1..W5)")
    parser.add_argument(
        "--scaling", action="store_true", help="also W5: the scaling curve (latency and memory)"
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
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--name", help="results file name (default: latest, or smoke)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    port = 18700
    with tempfile.TemporaryDirectory() as workdir:
        workloads = plan(args.smoke, args.big) + (scaling(args.smoke) if args.scaling else [])
        if args.cluster:
            workloads = cluster_plan(args.smoke)
        runs = [
            (workload, target)
            for workload in workloads
            if not args.only or workload.name == args.only
            # Rounds alternate the servers, so a noisy moment of a shared machine is spread
            # over all of them instead of falling on one.
            for _ in range(args.repeat)
            for target in (CLUSTER_TARGETS if args.cluster else TARGETS)
        ]
        for workload, target in runs:
            port += 2
            if target == "cluster-2-nodes":
                servers = start_cluster(port, Path(workdir))
            else:
                servers = [Server(target, port, Path(workdir))]
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
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    name = args.name or ("smoke" if args.smoke else "cluster" if args.cluster else "latest")
    (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    repeats = f"; medians of {args.repeat} runs each, taken in turn" if args.repeat > 1 else ""
    markdown = (
        f"Run {when} on {machine}; server on core {SERVER_CORE}, load generator on core"
        f" {LOADGEN_CORE}{repeats}.\n\n"
        f"{cluster_table(medians(rows)) if args.cluster else table(medians(rows))}\n"
    )
    (args.out / f"{name}.md").write_text(markdown)
    print(markdown)
    return 1 if any("error" in r["result"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
