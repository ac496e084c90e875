"""The compiled hot path: mypyc builds of the pure core, and the guard that keeps them honest.

The modules in `COMPILED` are the per-message path (messages, codec, WebSocket frames,
switchboard, call table, policy, events, actions, the rate limits) and the audit records:
synchronous, strictly typed Python with no I/O. mypyc compiles such code to C extensions
unchanged, and they run a forwarded message in about three quarters of the time
(docs/performance.md, engine step 15). Everything else stays interpreted.

How it is built and kept honest:

- The build backend (setup.py, `mypycify`) compiles the modules whenever the project is
  installed: `pip install .` or a wheel puts the extensions beside the sources in site-packages,
  `pip install -e .` beside the sources in the checkout. Either way it writes `_compiled.json`:
  the SHA-256 of every source it compiled. Without a C compiler it installs pure Python.
- On import of `callgate`, `choose_implementation` compares those digests with the sources on
  disk. When any differs (a source was edited after the build) or `CALLGATE_PURE=1` is set,
  *all* of these modules load from their sources: compiled modules call each other directly, so
  a mix would run two versions of one module. So an edited source is never shadowed by an old
  build (scripts/_venv.sh rebuilds it), and `callgate serve` says once at start when it runs
  pure Python, and why.

This module is never compiled itself, and imports nothing of callgate.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Literal

COMPILED = (
    "callgate.protocol.messages",
    "callgate.protocol.codec",
    "callgate.protocol.frames",
    "callgate.core.events",
    "callgate.core.actions",
    "callgate.core.calls",
    "callgate.core.devices",
    "callgate.core.missed",
    "callgate.core.policy",
    "callgate.core.switchboard",
    "callgate.ratelimit",
    "callgate.audit",
)
PACKAGE = Path(__file__).parent
SOURCE_ROOT = PACKAGE.parent  # the folder that holds `callgate/`, where mypyc runs
STAMP = PACKAGE / "_compiled.json"
PURE_VARIABLE = "CALLGATE_PURE"

Implementation = Literal["compiled", "pure", "stale", "forced-pure"]


def source_of(module: str) -> Path:
    return SOURCE_ROOT.joinpath(*module.split(".")).with_suffix(".py")


def extensions_of(module: str) -> list[Path]:
    """The built extension files of `module` (none when it is not compiled)."""
    source = source_of(module)
    found = (source.with_suffix(suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    return [path for path in found if path.exists()]


def source_digests(modules: Sequence[str] = COMPILED) -> dict[str, str]:
    return {name: hashlib.sha256(source_of(name).read_bytes()).hexdigest() for name in modules}


def decide(
    stamp: Mapping[str, object] | None,
    digests: Mapping[str, str],
    *,
    built: bool,
    pure_requested: bool,
) -> Implementation:
    """Which implementation runs: the build only when it exists and matches every source."""
    if not built or stamp is None:
        return "pure"
    if pure_requested:
        return "forced-pure"
    if stamp.get("python") != sys.implementation.cache_tag or stamp.get("sources") != dict(digests):
        return "stale"
    return "compiled"


class _FromSource(importlib.abc.MetaPathFinder):
    """Loads the compiled modules from their `.py` files, ahead of the extension next to them."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, source_of(fullname))


def read_stamp() -> dict[str, object] | None:
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def choose_implementation() -> Implementation:
    """Called once, on import of `callgate`: route the compiled modules to their sources unless
    the build is present and current."""
    built = all(extensions_of(name) for name in COMPILED)
    stamp = read_stamp() if built else None
    digests = source_digests() if stamp is not None else {}
    chosen = decide(
        stamp, digests, built=built, pure_requested=os.environ.get(PURE_VARIABLE) == "1"
    )
    if chosen != "compiled" and any(extensions_of(name) for name in COMPILED):
        sys.meta_path.insert(0, _FromSource())
    return chosen
