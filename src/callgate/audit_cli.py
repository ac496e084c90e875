"""`callgate audit verify | report | keygen | public-key | retain` (docs/audit-log.md).

These read the `[audit]` section of the config (and its CALLGATE_AUDIT_* overrides) and nothing
else: an auditor needs the public key, and the HMAC key only to check each record's own MAC.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from callgate import trail
from callgate.audit import (
    Signer,
    iso_utc,
    key_id_of,
    load_public_key,
    open_anchors,
    parse_record,
    public_pem,
    render,
    signing_key,
)
from callgate.config import AuditSettings, load_audit_settings
from callgate.errors import ConfigError


def run(args: argparse.Namespace) -> int:
    commands = {
        "verify": _verify,
        "report": _report,
        "keygen": _keygen,
        "public-key": _public_key,
        "retain": _retain,
    }
    return commands[args.audit_command](args)


def _settings(args: argparse.Namespace) -> AuditSettings:
    return load_audit_settings(getattr(args, "config", None))


def _checked(args: argparse.Namespace) -> list[trail.Verdict]:
    """Verify the trail(s) named on the command line with the keys and anchors given (or, from the
    config's [audit] section: the HMAC key, the signing key's public half, the anchor file)."""
    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        raise ConfigError(f"no such audit file: {', '.join(missing)}")
    settings = _settings(args)
    keys = [_read_public_key(path) for path in args.public_key]
    private = signing_key(settings)
    if private is not None:
        keys.append(private.public_key())
    hmac_key = settings.key.get_secret_value().encode() if settings.key is not None else None
    if not keys and hmac_key is None:
        raise ConfigError(
            "audit: give the checkpoints' public key (--public-key FILE), or the HMAC key"
            " (audit.key in --config, or CALLGATE_AUDIT_KEY)"
        )
    anchors = list(args.anchor)
    if not anchors and settings.anchor_path is not None and Path(settings.anchor_path).is_file():
        anchors.append(Path(settings.anchor_path))
    for path in anchors:
        if not path.is_file():
            raise ConfigError(f"no such anchor file: {path}")
    return trail.verify_each(args.files, public_keys=keys, hmac_key=hmac_key, anchors=anchors)


def _read_public_key(path: Path) -> Ed25519PublicKey:
    try:
        return load_public_key(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--public-key: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"--public-key: {path}: {exc}") from None


def _verify(args: argparse.Namespace) -> int:
    verdicts = _checked(args)
    for verdict in verdicts:
        _tell(verdict, sys.stdout, several=len(verdicts) > 1)
    return _exit_status(verdicts)


def _exit_status(verdicts: list[trail.Verdict]) -> int:
    """Broken if any trail is; else crashed if any had a crash; else intact."""
    statuses = {verdict.exit_status for verdict in verdicts}
    for status in (trail.EXIT_BROKEN, trail.EXIT_CRASHED):
        if status in statuses:
            return status
    return trail.EXIT_INTACT


def _tell(verdict: trail.Verdict, out: TextIO, *, several: bool = False) -> None:
    """Every problem, then one line that says what holds and how far."""
    write = out.write
    if several:
        write(f"-- trail {verdict.trail or '(without an id)'}\n")
    for path in verdict.skipped:
        write(
            f"{path}: skipped: an anchor or checkpoint file, not a log file"
            " (give it with --anchor)\n"
        )
    for problem in verdict.problems:
        write(f"{problem}\n")
    if verdict.more_problems:
        write(f"... and {verdict.more_problems} more problem(s)\n")
    span = (
        f"seq {verdict.first_seq}-{verdict.last_seq}"
        if verdict.last_seq is not None
        else "no records"
    )
    facts = [f"{len(verdict.files)} file(s), {verdict.records} record(s), {span}"]
    if verdict.retained_from is not None:
        facts.append(
            f"kept from seq {verdict.first_seq} (retention record {verdict.retained_from})"
        )
    if verdict.signed_through is not None:
        facts.append(
            f"signed through seq {verdict.signed_through}"
            f" (key {', '.join(sorted(verdict.key_ids))})"
        )
    if verdict.anchored_through is not None:
        facts.append(f"anchored through seq {verdict.anchored_through}")
    else:
        facts.append("no anchored checkpoint: a cut of the newest records cannot be seen")
    if verdict.last_seq is not None and verdict.signed_through is None:
        facts.append("no checkpoint signature checked (no public key given, or none signed)")
    elif verdict.last_seq is not None and verdict.signed_through != verdict.last_seq:
        facts.append(
            f"records after seq {verdict.signed_through} are not covered by a signature yet"
        )
    summary = "; ".join(facts)
    if verdict.tampered:
        write(
            f"audit trail NOT intact: {len(verdict.problems) + verdict.more_problems} problem(s);"
            f" the first is the first break ({summary})\n"
        )
    elif verdict.problems:
        write(f"audit trail intact but for a server crash (records lost, sealed off): {summary}\n")
    else:
        write(f"audit trail intact: {summary}\n")


def _report(args: argparse.Namespace) -> int:
    since, until = _time_option("--since", args.since), _time_option("--until", args.until)
    if args.unverified:
        missing = [str(path) for path in args.files if not path.is_file()]
        if missing:
            raise ConfigError(f"no such audit file: {', '.join(missing)}")
        print("UNVERIFIED: this report was made without checking the trail", file=sys.stderr)
    else:
        verdicts = _checked(args)
        if any(verdict.tampered for verdict in verdicts):
            for verdict in verdicts:
                _tell(verdict, sys.stderr, several=len(verdicts) > 1)
            print(
                "callgate: no report from a trail that is not intact (--unverified reports anyway)",
                file=sys.stderr,
            )
            return trail.EXIT_BROKEN
    refusals: dict[str, Counter[str]] = {}
    rows = trail.calls(args.files, user=args.user, since=since, until=until, refusals=refusals)
    trail.write_report(rows, sys.stdout, args.format, refusals)
    return 0


def _time_option(name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    when = trail.parse_time(value)
    if when is None:
        raise ConfigError(f"{name}: {value!r} is neither an RFC 3339 time nor unix seconds")
    return when


def _keygen(args: argparse.Namespace) -> int:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        descriptor = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{args.out} exists: not overwriting a key") from None
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)
    print(f"# private key written to {args.out} (set [audit] signing_key_file to it)")
    _print_public(key)
    return 0


def _print_public(key: Ed25519PrivateKey) -> None:
    print(f"# key id {key_id_of(key.public_key())}: give auditors this public key")
    print(public_pem(key), end="")


def _public_key(args: argparse.Namespace) -> int:
    key = signing_key(_settings(args))
    if key is None:
        raise ConfigError("audit.signing_key: not set (nor audit.signing_key_file)")
    _print_public(key)
    return 0


def _retain(args: argparse.Namespace) -> int:
    """Sign "the trail is kept from here" into the anchors, so older files may go."""
    settings = _settings(args)
    key = signing_key(settings)
    if key is None:
        raise ConfigError("audit.signing_key: a retention record must be signed")
    first = _first_record(args.file)
    if first.get("event") != "audit.opened" or not isinstance(first.get("prev"), str):
        raise ConfigError(f"{args.file}: does not start with an audit.opened record")
    record = {
        "ts": iso_utc(time.time_ns()),
        "event": "audit.retained",
        "seq": first["seq"],
        "prev": first["prev"],
    }
    if isinstance(first.get("trail"), str):
        record["trail"] = first["trail"]
    Signer(key).seal(record)
    line = render(record)
    anchors = open_anchors(settings)
    if not anchors:
        raise ConfigError("audit.anchor_path: retention is recorded in the anchor; set one")
    for anchor in anchors:
        anchor.write(line)
        anchor.close()
    print(f"retention recorded: the trail is kept from seq {first['seq']} ({args.file.name}) on;")
    print("log files before it may now be deleted, and `audit verify` accepts the trail from there")
    return 0


def _first_record(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            return parse_record(handle.readline())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: its first line is not a record: {exc}") from None
