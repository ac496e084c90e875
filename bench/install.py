"""The callgate that bench/run measures, installed the way a user installs it.

`pip install .` (not editable) into a virtual environment of the bench's own (bench/.venv), with
requirements.lock as constraints for the project and, through PIP_CONSTRAINT, for the isolated
build environment where setup.py compiles the hot path with mypyc. The install is made from a
copy of the files a clone of this tree would hold (git's tracked and untracked, ignored ones
left out): no compiled extension, build stamp or build directory of a development venv can reach
it, and uncommitted changes are measured too.

The environment is removed and made again from nothing whenever one of those files (or the
Python running this) changed since it was made, or with --reinstall; otherwise nothing has
touched it since and it is used as it is. The install must give the compiled hot path: anything
else is an error, and no stamp is written, so the next run tries again.

Standard library only: this runs before any project environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOCK = ROOT / "requirements.lock"
# What `pip install .` reads: the package, its build and its metadata (pyproject's readme).
INPUTS = ("src", "pyproject.toml", "setup.py", "README.md", "requirements.lock")
STAMP = ".callgate-bench-install"


def say(message: str) -> None:
    print(f"callgate bench: {message}", file=sys.stderr, flush=True)


def project_files() -> list[str]:
    """The inputs as a fresh clone with these working-tree changes would have them."""
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--"]
    listed = subprocess.run(  # noqa: S603 - fixed arguments
        [*command, *INPUTS],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    # A tracked file deleted in the working tree is listed too; a clone of this state lacks it.
    return sorted({name for name in listed.split("\0") if name and (ROOT / name).is_file()})


def digest(files: list[str]) -> str:
    hashed = hashlib.sha256(sys.version.encode())
    for name in files:
        hashed.update(b"\0" + name.encode() + b"\0" + (ROOT / name).read_bytes())
    return hashed.hexdigest()


def hot_path(python: Path) -> str:
    """callgate.IMPLEMENTATION as the installed package reports it, imported from outside ROOT."""
    environment = {k: v for k, v in os.environ.items() if k != "CALLGATE_PURE"}
    return subprocess.run(  # noqa: S603 - our own interpreter
        [python, "-c", "import callgate; print(callgate.IMPLEMENTATION)"],
        cwd=python.parent,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def install(target: Path, files: list[str]) -> None:
    say(f"creating a fresh virtual environment {os.path.relpath(target)}")
    venv.EnvBuilder(with_pip=True, clear=True).create(target)
    python = target / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    say("updating pip")
    subprocess.run([*pip, "--upgrade", "pip>=24"], check=True)  # noqa: S603
    # The build must not inherit a request for pure Python meant for a run (setup.py reads it).
    environment = {k: v for k, v in os.environ.items() if k != "CALLGATE_PURE"}
    environment["PIP_CONSTRAINT"] = str(LOCK)
    with tempfile.TemporaryDirectory(prefix="callgate-bench-src-") as copy:
        for name in files:
            (Path(copy) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, Path(copy) / name)
        say(
            f"pip install . ({len(files)} files of this tree, not editable), requirements.lock as"
            " constraints; setup.py compiles the hot path with mypyc (a minute or more)"
        )
        subprocess.run([*pip, "-c", str(LOCK), copy], env=environment, check=True)  # noqa: S603


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--venv", type=Path, default=BENCH / ".venv")
    parser.add_argument("--reinstall", action="store_true", help="make the environment again")
    args = parser.parse_args()
    target: Path = args.venv.absolute()
    files = project_files()
    want = digest(files)
    stamp = target / STAMP
    if not args.reinstall and stamp.is_file() and stamp.read_text().strip() == want:
        say(f"callgate as installed in {os.path.relpath(target)} matches this tree")
    else:
        shutil.rmtree(target, ignore_errors=True)
        install(target, files)
    built = hot_path(target / "bin" / "python")
    if built != "compiled":
        stamp.unlink(missing_ok=True)
        say(
            f"ERROR: pip install . gave the hot path {built!r}, not 'compiled' (no C compiler?"
            " PIP_VERBOSE=2 bench/run --reinstall shows the build's own messages); the bench"
            " measures the compiled build"
        )
        return 1
    stamp.write_text(want + "\n")
    say("hot path compiled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
