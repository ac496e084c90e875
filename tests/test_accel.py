"""The mypyc build of the hot path runs only when it matches its sources (callgate/_accel.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import callgate
from callgate._accel import COMPILED, SOURCE_ROOT, decide, extensions_of, source_digests

DIGESTS = {"callgate.core.calls": "aa", "callgate.protocol.codec": "bb"}
STAMP = {"python": sys.implementation.cache_tag, "sources": dict(DIGESTS)}
BUILT = all(extensions_of(name) for name in COMPILED)


@pytest.mark.parametrize(
    ("stamp", "built", "pure_requested", "expected"),
    [
        (STAMP, True, False, "compiled"),
        (STAMP, False, False, "pure"),  # no extensions: nothing to choose
        (None, True, False, "pure"),  # extensions without a record of what they were built from
        (STAMP, True, True, "forced-pure"),
        ({**STAMP, "sources": {**DIGESTS, "callgate.core.calls": "edited"}}, True, False, "stale"),
        ({**STAMP, "sources": {"callgate.core.calls": "aa"}}, True, False, "stale"),  # one missing
        ({**STAMP, "python": "cpython-399"}, True, False, "stale"),  # built for another Python
    ],
)
def test_the_build_runs_only_when_it_matches_every_source(
    stamp: dict[str, object] | None, built: bool, pure_requested: bool, expected: str
) -> None:
    assert decide(stamp, DIGESTS, built=built, pure_requested=pure_requested) == expected


def _loaded_from(env: dict[str, str], root: Path) -> list[str]:
    """Where each compiled module came from, imported in a fresh interpreter from `root`."""
    script = (
        "import importlib, callgate; print(callgate.IMPLEMENTATION); "
        f"[print(importlib.import_module(name).__file__) for name in {COMPILED!r}]"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.split()


def test_callgate_pure_1_loads_every_compiled_module_from_its_source() -> None:
    implementation, *files = _loaded_from({"CALLGATE_PURE": "1"}, SOURCE_ROOT)
    assert implementation == ("forced-pure" if BUILT else "pure")
    assert all(file.endswith(".py") for file in files), files


@pytest.mark.skipif(not BUILT, reason="the mypyc build is not present (no C compiler?)")
def test_an_edited_source_is_never_shadowed_by_its_old_build(tmp_path: Path) -> None:
    """Edit one compiled module's source after the build: all of them load from source."""
    shutil.copytree(SOURCE_ROOT / "callgate", tmp_path / "callgate")
    for shared in SOURCE_ROOT.glob("*__mypyc.*"):
        shutil.copy(shared, tmp_path)
    implementation, *files = _loaded_from({}, tmp_path)
    assert implementation == "compiled"  # the copy, untouched, runs its build
    assert not any(file.endswith(".py") for file in files), files

    edited = tmp_path / "callgate" / "core" / "policy.py"
    edited.write_text(edited.read_text() + "\n# edited after the build\n")
    implementation, *files = _loaded_from({}, tmp_path)
    assert implementation == "stale"
    assert all(file.endswith(".py") for file in files), files


def test_this_suite_runs_what_scripts_test_built() -> None:
    """With a current build the suite tests the compiled modules, not their sources."""
    if not BUILT:
        if os.environ.get("CI") == "true":  # CI installs a C compiler: the build must be there
            pytest.fail("the mypyc build is missing: see scripts/test's output")
        pytest.skip("the mypyc build is not present")
    if callgate.IMPLEMENTATION == "forced-pure":
        pytest.skip("CALLGATE_PURE=1: this run is the pure-Python pass")
    assert callgate.IMPLEMENTATION == "compiled", "the build is stale: scripts/test rebuilds it"
    assert source_digests()  # every compiled module has a readable source beside it
