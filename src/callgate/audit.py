"""The audit log: one JSON object per line, for auditors (contract section 10).

Records pass two guards before they are written. First an allow-list: only the keys in
`AUDIT_FIELDS` survive, whatever a caller passes. Second a redaction processor: any key that could
carry SDP, ICE candidates or tokens is replaced, in case a future field slips through the first.
Values are flattened to JSON scalars and long strings are cut; the JSON encoder escapes every
control and non-ASCII character, so a user-chosen id can never break a line or put a terminal
escape sequence on an auditor's screen.

A client cannot fill the disk with refusals, nor with the two records it can cause at its message
rate without being refused (a token refresh, a renegotiation): `RefusalDigest` writes the first
record of each kind from a connection, then sums its repeats into one record per
`REFUSAL_WINDOW` (docs/audit-log.md, "Repeated refusals").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import logging.handlers
import math
import mmap
import queue
import secrets
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from callgate.errors import ConfigError
from callgate.hmac_sha256 import HmacSha256

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
        # the server-assigned key of a call, unique in the deployment
        "call_key",
        # the trail a record of the chain belongs to
        "trail",
        # the chain itself, and the records that link files, checkpoint and recover the trail
        "seq",
        "mac",
        "prev",
        "prev_mac",
        "records",
        "digest",
        "key_id",
        "sig",
        "discarded_bytes",
        "discarded_sha256",
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
# sends, so repeats from one connection are summed (`RefusalDigest`).
REFUSAL_EVENTS = frozenset({"authz.denied", "auth.failed"})
# Records a client can also cause with every message it sends, accepted: renewing its token on
# its connection, renegotiating its call. Summed as refusals are (a renegotiation's per call).
# Nothing else is: the other call, session and connection records are written one by one, always.
RENEGOTIATED = "call.renegotiated"
REPEATED_EVENTS = frozenset({"token.refreshed", RENEGOTIATED})
SUMMED_EVENTS = REFUSAL_EVENTS | REPEATED_EVENTS
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
    """Bounds the records one connection's refusals (and `REPEATED_EVENTS`) can write; pure, on
    the clock it is given.

    A refusal's kind is its event, `msg_event` and `reason`; a renegotiation's, its event and
    call (`call_key`); a token refresh's, its event. The first record of a kind from a
    connection is written in full and opens a window of `window` seconds; repeats within it are
    only counted. When the window ends with repeats, one summary is written (the same event and
    kind, a refusal's without the per-message `call_id`, with `count` = the repeats) and a new
    window opens; a window that ends without repeats is forgotten, so the next record of that
    kind is written in full again. Two records of one kind from one connection are thus at
    least `window` seconds apart, whatever the client sends. A closing connection's counts are
    written at once (`closed`), before its `conn.close`. Records without a `conn` pass through
    untouched.
    """

    def __init__(self, window: float = REFUSAL_WINDOW) -> None:
        self._window = window
        self._bursts: dict[str, dict[tuple[str, str, str, str], _Burst]] = {}

    def admit(self, event: str, fields: Mapping[str, Any], now: float) -> list[Record]:
        """The records to write now for this one (itself, a summary, or nothing)."""
        conn = fields.get("conn")
        if event not in SUMMED_EVENTS or not isinstance(conn, str):
            return [(event, fields)]
        kind = (
            event,
            str(fields.get("msg_event", "")),
            str(fields.get("reason", "")),
            str(fields.get("call_key", "")),
        )
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
            summary = (
                {k: v for k, v in fields.items() if k not in _PER_MESSAGE_FIELDS}
                if event in REFUSAL_EVENTS
                else dict(fields)
            )
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

    def call_over(self, call_key: str) -> list[Record]:
        """The renegotiation counts of a call that ends, from every connection, so that they
        come before its terminal record (a call is read up to that record); nothing of that
        call is kept."""
        written: list[Record] = []
        for conn in list(self._bursts):
            bursts = self._bursts[conn]
            for kind in [k for k in bursts if k[0] == RENEGOTIATED and k[3] == call_key]:
                burst = bursts.pop(kind)
                if burst.count:
                    written.append(_summary(kind[0], burst))
            if not bursts:
                del self._bursts[conn]
        return written

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
    """The bytes a record's MAC, digest and signature cover: sorted keys, no spaces, ASCII only,
    without `mac` (and, for a signature, without `sig`)."""
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


def chain_digest(previous: str, body: bytes) -> str:
    """The public chain: SHA-256 over the previous record's digest and this record's canonical
    JSON (`canonical`). Nobody needs a key to compute it; checkpoints sign it."""
    return hashlib.sha256(previous.encode() + b"\n" + body).hexdigest()


def signed_part(record: Mapping[str, Any]) -> bytes:
    """What a checkpoint's Ed25519 signature covers: its canonical JSON without `mac` and `sig`."""
    return canonical({k: v for k, v in record.items() if k != "sig"})


# -- keys ---------------------------------------------------------------------------------------


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """A public key's id in checkpoints: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(text: str) -> Ed25519PrivateKey:
    """An Ed25519 private key: PEM (PKCS#8), or the base64 of its 32-byte seed.

    Raises: ValueError (not an Ed25519 private key).
    """
    if "-----BEGIN" not in text:
        return Ed25519PrivateKey.from_private_bytes(_base64_key(text, "seed"))
    key = serialization.load_pem_private_key(text.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")  # noqa: TRY004 - one error for a bad key
    return key


def load_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key: PEM (SubjectPublicKeyInfo) or the base64 of its 32 raw bytes.

    Raises: ValueError (not an Ed25519 public key).
    """
    if "-----BEGIN" not in text:
        return Ed25519PublicKey.from_public_bytes(_base64_key(text, "public key"))
    if "PRIVATE KEY" in text:
        raise ValueError("this is a private key: give the verifier the public key only")
    key = serialization.load_pem_public_key(text.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")  # noqa: TRY004
    return key


def _base64_key(text: str, what: str) -> bytes:
    raw = base64.b64decode(text.strip(), validate=True)
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 {what} is 32 bytes (base64: 44 characters)")
    return raw


def signing_key(settings: AuditSettings) -> Ed25519PrivateKey | None:
    """The configured signing key (`signing_key`, or `signing_key_file`), if any.

    Raises: ConfigError naming the key.
    """
    if settings.signing_key is not None:
        name, text = "audit.signing_key", settings.signing_key.get_secret_value()
    elif settings.signing_key_file is not None:
        name = "audit.signing_key_file"
        try:
            text = Path(settings.signing_key_file).read_text()
        except OSError as exc:
            raise ConfigError(
                f"{name}: cannot read {settings.signing_key_file}: {exc.strerror}"
            ) from None
    else:
        return None
    try:
        return load_private_key(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: not an Ed25519 private key ({exc})") from None


def public_pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


class Signer:
    """The server's checkpoint signature: Ed25519, named by its key id."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.key_id = key_id_of(private_key.public_key())

    def seal(self, record: MutableMapping[str, Any]) -> None:
        """Add `key_id` and `sig`: the Ed25519 signature of the record's `signed_part`."""
        record["key_id"] = self.key_id
        record["sig"] = self._key.sign(signed_part(record)).hex()


# -- strict reading -----------------------------------------------------------------------------

# Integers beyond this lose precision in JavaScript and many JSON tools (RFC 7493, I-JSON): two
# readers would see two values, so a record holding one is refused.
MAX_SAFE_INTEGER = 2**53 - 1
# No record the server writes comes near this; a longer line is refused unread.
MAX_LINE_BYTES = 65536


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return record


def _integer(text: str) -> int:
    if len(text) > 17 or abs(int(text)) > MAX_SAFE_INTEGER:
        raise ValueError(f"number {text[:24]} is outside the safe integer range")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:24]} is not finite")
    return value


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_STRICT = json.JSONDecoder(
    object_pairs_hook=_object, parse_int=_integer, parse_float=_float, parse_constant=_constant
)


def parse_record(raw: bytes) -> dict[str, Any]:
    """One line as an audit record, read strictly: UTF-8, one flat JSON object, no duplicate key,
    integers within +-(2**53 - 1), finite numbers. Raises: ValueError saying what is wrong."""
    if len(raw) > MAX_LINE_BYTES:
        raise ValueError(f"a line of {len(raw)} bytes")
    value = _STRICT.decode(raw.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 - one error type for a bad line
    for key, item in value.items():
        if isinstance(item, dict | list):
            raise ValueError(f"{key!r} holds a nested value")  # noqa: TRY004
    return value


def render(record: Mapping[str, Any]) -> str:
    """A record's line, as the log writes it."""
    return _line(record, _plain(record))


def _line(record: Any, plain: bool) -> str:
    # ensure_ascii escapes control characters (U+0000-U+001F, ESC) and all non-ASCII text.
    if plain:
        return orjson.dumps(record).decode("ascii")  # the same text, several times faster
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


class AuditLog:
    """Writes audit records, one JSON object per line, each sealed into two chains.

    Every record gets `seq` (1, 2, ... across restarts and rotations) and, when an HMAC key is
    configured, `mac`: HMAC-SHA256(key, previous mac + canonical JSON of the record). Every
    record also extends a public digest (`chain_digest`) that needs no key. Every
    `checkpoint_every` records or `checkpoint_seconds`, and at close, an `audit.checkpoint` record
    carries that digest, signed with the server's Ed25519 key when one is configured; the same
    line goes to every anchor (a file on other storage, syslog), where the log's writer cannot
    take it back. See docs/audit-log.md.
    """

    def __init__(
        self,
        sink: AuditSink,
        *,
        key: bytes | None = None,
        signer: Signer | None = None,
        anchors: Sequence[Anchor] = (),
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
        # The HMAC with the key already mixed in (chain_mac's result, without setting the key
        # up again per record).
        self._keyed = HmacSha256(key) if key is not None else None
        self._signer = signer
        self._anchors = list(anchors)
        self._strict = strict
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        resume = sink.resume()
        self._seq, self._mac, self._digest = resume.seq, resume.mac, resume.digest
        # The trail's id, in every `audit.opened` and checkpoint: tells one trail's anchor lines
        # from another's (cluster nodes, one syslog), and groups a report's files by trail.
        self._trail = resume.trail or secrets.token_hex(8)
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        # Told of each record as it is written (webhooks.py): a burst of refusals the digest
        # sums up reaches it as the records the trail holds, not once per refusal.
        self.observer: Callable[[str, Mapping[str, Any]], None] | None = None
        if resume.torn:  # a crash cut the last line: what is discarded is said, then sealed
            self._emit(
                "audit.recovered",
                {
                    "discarded_bytes": len(resume.torn),
                    "discarded_sha256": hashlib.sha256(resume.torn).hexdigest(),
                },
            )
        if sink.chained_across_files:
            self._emit("audit.opened", {"reason": "start", **self._link()})

    @classmethod
    def open(cls, settings: AuditSettings) -> AuditLog:
        """`path = "-"` is stdout; anything else is a rotating file, continued across restarts.

        Raises: OSError (a file or an anchor cannot be opened), ValueError (a bad signing key).
        """
        key = settings.key.get_secret_value().encode() if settings.key is not None else None
        sink: AuditSink
        if settings.path == "-":
            sink = StreamSink(sys.stdout)
        else:
            sink = FileSink(Path(settings.path), settings.rotate_bytes, settings.rotate_seconds)
        private = signing_key(settings)
        return cls(
            sink,
            key=key,
            signer=Signer(private) if private is not None else None,
            anchors=open_anchors(settings),
            checkpoint_every=settings.checkpoint_every,
            checkpoint_seconds=settings.checkpoint_seconds,
        )

    @property
    def tamper_evident(self) -> bool:
        return self._key is not None or self._signer is not None

    def _link(self) -> dict[str, Any]:
        """What a new file or run commits to: the chains as they stand before its first record."""
        return {
            "trail": self._trail,
            "prev": self._digest,
            "prev_mac": self._mac if self._keyed is not None else None,
            "key_id": self._signer.key_id if self._signer is not None else None,
        }

    def write(self, event: str, fields: Mapping[str, Any], now: float | None = None) -> None:
        """Write one record; a repeated refusal (or token refresh, or renegotiation) is
        counted instead (`RefusalDigest`).

        `now` is the monotonic clock (tests give their own).
        """
        if self._strict:
            unknown = set(fields) - AUDIT_FIELDS
            if unknown:
                raise ValueError(f"audit fields not in the allow-list: {sorted(unknown)}")
        if event in SUMMED_EVENTS:
            when = time.monotonic() if now is None else now
            for refusal, refusal_fields in self._refusals.admit(event, fields, when):
                self._write(refusal, refusal_fields)
            return
        if event == "conn.close":  # a connection's refusal counts come before its end
            conn = fields.get("conn")
            if isinstance(conn, str):
                for summary, summary_fields in self._refusals.closed(conn):
                    self._write(summary, summary_fields)
        elif event in TERMINAL_CALL_EVENTS:  # and a call's renegotiation counts before its end
            call_key = fields.get("call_key")
            if isinstance(call_key, str):
                for summary, summary_fields in self._refusals.call_over(call_key):
                    self._write(summary, summary_fields)
        self._write(event, fields)

    def _write(self, event: str, fields: Mapping[str, Any]) -> None:
        if self._sink.needs_rotation():
            self._sink.rotate()
            self._emit("audit.opened", {"reason": "rotation", **self._link()})
        self._emit(event, fields)
        if self.observer is not None:
            self.observer(event, fields)
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
        """Seal the trail so far: a checkpoint record, also sent to every anchor."""
        line = self._emit("audit.checkpoint", {"records": self._since_checkpoint})
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        for anchor in self._anchors:
            anchor.write(line)

    def close(self) -> None:
        for summary, summary_fields in self._refusals.flush():
            self._write(summary, summary_fields)
        if self._since_checkpoint:
            self.checkpoint()
        self._sink.close()
        for anchor in self._anchors:
            anchor.close()

    def _emit(self, event: str, fields: Mapping[str, Any]) -> str:
        # The processors are structlog's kind (logger, method, record), called in turn: the
        # BoundLogger that ran them (a context copy, a proxy call, its own bookkeeping) cost as
        # much as they do, and an audit record has no context to bind.
        record: dict[str, Any] = {key: value for key, value in fields.items() if key != "event"}
        record["event"] = event
        line = self._seal(None, "msg", _prepare(None, "msg", _stamp(None, "msg", record)))
        self._sink.msg(line)
        return line

    def _seal(self, _: Any, __: str, record: MutableMapping[str, Any]) -> str:
        """Number the record, sign it if it is a checkpoint, chain its digest and MAC, and render
        its line: the last processor.

        Whether orjson may write it is decided once for all: `seq` is an integer, and the digest,
        key id, signature and MAC hexadecimal, so adding them keeps a plain record plain.
        """
        self._seq += 1
        record["seq"] = self._seq
        record.pop("mac", None)  # only the chain writes it
        if record["event"] == "audit.checkpoint":
            record["trail"] = self._trail
            record["digest"] = self._digest
            if self._signer is not None:
                self._signer.seal(record)
        plain = _plain(record)
        body = _canonical(record, plain)
        self._digest = chain_digest(self._digest, body)
        if self._keyed is not None:
            self._mac = self._keyed.hexdigest(self._mac.encode() + b"\n" + body)
            record["mac"] = self._mac
        return _line(record, plain)


class Resume:
    """Where a trail left off: the last record's seq, MAC and digest, and a torn last line."""

    __slots__ = ("digest", "mac", "seq", "torn", "trail")

    def __init__(
        self, seq: int = 0, mac: str = "", digest: str = "", torn: bytes = b"", trail: str = ""
    ) -> None:
        self.trail = trail
        self.seq = seq
        self.mac = mac
        self.digest = digest
        self.torn = torn


class AuditSink:
    """Where lines go. The base class is an in-memory-free no-op; see the two below."""

    chained_across_files = False

    def msg(self, line: str) -> None:  # one finished line (the name is structlog's)
        raise NotImplementedError

    def resume(self) -> Resume:
        """Where the trail already written ends, to continue its chains."""
        return Resume()

    def needs_rotation(self) -> bool:
        return False

    def rotate(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass


class StreamSink(AuditSink):
    """A text stream (stdout, or a StringIO in tests)."""

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
    the newest rotated one), so a restart or a rotation never starts a new chain. A last line
    cut by a crash is ended at start, and its bytes reported by `resume` (the log seals them off
    with an `audit.recovered` record).
    """

    chained_across_files = True

    def __init__(self, path: Path, rotate_bytes: int, rotate_seconds: float) -> None:
        self.path = path
        self._rotate_bytes = rotate_bytes
        self._rotate_seconds = rotate_seconds
        path.parent.mkdir(parents=True, exist_ok=True)
        self._resume = Resume()
        for candidate in (path, *reversed(self.rotated_files())):
            found = _resume_from(candidate)
            if found is not None:
                self._resume = found
                break
        self._file = path.open("a", encoding="utf-8")
        if self._file.tell() and _ends_unterminated(path):
            self._file.write("\n")  # end the cut line, so the next record starts a line of its own
            self._file.flush()
        self._size = self._file.tell()
        self._opened = time.monotonic()

    def rotated_files(self) -> list[Path]:
        prefix = self.path.name + "."
        return sorted(
            p for p in self.path.parent.glob(prefix + "*") if p.name[len(prefix) :][:1].isdigit()
        )

    def resume(self) -> Resume:
        return self._resume

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

    def close(self) -> None:
        self._file.close()


def _ends_unterminated(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) != b"\n"


# The records a digest can restart from: each states the digest before itself.
_RESTART_MARKS = (b'"event":"audit.opened"', b'"event":"audit.checkpoint"')


def _resume_from(path: Path) -> Resume | None:
    """Where the trail in `path` ends (None: no record in it).

    The digest is recomputed from the file's last `audit.opened` or `audit.checkpoint` record
    (each states the digest before it) over the records after it, so only the tail is read. A
    last line without its newline is the crash's: a complete record is kept, anything else is
    returned as `torn`.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        end = view.rfind(b"\n") + 1
        last = bytes(view[end:])
        mark = max(view.rfind(marker, 0, end) for marker in _RESTART_MARKS)
        start = view.rfind(b"\n", 0, mark) + 1 if mark >= 0 else 0
        lines = bytes(view[start:end]).splitlines()
    torn = b""
    if last:
        try:
            parse_record(last)
            lines.append(last)  # only its newline was lost
        except ValueError:
            torn = last
    resume = Resume(torn=torn)
    digest: str | None = None
    found = False
    for line in lines:
        try:
            record = parse_record(line)
        except ValueError:
            continue  # a line cut by an earlier crash, sealed off after it
        if record.get("event") == "audit.opened" and isinstance(record.get("prev"), str):
            digest = record["prev"]
            resume.trail = str(record.get("trail", ""))
        elif record.get("event") == "audit.checkpoint" and isinstance(record.get("digest"), str):
            digest = record["digest"]
            resume.trail = str(record.get("trail", ""))
        if digest is not None:
            digest = chain_digest(digest, canonical(record))
        seq = record.get("seq")
        resume.seq = seq if isinstance(seq, int) else resume.seq
        resume.mac = str(record.get("mac", ""))
        found = True
    resume.digest = digest or ""
    return resume if found or torn else None


# -- anchors: where checkpoints go besides the trail ---------------------------------------------


def open_anchors(settings: AuditSettings) -> list[Anchor]:
    """The configured anchors, open. Raises: OSError (the anchor file cannot be opened)."""
    anchors: list[Anchor] = []
    if settings.anchor_path is not None:
        anchors.append(FileAnchor(Path(settings.anchor_path)))
    if settings.anchor_syslog is not None:
        anchors.append(SyslogAnchor(settings.anchor_syslog))
    if settings.anchor_url is not None:
        anchors.append(HttpAnchor(settings.anchor_url))
    return anchors


class Anchor:
    """A second home for checkpoint lines, out of the log writer's reach."""

    def write(self, line: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FileAnchor(Anchor):
    """Appends each checkpoint line to a file meant for other storage (another disk, a mount the
    server may only append to, a WORM bucket's gateway), flushed at once: a crash of the process
    cannot lose it. (Not fsynced: that would stall the event loop for a disk's latency.)"""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def write(self, line: str) -> None:
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# The tag before each checkpoint line in syslog; `audit verify --anchor` reads a line's JSON
# from its first "{" on, so an exported syslog file can be given as it is.
SYSLOG_TAG = "callgate-audit"


class SyslogAnchor(Anchor):
    """Sends each checkpoint line to syslog: a local socket (`/dev/log`) or `host:port` (UDP)."""

    def __init__(self, address: str) -> None:
        target: str | tuple[str, int] = address
        if not address.startswith("/"):
            host, _, port = address.rpartition(":")
            target = (host, int(port))
        self._handler = logging.handlers.SysLogHandler(
            address=target, facility=logging.handlers.SysLogHandler.LOG_AUTH
        )
        self._handler.ident = f"{SYSLOG_TAG}: "
        self._handler.append_nul = False  # the line as it is: an export of it verifies as it is

    def write(self, line: str) -> None:
        self._handler.emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))

    def close(self) -> None:
        self._handler.close()


class HttpAnchor(Anchor):
    """POSTs each checkpoint line (`application/json`) to an HTTP(S) endpoint that keeps them.

    A worker thread sends, so the event loop never waits for the network; a line that cannot be
    sent is retried (`ATTEMPTS` times, a second apart) and then reported on stderr: that
    checkpoint is not anchored, the next ones still are. `close` waits up to `CLOSE_WAIT` seconds
    for the lines still queued (the final checkpoint of a shutdown).
    """

    ATTEMPTS = 3
    TIMEOUT = 5.0
    CLOSE_WAIT = 10.0
    QUEUED = 1000  # lines waiting; more are dropped (and reported), never the event loop blocked

    def __init__(self, url: str) -> None:
        self._url = url
        self._lines: queue.Queue[str | None] = queue.Queue(self.QUEUED)
        self._worker = threading.Thread(target=self._send_all, name="audit-anchor", daemon=True)
        self._worker.start()

    def write(self, line: str) -> None:
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            _anchor_failed(self._url, "too many checkpoints waiting: one dropped")

    def close(self) -> None:
        try:
            self._lines.put(None, timeout=self.CLOSE_WAIT)
        except queue.Full:
            return
        self._worker.join(self.CLOSE_WAIT)

    def _send_all(self) -> None:
        while (line := self._lines.get()) is not None:
            for attempt in range(self.ATTEMPTS):
                try:
                    self._send(line)
                    break
                except (OSError, ValueError) as exc:
                    if attempt == self.ATTEMPTS - 1:
                        _anchor_failed(self._url, f"checkpoint not anchored: {exc}")
                    else:
                        time.sleep(1.0)

    def _send(self, line: str) -> None:
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked by the settings
            self._url,
            data=line.encode("ascii"),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=self.TIMEOUT) as response:  # noqa: S310
            response.read()


def _anchor_failed(url: str, problem: str) -> None:
    from callgate.log import get_logger  # here: callgate.log imports this module

    get_logger("callgate.audit").error("audit anchor failed", url=url, problem=problem)
