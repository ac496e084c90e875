"""The audit log: one JSON object per line, for auditors (contract section 10).

Records pass two guards before they are written. First an allow-list: only the keys in
`AUDIT_FIELDS` survive, whatever a caller passes. Second a redaction processor: any key that could
carry SDP, ICE candidates or tokens is replaced, in case a future field slips through the first.
Values are flattened to JSON scalars and long strings are cut; the JSON encoder escapes every
control and non-ASCII character, so a user-chosen id can never break a line or put a terminal
escape sequence on an auditor's screen.

A client cannot fill the disk with refusals: `RefusalDigest` writes the first refusal of each kind
from a connection, then sums its repeats into one record per `REFUSAL_WINDOW` (docs/audit-log.md,
"Repeated refusals").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import time
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import orjson

if TYPE_CHECKING:
    from callgate.config import AuditSettings

# Every key an audit record may carry. docs/protocol.md documents each.
AUDIT_FIELDS = frozenset(
    {
        "ts",
        "event",
        "conn",
        "addr",
        "user",
        "call_id",
        "caller",
        "callee",
        "media",
        "reason",
        "by",
        "devices",
        "answered",
        "duration_ms",
        "retry_after",
        "msg_event",
        "code",
        "close_code",
        "expires_at",
        "previous_conn",
        "calls",
        "delivered",
        "dropped_messages",
        # on a summary of repeated refusals: how many refusals the record stands for
        "count",
        # the admin API: the operator (the name of the admin key) who acted
        "operator",
        # cluster mode: a node, and a refused log entry's stream id
        "node",
        "entry",
        # the chain itself, and the records that link files and checkpoint the trail
        "seq",
        "mac",
        "prev_file",
        "records",
    }
)
# Keys that could hold secrets or media descriptions; never written even if allow-listed later.
REDACTED_FIELDS = frozenset(
    {"sdp", "offer", "answer", "description", "candidate", "token", "authorization", "secret"}
)
MAX_VALUE_CHARS = 256
# Every `call.requested` record is followed by exactly one of these for the same call.
TERMINAL_CALL_EVENTS = frozenset(
    {
        "call.unavailable",
        "call.busy",
        "call.rate_limited",
        "call.rejected",
        "call.cancelled",
        "call.timeout",
        "call.ended",
    }
)


# Records of a client's message or token being refused: a client can cause one per message it
# sends, so repeats from one connection are summed (`RefusalDigest`). Nothing else is: call,
# session and connection records are written one by one, always.
REFUSAL_EVENTS = frozenset({"authz.denied", "auth.failed"})
# Seconds: after a refusal written in full, repeats of its kind from its connection within this
# window are counted, not written; the count is written when the window ends (or the connection).
REFUSAL_WINDOW = 60.0
# Fields that describe one refused message, not the kind of refusal: left out of a summary.
_PER_MESSAGE_FIELDS = ("call_id",)

Record = tuple[str, Mapping[str, Any]]


class _Burst:
    """Repeats of one kind of refusal from one connection, within the current window."""

    __slots__ = ("count", "fields", "until")

    def __init__(self, fields: dict[str, Any], until: float) -> None:
        self.fields = fields  # the summary's fields, taken from the refusal written in full
        self.until = until
        self.count = 0  # refusals in the window not written one by one


class RefusalDigest:
    """Bounds the records one connection's refusals can write; pure, on the clock it is given.

    A refusal's kind is its event, `msg_event` and `reason`. The first refusal of a kind from a
    connection is written in full and opens a window of `window` seconds; repeats within it are
    only counted. When the window ends with repeats, one summary is written (the same event and
    kind, without the per-message `call_id`, with `count` = the repeats) and a new window opens;
    a window that ends without repeats is forgotten, so the next refusal of that kind is written
    in full again. Two records of one kind from one connection are thus at least `window`
    seconds apart, whatever the client sends. A closing connection's counts are written at once
    (`closed`), before its `conn.close`. Records without a `conn` pass through untouched.
    """

    def __init__(self, window: float = REFUSAL_WINDOW) -> None:
        self._window = window
        self._bursts: dict[str, dict[tuple[str, str, str], _Burst]] = {}

    def admit(self, event: str, fields: Mapping[str, Any], now: float) -> list[Record]:
        """The records to write now for this one (itself, a summary, or nothing)."""
        conn = fields.get("conn")
        if event not in REFUSAL_EVENTS or not isinstance(conn, str):
            return [(event, fields)]
        kind = (event, str(fields.get("msg_event", "")), str(fields.get("reason", "")))
        bursts = self._bursts.setdefault(conn, {})
        burst = bursts.get(kind)
        written: list[Record] = []
        if burst is not None and now >= burst.until:
            if burst.count:  # the burst goes on: its count so far, and this one in a new window
                written.append(_summary(event, burst))
                burst.count = 1
                burst.until = now + self._window
                return written
            burst = None
        if burst is None:
            summary = {k: v for k, v in fields.items() if k not in _PER_MESSAGE_FIELDS}
            bursts[kind] = _Burst(summary, now + self._window)
            written.append((event, fields))
        else:
            burst.count += 1
        return written

    def due(self, now: float) -> list[Record]:
        """Summaries of the windows that have ended (called about once a second)."""
        written: list[Record] = []
        for conn in list(self._bursts):
            bursts = self._bursts[conn]
            for kind in list(bursts):
                burst = bursts[kind]
                if now < burst.until:
                    continue
                if burst.count:
                    written.append(_summary(kind[0], burst))
                    burst.count = 0
                    burst.until = now + self._window
                else:
                    del bursts[kind]
            if not bursts:
                del self._bursts[conn]
        return written

    def closed(self, conn: str) -> list[Record]:
        """The counts of a connection that ends; nothing of it is kept."""
        bursts = self._bursts.pop(conn, {})
        return [_summary(kind[0], burst) for kind, burst in bursts.items() if burst.count]

    def flush(self) -> list[Record]:
        """Every count still open (the trail is closing)."""
        written: list[Record] = []
        for conn in list(self._bursts):
            written.extend(self.closed(conn))
        return written

    def __len__(self) -> int:
        """Open windows, of all connections (tests: nothing is kept for ever)."""
        return sum(len(bursts) for bursts in self._bursts.values())


def _summary(event: str, burst: _Burst) -> Record:
    return event, {**burst.fields, "count": burst.count}


def _scalar(value: Any) -> Any:
    if type(value) is str and len(value) <= MAX_VALUE_CHARS:  # nearly every value
        return value
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."


def iso_utc(unix_ns: int) -> str:
    """`2026-11-24T03:43:50.547165Z`: what structlog's TimeStamper(fmt="iso", utc=True) writes
    (no fraction when it is zero), with the date and time formatted once per second."""
    seconds, nanoseconds = divmod(unix_ns, 1_000_000_000)
    micro = nanoseconds // 1000
    text = _second_text(seconds)
    return f"{text}.{micro:06d}Z" if micro else f"{text}Z"


@lru_cache(maxsize=4)
def _second_text(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _stamp(_: Any, __: str, record: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    record["ts"] = iso_utc(time.time_ns())
    return record


def _prepare(_: Any, __: str, record: MutableMapping[str, Any]) -> dict[str, Any]:
    """The two guards and the flattening, in one pass over the record.

    Only allow-listed keys survive; a key that could carry secrets or media is redacted even if
    it is ever allow-listed; values become JSON scalars, long strings cut, None dropped. `ts`
    and `event` come first, so a line reads left to right as "when, what, details".
    """
    ordered = {"ts": record.get("ts"), "event": record.get("event")}
    for key, value in record.items():
        if value is None or key not in AUDIT_FIELDS:
            continue
        ordered[key] = "[redacted]" if key in REDACTED_FIELDS else _scalar(value)
    return ordered


def _plain(record: Mapping[str, Any]) -> bool:
    """True when orjson writes exactly what the standard library's ASCII-only encoder writes.

    That holds for ASCII strings without DEL, integers within 64 bits, booleans and None; the
    two differ on non-ASCII text (orjson writes UTF-8), DEL, and some floats' exponents, which
    therefore take the standard library's path (a property test holds the two to this).
    """
    for value in record.values():
        kind = type(value)
        if kind is str:
            if not value.isascii() or "\x7f" in value:
                return False
        elif kind is int:
            if not -(2**63) <= value < 2**64:
                return False
        elif kind is not bool and value is not None:
            return False
    return True


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's MAC covers: sorted keys, no spaces, ASCII only, without `mac`."""
    body = {k: v for k, v in record.items() if k != "mac"}
    return _canonical(body, _plain(body))


def _canonical(body: Mapping[str, Any], plain: bool) -> bytes:
    if plain:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def chain_mac(key: bytes, previous_mac: str, record: Mapping[str, Any]) -> str:
    """HMAC-SHA256 over the previous record's MAC and this record's canonical JSON."""
    return hmac.digest(key, previous_mac.encode() + b"\n" + canonical(record), "sha256").hex()


def sign(key: bytes, document: Mapping[str, Any]) -> str:
    """The signature of a checkpoint line (the sidecar file), over its canonical JSON."""
    return hmac.new(
        key, canonical({k: v for k, v in document.items() if k != "sig"}), hashlib.sha256
    ).hexdigest()


def _dumps(record: Any, **_: Any) -> str:
    return _line(record, isinstance(record, dict) and _plain(record))


def _line(record: Any, plain: bool) -> str:
    # ensure_ascii escapes control characters (U+0000-U+001F, ESC) and all non-ASCII text.
    if plain:
        return orjson.dumps(record).decode("ascii")  # the same text, several times faster
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


class AuditLog:
    """Writes audit records, one JSON object per line, each sealed into a hash chain.

    Every record gets `seq` (1, 2, ... across restarts and rotations) and, when a key is
    configured, `mac`: HMAC-SHA256(key, previous mac + canonical JSON of the record). Every
    `checkpoint_every` records or `checkpoint_seconds` (and at close), an `audit.checkpoint` record
    is written and its seq and mac are also appended, signed, to the sink's checkpoint file, which
    lets `callgate audit verify` notice a trail cut short. See docs/audit-log.md.
    """

    def __init__(
        self,
        sink: AuditSink,
        *,
        key: bytes | None = None,
        strict: bool = False,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 60.0,
        refusal_window: float = REFUSAL_WINDOW,
    ) -> None:
        """`strict` (tests) raises on a field outside the allow-list instead of dropping it, so a
        new audit field cannot be silently lost."""
        self._refusals = RefusalDigest(refusal_window)
        self._sink = sink
        self._key = key
        # The HMAC with the key already mixed in: each record's MAC copies it (chain_mac's
        # result, without setting the key up again per record).
        self._keyed = hmac.new(key, digestmod=hashlib.sha256) if key is not None else None
        self._strict = strict
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        self._seq, self._mac = sink.last_link()
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        if sink.chained_across_files:
            self._emit("audit.opened", {"reason": "start", "prev_file": sink.previous_file()})

    @classmethod
    def open(cls, settings: AuditSettings) -> AuditLog:
        """`path = "-"` is stdout; anything else is a rotating file, continued across restarts."""
        key = settings.key.get_secret_value().encode() if settings.key is not None else None
        sink: AuditSink
        if settings.path == "-":
            sink = StreamSink(sys.stdout)
        else:
            sink = FileSink(Path(settings.path), settings.rotate_bytes, settings.rotate_seconds)
        return cls(
            sink,
            key=key,
            checkpoint_every=settings.checkpoint_every,
            checkpoint_seconds=settings.checkpoint_seconds,
        )

    @property
    def tamper_evident(self) -> bool:
        return self._key is not None

    def write(self, event: str, fields: Mapping[str, Any], now: float | None = None) -> None:
        """Write one record; a repeated refusal is counted instead (`RefusalDigest`).

        `now` is the monotonic clock (tests give their own).
        """
        if self._strict:
            unknown = set(fields) - AUDIT_FIELDS
            if unknown:
                raise ValueError(f"audit fields not in the allow-list: {sorted(unknown)}")
        if event in REFUSAL_EVENTS:
            when = time.monotonic() if now is None else now
            for refusal, refusal_fields in self._refusals.admit(event, fields, when):
                self._write(refusal, refusal_fields)
            return
        if event == "conn.close":  # a connection's refusal counts come before its end
            conn = fields.get("conn")
            if isinstance(conn, str):
                for summary, summary_fields in self._refusals.closed(conn):
                    self._write(summary, summary_fields)
        self._write(event, fields)

    def _write(self, event: str, fields: Mapping[str, Any]) -> None:
        if self._sink.needs_rotation():
            previous = self._sink.rotate()
            self._emit("audit.opened", {"reason": "rotation", "prev_file": previous})
        self._emit(event, fields)
        self._since_checkpoint += 1
        if self._since_checkpoint >= self._checkpoint_every:
            self.checkpoint()

    def tick(self, now: float | None = None) -> None:
        """Called about once a second: the counts of refusal windows that ended, and a
        time-based checkpoint when records are waiting. `now`: as for `write`."""
        for summary, summary_fields in self._refusals.due(time.monotonic() if now is None else now):
            self._write(summary, summary_fields)
        if (
            self._since_checkpoint
            and time.monotonic() - self._last_checkpoint >= self._checkpoint_seconds
        ):
            self.checkpoint()

    def checkpoint(self) -> None:
        self._emit("audit.checkpoint", {"records": self._since_checkpoint})
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        if self._key is not None:
            line: dict[str, Any] = {
                "ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "file": self._sink.name,
                "seq": self._seq,
                "mac": self._mac,
            }
            line["sig"] = sign(self._key, line)
            self._sink.write_checkpoint(_dumps(line))

    def close(self) -> None:
        for summary, summary_fields in self._refusals.flush():
            self._write(summary, summary_fields)
        if self._since_checkpoint:
            self.checkpoint()
        self._sink.close()

    def _emit(self, event: str, fields: Mapping[str, Any]) -> None:
        # The processors are structlog's kind (logger, method, record), called in turn: the
        # BoundLogger that ran them (a context copy, a proxy call, its own bookkeeping) cost as
        # much as they do, and an audit record has no context to bind.
        record: dict[str, Any] = {key: value for key, value in fields.items() if key != "event"}
        record["event"] = event
        self._sink.msg(self._seal(None, "msg", _prepare(None, "msg", _stamp(None, "msg", record))))

    def _seal(self, _: Any, __: str, record: MutableMapping[str, Any]) -> str:
        """Number the record, chain its MAC and render its line: the last processor.

        Whether orjson may write it is decided once for both: `seq` is an integer and the MAC
        hexadecimal, so adding them keeps a plain record plain.
        """
        self._seq += 1
        record["seq"] = self._seq
        record.pop("mac", None)  # only the chain writes it
        plain = _plain(record)
        if self._keyed is not None:
            mac = self._keyed.copy()
            mac.update(self._mac.encode() + b"\n" + _canonical(record, plain))
            self._mac = mac.hexdigest()
            record["mac"] = self._mac
        return _line(record, plain)


class AuditSink:
    """Where lines go. The base class is an in-memory-free no-op; see the two below."""

    name = "-"
    chained_across_files = False

    def msg(self, line: str) -> None:  # one finished line (the name is structlog's)
        raise NotImplementedError

    def last_link(self) -> tuple[int, str]:
        """(seq, mac) of the last record already written, to continue the chain."""
        return 0, ""

    def previous_file(self) -> str | None:
        return None

    def needs_rotation(self) -> bool:
        return False

    def rotate(self) -> str:
        raise NotImplementedError

    def write_checkpoint(self, line: str) -> None:
        pass

    def close(self) -> None:
        pass


class StreamSink(AuditSink):
    """A text stream (stdout, or a StringIO in tests); checkpoints are written in-line only."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


class FileSink(AuditSink):
    """An append-only file, rotated by size and age into `<path>.<UTC time>` files.

    The chain continues from the last record of the current file (or, when it is missing, of
    the newest rotated one), so a restart or a rotation never starts a new chain. Checkpoints
    are appended to `<path>.checkpoints`, which is never rotated.
    """

    chained_across_files = True

    def __init__(self, path: Path, rotate_bytes: int, rotate_seconds: float) -> None:
        self.path = path
        self._rotate_bytes = rotate_bytes
        self._rotate_seconds = rotate_seconds
        self._checkpoints = path.with_name(path.name + ".checkpoints")
        self._previous = self._newest_rotated()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._size = self._file.tell()
        self._opened = time.monotonic()

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.path.name

    def rotated_files(self) -> list[Path]:
        prefix = self.path.name + "."
        return sorted(
            p for p in self.path.parent.glob(prefix + "*") if p.name[len(prefix) :][:1].isdigit()
        )

    def _newest_rotated(self) -> str | None:
        rotated = self.rotated_files()
        return rotated[-1].name if rotated else None

    def last_link(self) -> tuple[int, str]:
        for candidate in (self.path, *reversed(self.rotated_files())):
            record = _last_record(candidate)
            if record is not None:
                return int(record.get("seq", 0)), str(record.get("mac", ""))
        return 0, ""

    def previous_file(self) -> str | None:
        # Only a fresh current file follows a rotated one; an existing one continues itself.
        return self._previous if self._size == 0 else None

    def msg(self, line: str) -> None:
        self._file.write(line + "\n")
        self._file.flush()
        self._size += len(line) + 1

    def needs_rotation(self) -> bool:
        return self._size > 0 and (
            self._size >= self._rotate_bytes
            or time.monotonic() - self._opened >= self._rotate_seconds
        )

    def rotate(self) -> str:
        self._file.close()
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        rotated = self.path.with_name(f"{self.path.name}.{stamp}")
        self.path.rename(rotated)
        self._file = self.path.open("a", encoding="utf-8")
        self._size = 0
        self._opened = time.monotonic()
        return rotated.name

    def write_checkpoint(self, line: str) -> None:
        with self._checkpoints.open("a", encoding="utf-8") as out:
            out.write(line + "\n")

    def close(self) -> None:
        self._file.close()


def _last_record(path: Path) -> dict[str, Any] | None:
    """The last complete JSON line of a file (a crash may leave a partial one after it)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            tail = handle.read().splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            return record
    return None
