"""The inboxes: node-to-node batches on Redis streams, through two long-lived threads.

A node's inbox is where its batches go while no link to it is up, or with links off (links.py),
and what the leader hands to a dead node's devices' resume buffers. Why threads, when the rest
of the cluster uses coredis on trio: with links off, deliveries are the one per-message path
through Redis. Measured here (docs/cluster.md, "Why two Redis clients"), a coredis command
costs about 215 µs of CPU on trio (a reader task, a writer task and memory streams per
connection: four task switches per command), against about 27 µs for the same round trip on a
bare trio socket; redis-py (with hiredis) in a thread of its own does it at close to the
socket's cost. So each node runs:

* a **writer** thread: it takes every batch queued since its last round trip (sealed on trio's
  side by links.py: signed, numbered, naming the target) and appends them with one pipeline.
  Batches pile up while a round trip is in flight, so the cost per message falls with the load;
* a **reader** thread: `XREAD BLOCK` on this node's inbox, each batch read handed to trio
  (`TrioToken.run_sync_soon`). What trio has carried out is trimmed by whichever thread makes
  the next round trip, in that round trip: no wake-up of its own.

Hand-offs are a `queue.SimpleQueue` one way and `run_sync_soon` the other: no thread waits on
trio, and trio never waits on a thread. What the threads share with trio is said at each field.

An inbox of another type than a stream (only a Redis client without the key makes one: Redis
never changes a key's type) would fail every append to it and every read of it for good, and
no delivery by that inbox would arrive. Whichever thread meets it removes it (if it still is
not a stream, so a stream another node made meanwhile is kept), tells trio (which audits it),
and goes on at once. The writer removes it and appends again in one script, so a client that
keeps retyping the inbox has no moment between the two to retype it in: the appends that
failed are made again, the others not (their targets would refuse the copies as replays).

An append Redis refuses by itself (an answer about that inbox alone, not Redis away: a stream
at the last id a stream can have takes no more) holds only that target's batches, in order,
tried again on a back-off of that target's own; every other target's go out meanwhile. They
count as pending, as while Redis is away (past MAX_OUTBOX orders the node refuses new ones,
counted and logged). Such a stream (only a client without the key appends at that id) is
removed by its reader once it has read it to that id, since no id follows it, and read again
from its start: the held batches go out with their target's next attempt.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis
import trio

from callgate.cluster.store import DROP_OTHER_TYPE
from callgate.log import get_logger

log = get_logger("callgate.cluster")

READ_BLOCK_MS = 1000
COALESCE = 0.002  # seconds the writer waits for more orders before a round trip
READ_COUNT = 512
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# (target node, the batch's stream fields, how many orders it holds)
Outgoing = tuple[str, Mapping[bytes, bytes], int]
# Queued by `stop`.
STOP = "stop"
# KEYS: an inbox. Removed if it is not a stream (nor absent): 1, else 0.
_UNLINK_IF_NOT_STREAM = (
    DROP_OTHER_TYPE
    + """
if dropped(KEYS[1], 'stream') then return 1 end
return 0
"""
)
# KEYS: an inbox. ARGV: a batch's fields and values. The inbox removed if it is not a stream
# (nor absent), then the batch appended: 1 if it was removed, else 0. One script, so a client
# that keeps retyping the inbox cannot slip its write between the removal and the append.
_APPEND_OVER_OTHER_TYPE = (
    DROP_OTHER_TYPE
    + """
local removed = dropped(KEYS[1], 'stream')
redis.call('XADD', KEYS[1], '*', unpack(ARGV))
if removed then return 1 end
return 0
"""
)


# The largest part of a stream id (each of its two parts is an unsigned 64-bit number).
LAST_PART = 2**64 - 1
# KEYS: an inbox. ARGV: the last id a stream can have, which trio carried out. Removed if that
# still is its last entry (nothing can have been appended after it): 1, else 0.
_DROP_READ_TO_THE_END = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'stream' then return 0 end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last and last[1] == ARGV[1] then
  redis.call('UNLINK', KEYS[1])
  return 1
end
return 0
"""


class _Held:
    """A target's batches that Redis refused to append (an answer about that inbox alone),
    in order, with when they are tried again and how many attempts in a row failed."""

    def __init__(self) -> None:
        self.batches: list[Outgoing] = []
        self.retry_at = 0.0
        self.attempts = 0


class _NotAppended(Exception):
    """Some commands of a round trip were not carried out: which, and why."""

    def __init__(self, commands: list[tuple[Any, ...]], error: redis.RedisError) -> None:
        super().__init__(str(error))
        self.commands = commands
        self.error = error


def _wrong_type(exc: BaseException) -> bool:
    """A WRONGTYPE answer (redis-py has no class of its own for it)."""
    return isinstance(exc, redis.ResponseError) and "WRONGTYPE" in str(exc)


Entries = list[tuple[bytes, Mapping[bytes, bytes]]]


def _stream_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _at_the_end(entry_id: bytes) -> bool:
    """Whether `entry_id` is the last id a stream can have (only a client without the key
    appends one with it): no id follows it, and the stream takes no more appends."""
    return _stream_key(entry_id) == (LAST_PART, LAST_PART)


def _trim(inbox: str, finished: bytes) -> tuple[Any, ...]:
    """The command that trims `inbox` up to `finished`, the last entry trio carried out (never
    the last id a stream can have: `_at_the_end`): `XTRIM MINID` the id right after it."""
    ms, _, seq = finished.partition(b"-")
    if int(seq or 0) < LAST_PART:
        return ("XTRIM", inbox, "MINID", f"{int(ms)}-{int(seq or 0) + 1}")
    return ("XTRIM", inbox, "MINID", f"{int(ms) + 1}-0")


class DeliveryLine:
    def __init__(self, redis_url: str, prefix: str) -> None:
        self._url = redis_url
        self._prefix = prefix + ":in:"
        self._outgoing: queue.SimpleQueue[Outgoing | str] = queue.SimpleQueue()
        # Written by trio, read by the threads (single attribute reads and writes: atomic).
        self.node_id = ""
        self.finished_up_to = b"0-0"  # the last inbox entry trio has carried out
        # What either thread last trimmed (a plain attribute: at worst both trim once).
        self._trimmed = b"0-0"
        self._stopped = threading.Event()
        # Each counter is written by one thread only, so no lock (a lock on trio's side would
        # hand the GIL to a busy thread for a switch interval): trio counts what it queued, the
        # writer what it appended.
        self._queued = 0
        self._appended = 0
        self.writable = True
        self.readable = True
        # Set by `start`: tells trio of an inbox of another type removed (the key's name).
        self._retyped: Callable[[str], None] = lambda key: None

    # -- trio's side -------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Orders queued and not yet appended."""
        return self._queued - self._appended

    def send(self, node: str, fields: Mapping[bytes, bytes], orders: int) -> None:
        """Append a sealed batch of `orders` orders to `node`'s inbox."""
        self._queued += orders
        self._outgoing.put((node, fields, orders))

    def finished(self, entry_id: bytes) -> None:
        """Trio carried out the inbox up to `entry_id`: trimmed by the next round trip of
        either thread (the reader's next read, or the writer's next append), so a node that
        dies leaves little it had finished; the heartbeat also says how far it got."""
        self.finished_up_to = entry_id

    def wait_drained(self, timeout: float) -> bool:
        """Block (in a worker thread) until every order sent is appended; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            self._stopped.wait(0.005)
        return not self.pending

    def start(
        self, received: Callable[[str, Entries], None], retyped: Callable[[str], None]
    ) -> None:
        """Start both threads; each batch read is handed to `received(node_id, entries)` on
        trio's thread (no entries: the inbox, read to the last id a stream can have, was
        removed, and is read again from its start), and so is the name (without the prefix)
        of each inbox of another type the threads removed, to `retyped`."""
        token = trio.lowlevel.current_trio_token()

        def tell(key: str) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(retyped, key.removeprefix(self._prefix[: -len("in:")]))

        self._retyped = tell
        for name, target in (
            ("writer", self._write_forever),
            ("reader", lambda: self._read_forever(token, received)),
        ):
            threading.Thread(target=target, name=f"callgate-line-{name}", daemon=True).start()

    def stop(self) -> None:
        """The threads end within a read's block time; what is still queued is not sent."""
        self._stopped.set()
        self._outgoing.put(STOP)

    # -- the writer thread -------------------------------------------------------------------

    def _back_off(self, side: str, what: str, exc: redis.RedisError, attempt: int) -> int:
        """Redis is away for `side` ("writable" or "readable"): say so once, then wait before
        the next attempt, unless stopped; the next attempt's count."""
        if getattr(self, side):
            log.warning(what, error=str(exc))
        setattr(self, side, False)
        self._stopped.wait(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
        return attempt + 1

    def _client(self) -> redis.Redis:
        return redis.Redis.from_url(self._url, socket_connect_timeout=2.0, socket_timeout=5.0)

    def _write_forever(self) -> None:
        client = self._client()
        attempt = 0  # round trips in a row that Redis did not answer (it is away: for all)
        taken: list[Outgoing] = []
        # Per target whose own appends Redis refused (an answer to that append alone): its
        # batches, in order, wait for its next attempt; the other targets' go out meanwhile.
        held: dict[str, _Held] = {}
        try:
            while not self._stopped.is_set():
                if not taken:
                    if not self._take(taken, held):
                        return
                    if not taken:  # a wait for a held target's next attempt ended
                        continue
                finished = self.finished_up_to
                # (an inbox read to its last possible id is the reader's to remove)
                trim = finished != self._trimmed and not _at_the_end(finished)
                try:
                    refused = self._append(client, taken, finished if trim else None)
                except redis.RedisError as exc:
                    what = "cluster deliveries not writable; kept"
                    attempt = self._back_off("writable", what, exc, attempt)
                    continue
                attempt = 0
                self.writable = True
                if trim:
                    self._trimmed = max(self._trimmed, finished, key=_stream_key)
                for node in {node for node, _, _ in taken} - set(refused):
                    held.pop(node, None)  # (appended: a later refusal backs off from the start)
                for node, (kept, error) in refused.items():
                    self._hold(held, node, kept, error)
                taken = []
        finally:
            client.close()

    def _take(self, taken: list[Outgoing], held: dict[str, _Held]) -> bool:
        """Fill `taken` with what goes in the next round trip: everything queued (waiting for
        some if nothing is, until a held target's next attempt), each batch for a held target
        behind that target's; then the held batches whose target's attempt has come. False:
        stopped."""
        retry_at = min((h.retry_at for h in held.values() if h.batches), default=None)
        try:
            if retry_at is None:
                item = self._outgoing.get()
            else:
                item = self._outgoing.get(timeout=max(0.0, retry_at - time.monotonic()))
        except queue.Empty:
            item = None
        if item is not None:
            # Let what comes within COALESCE join this round trip: a round trip and the
            # wake-ups around it cost the same for one order as for a hundred.
            self._stopped.wait(COALESCE)
            while True:  # everything queued meanwhile goes in the same round trip
                if isinstance(item, str):  # STOP
                    return False
                waiting = held.get(item[0])
                if waiting is not None and waiting.batches:
                    waiting.batches.append(item)
                else:
                    taken.append(item)
                try:
                    item = self._outgoing.get_nowait()
                except queue.Empty:
                    break
        now = time.monotonic()
        for waiting in held.values():
            if waiting.batches and waiting.retry_at <= now:
                taken.extend(waiting.batches)
                waiting.batches = []
        return True

    def _hold(
        self, held: dict[str, _Held], node: str, kept: list[Outgoing], error: redis.RedisError
    ) -> None:
        """Redis refused the appends to `node`'s inbox (`kept`, in order): they wait for that
        target's next attempt, backed off per target, while the other targets' go out."""
        waiting = held.setdefault(node, _Held())
        if not waiting.attempts:
            log.warning(
                "cluster deliveries to one node not appended; kept", node=node, error=str(error)
            )
        delay = RETRY_DELAYS[min(waiting.attempts, len(RETRY_DELAYS) - 1)]
        waiting.attempts += 1
        waiting.retry_at = time.monotonic() + delay
        waiting.batches = kept + waiting.batches

    def _append(
        self, client: redis.Redis, taken: list[Outgoing], trim: bytes | None
    ) -> dict[str, tuple[list[Outgoing], redis.RedisError]]:
        """Append `taken` in one round trip (and trim what trio finished). Returns, per target
        whose appends Redis refused, those batches (in order) and why: every other batch was
        appended, once.
        Raises: redis.RedisError, when Redis did not answer; `taken` then holds only what was
        not appended (appended again after a back-off: the rest would be refused as replays
        by their targets)."""
        appends = [
            ("XADD", self._prefix + node, "*", *itertools.chain(*fields.items()))
            for node, fields, _ in taken
        ]
        commands: list[tuple[Any, ...]] = list(appends)
        if trim is not None:  # what trio finished, while this round trip goes anyway
            commands.insert(0, _trim(self._prefix + self.node_id, trim))
        try:
            failed = self._append_once(client, commands)
        except _NotAppended as left:
            by_command = {id(command): item for command, item in zip(appends, taken, strict=True)}
            kept = [by_command[id(c)] for c in left.commands if id(c) in by_command]
            self._appended += sum(orders for _, _, orders in taken) - sum(o for _, _, o in kept)
            taken[:] = kept
            raise left.error from None
        refused: dict[str, tuple[list[Outgoing], redis.RedisError]] = {}
        for command, item in zip(appends, taken, strict=True):
            error = failed.get(id(command))
            if error is None:
                self._appended += item[2]
            else:
                refused.setdefault(item[0], ([], error))[0].append(item)
        return refused

    def _append_once(
        self, client: redis.Redis, commands: list[tuple[Any, ...]]
    ) -> dict[int, redis.RedisError]:
        """Carry out `commands` (appends, and a trim first); the appends Redis refused (by the
        command's id), with Redis's answer. An append to an inbox of another type is made
        again by one script that removes that key first if it still is not a stream: atomic,
        so a client that keeps retyping the inbox cannot win a race against it.
        Raises: _NotAppended, with the commands not known carried out, when Redis did not
        answer."""
        if len(commands) == 1:  # the usual case: one command, without a pipeline's objects
            try:
                client.execute_command(*commands[0])  # type: ignore[no-untyped-call]
            except redis.ResponseError as exc:
                replies: list[Any] = [exc]
            except redis.RedisError as exc:
                raise _NotAppended(commands, exc) from None
            else:
                return {}
        else:
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            # Each command's own answer: one refused (an inbox of another type, say) fails
            # alone, and only it is made again (the others were appended: again, they would
            # be refused as replays).
            try:
                replies = pipe.execute(raise_on_error=False)
            except redis.RedisError as exc:  # the connection: nothing is known appended
                raise _NotAppended(commands, exc) from None
        refused: dict[int, redis.RedisError] = {}
        answered = [
            (c, r) for c, r in zip(commands, replies, strict=True) if isinstance(r, Exception)
        ]
        for position, (command, reply) in enumerate(answered):
            if not isinstance(reply, redis.RedisError):
                reply = redis.ResponseError(str(reply))
            if not _wrong_type(reply):
                refused[id(command)] = reply
                continue
            try:
                if command[0] != "XADD":  # the trim of this node's own inbox: nothing to trim
                    self._remove_wrong_type(client, command[1])
                else:
                    self._append_over_other_type(client, command)
            except redis.ResponseError as exc:
                refused[id(command)] = exc
            except redis.RedisError as exc:  # unknown from this one on: made again
                left = [c for n, (c, _) in enumerate(answered) if n >= position or id(c) in refused]
                raise _NotAppended(left, exc) from None
        return refused

    def _append_over_other_type(self, client: redis.Redis, command: tuple[Any, ...]) -> None:
        """An append answered WRONGTYPE: its inbox removed if it still is not a stream (said
        to trio), and the batch appended, in one script."""
        _, key, _, *fields = command
        if client.eval(_APPEND_OVER_OTHER_TYPE, 1, key, *fields):
            log.warning("a cluster inbox of another type was removed", key=key)
            self._retyped(key)

    def _remove_wrong_type(self, client: redis.Redis, key: str) -> None:
        """`key` answered WRONGTYPE: removed if it still is no stream, and said to trio."""
        if client.eval(_UNLINK_IF_NOT_STREAM, 1, key):
            log.warning("a cluster inbox of another type was removed", key=key)
            self._retyped(key)

    # -- the reader thread -------------------------------------------------------------------

    def _read_forever(
        self, token: trio.lowlevel.TrioToken, received: Callable[[str, Entries], None]
    ) -> None:
        client = self._client()
        attempt = 0
        position = b"0-0"
        inbox = ""
        try:
            while not self._stopped.is_set():
                node = self.node_id
                if self._prefix + node != inbox:  # a new node id (an evicted node's restart)
                    inbox, position, self._trimmed = self._prefix + node, b"0-0", b"0-0"
                finished = self.finished_up_to
                try:
                    if _at_the_end(finished):  # read to its last possible id: removed
                        client.eval(_DROP_READ_TO_THE_END, 1, inbox, finished)
                        log.warning("a cluster inbox at the last stream id was removed", key=inbox)
                        # Whatever is there now came after that entry: read from its start
                        # (and trio, told by an empty batch, counts from there too).
                        position, self._trimmed, self.finished_up_to = b"0-0", b"0-0", b"0-0"
                        token.run_sync_soon(received, node, [])
                        continue
                    if finished != self._trimmed:  # trim what trio finished, in this round trip
                        pipe = client.pipeline(transaction=False)
                        pipe.execute_command(*_trim(inbox, finished))  # type: ignore[no-untyped-call]
                        pipe.xread({inbox: position}, count=READ_COUNT, block=READ_BLOCK_MS)
                        # A trim refused (WRONGTYPE: the read says so too) keeps no read back.
                        trimmed, reply = pipe.execute(raise_on_error=False)
                        if isinstance(reply, Exception):
                            raise reply
                        if not isinstance(trimmed, Exception):
                            self._trimmed = max(self._trimmed, finished, key=_stream_key)
                    else:
                        reply = client.xread(
                            {inbox: position}, count=READ_COUNT, block=READ_BLOCK_MS
                        )
                except trio.RunFinishedError:
                    return
                except redis.RedisError as exc:
                    if _wrong_type(exc):  # not a stream: removed, read again at once
                        try:
                            self._remove_wrong_type(client, inbox)
                            continue
                        except redis.RedisError as again:
                            exc = again
                    what = "cluster inbox not readable; retrying"
                    attempt = self._back_off("readable", what, exc, attempt)
                    continue
                attempt = 0
                self.readable = True
                if not reply:
                    continue
                entries: Entries = [(bytes(i), f) for i, f in reply[0][1]]
                position = entries[-1][0]
                try:
                    token.run_sync_soon(received, node, entries)
                except trio.RunFinishedError:
                    return
        finally:
            client.close()
