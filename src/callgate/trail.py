"""Reading an audit trail back: `verify` (is it intact?) and `report` (who called whom).

Both stream the files line by line, so a trail of any size is read in bounded memory: verify
keeps the chains' state, the open gaps in the sequence (at most `MAX_GAPS`) and the problems it
reports (at most `MAX_PROBLEMS`), never anything per record.

What `verify` checks, with the server's Ed25519 public key(s), the HMAC key, or both:
* every line is a record read strictly (`audit.parse_record`);
* `seq` runs 1, 2, 3, ... from the trail's first record (or from where a signed retention record
  in the anchor says the kept trail starts) without a gap, a repeat or a step back;
* every file's first record (`audit.opened`) commits to the chains as they stood before it;
* with the public key: every checkpoint's signature, by a known key, over the digest of every
  record before it (so each record is covered by the next checkpoint);
* with the HMAC key: every record's own MAC;
* with an anchor: every anchored checkpoint is in the trail, identical, and the trail does not
  end before the last one.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import hmac
import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from callgate.audit import (
    MAX_LINE_BYTES,
    TERMINAL_CALL_EVENTS,
    canonical,
    chain_digest,
    key_id_of,
    parse_record,
    signed_part,
)

# Kinds that are not tampering: a crash of the server, found and sealed (or not yet sealed).
CRASH_KINDS = frozenset({"recovered_crash", "torn_tail"})
# Exit statuses of `callgate audit verify` (docs/audit-log.md).
EXIT_INTACT, EXIT_BROKEN, EXIT_UNUSABLE, EXIT_CRASHED = 0, 1, 2, 3
MAX_PROBLEMS = 10_000
MAX_GAPS = 10_000
# File names that are anchors or old checkpoint files, never log files (a glob may take them in).
ANCHOR_SUFFIXES = (".checkpoints", ".anchor")


@dataclass(slots=True)
class Problem:
    kind: str
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind}: {self.message}"

    @property
    def is_tampering(self) -> bool:
        return self.kind not in CRASH_KINDS


@dataclass(slots=True)
class Verdict:
    """What `verify` found, and how far the trail is covered."""

    problems: list[Problem] = field(default_factory=list)
    more_problems: int = 0  # beyond MAX_PROBLEMS, counted only
    files: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # anchors given as log files
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    retained_from: str | None = None  # the retention record the trail's start rests on
    signed_through: int | None = None  # the last checkpoint whose signature verified
    anchored_through: int | None = None  # the last checkpoint found in the anchor
    key_ids: set[str] = field(default_factory=set)
    trail: str | None = None  # the trail's id

    def add(self, problem: Problem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.more_problems += 1

    @property
    def tampered(self) -> bool:
        return self.more_problems > 0 or any(p.is_tampering for p in self.problems)

    @property
    def exit_status(self) -> int:
        if self.tampered:
            return EXIT_BROKEN
        return EXIT_CRASHED if self.problems else EXIT_INTACT


# -- reading lines ------------------------------------------------------------------------------


def _lines(handle: BinaryIO) -> Iterator[tuple[int, bytes | None, bool]]:
    """(line number, its bytes or None when longer than MAX_LINE_BYTES, ended by a newline)."""
    number = 0
    while True:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest unread into memory
                raw = handle.readline(MAX_LINE_BYTES)
            yield number, None, True
            continue
        yield number, raw.rstrip(b"\r\n"), raw.endswith(b"\n")


def _parsed(path: Path) -> Iterator[tuple[int, bytes | None, dict[str, Any] | str, bool]]:
    """Each line: its number, its bytes (None when too long), the record or the reason it is not
    one, and whether a newline ended it."""
    with path.open("rb") as handle:
        for number, raw, ended in _lines(handle):
            if raw is None:
                yield number, raw, f"a line longer than {MAX_LINE_BYTES} bytes", ended
                continue
            try:
                record = parse_record(raw)
            except ValueError as exc:
                yield number, raw, str(exc) or "not JSON", ended
                continue
            yield number, raw, _shape_problem(record) or record, ended


def _shape_problem(record: Mapping[str, Any]) -> str | None:
    seq = record.get("seq")
    if type(seq) is not int or seq < 1:
        return "no valid seq: not an audit record"
    if not isinstance(record.get("event"), str) or not isinstance(record.get("ts"), str):
        return "no event or ts: not an audit record"
    return None


def _first(path: Path) -> tuple[int, str]:
    """The seq and the trail id of a file's first record."""
    for _, _, record, _ in _parsed(path):
        if isinstance(record, dict):
            return int(record["seq"]), _text(record.get("trail"))
    return sys.maxsize, ""


def trail_order(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """The log files in trail order (each named once), and the anchor files among them."""
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    logs = [p for p in unique.values() if not p.name.endswith(ANCHOR_SUFFIXES)]
    anchors = [p for p in unique.values() if p.name.endswith(ANCHOR_SUFFIXES)]
    return sorted(logs, key=lambda p: (_first(p)[0], p.name)), anchors


# -- anchors ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    seq: int
    record: dict[str, Any]
    place: tuple[str, int]


def _anchor_entries(
    paths: Iterable[Path], keys: Mapping[str, Ed25519PublicKey], verdict: Verdict
) -> Iterator[_Entry]:
    """The checkpoint and retention lines of anchor files, signatures checked. A line is read
    from its first `{` (a syslog export keeps its prefix); lines without one are not ours."""
    for path in paths:
        with path.open("rb") as handle:
            for number, raw, _ in _lines(handle):
                start = raw.find(b"{") if raw is not None else 0
                if start < 0:
                    continue
                place = (path.name, number)
                try:
                    record = parse_record(raw[start:] if raw is not None else b"")
                except ValueError as exc:
                    verdict.add(Problem("bad_anchor", *place, f"not an anchor line: {exc}"))
                    continue
                if record.get("event") not in ("audit.checkpoint", "audit.retained") or (
                    type(record.get("seq")) is not int
                ):
                    verdict.add(Problem("bad_anchor", *place, "not a checkpoint or retention"))
                    continue
                problem = _signature_problem(record, keys)
                if problem is not None and (keys or record["event"] == "audit.retained"):
                    verdict.add(Problem("bad_anchor", *place, problem))
                    continue
                yield _Entry(record["seq"], record, place)


def _signature_problem(
    record: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]
) -> str | None:
    key_id, sig = record.get("key_id"), record.get("sig")
    if not isinstance(sig, str) or not isinstance(key_id, str):
        return "not signed"
    key = keys.get(key_id)
    if key is None:
        return f"signed by key {key_id[:32]!r}, which was not given"
    try:
        key.verify(bytes.fromhex(sig), signed_part(record))
    except (InvalidSignature, ValueError):
        return f"its signature (key {key_id}) does not verify"
    return None


# -- verify -------------------------------------------------------------------------------------


class _Chain:
    """The state of one pass over the trail: where the chains stand, what is still open."""

    def __init__(
        self,
        verdict: Verdict,
        keys: Mapping[str, Ed25519PublicKey],
        hmac_key: bytes | None,
        anchor_files: list[Path],
    ) -> None:
        self.verdict = verdict
        self.keys = keys
        self.hmac_key = hmac_key
        self.trail_id: str | None = None  # from the first record that names its trail
        self.anchor_files = anchor_files
        self.retained = [
            e
            for e in _anchor_entries(anchor_files, keys, verdict)
            if e.record["event"] == "audit.retained"
        ]
        # This trail's anchored checkpoints, read once the trail's id is known (`_peek`).
        self.anchored: Iterator[_Entry] | None = None
        self.next_anchor: _Entry | None = None
        self.expected: int | None = None  # the next seq; None before the first record
        self.mac: str | None = None  # the HMAC chain before the next record (None: unknown)
        self.digest: str | None = None  # the public chain likewise
        self.broken = False  # a problem since the last checkpoint (reported once)
        self.gaps: dict[int, tuple[int, Problem]] = {}  # start -> (end, tentative "deleted")
        self.torn: tuple[tuple[str, int], bytes, str] | None = None

    def problem(self, kind: str, place: tuple[str, int], message: str) -> Problem:
        problem = Problem(kind, *place, message)
        self.verdict.add(problem)
        self.broken = self.broken or problem.is_tampering
        return problem

    def _ours(self, entry: _Entry) -> bool:
        """An anchor line of this trail (one anchor may hold the lines of several)."""
        trail = entry.record.get("trail")
        return trail is None or self.trail_id is None or trail == self.trail_id

    def _peek(self) -> _Entry | None:
        if self.anchored is None:
            ours = (
                e
                for e in _anchor_entries(self.anchor_files, self.keys, Verdict())
                if e.record["event"] == "audit.checkpoint" and self._ours(e)
            )
            self.anchored = _in_order(ours, self.verdict)
            self.next_anchor = next(self.anchored, None)
        return self.next_anchor

    def _pop(self) -> None:
        assert self.anchored is not None  # noqa: S101 - _peek came first
        self.next_anchor = next(self.anchored, None)

    def record(self, record: dict[str, Any], place: tuple[str, int]) -> None:
        seq, event = record["seq"], record["event"]
        if self.trail_id is None and isinstance(record.get("trail"), str):
            self.trail_id = record["trail"]
        self._torn_line_before(record)
        self.verdict.records += 1
        body = canonical(record)
        if self.expected is None:
            self._start(record, place)
        elif seq != self.expected:
            self._out_of_sequence(record, place, self.expected)
            if seq < self.expected:
                return  # a record out of place does not move the chains
        elif event == "audit.opened":
            self._check_link(record, place)
        if seq == self.expected:  # (`_start` set it for the first record)
            self._check_mac(record, body, place)
        if event == "audit.checkpoint":
            self._checkpoint(record, place)
        self.digest = chain_digest(self.digest, body) if self.digest is not None else None
        self.mac = str(record.get("mac", ""))
        self.expected = seq + 1
        self.verdict.first_seq = self.verdict.first_seq or seq
        self.verdict.last_seq = seq

    def _start(self, record: dict[str, Any], place: tuple[str, int]) -> None:
        """The trail's first record: seq 1, or the first kept one of a retention record."""
        seq = record["seq"]
        self.expected = seq
        if seq == 1:
            self.mac, self.digest = "", ""
            if record.get("prev", "") != "" or record.get("prev_mac", "") != "":
                self.problem("edited", place, "the trail's first record claims a record before it")
            return
        prev, prev_mac = record.get("prev"), record.get("prev_mac")
        if record["event"] == "audit.opened" and isinstance(prev, str):
            self.digest = prev
            self.mac = prev_mac if isinstance(prev_mac, str) else None
            for entry in self.retained:
                if entry.seq == seq and entry.record.get("prev") == prev and self._ours(entry):
                    self.verdict.retained_from = f"{entry.place[0]}:{entry.place[1]}"
                    return
        self.problem(
            "missing_start",
            place,
            f"the trail's beginning is missing: the first record here is seq {seq}, and no"
            " retention record in an anchor says the trail was kept from there",
        )

    def _out_of_sequence(
        self, record: dict[str, Any], place: tuple[str, int], expected: int
    ) -> None:
        seq = record["seq"]
        if seq > expected:
            shown = f"{expected}" if seq == expected + 1 else f"{expected}-{seq - 1}"
            gap = self.problem("deleted", place, f"record(s) seq {shown} missing before seq {seq}")
            if len(self.gaps) < MAX_GAPS:
                self.gaps[expected] = (seq - 1, gap)
            self.mac, self.digest = None, None  # unknown until the next checkpoint
            return
        if seq == expected - 1 and record.get("mac") == self.mac and self.mac:
            self.problem("duplicate", place, f"seq {seq} appears twice")
            return
        for start, (end, gap) in list(self.gaps.items()):
            if start <= seq <= end:  # it was not deleted: it is here, out of place
                gap.kind = "reordered"
                gap.message = (
                    f"seq {start}-{end} is not where it belongs (moved to {place[0]}:{place[1]})"
                )
                if start == end:
                    del self.gaps[start]
                return
        self.problem(
            "reordered",
            place,
            f"seq {seq} comes after seq {expected - 1} (moved, copied or replayed)",
        )

    def _check_link(self, record: dict[str, Any], place: tuple[str, int]) -> None:
        """A new file's or run's first record states the chains before it: they must agree."""
        prev, prev_mac = record.get("prev"), record.get("prev_mac")
        if self.digest is not None and prev != self.digest and not self.broken:
            self.problem(
                "edited", place, "the records before it are not the ones it commits to (`prev`)"
            )
        elif self.hmac_key is not None and self.mac is not None and prev_mac != self.mac:
            self.problem("edited", place, "it does not continue the MAC chain before it")
        if self.digest is None and isinstance(prev, str):
            self.digest = prev

    def _check_mac(self, record: dict[str, Any], body: bytes, place: tuple[str, int]) -> None:
        """`body`: the record's canonical JSON, made once for both chains (`chain_mac`'s rule)."""
        if self.hmac_key is None or self.mac is None:
            return
        given = record.get("mac")
        expected = hmac.digest(self.hmac_key, self.mac.encode() + b"\n" + body, "sha256").hex()
        # compare_digest refuses str with non-ASCII characters: such a `mac` is simply wrong.
        if (
            not isinstance(given, str)
            or not given.isascii()
            or not hmac.compare_digest(expected, given)
        ):
            self.problem("edited", place, f"record seq {record['seq']} does not match its MAC")

    def _checkpoint(self, record: dict[str, Any], place: tuple[str, int]) -> None:
        seq, claimed = record["seq"], record.get("digest")
        signature = _signature_problem(record, self.keys) if self.keys else None
        if signature is not None:
            self.problem("bad_checkpoint", place, f"checkpoint seq {seq}: {signature}")
        elif self.keys:
            self.verdict.signed_through = seq
            self.verdict.key_ids.add(str(record["key_id"]))
        if self.digest is not None and claimed != self.digest and not self.broken:
            self.problem(
                "edited",
                place,
                f"the records before checkpoint seq {seq} are not the ones it sealed",
            )
        if isinstance(claimed, str) and signature is None:
            self.digest = claimed  # sealed: the chain goes on from what the signature covers
        self.broken = False
        self._match_anchor(record, place)

    def _match_anchor(self, record: dict[str, Any], place: tuple[str, int]) -> None:
        seq = record["seq"]
        while (entry := self._peek()) is not None and entry.seq <= seq:
            self._pop()
            if entry.seq < (self.verdict.first_seq or seq):
                continue  # before the kept trail
            if entry.seq < seq:
                self.problem(
                    "deleted",
                    place,
                    f"the checkpoint seq {entry.seq} anchored at {entry.place[0]}:"
                    f"{entry.place[1]} is not in the trail",
                )
            elif canonical(entry.record) != canonical(record):
                self.problem(
                    "bad_checkpoint", place, f"checkpoint seq {seq} differs from the anchored one"
                )
            else:
                self.verdict.anchored_through = seq

    def _torn_line_before(self, record: Mapping[str, Any]) -> None:
        """A line that was not a record is a crash's only if the next record seals it off."""
        if self.torn is None:
            return
        place, raw, reason = self.torn
        self.torn = None
        if (
            record["event"] == "audit.recovered"
            and record.get("discarded_bytes") == len(raw)
            and record.get("discarded_sha256") == hashlib.sha256(raw).hexdigest()
        ):
            self.verdict.add(
                Problem(
                    "recovered_crash",
                    *place,
                    f"a crash cut this line ({len(raw)} bytes); the restarted server sealed it"
                    f" off (seq {record['seq']})",
                )
            )
        else:
            self.problem("unreadable", place, reason)

    def unreadable(self, place: tuple[str, int], raw: bytes | None, reason: str) -> None:
        self.flush_torn()
        if raw is None:
            self.problem("unreadable", place, reason)
        else:
            self.torn = (place, raw, reason)

    def flush_torn(self) -> None:
        if self.torn is not None:
            self.problem("unreadable", self.torn[0], self.torn[2])
            self.torn = None

    def end_of_file(self, place: tuple[str, int], raw: bytes | None, last_file: bool) -> None:
        """A last line without its newline: a crash mid-write, in the newest file only."""
        if self.torn is not None and raw is not None and self.torn[1] == raw and last_file:
            self.torn = None
            self.verdict.add(
                Problem(
                    "torn_tail",
                    *place,
                    f"the last line was cut mid-write ({len(raw)} bytes): a crash; the server"
                    " seals it off when it starts again",
                )
            )
        self.flush_torn()

    def finish(self) -> None:
        self.flush_torn()
        last = self.verdict.last_seq
        while (entry := self._peek()) is not None:
            if last is None or entry.seq > last:
                self.problem(
                    "truncated",
                    entry.place,
                    f"the trail ends at seq {last}, but this anchored checkpoint covers seq"
                    f" {entry.seq}: the newest records were cut",
                )
                break
            if entry.seq >= (self.verdict.first_seq or 0):
                self.problem(
                    "deleted",
                    entry.place,
                    f"the anchored checkpoint seq {entry.seq} is not in the trail",
                )
            self._pop()


def verify(
    paths: Iterable[Path],
    *,
    public_keys: Iterable[Ed25519PublicKey] = (),
    hmac_key: bytes | None = None,
    anchors: Iterable[Path] = (),
) -> Verdict:
    """Every problem found, in trail order (the first one is the first break)."""
    keys = {key_id_of(key): key for key in public_keys}
    files, skipped = trail_order(paths)
    verdict = Verdict(files=files, skipped=skipped)
    chain = _Chain(verdict, keys, hmac_key, list(dict.fromkeys(anchors)))
    for index, path in enumerate(files):
        last: tuple[tuple[str, int], bytes | None] | None = None
        for number, raw, parsed, ended in _parsed(path):
            place = (path.name, number)
            if isinstance(parsed, dict):
                chain.record(parsed, place)
            else:
                chain.unreadable(place, raw, f"not an audit record: {parsed}")
            last = (place, raw) if not ended else None
        if last is not None:
            chain.end_of_file(last[0], last[1], index == len(files) - 1)
        chain.flush_torn()
    chain.finish()
    if not files:
        verdict.add(Problem("missing_start", "-", 0, "no log file given"))
    elif keys and verdict.records and verdict.signed_through is None:
        # Anyone can write records and chain them; only a checkpoint signed by a given key
        # shows the server wrote them. (A trail younger than `checkpoint_seconds` has none
        # yet: verify it again after its first checkpoint.)
        verdict.add(
            Problem(
                "unsigned",
                files[0].name,
                1,
                "no record of this trail is covered by a checkpoint signed by a given key",
            )
        )
    verdict.trail = chain.trail_id
    return verdict


def verify_each(
    paths: Iterable[Path],
    *,
    public_keys: Iterable[Ed25519PublicKey] = (),
    hmac_key: bytes | None = None,
    anchors: Iterable[Path] = (),
) -> list[Verdict]:
    """`verify` for each trail among the files (a cluster's nodes each write their own), told
    apart by the trail id of each file's first record."""
    files, skipped = trail_order(paths)
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(_first(path)[1], []).append(path)
    keys, given = list(public_keys), list(anchors)
    verdicts = [
        verify(group, public_keys=keys, hmac_key=hmac_key, anchors=given)
        for group in groups.values()
    ] or [verify([], public_keys=keys, hmac_key=hmac_key, anchors=given)]
    verdicts[0].skipped = skipped
    # A trail the anchor vouches for and no file was given of: deleted whole (perhaps with a
    # forged trail of another id in its place). Every anchored trail must be verified.
    missing = Verdict()
    named = {key_id_of(key): key for key in keys}
    for trail_id, place in _anchored_trails(given, named, missing).items():
        if trail_id not in groups:
            missing.add(
                Problem(
                    "deleted",
                    *place,
                    f"the anchor holds checkpoints of trail {trail_id}; no file of it was given",
                )
            )
    if missing.problems:
        missing.trail = "(anchored, no file given)"
        verdicts.append(missing)
    return verdicts


def _anchored_trails(
    anchors: Iterable[Path], keys: Mapping[str, Ed25519PublicKey], verdict: Verdict
) -> dict[str, tuple[str, int]]:
    """The trail ids the anchors' checkpoints name, each with the place of its first line (lines
    that do not verify are left to each trail's own verdict)."""
    trails: dict[str, tuple[str, int]] = {}
    for entry in _anchor_entries(anchors, keys, verdict):
        trail_id = entry.record.get("trail")
        if entry.record["event"] == "audit.checkpoint" and isinstance(trail_id, str):
            trails.setdefault(trail_id, entry.place)
    verdict.problems.clear()  # reported by the trails' own verdicts
    return trails


def _in_order(entries: Iterable[_Entry], verdict: Verdict) -> Iterator[_Entry]:
    """Anchored checkpoints in seq order; one out of order or repeated is reported, not used."""
    last = 0
    for entry in entries:
        if entry.seq <= last:
            verdict.add(Problem("bad_anchor", *entry.place, f"seq {entry.seq} after seq {last}"))
            continue
        last = entry.seq
        yield entry


# -- report -------------------------------------------------------------------------------------


@dataclass(slots=True)
class CallRow:
    call_key: str
    call_id: str
    caller: str
    callee: str
    media: str = ""
    requested: str = ""
    answered: str = ""
    ended: str = ""
    duration_ms: int | None = None
    outcome: str = "open"
    reason: str = ""
    devices: int = 0
    connections: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "call_key": self.call_key,
            "call_id": self.call_id,
            "caller": self.caller,
            "callee": self.callee,
            "media": self.media,
            "requested": self.requested,
            "answered": self.answered,
            "ended": self.ended,
            "duration_ms": self.duration_ms,
            "outcome": self.outcome,
            "reason": self.reason,
            "devices": self.devices,
            "connections": " ".join(self.connections),
        }


COLUMNS = list(CallRow("", "", "", "").as_dict())


def parse_time(value: str | None) -> datetime | None:
    """RFC 3339 or unix seconds; None when it is neither (or not given)."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        pass
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _count(value: object, default: int) -> int:
    """A count from a record: an int as it is, anything else as the default."""
    return value if type(value) is int and value >= 0 else default


def calls(
    paths: Iterable[Path],
    *,
    user: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    refusals: dict[str, Counter[str]] | None = None,
) -> Iterator[CallRow]:
    """One row per call, yielded as each call ends (calls still open at the end come last).

    A call is its `call_key` (server-assigned, unique); records without one (older trails) fall
    back to caller + call_id. `refusals`, if given, is filled per user with counts of refusals
    and rate limits.
    """
    live: dict[str, CallRow] = {}
    for record in _by_time(paths):
        when = parse_time(_text(record.get("ts")))
        if when is not None and ((since and when < since) or (until and when > until)):
            continue
        event = _text(record.get("event"))
        if refusals is not None:
            _count_refusal(record, event, user, refusals)
        if not event.startswith("call."):
            continue
        caller, call_id = _text(record.get("caller")), _text(record.get("call_id"))
        key = _text(record.get("call_key")) or json.dumps([caller, call_id])
        if event == "call.requested":
            live[key] = CallRow(
                _text(record.get("call_key")),
                call_id,
                caller,
                _text(record.get("callee")),
                media=_text(record.get("media")),
                requested=_text(record.get("ts")),
                connections=[_text(record.get("conn"))],
            )
            continue
        row = live.get(key)
        if row is None:
            continue  # the call was requested before the time range
        if event == "call.ringing":
            row.devices = _count(record.get("devices"), 0)
        elif event == "call.answered":
            row.answered = _text(record.get("ts"))
            row.connections.append(_text(record.get("conn")))
        if event in TERMINAL_CALL_EVENTS:
            row.ended = _text(record.get("ts"))
            row.outcome = event.removeprefix("call.")
            row.reason = _text(record.get("reason"))
            duration = record.get("duration_ms")
            row.duration_ms = duration if type(duration) is int else None
            del live[key]
            if user is None or user in (row.caller, row.callee):
                yield row
    for row in live.values():
        if user is None or user in (row.caller, row.callee):
            yield row


def _by_time(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """The records of every file, merged by time, streaming.

    Each file is in time order. Several files are either one trail's rotations (disjoint in time)
    or the trails of several cluster nodes, whose records of one call interleave: the node that
    rang writes `call.requested`, the callee's node `call.answered`. Merging by `ts` puts every
    call back in order (the nodes' clocks must be synchronized, as for any distributed log).
    """

    def readable(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        for _, _, record, _ in _parsed(path):
            if isinstance(record, dict):
                yield _sort_key(record.get("ts")), record

    ordered, _ = trail_order(paths)
    for _, record in heapq.merge(*(readable(path) for path in ordered), key=lambda pair: pair[0]):
        yield record


def _sort_key(ts: object) -> str:
    """RFC 3339 UTC times sort as text once their fraction has the same width."""
    text = _text(ts)
    if text.endswith("Z") and "." not in text:
        text = text[:-1] + ".000000Z"
    return text


def _count_refusal(
    record: dict[str, Any], event: str, user: str | None, refusals: dict[str, Counter[str]]
) -> None:
    if event == "authz.denied":
        who, what = _text(record.get("user")), f"denied:{_text(record.get('reason'))}"
    elif event == "call.rate_limited":
        who, what = _text(record.get("caller")), f"rate_limited:{_text(record.get('reason'))}"
    elif event == "auth.failed":
        who = _text(record.get("user") or record.get("addr"))
        what = f"auth:{_text(record.get('reason'))}"
    else:
        return
    if user is None or who == user:
        # A summary of repeated refusals stands for `count` of them (audit.RefusalDigest).
        refusals.setdefault(who, Counter())[what] += _count(record.get("count"), 1)


def write_report(
    rows: Iterable[CallRow], out: TextIO, fmt: str, refusals: dict[str, Counter[str]]
) -> int:
    """Write rows as `table`, `csv` or `jsonl`, then the refusals summary. Returns the row count.

    Every value is written in full: a table's column is as wide as its header or its widest
    value so far, never cut.
    """
    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.as_dict())
            count += 1
    elif fmt == "jsonl":
        for row in rows:
            out.write(json.dumps({"type": "call", **row.as_dict()}) + "\n")
            count += 1
        for who, counts in sorted(refusals.items()):
            out.write(json.dumps({"type": "refusals", "user": who, **dict(counts)}) + "\n")
        return count
    else:
        widths = [24, 14, 12, 12, 5, 27, 27, 27, 11, 11, 18, 7]
        header = COLUMNS[:-1]
        out.write("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
        out.write("\n")
        for row in rows:
            values = list(row.as_dict().values())[:-1]
            cells = [_text(v) for v in values]
            out.write("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
            out.write("\n")
            count += 1
    if refusals:
        out.write("\nrefusals and rate limits per user\n")
        for who, counts in sorted(refusals.items()):
            details = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            out.write(f"  {who}: {details}\n")
    return count
