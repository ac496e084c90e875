"""Reading an audit trail back: `verify` (is it intact?) and `report` (who called whom).

Both stream the files line by line, so a trail of any size is read in bounded memory (verify keeps
one bit per sequence number to tell a reordering from a deletion).

How `verify` names what it finds, for records n-1 and n read in sequence:
* `edited`: n has the expected seq but its MAC does not match its content;
* `deleted`: seq jumps past numbers that appear nowhere in the trail;
* `reordered`: seq goes backwards, or jumps past numbers that appear later;
* `unreadable`: a line that is not a JSON record (edited beyond parsing, or cut mid-line);
* `missing_file`: a file's `audit.opened` record names a previous file that was not given,
  or the first file does not start the trail;
* `truncated`: the last signed checkpoint covers records the trail does not have;
* `bad_checkpoint`: a checkpoint line whose signature fails, or that names a record whose MAC
  differs.
"""

from __future__ import annotations

import csv
import heapq
import hmac
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from callgate.audit import TERMINAL_CALL_EVENTS, chain_mac, sign

_ROTATED = re.compile(r"\.\d{8}T\d{6}\d*Z$")


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind}: {self.message}"


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                record = json.loads(raw)
            except ValueError:
                yield number, None
                continue
            yield number, record if isinstance(record, dict) else None


def _first_seq(path: Path) -> int:
    for _, record in _records(path):
        if record is not None and isinstance(record.get("seq"), int):
            return int(record["seq"])
    return sys.maxsize


class _SeqBitmap:
    def __init__(self) -> None:
        self._bits = bytearray()

    def add(self, seq: int) -> None:
        index = seq >> 3
        if index >= len(self._bits):
            self._bits.extend(bytes(index - len(self._bits) + 1024))
        self._bits[index] |= 1 << (seq & 7)

    def __contains__(self, seq: int) -> bool:
        index = seq >> 3
        return 0 <= index < len(self._bits) and bool(self._bits[index] & (1 << (seq & 7)))


def verify(
    paths: Iterable[Path], key: bytes, checkpoint_files: Iterable[Path] = ()
) -> list[Problem]:
    """Every problem found, in trail order (the first one is the first broken link)."""
    files = sorted(paths, key=lambda p: (_first_seq(p), p.name))
    seen = _SeqBitmap()
    for path in files:
        for _, record in _records(path):
            if record is not None and isinstance(record.get("seq"), int):
                seen.add(record["seq"])

    problems: list[Problem] = []
    previous_seq: int | None = None
    previous_mac = ""
    last_place = ("", 0)
    checkpoint_macs: dict[int, str] = {}
    given = {p.name for p in files}
    for index, path in enumerate(files):
        for number, record in _records(path):
            place = (path.name, number)
            if record is None or not isinstance(record.get("seq"), int):
                problems.append(Problem("unreadable", *place, "not an audit record"))
                continue
            seq, mac = record["seq"], str(record.get("mac", ""))
            if number == 1:
                problems += _check_file_link(record, path, index, files, given)
            if previous_seq is not None and seq != previous_seq + 1:
                problems.append(_jump(previous_seq, seq, seen, place))
            elif (
                previous_seq is None and seq != 1 and index == 0 and record.get("prev_file") is None
            ):
                problems.append(
                    Problem("missing_file", *place, f"the trail starts at seq {seq}, not 1")
                )
            elif hmac.compare_digest(chain_mac(key, previous_mac, record), mac) is False and (
                previous_seq is not None or seq == 1
            ):
                problems.append(
                    Problem("edited", *place, f"record seq {seq} does not match its MAC")
                )
            if record.get("event") == "audit.checkpoint":
                checkpoint_macs[seq] = mac
            previous_seq, previous_mac, last_place = seq, mac, place
    problems += _check_checkpoints(key, checkpoint_files, previous_seq, last_place, checkpoint_macs)
    return problems


def _jump(previous: int, seq: int, seen: _SeqBitmap, place: tuple[str, int]) -> Problem:
    if seq <= previous:
        return Problem("reordered", *place, f"seq {seq} comes after seq {previous}")
    missing = range(previous + 1, seq)
    if all(n in seen for n in missing):
        return Problem("reordered", *place, f"seq {seq} comes before seq {previous + 1}")
    shown = f"{missing.start}" if len(missing) == 1 else f"{missing.start}-{missing.stop - 1}"
    return Problem("deleted", *place, f"record(s) seq {shown} missing before seq {seq}")


def _check_file_link(
    record: dict[str, Any], path: Path, index: int, files: list[Path], given: set[str]
) -> list[Problem]:
    previous_file = record.get("prev_file")
    if record.get("event") != "audit.opened" or not previous_file:
        return []
    expected = files[index - 1].name if index > 0 else None
    if previous_file != expected and previous_file not in given:
        return [
            Problem(
                "missing_file",
                path.name,
                1,
                f"follows {previous_file}, which was not given"
                + (f" (the file before it here is {expected})" if expected else ""),
            )
        ]
    return []


def _check_checkpoints(
    key: bytes,
    checkpoint_files: Iterable[Path],
    last_seq: int | None,
    last_place: tuple[str, int],
    checkpoint_macs: dict[int, str],
) -> list[Problem]:
    problems: list[Problem] = []
    newest: tuple[int, str, int] | None = None
    for path in checkpoint_files:
        for number, line in _records(path):
            place = (path.name, number)
            if line is None or not hmac.compare_digest(sign(key, line), str(line.get("sig"))):
                problems.append(Problem("bad_checkpoint", *place, "signature does not match"))
                continue
            seq = int(line["seq"])
            if seq in checkpoint_macs and checkpoint_macs[seq] != line.get("mac"):
                problems.append(
                    Problem("bad_checkpoint", *place, f"seq {seq} in the trail has another MAC")
                )
            if newest is None or seq > newest[0]:
                newest = (seq, path.name, number)
    if newest is not None and (last_seq is None or last_seq < newest[0]):
        problems.append(
            Problem(
                "truncated",
                *last_place,
                f"the trail ends at seq {last_seq}, but checkpoint {newest[1]}:{newest[2]}"
                f" covers seq {newest[0]}",
            )
        )
    return problems


def checkpoint_files_for(paths: Iterable[Path]) -> list[Path]:
    """The `.checkpoints` sidecars of the trail these files belong to, where they exist."""
    sidecars = {path.with_name(_ROTATED.sub("", path.name) + ".checkpoints") for path in paths}
    return sorted(p for p in sidecars if p.exists())


# -- report -----------------------------------------------------------------------------------


@dataclass(slots=True)
class CallRow:
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


COLUMNS = list(CallRow("", "", "").as_dict())


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return datetime.fromtimestamp(float(value), UTC)


def calls(
    paths: Iterable[Path],
    *,
    user: str | None = None,
    since: str | None = None,
    until: str | None = None,
    refusals: dict[str, Counter[str]] | None = None,
) -> Iterator[CallRow]:
    """One row per call, yielded as each call ends (calls still open at the end come last).

    `refusals`, if given, is filled per user with counts of refusals and rate limits.
    """
    start, stop = _parse_time(since), _parse_time(until)
    live: dict[tuple[str, str], CallRow] = {}
    for record in _by_time(paths):
        when = _parse_time(record.get("ts"))
        if when is not None and ((start and when < start) or (stop and when > stop)):
            continue
        event = str(record.get("event", ""))
        if refusals is not None:
            _count_refusal(record, event, user, refusals)
        if not event.startswith("call."):
            continue
        key = (str(record.get("caller", "")), str(record.get("call_id", "")))
        if event == "call.requested":
            live[key] = CallRow(
                key[1],
                key[0],
                str(record.get("callee", "")),
                media=str(record.get("media", "")),
                requested=str(record.get("ts", "")),
                connections=[str(record.get("conn", ""))],
            )
            continue
        found = live.get(key)
        if found is None:
            continue  # the call was requested before the time range
        row = found
        if event == "call.ringing":
            row.devices = int(record.get("devices", 0))
        elif event == "call.answered":
            row.answered = str(record.get("ts", ""))
            row.connections.append(str(record.get("conn", "")))
        if event in TERMINAL_CALL_EVENTS:
            row.ended = str(record.get("ts", ""))
            row.outcome = event.removeprefix("call.")
            row.reason = str(record.get("reason", ""))
            row.duration_ms = record.get("duration_ms")
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
        for _, record in _records(path):
            if record is not None:
                yield _sort_key(record.get("ts")), record

    ordered = sorted(paths, key=lambda p: (_first_seq(p), p.name))
    for _, record in heapq.merge(*(readable(path) for path in ordered), key=lambda pair: pair[0]):
        yield record


def _sort_key(ts: object) -> str:
    """RFC 3339 UTC times sort as text once their fraction has the same width."""
    text = str(ts or "")
    if text.endswith("Z") and "." not in text:
        text = text[:-1] + ".000000Z"
    return text


def _count_refusal(
    record: dict[str, Any], event: str, user: str | None, refusals: dict[str, Counter[str]]
) -> None:
    if event == "authz.denied":
        who, what = str(record.get("user", "")), f"denied:{record.get('reason', '')}"
    elif event == "call.rate_limited":
        who, what = str(record.get("caller", "")), f"rate_limited:{record.get('reason', '')}"
    elif event == "auth.failed":
        who, what = (
            str(record.get("user") or record.get("addr", "")),
            f"auth:{record.get('reason')}",
        )
    else:
        return
    if user is None or who == user:
        refusals.setdefault(who, Counter())[what] += 1


def write_report(
    rows: Iterable[CallRow], out: TextIO, fmt: str, refusals: dict[str, Counter[str]]
) -> int:
    """Write rows as `table`, `csv` or `jsonl`, then the refusals summary. Returns the row count."""
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
        widths = [14, 12, 12, 5, 27, 27, 27, 11, 11, 18, 7]
        header = COLUMNS[:-1]
        out.write("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "\n")
        for row in rows:
            values = list(row.as_dict().values())[:-1]
            cells = ["" if v is None else str(v) for v in values]
            out.write("  ".join(c[:w].ljust(w) for c, w in zip(cells, widths, strict=True)) + "\n")
            count += 1
    if refusals and fmt != "jsonl":
        out.write("\nrefusals and rate limits per user\n")
        for who, counts in sorted(refusals.items()):
            details = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            out.write(f"  {who}: {details}\n")
    return count
