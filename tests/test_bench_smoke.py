"""The benchmark cannot rot: a smoke run (tiny counts, seconds) of every workload on both servers.

No timing is asserted here: speed lives in bench/run and docs/performance.md, never in tests.
bench/run measures a `pip install .` of the tree (bench/install.py); building one takes minutes,
so these runs use this interpreter's callgate (the development build as it stands, compiled or
not: --any-hot-path), with the same shipped config and raised limits.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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
    """The cross-node run: two cluster nodes on the test Redis against one node."""
    run_bench("--cluster", "--out", str(tmp_path), "--name", "cluster-smoke")
    lines = (tmp_path / "cluster-smoke.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert {(r["workload"], r["target"]) for r in rows} == {
        (w, t) for w in ("W1", "W2") for t in ("callgate", "cluster-2-nodes")
    }
    for row in rows:
        assert "error" not in row["result"], row
    assert "| one node | two nodes, cross-node |" in (tmp_path / "cluster-smoke.md").read_text()


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
