"""The node's link to the cluster: the shared log, heartbeats and leadership, on Redis.

Redis is used through redis-py's blocking client, always from a worker thread
(`trio.to_thread`), so the event loop never waits on the network. Three tasks:

* the writer appends this node's entries in order (a pipeline per batch). While Redis is away
  they stay in the outbox and go out, in order, when it is back: nothing a node saw is lost;
* the reader follows the log (`XREAD BLOCK`) and applies every entry to the replica, then hands
  the actions to the hub, which carries out those addressed to its own connections;
* the keeper, once per `heartbeat_interval`, writes this node's heartbeat, holds or renews the
  leader lease, and, on the leader, declares dead the nodes whose heartbeat lapsed.

Nothing unsigned read from Redis decides anything. A heartbeat value is signed with the cluster
key and carries a number that grows with every beat; a check "sees" a node only when its value
verifies and its number is newer than the last one seen. A node is declared dead after
`misses_for_death` = ceil(node_timeout / heartbeat_interval) checks in a row (at least 2)
without seeing it, so a key deleted, overwritten or copied back by a Redis client without the
key is a missed check, not a death. The lease value is signed too (holder and expiry): one that
does not verify, or has expired, is no lease, and any node overwrites it (compare-and-set).

The leader has two duties: appending `TimerFired` for due timers (every node arms every timer,
so a new leader knows which are due), and `NodeDown` for silent nodes. Both are idempotent in
the core, so a second leader during a lease hand-over costs a duplicate entry, not a second
outcome.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import trio

from callgate.cluster.entries import (
    BadEntry,
    ClusterEvent,
    Entry,
    EntryCodec,
    NodeDown,
)
from callgate.cluster.replica import Replica
from callgate.config import ClusterSettings
from callgate.core.actions import Action
from callgate.core.events import TimerFired, TimerId
from callgate.core.policy import Throttled
from callgate.log import get_logger

log = get_logger("callgate.cluster")
_T = TypeVar("_T")

BATCH = 512
READ_BLOCK_MS = 1000
RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)

# Replace the lease only if it still holds the value this node judged (ours, absent, or not
# genuine); 1 when it did, and this node leads. Redis cannot check the signature: Python did.
_LEASE = """
local current = redis.call('GET', KEYS[1])
if (current or '') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

Executor = Callable[[Entry, list[Action], bool], None]
Rejected = Callable[[str, str], None]


def new_node_id(name: str | None) -> str:
    """`<name>-<random>`: a node that restarts is a new node (its old devices are gone)."""
    return f"{name or 'node'}-{secrets.token_hex(3)}"


class ClusterLink:
    def __init__(self, settings: ClusterSettings, replica: Replica, codec: EntryCodec) -> None:
        self._settings = settings
        self.replica = replica
        self._codec = codec
        self.node_id = new_node_id(settings.node_name)
        prefix = settings.name
        self._log_key = f"{prefix}:log"
        self._leader_key = f"{prefix}:leader"
        self._epoch_key = f"{prefix}:epoch"
        self._node_prefix = f"{prefix}:node:"
        self._snapshot_key = f"{prefix}:snapshot"
        self._closed = False
        options: dict[str, Any] = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0}
        self._redis = redis.Redis.from_url(settings.redis_url, **options)
        self._reader_redis = redis.Redis.from_url(settings.redis_url, **options)
        self._lease = self._redis.register_script(_LEASE)
        # Set by the hub: carries out an applied entry's actions; records a refused entry.
        self.execute: Executor = lambda entry, actions, own: None
        self.rejected: Rejected = lambda entry_id, reason: None
        self.evicted: Callable[[], None] = lambda: None
        # Called after the replica was replaced by a snapshot (timers and revocations changed).
        self.restored: Callable[[], None] = lambda: None
        self._outbox: deque[dict[bytes, bytes]] = deque()
        self._outbox_changed = trio.Event()
        self._drained = trio.Event()
        # Set once the replica has caught up with the log for the first time.
        self.joined = trio.Event()
        self._seq = 0
        self._applied_seq = 0
        self._applied = trio.Event()
        self._last_id = b"0-0"
        self._caught_up = False
        self._writer_ok = True
        self._reader_ok = False
        self._keeper_ok = True
        self._connected_since = time.monotonic()
        self._epoch: bytes | None = None
        self.is_leader = False
        self._due: set[TimerId] = set()
        self._declared_down: dict[str, float] = {}
        # Liveness: this node's beat number; per watched node, the last genuine beat seen and
        # the checks missed since. A death takes `misses_for_death` consecutive misses.
        self._beat = 0
        self._last_beat: dict[str, int] = {}
        self._missed: dict[str, int] = {}
        self.misses_for_death = max(
            2, math.ceil(settings.node_timeout / settings.heartbeat_interval - 1e-9)
        )
        # Snapshots: entries applied since the last one, when it was taken, and where.
        self._since_snapshot = 0
        self._snapshot_at = time.monotonic()
        self._snapshot_position: bytes | None = None
        # The store's epoch when the log was last read (a restarted Redis gets a new one).
        self._log_epoch: bytes | None = None

    # -- state -------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """Redis answers and the replica has caught up with the log: new work can be accepted."""
        return self._caught_up and self._reader_ok and self._writer_ok and self._keeper_ok

    @property
    def pending(self) -> int:
        """Entries of this node not yet in the log."""
        return len(self._outbox)

    @property
    def judging(self) -> bool:
        """This node leads and is past its grace after (re)connecting: it declares deaths."""
        settings = self._settings
        return self.is_leader and time.monotonic() - self._connected_since >= settings.node_timeout

    @property
    def missed(self) -> dict[str, int]:
        """Per watched node, the checks in a row that did not see it."""
        return dict(self._missed)

    @property
    def position(self) -> bytes:
        """The id of the last log entry applied here."""
        return self._last_id

    # -- what the hub asks -------------------------------------------------------------------

    def submit(self, event: ClusterEvent, *, throttled: Throttled | None = None) -> int:
        """Queue an entry for the log; returns its number, for `wait_applied`. Never blocks."""
        self._seq += 1
        entry = Entry(self.node_id, self._seq, time.time(), event, throttled)
        self._outbox.append(self._codec.seal(entry))
        self._outbox_changed.set()
        return self._seq

    async def wait_applied(self, seq: int) -> None:
        while self._applied_seq < seq:
            await self._applied.wait()

    async def flush(self) -> None:
        """Wait until every queued entry is in the log (the caller bounds the wait)."""
        if self._outbox:
            await self._drained.wait()

    def timer_due(self, timer: TimerId) -> None:
        """A timer every node armed has fired here: the leader puts it in the log."""
        if self.is_leader:
            self.submit(TimerFired(timer))
        else:
            self._due.add(timer)

    def timer_cancelled(self, timer: TimerId) -> None:
        self._due.discard(timer)

    # -- the tasks ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self.load_snapshot()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._keep_loop)
                nursery.start_soon(self._read_loop)
        finally:
            # A worker thread abandoned mid-call gets an error on its closed socket; ignored.
            self.close()

    async def _write_loop(self) -> None:
        attempt = 0
        while True:
            if not self._outbox:
                self._outbox_changed = trio.Event()
                await self._outbox_changed.wait()
            batch = list(itertools.islice(self._outbox, BATCH))
            try:
                await self._in_thread(self._append, batch)
            except redis.RedisError as exc:
                self._writer_failed(exc)
                await trio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
                attempt += 1
                continue
            attempt = 0
            if not self._writer_ok:
                log.info("cluster log writable again", node=self.node_id)
            self._writer_ok = True
            for _ in batch:
                self._outbox.popleft()
            if not self._outbox:
                self._drained.set()
                self._drained = trio.Event()

    def _writer_failed(self, exc: Exception) -> None:
        if self._writer_ok:
            log.warning("cluster log not writable; entries kept", error=str(exc))
        self._writer_ok = False

    def _append(self, batch: list[dict[bytes, bytes]]) -> None:
        pipe = self._redis.pipeline(transaction=True)
        for fields in batch:
            pipe.xadd(self._log_key, fields)  # type: ignore[arg-type]
        pipe.execute()

    async def _read_loop(self) -> None:
        attempt = 0
        while True:
            try:
                if not self._reader_ok:
                    # Joining, or back after an outage: start from the snapshot when the log
                    # no longer holds every entry after the last one applied here.
                    sealed = await self._in_thread(self._snapshot_if_behind)
                    if sealed is not None:
                        self._restore(sealed)
                block = READ_BLOCK_MS if self._caught_up else None
                batch = await self._in_thread(self._read, block)
            except redis.RedisError as exc:
                if self._reader_ok or attempt == 0:
                    log.warning("cluster log not readable; retrying", error=str(exc))
                self._reader_ok = False
                await trio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
                attempt += 1
                continue
            if not self._reader_ok:
                self._connected_since = time.monotonic()
                if attempt:
                    log.info("cluster log readable again", node=self.node_id)
            attempt = 0
            self._reader_ok = True
            for entry_id, fields in batch:
                self._last_id = entry_id
                self._apply(entry_id, fields)
            if not batch and not self._caught_up:
                self._caught_up = True
                self.joined.set()

    def _snapshot_if_behind(self) -> bytes | None:
        """The sealed snapshot, if entries after our position were trimmed from the log.

        Only within one store: after Redis restarted without its data (a new epoch) the log is
        new, and this node's replica is as good as any other's.
        """
        pipe = self._reader_redis.pipeline(transaction=False)
        pipe.get(self._epoch_key)
        pipe.xrange(self._log_key, count=1)
        pipe.get(self._snapshot_key)
        epoch, first, sealed = pipe.execute()
        if epoch is None:
            return None
        same_store = self._log_epoch is None or epoch == self._log_epoch
        self._log_epoch = epoch
        if not same_store or not first or _stream_id(first[0][0]) <= _stream_id(self._last_id):
            return None
        return bytes(sealed) if sealed is not None else None

    def _restore(self, sealed: bytes) -> None:
        try:
            position, state = self._codec.open_snapshot(sealed)
            self.replica.restore_state(state)
        except (BadEntry, KeyError, TypeError, ValueError) as exc:
            log.error("cluster snapshot refused; reading the whole log", error=str(exc))
            self.rejected("snapshot", getattr(exc, "reason", "malformed"))
            return
        had_applied = self._last_id != b"0-0"
        self._last_id = position
        self._snapshot_position = position
        log.info("cluster state loaded from a snapshot", position=position.decode())
        if had_applied:
            # This node missed entries: what it believed about its own devices may be wrong.
            log.warning("this node fell behind the cluster log; closing its connections")
            self.evicted()
        self.restored()

    def _read(self, block: int | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply: Any = self._reader_redis.xread(
            {self._log_key: self._last_id}, count=BATCH, block=block
        )
        if not reply:
            return []
        _, entries = reply[0]
        return list(entries)

    def _apply(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            entry = self.replica.receive(fields)
        except BadEntry as bad:
            log.warning("cluster entry refused", entry=entry_id.decode(), reason=bad.reason)
            self.rejected(entry_id.decode(), bad.reason)
            return
        actions = self.replica.apply(entry)
        own = entry.origin == self.node_id
        if isinstance(entry.event, TimerFired):
            self._due.discard(entry.event.timer)
        self.execute(entry, actions, own)
        if isinstance(entry.event, NodeDown) and entry.event.node == self.node_id:
            log.warning("this node was declared dead by the cluster; closing its connections")
            self.evicted()
        if own:
            self._applied_seq = entry.seq
            self._applied.set()
            self._applied = trio.Event()
        self._since_snapshot += 1

    async def _keep_loop(self) -> None:
        interval = self._settings.heartbeat_interval
        while True:
            nodes = sorted(self.replica.nodes_with_devices() - {self.node_id})
            try:
                leader, beats = await self._in_thread(self._keep, nodes)
            except redis.RedisError as exc:
                if self._keeper_ok:
                    log.warning("cluster store not reachable for heartbeats", error=str(exc))
                self._keeper_ok = False
                self.is_leader = False
            else:
                self._keeper_ok = True
                self.observe(dict(zip(nodes, beats, strict=True)))
                self._lead(leader)
                if self.is_leader and self._snapshot_due():
                    await self._snapshot()
            await trio.sleep(interval)

    def _snapshot_due(self) -> bool:
        settings = self._settings
        return self._since_snapshot >= settings.snapshot_every or (
            self._since_snapshot > 0
            and time.monotonic() - self._snapshot_at >= settings.snapshot_seconds
        )

    async def _snapshot(self) -> None:
        """Store the replica's state at the current position; trim the log to the previous one.

        Entries stay for one snapshot period after they are covered, so a node that is a little
        behind reads on; one further behind than that loads the snapshot.
        """
        position = self._last_id
        sealed = self._codec.seal_snapshot(position, self.replica.export_state())
        trim_to = self._snapshot_position
        try:
            await self._in_thread(self._store_snapshot, sealed, trim_to)
        except redis.RedisError as exc:
            log.warning("cluster snapshot not stored", error=str(exc))
            return
        self._snapshot_position = position
        self._since_snapshot = 0
        self._snapshot_at = time.monotonic()

    def _store_snapshot(self, sealed: bytes, trim_to: bytes | None) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._snapshot_key, sealed)
        if trim_to is not None:
            pipe.xtrim(self._log_key, minid=trim_to.decode(), approximate=False)
        pipe.execute()

    def _keep(self, nodes: list[str]) -> tuple[bool, list[int | None]]:
        """Beat, hold the lease, read the watched nodes' beats (None: absent or not genuine)."""
        settings, codec = self._settings, self._codec
        timeout_ms = int(settings.node_timeout * 1000)
        self._beat += 1
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(
            self._node_prefix + self.node_id,
            codec.seal_heartbeat(self.node_id, self._beat),
            px=timeout_ms,
        )
        pipe.set(self._epoch_key, secrets.token_hex(8), nx=True)
        pipe.get(self._epoch_key)
        pipe.get(self._leader_key)
        for node in nodes:
            pipe.get(self._node_prefix + node)
        results = pipe.execute()
        epoch, lease = results[2], results[3]
        if self._epoch is not None and epoch != self._epoch:
            # Redis lost its data (a restart without persistence): entries not yet read when it
            # went away are gone. Heartbeats and the lease are re-created by this very call.
            log.warning("cluster store was reset (Redis restarted without its data)")
            self._connected_since = time.monotonic()
        self._epoch = epoch
        beats = [
            codec.open_heartbeat(value, node)
            for node, value in zip(nodes, results[4:], strict=True)
        ]
        # A lease value that does not verify, or has expired, is no lease: take it over.
        now = time.time()
        holder = codec.open_lease(lease, now)
        leader = False
        if holder is None or holder == self.node_id:
            renewed = codec.seal_lease(self.node_id, now + settings.node_timeout)
            took: Any = self._lease(
                keys=[self._leader_key], args=[lease or b"", renewed, timeout_ms]
            )
            leader = bool(took)
        return leader, beats

    def observe(self, beats: dict[str, int | None]) -> None:
        """Count, per watched node, the checks in a row without a genuine, newer beat."""
        for node in list(self._missed):
            if node not in beats:
                del self._missed[node]
                self._last_beat.pop(node, None)
        for node, beat in beats.items():
            last = self._last_beat.get(node)
            if beat is not None and (last is None or beat > last):
                self._last_beat[node] = beat
                self._missed[node] = 0
            else:
                self._missed[node] = self._missed.get(node, 0) + 1

    def _lead(self, leader: bool) -> None:
        became = leader and not self.is_leader
        self.is_leader = leader
        if not leader:
            return
        if became:
            log.info("this node leads the cluster", node=self.node_id)
            for timer in sorted(self._due):
                self.submit(TimerFired(timer))
            self._due.clear()
        # After a reconnect, give every node a full timeout to heartbeat before judging it.
        if not self.judging:
            return
        now = time.monotonic()
        for node, missed in self._missed.items():
            if missed < self.misses_for_death:
                continue
            declared = self._declared_down.get(node)
            if declared is None or now - declared > self._settings.node_timeout:
                self._declared_down[node] = now
                log.warning("node stopped heartbeating; its devices are disconnected", node=node)
                self.submit(NodeDown(node))

    async def load_snapshot(self) -> None:
        """At start: begin from the stored snapshot, if any, instead of the whole log."""
        try:
            sealed: Any = await self._in_thread(self._reader_redis.get, self._snapshot_key)
        except redis.RedisError:
            return  # the reader retries, and checks again
        if sealed is not None:
            self._restore(bytes(sealed))

    def close(self) -> None:
        self._closed = True
        self._redis.close()
        self._reader_redis.close()

    async def _in_thread(self, work: Callable[..., _T], *args: Any) -> _T:
        """`work(*args)` in a worker thread, abandoned (left to finish alone) if cancelled."""
        return await trio.to_thread.run_sync(
            self._then_close_if_closed, work, *args, abandon_on_cancel=True
        )

    def _then_close_if_closed(self, work: Callable[..., _T], *args: Any) -> _T:
        # A call abandoned by a closing link finds its socket closed, and redis-py retries on
        # a new one: close again when it ends, so no socket outlives the link.
        try:
            return work(*args)
        finally:
            if self._closed:
                self.close()


def delete_cluster_keys(redis_url: str, name: str) -> None:
    """Remove every key of cluster `name` (its log, snapshot, lease, heartbeats, limits).

    For tests and benchmarks that start throw-away clusters; never needed in production.
    """
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{name}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _stream_id(value: bytes) -> tuple[int, int]:
    milliseconds, _, sequence = value.partition(b"-")
    return int(milliseconds), int(sequence or 0)
