"""`python -m callgate.accelerate build | clean | status`: the mypyc build of the hot path.

scripts/_venv.sh runs `build`, which compiles only when a source changed since the last build.
What is compiled, and how a stale build is kept from running, is in callgate/_accel.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence

import callgate
from callgate._accel import (
    COMPILED,
    SOURCE_ROOT,
    STAMP,
    decide,
    extensions_of,
    read_stamp,
    source_digests,
    source_of,
)


def remove_build() -> None:
    STAMP.unlink(missing_ok=True)
    for name in COMPILED:
        for extension in extensions_of(name):
            extension.unlink()
    # mypyc's shared library for the group, named after a hash of the module names.
    for shared in SOURCE_ROOT.glob("*__mypyc.*"):
        shared.unlink()


def build(*, force: bool = False) -> int:
    """Compile `COMPILED` in place with mypyc, unless the build is current. 0 on success."""
    digests = source_digests()
    built = all(extensions_of(name) for name in COMPILED)
    current = decide(read_stamp(), digests, built=built, pure_requested=False) == "compiled"
    if current and not force:
        return 0
    if importlib.util.find_spec("mypyc") is None:
        print("callgate: mypyc is not installed (the dev extra has it)", file=sys.stderr)
        return 1
    remove_build()
    sources = [str(source_of(name).relative_to(SOURCE_ROOT)) for name in COMPILED]
    print(f"callgate: compiling {len(sources)} modules with mypyc", file=sys.stderr)
    done = subprocess.run(  # noqa: S603 - our own interpreter and sources
        [sys.executable, "-m", "mypyc", *sources],
        cwd=SOURCE_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    # mypyc's C sources and setup.py: not needed once the extensions are built.
    shutil.rmtree(SOURCE_ROOT / "build", ignore_errors=True)
    if done.returncode != 0 or not all(extensions_of(name) for name in COMPILED):
        remove_build()
        print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
        return 1
    # The digests taken before compiling: a source edited during the build reads as stale.
    STAMP.write_text(
        json.dumps({"python": sys.implementation.cache_tag, "sources": digests}, indent=1) + "\n"
    )
    return 0


def main(argv: Sequence[str]) -> int:
    match list(argv):
        case ["build"]:
            return build()
        case ["build", "--force"]:
            return build(force=True)
        case ["clean"]:
            remove_build()
            return 0
        case ["status"]:
            print(callgate.IMPLEMENTATION)
            return 0
    print("usage: python -m callgate.accelerate build [--force] | clean | status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
