"""The benchmark cannot rot: a smoke run (tiny counts, seconds) of every workload on both servers.

No timing is asserted here: speed lives in bench/run and docs/performance.md, never in tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
READY = shutil.which("node") and all(
    (ROOT / "bench" / folder / "node_modules").is_dir() for folder in ("reference", "loadgen")
)


def run_bench(*args: str) -> None:
    """bench/runner.py --smoke with `args`; it must succeed."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "runner.py"), "--smoke", *args],
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
    run_bench("--scaling", "--out", str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert {(r["workload"], r["target"]) for r in rows} == {
        (w, t)
        for w in ("W1", "W2", "W3", "W4", "W5")
        for t in ("callgate", "callgate-wsproto", "reference")
    }
    for row in rows:
        assert "error" not in row["result"], row
    table = (tmp_path / "smoke.md").read_text()
    assert "| callgate (trio-websocket) | callgate (wsproto) | reference |" in table


@pytest.mark.skipif(
    not READY, reason="Node or the bench's npm packages missing (scripts/test installs them)"
)
def test_bench_cluster_smoke_run(tmp_path: Path) -> None:
    """The cross-node run: two cluster nodes on the test Redis against one node."""
    run_bench("--cluster", "--out", str(tmp_path), "--name", "cluster-smoke")
    lines = (tmp_path / "cluster-smoke.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert {(r["workload"], r["target"]) for r in rows} == {
        (w, t) for w in ("W1", "W2") for t in ("callgate-wsproto", "cluster-2-nodes")
    }
    for row in rows:
        assert "error" not in row["result"], row
    assert (
        "| one node (wsproto) | two nodes, cross-node |"
        in (tmp_path / "cluster-smoke.md").read_text()
    )
