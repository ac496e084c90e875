"""The build: callgate's hot path compiled with mypyc, or pure Python where it cannot be.

Everything about the project is declared in pyproject.toml; this file only adds the compiled
extensions, the way mypyc-compiled projects on PyPI do it (`mypycify`). What is compiled, and how
a build is kept from running against sources it was not made from, is in src/callgate/_accel.py.

- `pip install .` (or a wheel) compiles the modules in `COMPILED` and writes `_compiled.json`
  (the digest of each source) beside them; `pip install -e .` does the same next to the sources.
- Without a C compiler (or with CALLGATE_PURE=1 set during the build) the extensions are skipped
  and callgate installs as pure Python; the server then says so once when it starts.
- mypyc runs only when extensions are actually built, not for every metadata query pip makes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SOURCES = ROOT / "src"


def _load_accel() -> Any:
    """callgate/_accel.py without importing callgate (whose dependencies the build lacks)."""
    spec = importlib.util.spec_from_file_location("_callgate_accel", SOURCES / "callgate/_accel.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ACCEL = _load_accel()


def _say(message: str) -> None:
    print(f"callgate build: {message}", file=sys.stderr)


def _hot_path_extensions() -> list[Any]:
    if os.environ.get(ACCEL.PURE_VARIABLE) == "1":
        _say(f"{ACCEL.PURE_VARIABLE}=1: installing pure Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("mypyc is not available: installing pure Python")
        return []
    paths = [str(ACCEL.source_of(name).relative_to(ROOT)) for name in ACCEL.COMPILED]
    _say(f"compiling {len(paths)} modules with mypyc")
    # No project config (its mypy plugin and strictness are for the linters), and imports of
    # third-party packages, absent from the build environment, read as Any: mypyc compiles our
    # own code exactly as written either way.
    options = ["--config-file=", "--ignore-missing-imports", "--follow-imports=silent"]
    try:
        extensions = mypycify([*options, *paths], opt_level="3", group_name="callgate")
    except (Exception, SystemExit) as error:  # any failure means: install pure Python
        _say(f"mypyc failed ({error}): installing pure Python")
        return []
    for extension in extensions:
        # A compiler error skips the extension instead of failing the install.
        extension.optional = True
    return extensions


class BuildHotPath(build_ext):
    """build_ext that makes the mypyc extensions when it runs, then stamps what it built from."""

    def run(self) -> None:
        if not self.extensions:
            # Made here rather than at import or in finalize_options, which pip's metadata steps
            # (egg_info, sdist's defaults) also reach: mypyc runs once per actual build.
            self.distribution.ext_modules = _hot_path_extensions()
            # Finalize again, now with the extensions (setuptools maps each one to its file
            # there); swig_opts is the one option that cannot be finalized twice.
            self.extensions = None
            self.swig_opts = None
            self.finalized = False
            self.ensure_finalized()
        super().run()
        built = [Path(self.get_ext_fullpath(name)) for name in ACCEL.COMPILED]
        if not self.extensions or not all(path.exists() for path in built):
            _say("the compiled build could not be made (no C compiler?): installing pure Python")
            return
        # Digests of the sources the build came from; `_accel.decide` compares them with the
        # sources beside the extensions on every start, so an edited source is never shadowed.
        stamp = {"python": sys.implementation.cache_tag, "sources": ACCEL.source_digests()}
        package = Path(self.get_ext_fullpath("callgate.audit")).parent  # build dir or src/
        (package / ACCEL.STAMP.name).write_text(json.dumps(stamp, indent=1) + "\n")


class HotPathDistribution(Distribution):
    """Always a platform build: the extensions are decided when build_ext runs."""

    def has_ext_modules(self) -> bool:
        return True


setup(distclass=HotPathDistribution, cmdclass={"build_ext": BuildHotPath})
