"""The mypyc build of the hot path runs only when it matches its sources (callgate/_accel.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import callgate
from callgate._accel import (
    COMPILED,
    PURE_VARIABLE,
    SOURCE_ROOT,
    decide,
    extensions_of,
    source_digests,
)

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


PROJECT = SOURCE_ROOT.parent
# What a wheel is built from: the checkout as committed, without local builds and caches.
NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv",
    "node_modules",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    "*.so",
    "_compiled.json",
    "bench",
    "tests",
    "docs",
)


def _wheel_implementation(tmp_path: Path, **env: str) -> tuple[str, list[str]]:
    """Build a wheel of this checkout through setup.py (as `pip install .` does), unpack it, and
    say which implementation it runs and which extensions it carries."""
    checkout = tmp_path / "checkout"
    shutil.copytree(PROJECT, checkout, ignore=NOT_SOURCES)
    # The dev venv has the build requirements (setuptools, mypy): no download, no isolation.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--disable-pip-version-check",
            "-w",
            str(tmp_path / "dist"),
            str(checkout),
        ],
        # Not CALLGATE_PURE from the pure-Python pass of scripts/test: that would build pure.
        env={**{k: v for k, v in os.environ.items() if k != PURE_VARIABLE}, **env},
        capture_output=True,
        check=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("callgate-*.whl")
    unpacked = tmp_path / "site"
    shutil.unpack_archive(wheel, unpacked, format="zip")
    extensions = sorted(path.name for path in unpacked.rglob("*.so"))
    implementation, *files = _loaded_from({}, unpacked)
    assert all(file.startswith(str(unpacked)) for file in files), files
    return implementation, extensions


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_a_wheel_carries_the_compiled_build_and_runs_it(tmp_path: Path) -> None:
    implementation, extensions = _wheel_implementation(tmp_path)
    assert implementation == "compiled"
    assert len(extensions) == len(COMPILED) + 1, extensions  # and mypyc's shared library


def test_without_a_c_compiler_the_wheel_is_pure_python(tmp_path: Path) -> None:
    implementation, extensions = _wheel_implementation(tmp_path, CC="false")
    assert (implementation, extensions) == ("pure", [])


def test_serve_says_once_at_start_that_it_runs_pure_python() -> None:
    """The listening line names the build; a server without the compiled one says why, once."""
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "callgate",
            "serve",
            "--config",
            str(PROJECT / "config/callgate.toml"),
            "--port",
            "0",
        ],
        env={**os.environ, "CALLGATE_PURE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as server:
        assert server.stdout is not None
        watchdog = threading.Timer(60, server.kill)  # a server that never starts fails the test
        watchdog.start()
        lines = []
        try:
            for line in server.stdout:
                lines.append(line)
                if '"event": "listening"' in line:
                    break
        finally:
            # The warning is written with the listening line; the rest comes out on the way down.
            server.terminate()
            lines.extend(server.stdout)
            watchdog.cancel()
    output = "".join(lines)
    assert '"hot_path": "forced-pure"' in output
    assert output.count("running as pure Python") == 1, output
    assert "CALLGATE_PURE=1 is set" in output
