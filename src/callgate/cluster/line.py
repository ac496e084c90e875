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
not a stream: one script, so a stream another node made meanwhile is kept), tells trio (which
audits it), and goes on at once: the appends that failed are made again, the others not.
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
WRONG_TYPE_ROUNDS = 3  # removals in a row before an append is treated as failing (backed off)
# KEYS: an inbox. Removed if it is not a stream (nor absent): 1, else 0.
_UNLINK_IF_NOT_STREAM = (
    DROP_OTHER_TYPE
    + """
if dropped(KEYS[1], 'stream') then return 1 end
return 0
"""
)


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


def _following(entry_id: bytes) -> str:
    """The stream id right after `entry_id` (what `XTRIM MINID` keeps from)."""
    ms, _, seq = entry_id.partition(b"-")
    return f"{int(ms)}-{int(seq or 0) + 1}"


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
        trio's thread, and so is the name (without the prefix) of each inbox of another type
        the threads removed, to `retyped`."""
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
        attempt = 0
        taken: list[Outgoing] = []
        try:
            while not self._stopped.is_set():
                if not taken:
                    item = self._outgoing.get()
                    # Let what comes within COALESCE join this round trip: a round trip and the
                    # wake-ups around it cost the same for one order as for a hundred.
                    self._stopped.wait(COALESCE)
                    while True:  # everything queued meanwhile goes in the same round trip
                        if item == STOP:
                            return
                        taken.append(item)  # type: ignore[arg-type]
                        try:
                            item = self._outgoing.get_nowait()
                        except queue.Empty:
                            break
                finished = self.finished_up_to
                try:
                    self._append(client, taken, None if finished == self._trimmed else finished)
                except redis.RedisError as exc:
                    what = "cluster deliveries not writable; kept"
                    attempt = self._back_off("writable", what, exc, attempt)
                    continue
                attempt = 0
                self.writable = True
                self._appended += sum(orders for _, _, orders in taken)
                self._trimmed = max(self._trimmed, finished, key=_stream_key)
                taken = []
        finally:
            client.close()

    def _append(self, client: redis.Redis, taken: list[Outgoing], trim: bytes | None) -> None:
        """Raises: redis.RedisError; `taken` then holds only what was not appended (appended
        again, after a back-off: the rest would be refused as replays by their targets)."""
        appends = [
            ("XADD", self._prefix + node, "*", *itertools.chain(*fields.items()))
            for node, fields, _ in taken
        ]
        commands: list[tuple[Any, ...]] = list(appends)
        if trim is not None:  # what trio finished, while this round trip goes anyway
            commands.insert(0, ("XTRIM", self._prefix + self.node_id, "MINID", _following(trim)))
        try:
            self._append_rounds(client, commands)
        except _NotAppended as left:
            by_command = {id(command): item for command, item in zip(appends, taken, strict=True)}
            kept = [by_command[id(c)] for c in left.commands if id(c) in by_command]
            self._appended += sum(orders for _, _, orders in taken) - sum(o for _, _, o in kept)
            taken[:] = kept
            raise left.error from None

    def _append_rounds(self, client: redis.Redis, commands: list[tuple[Any, ...]]) -> None:
        """Raises: _NotAppended, with the commands not carried out and why."""
        for _ in range(WRONG_TYPE_ROUNDS):
            if len(commands) == 1:  # the usual case: one command, without a pipeline's objects
                try:
                    client.execute_command(*commands[0])  # type: ignore[no-untyped-call]
                except redis.RedisError as exc:
                    if not _wrong_type(exc):
                        raise _NotAppended(commands, exc) from None
                    replies: list[Any] = [exc]
                else:
                    return
            else:
                pipe = client.pipeline(transaction=False)
                for command in commands:
                    pipe.execute_command(*command)  # type: ignore[no-untyped-call]
                # Each command's own answer: one on an inbox of another type fails alone, and
                # only it is made again (the others were appended: again, they would be
                # refused as replays).
                try:
                    replies = pipe.execute(raise_on_error=False)
                except redis.RedisError as exc:  # the connection: nothing is known appended
                    raise _NotAppended(commands, exc) from None
            failed = [c for c, r in zip(commands, replies, strict=True) if isinstance(r, Exception)]
            for reply in replies:
                if isinstance(reply, Exception) and not _wrong_type(reply):
                    if not isinstance(reply, redis.RedisError):
                        reply = redis.RedisError(reply)
                    raise _NotAppended(failed, reply)
            if not failed:
                return
            try:
                for key in {command[1] for command in failed}:
                    self._remove_wrong_type(client, key)
            except redis.RedisError as exc:
                raise _NotAppended(failed, exc) from None
            commands = failed
        gave_up = redis.ResponseError("WRONGTYPE: an inbox kept being replaced by another type")
        raise _NotAppended(commands, gave_up)

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
                    if finished != self._trimmed:  # trim what trio finished, in this round trip
                        pipe = client.pipeline(transaction=False)
                        pipe.xtrim(inbox, minid=_following(finished), approximate=False)
                        pipe.xread({inbox: position}, count=READ_COUNT, block=READ_BLOCK_MS)
                        reply: Any = pipe.execute()[-1]
                        self._trimmed = max(self._trimmed, finished, key=_stream_key)
                    else:
                        reply = client.xread(
                            {inbox: position}, count=READ_COUNT, block=READ_BLOCK_MS
                        )
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
