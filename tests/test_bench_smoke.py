"""The benchmark cannot rot: a smoke run (tiny counts, seconds) of every workload on both servers.

No timing is asserted here: speed lives in bench/run and docs/performance.md, never in tests.
bench/run measures a `pip install .` of the tree (bench/install.py); building one takes minutes,
so these runs use this interpreter's callgate (the development build as it stands, compiled or
not: --any-hot-path), with the same shipped config and raised limits.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).parent.parent
CALLGATE = shlex.join([sys.executable, "-m", "callgate"])
READY = shutil.which("node") and all(
    (ROOT / "bench" / folder / "node_modules").is_dir() for folder in ("reference", "loadgen")
)


def run_bench(*args: str) -> None:
    """bench/runner.py --smoke with `args`; it must succeed."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "runner.py"),
            "--smoke",
            "--callgate",
            CALLGATE,
            "--any-hot-path",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.skipif(
    not READY, reason="Node or the bench's npm packages missing (scripts/test installs them)"
)
def test_bench_smoke_run(tmp_path: Path) -> None:
    run_bench("--scaling", "--trio-websocket", "--out", str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert {(r["workload"], r["target"]) for r in rows} == {
        (w, t)
        for w in ("W1", "W2", "W3", "W4", "W5")
        for t in ("callgate", "callgate-trio-websocket", "reference")
    }
    for row in rows:
        assert "error" not in row["result"], row
        # Every callgate row names the build its server reported.
        assert ("hot_path" in row) == (row["target"] != "reference"), row
    table = (tmp_path / "smoke.md").read_text()
    assert (
        "| callgate (wsproto, as shipped) | callgate (trio-websocket) | reference | ratio"
        " | ratio trio-websocket |" in table
    )
    assert "config/callgate.toml as shipped with bench/raised-limits.toml" in table


@pytest.mark.skipif(
    not READY, reason="Node or the bench's npm packages missing (scripts/test installs them)"
)
def test_bench_cluster_smoke_run(tmp_path: Path) -> None:
    """The cluster run on the test Redis: one node with cluster mode off, clusters of 1, 2 and 4
    nodes, three nodes with one outside the traffic (and `serve --workers 2` once serve has it),
    with per-node figures and a verdict for every target."""
    run_bench("--cluster", "--out", str(tmp_path), "--name", "cluster-smoke")
    lines = (tmp_path / "cluster-smoke.jsonl").read_text().splitlines()
    rows = {json.loads(line)["target"]: json.loads(line) for line in lines}
    assert set(rows) - {"workers-2"} == {
        "one-node",
        "cluster-1",
        "cluster-2",
        "cluster-4",
        "idle-node",
    }
    for target, row in rows.items():
        result = row["result"]
        assert "error" not in result, row
        assert len(result["node_cpu_us_per_msg"]) == result["processes"], row
        assert len(result["node_rss_mib"]) == result["processes"], row
        if target.startswith("cluster-"):
            assert result["processes"] == int(target.removeprefix("cluster-")), row
    assert rows["idle-node"]["layout"]["idle_nodes"] == 2
    outside = rows["idle-node"]["result"]
    assert outside["processes"] == 3
    assert "idle_share" in outside  # (its memory share needs more clients than a smoke run's)
    table = (tmp_path / "cluster-smoke.md").read_text()
    assert (
        "| metric | one node, cluster off | cluster, 1 node | cluster, 2 nodes | cluster, 4 nodes"
        " | cluster, 3 nodes, traffic on 2 |"
    ) in table
    verdicts = r"\| (PASS|FAIL|not measured) \|"
    assert len([line for line in table.splitlines() if re.search(verdicts, line)]) == 6, table
    if "workers-2" not in rows:
        assert "workers-2 skipped: this callgate's `serve --help` has no --workers" in table


def test_bench_drops_every_key_of_its_cluster_and_no_other() -> None:
    """The bench cleans up its throw-away clusters by their name alone, as a prefix or as a hash
    tag anywhere in a key, without the cluster's code (which changes under it)."""
    runner = load_runner()
    name = f"bench-1-{uuid.uuid4().hex[:8]}*?"  # glob characters stand for themselves
    client = redis.Redis.from_url(runner.REDIS_URL)
    ours = [f"{name}:leader", f"{{{name}}}:presence:alice", f"x:{{{name}}}:y"]
    theirs = [name.replace("*?", "x?:leader"), f"bench-1-{uuid.uuid4().hex[:8]}:leader"]
    try:
        for key in ours + theirs:
            client.set(key, "1")
        runner.drop_cluster(name)
        assert [client.exists(key) for key in ours + theirs] == [0, 0, 0, 1, 1]
    finally:
        client.delete(*ours, *theirs)
        client.close()


def test_the_bench_imports_nothing_of_the_cluster_backend() -> None:
    """The cluster backend is rewritten apart from the bench: the bench drives nodes only through
    their config and cleans up Redis on its own."""
    for path in (ROOT / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not [n for n in names if n.startswith("callgate.cluster")], (path, names)


def load_runner() -> Any:
    spec = importlib.util.spec_from_file_location("bench_runner", ROOT / "bench" / "runner.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_refuses_a_callgate_whose_hot_path_is_not_compiled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measured build must be the compiled one; a server that reports another stops the run."""
    runner = load_runner()
    # This real server then runs "forced-pure" (or "pure", in a tree with no build at all).
    monkeypatch.setenv("CALLGATE_PURE", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    callgate = runner.Callgate([sys.executable, "-m", "callgate"], "compiled", runner.overrides())
    with pytest.raises(runner.BenchError, match=r"hot path '(forced-)?pure', not 'compiled'"):
        runner.Server("callgate", 0, tmp_path, callgate)


def test_raised_limits_only_raise_shipped_limits(tmp_path: Path) -> None:
    """bench/raised-limits.toml names only keys of the shipped config (callgate ignores an unknown
    environment variable, so a misspelt one would measure the shipped limit), and only limits."""
    runner = load_runner()
    variables = runner.overrides()
    assert variables["CALLGATE_LIMITS_MESSAGES"] == "1000000/second"
    assert all(
        name.startswith(("CALLGATE_LIMITS_", "CALLGATE_SERVER_MAX_CONNECTIONS_"))
        for name in variables
    ), variables
    misspelt = tmp_path / "overlay.toml"
    misspelt.write_text('[limits]\nmesages = "1000000/second"\n')
    with pytest.raises(runner.BenchError, match=r"\[limits\] mesages is not a key"):
        runner.overrides(misspelt)


def test_cluster_targets_show_each_rounds_ratio_beside_the_median_one() -> None:
    """A repeated cluster run gives each target's ratio of the medians and, beside it, the ratio
    in each round (this machine moves by about the targets' margins between runs)."""
    runner = load_runner()
    layouts = [
        runner.Layout("one-node", "one node, cluster off", 1, False, 1),
        runner.Layout("cluster-2", "cluster, 2 nodes", 2, True, 2),
    ]

    def row(target: str, cpu: float, p99: float) -> dict[str, Any]:
        result = {"cpu_us_per_msg": cpu, "p99_ms": p99, "machine_busy_pct": 20}
        return {"workload": "W5", "label": "x", "target": target, "result": result}

    rounds = [(50, 0.5, 120, 1.0), (60, 0.5, 150, 1.5), (70, 1.0, 130, 1.0)]
    rows = [
        r
        for one, p1, two, p2 in rounds
        for r in (row("one-node", one, p1), row("cluster-2", two, p2))
    ]
    table = runner.cluster_table(rows, layouts, "2,000")
    cpu = next(line for line in table.splitlines() if line.startswith("| cross-node CPU"))
    # medians 130 / 60; rounds 120/50, 150/60, 130/70
    assert cpu.split(" | ")[1:5] == ["2.17x", "2.40, 2.50, 1.86", "<= 2.00x", "FAIL"], cpu
    p99 = next(line for line in table.splitlines() if line.startswith("| cross-node p99"))
    assert p99.split(" | ")[1:5] == ["2.00x", "2.00, 3.00, 1.00", "<= 2.00x", "PASS"], p99
    single = runner.cluster_table(rows[:2], layouts, "2,000")
    cpu = next(line for line in single.splitlines() if line.startswith("| cross-node CPU"))
    assert cpu.split(" | ")[1:3] == ["2.40x", "-"], cpu
