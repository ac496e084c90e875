"""How fast `callgate audit verify` reads a trail, and that its memory does not grow with it.

Writes trails of N records with the real writer (rotating files, HMAC chain, Ed25519 checkpoints
every 1,000 records, an anchor), then runs `callgate audit verify` on each in a fresh process,
with the public key and the anchor (and again with the HMAC key too), and reports the wall time
and the process's peak resident memory. Not a test: run it by hand, on the build you measure.

    .venv/bin/python bench/audit_verify.py                 # 25k, 50k and 100k records
    .venv/bin/python bench/audit_verify.py --records 100000
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from callgate.audit import (
    AuditLog,
    FileAnchor,
    FileSink,
    Signer,
    load_private_key,
    public_pem,
)

HMAC_KEY = "bench-audit-key-that-is-at-least-32-bytes"
SEED = "YmVuY2gtb25seSBhdWRpdCBzaWduaW5nIGtleSBzZWU="  # 32 bytes, bench only


def write_trail(folder: Path, records: int) -> list[Path]:
    """`records` call records (a real mix of fields), rotated every 16 MiB, as a server writes."""
    audit = AuditLog(
        FileSink(folder / "audit.log", 16 * 1024 * 1024, 86400),
        key=HMAC_KEY.encode(),
        signer=Signer(load_private_key(SEED)),
        anchors=[FileAnchor(folder / "anchor" / "audit.anchor")],
        checkpoint_every=1000,
    )
    for n in range(records):
        call = {
            "call_key": f"Zq3xk9PbLw0aYc1T.{n}",
            "call_id": f"7f1c-{n:08d}",
            "caller": f"user-{n % 997}",
            "callee": f"user-{(n * 7) % 997}",
            "media": "video",
        }
        if n % 2:
            audit.write("call.requested", {**call, "conn": "Zq3xk9PbLw0aYc1T"})
        else:
            audit.write(
                "call.ended",
                {
                    **call,
                    "reason": "hangup",
                    "by": call["caller"],
                    "answered": True,
                    "duration_ms": 61500 + n,
                },
            )
    audit.close()
    return [*sorted(folder.glob("audit.log.2*")), folder / "audit.log"]


def measure(command: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(seconds, peak RSS of the child in MiB, exit status)."""
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    elapsed = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
    return elapsed, peak_kib / 1024, result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, action="append", help="trail length(s)")
    args = parser.parse_args()
    sizes = args.records or [25_000, 50_000, 100_000]
    callgate = [sys.executable, "-m", "callgate", "audit", "verify"]
    import callgate as package

    print(f"callgate build: {package.IMPLEMENTATION}")
    print(f"{'records':>8}  {'mode':<22}  {'seconds':>7}  {'peak MiB':>8}  exit")
    for size in sorted(sizes):
        # Each size in its own process tree: ru_maxrss of children is a running maximum, so
        # the sizes are measured smallest first and each figure is the peak so far.
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            files = [str(path) for path in write_trail(folder, size)]
            public = folder / "public.pem"
            public.write_text(public_pem(load_private_key(SEED)))
            anchor = ["--anchor", str(folder / "anchor" / "audit.anchor")]
            base = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")}
            modes = {
                "public key + anchor": (["--public-key", str(public), *anchor], base),
                "+ HMAC key": (
                    ["--public-key", str(public), *anchor],
                    {**base, "CALLGATE_AUDIT_KEY": HMAC_KEY},
                ),
            }
            for mode, (extra, env) in modes.items():
                seconds, peak, status = measure([*callgate, *files, *extra], env)
                print(f"{size:>8}  {mode:<22}  {seconds:>7.2f}  {peak:>8.1f}  {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
