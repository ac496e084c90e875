"""`python -m callgate.accelerate status | clean`: which build of the hot path runs, or remove it.

The build itself is made by the build backend (setup.py) whenever the project is installed:
`pip install .`, a wheel, or `pip install -e .` for a checkout (scripts/_venv.sh reruns that when
a compiled source changed). What is compiled, and how a stale build is kept from running, is in
callgate/_accel.py.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import callgate
from callgate._accel import COMPILED, SOURCE_ROOT, STAMP, extensions_of


def remove_build() -> None:
    """Delete the compiled extensions and their stamp: callgate then runs as pure Python."""
    STAMP.unlink(missing_ok=True)
    for name in COMPILED:
        for extension in extensions_of(name):
            extension.unlink()
    # mypyc's shared library for the group (setup.py names the group "callgate").
    for shared in SOURCE_ROOT.glob("*__mypyc.*"):
        shared.unlink()


def main(argv: Sequence[str]) -> int:
    match list(argv):
        case ["clean"]:
            remove_build()
            return 0
        case ["status"]:
            print(callgate.IMPLEMENTATION)
            return 0
    print("usage: python -m callgate.accelerate status | clean", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
