"""Direct links between nodes: the fast path of deliveries, with each node's inbox behind it.

Every order for another node's connections (node.py) is queued here, per target node, and
leaves as a batch (entries.py: signed, numbered, naming its origin and target; at most
MAX_BATCH_ORDERS orders and about MAX_BATCH_BYTES) by one of two paths:

* on a **link**: a TCP connection this node opened to the target's link listener. One batch is
  one frame. What the reactor's turn queued for a target is written at the end of the turn, in
  one `os.write`, without waking a task (`Links._end_turn`); anything else (a decision's
  deliveries, the rest of a write the socket did not take) goes through that target's **peer**
  task. The target reads its links in the reactor's turn too (`Inbound.on_readable`) and acks
  at most every `ack_interval` (an eighth of `ack_timeout`, at most 0.25 s). No Redis and no
  thread per message;
* into the target's **inbox** (line.py: a Redis stream), which outlives the target's process:
  the leader hands a dead node's unread inbox to its devices' resume buffers.

The inbox is the fallback, and two rules keep the two paths from losing or reordering anything:

1. A batch sent on a link is kept until its ack arrives. If the link fails (an error, the
   target gone, no ack within `ack_timeout`: a frozen or unreachable target, or MAX_UNACKED
   batches waiting), every batch not acked is appended to the target's inbox, in order, with
   its own number, and from then on that target's batches take the inbox.
2. A link is (re)opened only when the target says, in the handshake, that it has carried out
   every batch this node put in its inbox (`last` >= the highest number sent that way; what is
   queued meanwhile waits for the handshake, which HANDSHAKE_TIMEOUT bounds). Only appends of
   the last `forget_after` count: an older batch is refused as stale wherever it is read
   (node.py), and its number may be forgotten by the target. So a target gets each origin's
   batches in order; what it may get twice is a batch sent on a link and then
   copied to the inbox. node.py carries out each number once and tells such a copy (the other
   path, once) from a replay (the same path, a second copy, or too old): only a replay is
   audited.

A link's handshake proves both ends hold the cluster key, each over the other's fresh nonce:
the opener's hello names origin, target and its nonce; the target's welcome (with how far it
has carried out the opener's batches, and a nonce of its own) and every ack are signed over the
opener's nonce, so a listener without the key cannot ack batches away; the opener's
confirmation is signed over the target's nonce, so a handshake recorded off the network and
played again opens nothing. Batches are signed on their own (a recorded batch is a replay,
refused by its number). So only a node holding the key sends on a link. Before that is proven
a frame may be HANDSHAKE_FRAME bytes at most, MAX_HANDSHAKES connections may be in their
handshake (MAX_HANDSHAKES_PER_ADDRESS from one address), and refusals are audited once per
address and reason per REFUSAL_WINDOW (with a count). Frames are authenticated, not encrypted:
like the Redis connection without TLS, links belong on a private network (docs/cluster.md).
Where to dial a node comes from its signed heartbeat, looked up before anything is sent to a
target without a link (links on or off): that lookup also finds a target declared dead that
node.py did not know of, which then gets nothing more, not even in its inbox.

Wire format of a frame: 4-byte big-endian length of what follows, one byte of kind, the body.
Bodies: hello, welcome, confirm, ack: MAC then JSON (entries.py `seal_link`); batch: MAC then
payload (`seal_delivery`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import secrets
import struct
import time
from array import array
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from callgate.cluster.entries import MAC_BYTES, MAX_DELIVERY_BYTES, BadEntry, EntryCodec, Order
from callgate.cluster.line import DeliveryLine
from callgate.log import get_logger

if TYPE_CHECKING:
    from callgate.transport.reactor import Reactor

log = get_logger("callgate.cluster")

HELLO, WELCOME, CONFIRM, ACK, BATCH = b"H", b"W", b"C", b"A", b"B"
_HEADER = struct.Struct(">I")
MAX_FRAME = MAX_DELIVERY_BYTES + MAC_BYTES + 1
HANDSHAKE_FRAME = 4096  # a hello or a confirmation is a few hundred bytes
MAX_HANDSHAKES = 64  # connections still in their handshake; more are closed at once
# ... of them from one address (a node opens one link to each other node, and retries after a
# failure; every worker of `serve --workers` dials from the same address): one host holding
# idle connections cannot take every slot and keep the links shut.
MAX_HANDSHAKES_PER_ADDRESS = 16
MAX_BATCH_ORDERS = 256  # orders in one batch (and below MAX_BATCH_BYTES)
MAX_BATCH_BYTES = 1024 * 1024
MAX_UNACKED = 2048  # batches a link may leave unacked before its inbox takes over
REFUSAL_WINDOW = 60.0  # seconds: one audit record per refusing address, the rest counted
HANDSHAKE_TIMEOUT = 2.0  # seconds a hello or welcome may take
RECEIVE_SIZE = 256 * 1024
# Seconds before a target without a link is tried again, by the attempts in a row that failed.
# Long after repeated failures: a handshake holds what is queued for up to HANDSHAKE_TIMEOUT.
RETRY_DELAYS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 15.0, 60.0)
WARN_AFTER = 6  # failed attempts in a row before a warning (the link may be misconfigured)
# A link's acks: one per interval at most, an eighth of `ack_timeout` (of the opener's, if
# shorter) up to ACK_INTERVAL (0.25 s by default), and sooner once ACK_AFTER batches came.
ACK_INTERVAL = 0.25
ACK_AFTER = 256
MIN_ACK_INTERVAL = 0.005  # however short an opener's ack timeout
NO_LINK_RETRY = 5.0  # seconds before a node that advertised no link is asked again

# (order, the delivered device's user or None)
Queued = tuple[Order, str | None]


class RecentPaths:
    """The last `size` batch numbers carried out from one origin, each with the path it came
    by, in a fixed 8 bytes each (a number on a link is kept as itself, from the inbox negated).
    Looked up only for a batch whose number was already carried out: was it the other path's
    copy (expected after a link failed), or a replay?"""

    def __init__(self, size: int = 4096) -> None:
        self._ring = array("q", bytes(8 * size))
        self._next = 0

    def add(self, seq: int, linked: bool) -> None:
        self._ring[self._next] = seq if linked else -seq
        self._next = (self._next + 1) % len(self._ring)

    def came_by_link(self, seq: int) -> bool | None:
        """True: by a link; False: by the inbox; None: not among the recent ones."""
        if seq in self._ring:
            return True
        if -seq in self._ring:
            return False
        return None

    def copy_seen(self, seq: int) -> None:
        """The other path's copy of `seq` came: a third arrival is a replay, whatever its path."""
        for value in (seq, -seq):
            try:
                self._ring[self._ring.index(value)] = 0
            except ValueError:
                continue


class Refusals:
    """Refusals audited once per source and reason per REFUSAL_WINDOW, with how many there
    were (and how many messages for devices they held, `lost`: stale batches): whoever can
    reach the link port, or write to Redis, could otherwise fill the audit trail at their own
    speed."""

    def __init__(self, most: int = 1024) -> None:
        self._windows: dict[tuple[str, str], tuple[float, int, int]] = {}
        self._most = most

    def admit(
        self, source: str, reason: str, count: int = 1, lost: int = 0
    ) -> tuple[int, int] | None:
        """The count and the messages lost to audit now (these `count` refusals, and those
        kept quiet since the last record), or None to keep these quiet."""
        now = time.monotonic()
        key = (source, reason)
        window = self._windows.get(key)
        if window is not None and now < window[0]:
            self._windows[key] = (window[0], window[1] + count, window[2] + lost)
            return None
        if len(self._windows) >= self._most:
            self._windows.clear()
        self._windows[key] = (now + REFUSAL_WINDOW, 0, 0)
        if window is None:
            return count, lost
        return window[1] + count, window[2] + lost

    def overdue(self) -> list[tuple[str, str, int, int]]:
        """(source, reason, count, lost) of the windows that ended with refusals not yet
        audited (their count would otherwise wait for the next refusal, maybe for ever);
        those windows are closed."""
        now = time.monotonic()
        ended = [
            (key, kept, lost)
            for key, (until, kept, lost) in self._windows.items()
            if until <= now and kept > 0
        ]
        for key, _, _ in ended:
            del self._windows[key]
        return [(source, reason, kept, lost) for (source, reason), kept, lost in ended]


class LinkClosed(Exception):
    """The other end closed the link, or sent what a link never carries."""


class FrameReader:
    """Frames off one stream: `next` waits for one; `ready` returns those already read."""

    def __init__(self, stream: trio.SocketStream, most: int = MAX_FRAME) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self.most = most  # the longest frame taken

    def ready(self, most: int = 0) -> list[tuple[bytes, bytes]]:
        """The whole frames read so far (at most `most` of them, if given); the rest stays.

        Raises: BadEntry("malformed") for a length no frame has."""
        frames: list[tuple[bytes, bytes]] = []
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= _HEADER.size and not (most and len(frames) >= most):
            (length,) = _HEADER.unpack_from(buffer, start)
            if length < 1 or length > self.most:
                raise BadEntry("malformed")
            end = start + _HEADER.size + length
            if len(buffer) < end:
                break
            body_start = start + _HEADER.size
            frames.append(
                (bytes(buffer[body_start : body_start + 1]), bytes(buffer[body_start + 1 : end]))
            )
            start = end
        if start:
            del buffer[:start]
        return frames

    def feed(self, data: bytes) -> None:
        self._buffer += data

    async def burst(self) -> list[tuple[bytes, bytes]]:
        """At least one frame: every whole frame that has arrived."""
        while True:
            frames = self.ready()
            if frames:
                return frames
            self._buffer += await self.receive()

    async def receive(self) -> bytes:
        """Raises: LinkClosed when the other end closed the link."""
        data = await self._stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise LinkClosed("closed by the other end")
        return data

    async def next(self) -> tuple[bytes, bytes]:
        """One frame (a handshake step); what came after it stays for `ready` and `burst`."""
        while True:
            frames = self.ready(1)
            if frames:
                return frames[0]
            self._buffer += await self.receive()


def frame(kind: bytes, body: bytes) -> bytes:
    return _HEADER.pack(len(body) + 1) + kind + body


@dataclass(eq=False)
class Sent:
    seq: int
    fields: dict[bytes, bytes]
    orders: list[Queued]
    at: float


@dataclass(eq=False)
class Peer:
    """What this node sends to one other node, and by which path."""

    node: str
    queue: list[Queued] = field(default_factory=list)
    wake: trio.Event = field(default_factory=trio.Event)
    stream: trio.SocketStream | None = None  # the open link, or None: the inbox
    nonce: str = ""
    unacked: deque[Sent] = field(default_factory=deque)
    inbox_high: int = 0  # the highest number this node put in the target's inbox
    inbox_at: float = -math.inf  # when it last put one there (monotonic)
    used_at: float = field(default_factory=time.monotonic)  # when it last sealed a batch
    attempts: int = 0
    next_try: float = 0.0
    connecting: bool = False
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    # Bytes of a frame a direct write could not finish: the peer's task sends them, and
    # nothing else is written to the link before they are.
    rest: bytes = b""
    sending: bool = False  # the peer's task is in a send
    in_turn: bool = False  # queued during the reactor's turn: flushed at its end


class LinkHost(Protocol):
    """What links need of their node (node.py's ClusterNode)."""

    @property
    def node_id(self) -> str:
        """Its current id (a new one after the cluster evicted it)."""

    async def link_address(self, node: str) -> str | None:
        """Where `node`'s links listen (its signed heartbeat); None: use its inbox. A node
        found declared dead is forgotten here meanwhile (`forget`), its queue decided again."""

    def carried_out(self, origin: str) -> int:
        """The last batch number from `origin` carried out here."""

    def link_received(self, origin: str, fields: Mapping[bytes, bytes]) -> None:
        """Carry out a batch that came on a link `origin` opened (checks it first)."""

    def may_be_stale(self) -> bool:
        """Back from a freeze, it may have been declared dead (ask `still_member`)."""

    async def still_member(self) -> bool:
        """False: it was declared dead meanwhile (what a link brought is not its own)."""

    def rejected(
        self, entry: str, reason: str, count: int = 1, *, messages: int | None = None
    ) -> None:
        """Audit something refused (`cluster.rejected`; `count` of them since the last;
        `messages`, the messages for devices a refused batch held)."""


class Links:
    """Outgoing: one peer per target node. Incoming: the link listener (`run`); what links
    need of their node is `LinkHost`."""

    def __init__(
        self,
        codec: EntryCodec,
        line: DeliveryLine,
        node: LinkHost,
        *,
        ack_timeout: float,
        forget_after: float,
        enabled: bool = True,
        reactor: Reactor | None = None,
    ) -> None:
        self._codec = codec
        self._line = line
        self._node = node
        self._reactor = reactor
        self._turn_peers: list[Peer] = []
        if reactor is not None:
            reactor.after_turn(self._end_turn)
        self.ack_timeout = ack_timeout
        # A peer that sent nothing for this long and has no link open is forgotten (`prune`),
        # and its inbox appends older than this hold no link back (a batch that old is stale).
        self.forget_after = forget_after
        self.enabled = enabled
        self._peers: dict[str, Peer] = {}
        self._seq = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._closing_inbound = False
        self._catching_up = 0  # handshakes waiting for their origin's inbox to be carried out
        self._progress = trio.Event()
        # Accepted links: each with its Inbound once its handshake proved its origin (None
        # while in the handshake).
        self._inbound: dict[trio.SocketStream, Inbound | None] = {}
        self._handshaking: dict[trio.SocketStream, str] = {}  # accepted, in their handshake: host
        self._refusals = Refusals()
        self.address = ""  # host:port other nodes dial ("" until listening, or links off)
        self.queued = 0  # orders queued and not yet sealed
        # Counted for `live_counts` and tests.
        self.batches_linked = 0
        self.batches_inboxed = 0
        self.fallbacks = 0

    # -- what node.py asks -------------------------------------------------------------------

    def send(self, node: str, order: Order, user: str | None) -> None:
        peer = self._peers.get(node)
        if peer is None:
            peer = self._peers[node] = Peer(node)
            if self._nursery is not None:
                self._nursery.start_soon(self._peer_loop, peer)
        peer.queue.append((order, user))
        self.queued += 1
        reactor = self._reactor
        if reactor is not None and reactor.turning:
            # A message the reactor is handling: everything its turn queues for this node
            # goes in one batch, written at the turn's end without waking a task.
            if not peer.in_turn:
                peer.in_turn = True
                self._turn_peers.append(peer)
        else:
            peer.wake.set()

    def _end_turn(self) -> None:
        """The reactor's turn ended: write each batch it queued straight to its link."""
        peers, self._turn_peers = self._turn_peers, []
        for peer in peers:
            peer.in_turn = False
        for peer in peers:
            if not peer.queue:
                continue
            if peer.stream is None or peer.connecting or peer.sending or peer.rest:
                peer.wake.set()  # the peer's task takes it (the inbox, or after its send)
                continue
            data = self._linked_batch(peer, peer.stream)
            try:
                written = os.write(peer.stream.socket.fileno(), data)
            except BlockingIOError:
                written = 0
            except OSError:
                self._fall_back(peer, "send failed")
                continue
            if written < len(data):
                peer.rest = data[written:]
                peer.wake.set()
            else:
                self._check_unacked(peer)
            if peer.queue:
                peer.wake.set()  # more than one batch's worth: the peer's task sends the rest

    @property
    def unacked(self) -> int:
        return sum(len(peer.unacked) for peer in self._peers.values())

    @property
    def pending(self) -> int:
        """Orders not yet sealed, and batches sent on a link and not yet acked."""
        return self.queued + self.unacked

    def linked(self, node: str) -> bool:
        peer = self._peers.get(node)
        return peer is not None and peer.stream is not None

    def forget(self, node: str) -> list[Queued]:
        """`node` is dead: stop sending to it. Returns what it was sent and never acked, and
        what was queued for it (node.py decides those deliveries again)."""
        self._drop_inbound(node)  # a crashed host leaves no half-open link behind
        peer = self._peers.pop(node, None)
        if peer is None:
            return []
        peer.scope.cancel()
        left = [queued for sent in peer.unacked for queued in sent.orders] + peer.queue
        self.queued -= len(peer.queue)
        peer.queue, peer.unacked = [], deque()
        self._close(peer)
        return left

    def prune(self) -> list[str]:
        """Forget the peers with no link open, nothing queued or unacked, and nothing sealed
        for `forget_after` (a node that died without this node hearing of it, or one it has
        not talked to for that long: a peer comes back with the next order for it). Returns
        the nodes forgotten."""
        horizon = time.monotonic() - self.forget_after
        idle = [
            node
            for node, peer in self._peers.items()
            if peer.used_at < horizon
            and peer.stream is None
            and not (peer.connecting or peer.sending or peer.queue or peer.unacked or peer.rest)
        ]
        for node in idle:
            self._peers.pop(node).scope.cancel()
        return idle

    def reset(self) -> None:
        """This node was evicted and starts under a new id (called before the id changes): no
        link of the old one stays. What it had decided and not yet delivered elsewhere still
        goes, under the old id, through the targets' inboxes."""
        for node, peer in list(self._peers.items()):
            if peer.stream is not None or peer.unacked:
                self._fall_back(peer, "this node was evicted")
            while peer.queue:
                seq, fields, orders = self._seal(peer)
                self._to_inbox(peer, seq, fields, len(orders))
            peer.scope.cancel()
            del self._peers[node]
        self._drop_inbound()

    def close_inbound(self) -> None:
        """Shutting down: carry out no more batches from links; their senders fall back to
        this node's inbox, which the shutdown hands over. Each link is acked first, as far as
        it was carried out (one write that does not wait): its sender copies to the inbox only
        what was not, and the handover does not put in a resume buffer what a device got."""
        self._closing_inbound = True
        for stream, inbound in list(self._inbound.items()):
            if inbound is not None:
                with contextlib.suppress(OSError):  # (a full socket: the sender copies)
                    os.write(stream.socket.fileno(), self._ack_frame(inbound))
        self._drop_inbound()

    def _drop_inbound(self, origin: str | None = None) -> None:
        """Close accepted links (only `origin`'s, if given)."""
        for stream, inbound in list(self._inbound.items()):
            if origin is not None and (inbound is None or inbound.origin != origin):
                continue
            fd = stream.socket.fileno()
            if self._reactor is not None and self._reactor.holds(fd):
                self._reactor.wake(fd, b"")  # out of the reactor's set before it closes
            _abort(stream)

    async def run(
        self,
        host: str,
        port: int,
        advertise: str | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The peers' tasks, and the link listener when links are enabled (started: listening)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for peer in self._peers.values():
                    nursery.start_soon(self._peer_loop, peer)
                nursery.start_soon(self._watch)
                if self.enabled:
                    serve = functools.partial(trio.serve_tcp, self._serve, port, host=host)
                    listeners = await nursery.start(serve)
                    bound = listeners[0].socket.getsockname()
                    self.address = f"{advertise or host}:{bound[1]}"
                    log.info("cluster links listening", address=self.address)
                task_status.started()
                await trio.sleep_forever()  # peers' tasks start here as they are needed
        finally:
            self._nursery = None
            for peer in self._peers.values():
                self._close(peer)

    @property
    def _tasks(self) -> trio.Nursery:
        if self._nursery is None:  # peers' tasks start in `run`, never before
            raise RuntimeError("links not running")
        return self._nursery

    def carried_out_more(self) -> None:
        """node.py carried out another batch (a handshake may be waiting for it)."""
        if self._catching_up:
            self._progress.set()
            self._progress = trio.Event()

    # -- sending -----------------------------------------------------------------------------

    async def _peer_loop(self, peer: Peer) -> None:
        # No timeout per batch (a cancel scope costs as much as the send): `_watch` fails a
        # link whose acks are late, which also ends a send blocked on a frozen target.
        with peer.scope:
            while True:
                if not (peer.queue or peer.rest) or peer.connecting:
                    peer.wake = trio.Event()
                    await peer.wake.wait()
                if peer.rest and peer.stream is not None:
                    await self._send_frame(peer, peer.stream, peer.rest)
                    peer.rest = b""
                if peer.queue and peer.stream is None and self._should_try(peer):
                    # What is queued waits for the handshake (bounded): sent to the inbox
                    # meanwhile, it would have to be carried out before the link may be used.
                    peer.connecting = True
                    self._tasks.start_soon(self._connect, peer)
                if peer.queue and not peer.connecting:
                    await self._send_batch(peer)

    async def _watch(self) -> None:
        """Every link whose oldest unacked batch is older than `ack_timeout` fails over."""
        while True:
            await trio.sleep(self.ack_timeout / 4)
            late = time.monotonic() - self.ack_timeout
            for peer in list(self._peers.values()):
                if peer.unacked and peer.unacked[0].at < late:
                    self._fall_back(peer, "no ack in time")

    def _should_try(self, peer: Peer) -> bool:
        """Links are tried only for traffic: a target nobody sends to costs nothing. With
        links off, the target is still looked up (`link_address`, which finds a node declared
        dead) before its inbox is used, and again at most every NO_LINK_RETRY."""
        return not peer.connecting and time.monotonic() >= peer.next_try

    def _seal(self, peer: Peer) -> tuple[int, dict[bytes, bytes], list[Queued]]:
        """The next batch of what is queued for `peer` (the rest stays queued): at most
        MAX_BATCH_ORDERS orders, and halved until it is under MAX_BATCH_BYTES."""
        take = min(len(peer.queue), MAX_BATCH_ORDERS)
        at = int(time.time() * 1000)  # when it was sealed: a batch kept too long is stale
        peer.used_at = time.monotonic()
        while True:  # (a number a halved batch does not use is skipped: targets need order only)
            orders, seq = peer.queue[:take], next(self._seq)
            fields = self._codec.seal_delivery(self._node.node_id, peer.node, seq, orders, at=at)
            if take == 1 or len(fields[b"p"]) <= MAX_BATCH_BYTES:
                break
            take //= 2
        del peer.queue[:take]
        self.queued -= take
        return seq, fields, orders

    def _linked_batch(self, peer: Peer, stream: trio.SocketStream) -> bytes:
        """What is queued for `peer` as one batch frame, kept until acked."""
        seq, fields, orders = self._seal(peer)
        peer.unacked.append(Sent(seq, fields, orders, time.monotonic()))
        self.batches_linked += 1
        return frame(BATCH, fields[b"m"] + fields[b"p"])

    def _check_unacked(self, peer: Peer) -> None:
        """Far more unacked than acks every ACK_INTERVAL allow: a target that does not keep
        up goes by its inbox (and it remembers each batch's path longer than this)."""
        if len(peer.unacked) >= MAX_UNACKED:
            self._fall_back(peer, "too many unacked")

    async def _send_batch(self, peer: Peer) -> None:
        stream = peer.stream
        if stream is None:
            seq, fields, orders = self._seal(peer)
            self._to_inbox(peer, seq, fields, len(orders))
            return
        await self._send_frame(peer, stream, self._linked_batch(peer, stream))
        if peer.stream is stream:
            self._check_unacked(peer)

    async def _send_frame(self, peer: Peer, stream: trio.SocketStream, data: bytes) -> None:
        peer.sending = True
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if peer.stream is stream:
                self._fall_back(peer, "send failed")
        finally:
            peer.sending = False

    def _to_inbox(self, peer: Peer, seq: int, fields: dict[bytes, bytes], orders: int) -> None:
        self._line.send(peer.node, fields, orders)
        peer.inbox_high = max(peer.inbox_high, seq)
        peer.inbox_at = time.monotonic()
        self.batches_inboxed += 1

    def _fall_back(self, peer: Peer, why: str) -> None:
        """The link failed: what it did not ack goes to the target's inbox, in order."""
        log.info("cluster link lost; using the inbox", node=peer.node, why=why)
        self.fallbacks += 1
        self._close(peer)
        peer.rest = b""  # part of a batch that is in `unacked`, copied below
        while peer.unacked:
            sent = peer.unacked.popleft()
            self._to_inbox(peer, sent.seq, sent.fields, len(sent.orders))
        self._retry_later(peer)

    def _retry_later(self, peer: Peer, delay: float | None = None) -> None:
        if delay is None:
            delay = RETRY_DELAYS[min(peer.attempts, len(RETRY_DELAYS) - 1)]
            peer.attempts += 1
        peer.next_try = time.monotonic() + delay
        peer.wake.set()

    def _close(self, peer: Peer) -> None:
        if peer.stream is not None:
            _abort(peer.stream)
            peer.stream = None

    async def _connect(self, peer: Peer) -> None:
        """Open a link to `peer.node`; it carries batches once the target has carried out
        everything this node put in its inbox. (Links off: only the lookup.)"""
        stream: trio.SocketStream | None = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                address = await self._node.link_address(peer.node)
            if self._peers.get(peer.node) is not peer:
                return  # found dead meanwhile (`forget`): what was queued is decided again
            if address is None or not self.enabled:
                # It has no link (or no genuine heartbeat yet), or links are off: the inbox.
                self._retry_later(peer, NO_LINK_RETRY)
                return
            host, _, port = address.rpartition(":")
            host = host.strip("[]")  # an IPv6 address, written [::1]:port
            # What this node put in the target's inbox, unless it was so long ago that any of
            # it still unread is stale there (and the target may have forgotten its number).
            fresh = time.monotonic() - peer.inbox_at < self.forget_after
            high = peer.inbox_high if fresh else 0
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                stream = await trio.open_tcp_stream(host, int(port))
                nonce = secrets.token_hex(16)
                origin = self._node.node_id
                # `high`: the target answers once it has carried out this node's inbox that far.
                # `ack`: its ack timeout; the target acks often enough for it.
                hello = {
                    "o": origin,
                    "t": peer.node,
                    "n": nonce,
                    "high": high,
                    "ack": self.ack_timeout,
                }
                await stream.send_all(frame(HELLO, self._codec.seal_link("hello", hello)))
                reader = FrameReader(stream)
                kind, body = await reader.next()
            welcome = self._codec.open_link(body, "welcome") if kind == WELCOME else {}
            if (welcome.get("o"), welcome.get("t"), welcome.get("n")) != (
                peer.node,
                origin,
                nonce,
            ):
                raise LinkClosed("not the node dialled")
            last, challenge = welcome.get("last"), welcome.get("m")
            if not isinstance(last, int) or last < high:
                raise LinkClosed("its inbox is not carried out yet")
            if peer.node not in self._peers or self._node.node_id != origin:
                raise LinkClosed("no longer wanted")
            confirm = {"o": origin, "t": peer.node, "m": challenge}
            await stream.send_all(frame(CONFIRM, self._codec.seal_link("confirm", confirm)))
            peer.stream, peer.nonce, peer.attempts = stream, nonce, 0
            stream = None
            self._tasks.start_soon(self._read_acks, peer, peer.stream, reader)
            peer.wake.set()
        except (
            OSError,
            ValueError,
            LinkClosed,
            BadEntry,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            if stream is not None:
                _abort(stream)
            if not self.enabled:  # links off: only the lookup failed (Redis slow), nothing dialled
                self._retry_later(peer, NO_LINK_RETRY)
                return
            log.debug("cluster link not opened", node=peer.node, error=str(exc))
            if peer.attempts + 1 == WARN_AFTER:
                log.warning(
                    "cluster link does not open; the node's inbox carries its deliveries",
                    node=peer.node,
                    error=str(exc) or type(exc).__name__,
                )
            self._retry_later(peer)
        finally:
            peer.connecting = False
            if stream is not None and peer.stream is not stream:
                _abort(stream)

    async def _read_acks(self, peer: Peer, stream: trio.SocketStream, reader: FrameReader) -> None:
        try:
            while peer.stream is stream:
                for kind, body in await reader.burst():
                    ack = self._codec.open_link(body, "ack") if kind == ACK else {}
                    seq = ack.get("s")
                    if ack.get("n") != peer.nonce or not isinstance(seq, int):
                        raise LinkClosed("not an ack")
                    while peer.unacked and peer.unacked[0].seq <= seq:
                        peer.unacked.popleft()
        except (
            LinkClosed,
            BadEntry,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
        ) as exc:
            if peer.stream is stream:
                self._fall_back(peer, str(exc) or type(exc).__name__)

    # -- receiving ---------------------------------------------------------------------------

    async def _serve(self, stream: trio.SocketStream) -> None:
        host = _peer_name(stream).rpartition(":")[0] or "?"
        busy = self._handshaking.values()
        if (
            self._closing_inbound
            or len(busy) >= MAX_HANDSHAKES
            or sum(1 for other in busy if other == host) >= MAX_HANDSHAKES_PER_ADDRESS
        ):
            _abort(stream)
            return
        self._handshaking[stream] = host
        self._inbound[stream] = None  # its Inbound once the handshake proves its origin
        try:
            await self._serve_link(stream)
        except BadEntry as bad:  # a hello that does not verify: not a node of this cluster
            self._refused(stream, bad.reason)
        except (
            ValueError,  # a socket closed under the task (never expected; contained)
            LinkClosed,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            OSError,
        ) as exc:
            log.debug("cluster link closed", error=str(exc) or type(exc).__name__)
        finally:
            self._inbound.pop(stream, None)
            self._handshaking.pop(stream, None)  # (if it ended in its handshake)
            _abort(stream)

    def audit_overdue(self) -> None:
        """Audit the refusals of links whose window ended since the last record (node.py
        calls this with each heartbeat)."""
        for host, reason, count, _ in self._refusals.overdue():
            self._node.rejected(f"link:{host}", reason, count)

    def _refused(self, stream: trio.SocketStream, reason: str) -> None:
        """Audit a refused link: once per address and reason per REFUSAL_WINDOW, with how
        many were refused since (anyone who reaches the port could otherwise fill the trail)."""
        host = _peer_name(stream).rpartition(":")[0] or "?"
        admitted = self._refusals.admit(host, reason)
        if admitted is not None:
            self._node.rejected(f"link:{host}", reason, admitted[0])

    async def _serve_link(self, stream: trio.SocketStream) -> None:
        reader = FrameReader(stream, HANDSHAKE_FRAME)  # nothing big before the key is proven
        with trio.fail_after(HANDSHAKE_TIMEOUT / 2):
            kind, body = await reader.next()
        if kind != HELLO:
            raise BadEntry("malformed")
        hello = self._codec.open_link(body, "hello")
        target, origin, nonce = self._node.node_id, hello.get("o"), hello.get("n")
        if not isinstance(origin, str) or not isinstance(nonce, str):
            raise BadEntry("malformed")
        if hello.get("t") != target:
            # Genuine, for an id this node no longer has (it was evicted, or a worker came
            # back on the same port): the opener hears of it soon. Not an attack: no record.
            raise LinkClosed("for another node id")
        high = hello.get("high")
        if isinstance(high, int):  # what the origin put in the inbox is carried out first
            self._catching_up += 1
            try:
                with trio.move_on_after(HANDSHAKE_TIMEOUT / 2):
                    while self._node.carried_out(origin) < high:
                        await self._progress.wait()
            finally:
                self._catching_up -= 1
        # Its own nonce, `m`, which the opener signs back: a hello recorded off the network
        # and played again opens nothing.
        challenge = secrets.token_hex(16)
        last = self._node.carried_out(origin)
        welcome = {"o": target, "t": origin, "n": nonce, "m": challenge, "last": last}
        await stream.send_all(frame(WELCOME, self._codec.seal_link("welcome", welcome)))
        with trio.fail_after(HANDSHAKE_TIMEOUT / 2):
            kind, body = await reader.next()
        confirm = self._codec.open_link(body, "confirm") if kind == CONFIRM else {}
        if (confirm.get("o"), confirm.get("t"), confirm.get("m")) != (origin, target, challenge):
            raise BadEntry("malformed" if kind != CONFIRM else "replayed")
        reader.most = MAX_FRAME
        inbound = Inbound(
            self, stream, reader, origin, target, nonce, self._ack_interval_for(hello.get("ack"))
        )
        self._inbound[stream] = inbound
        self._handshaking.pop(stream, None)
        acks = trio.CancelScope()
        self._tasks.start_soon(self._ack_loop, acks, inbound)
        reactor = self._reactor
        buffered = True  # batches may have come with the confirmation
        try:
            while True:
                if buffered:
                    buffered = False
                elif reactor is not None and reactor.running:
                    # Parked: the reactor reads and carries out batches in its own turn
                    # (`Inbound.on_readable`); this task wakes only to check or to end.
                    woke = await reactor.park(stream.socket.fileno(), inbound)
                    if woke == b"":
                        if inbound.refused is not None:
                            raise inbound.refused
                        return  # closed by the other end
                    if woke is None:
                        reactor = None  # the reactor stops: read here from now on
                else:
                    reader.feed(await reader.receive())
                if self._node.may_be_stale() and not await self._node.still_member():
                    return  # evicted meanwhile (back from a freeze)
                if not self._still_wanted(target) or stream.socket.fileno() < 0:
                    return  # nothing more carried out: the sender falls back to the inbox
                inbound.carry_out(reader.ready())
        finally:
            acks.cancel()

    def _still_wanted(self, target: str) -> bool:
        return not self._closing_inbound and self._node.node_id == target

    @property
    def ack_interval(self) -> float:
        return min(ACK_INTERVAL, self.ack_timeout / 8)

    def _ack_interval_for(self, opener_timeout: object) -> float:
        """A link's ack interval: this node's, or shorter for an opener whose hello says it
        waits less for acks (`node_timeout` set lower there, during a rolling change)."""
        if isinstance(opener_timeout, int | float) and not isinstance(opener_timeout, bool):
            return max(MIN_ACK_INTERVAL, min(self.ack_interval, opener_timeout / 8))
        return self.ack_interval

    def _ack_frame(self, inbound: Inbound) -> bytes:
        ack = {"n": inbound.nonce, "s": self._node.carried_out(inbound.origin)}
        return frame(ACK, self._codec.seal_link("ack", ack))

    async def _ack_loop(self, scope: trio.CancelScope, inbound: Inbound) -> None:
        """Acks only free the sender's copies: a busy link costs one ack per `ack_interval`,
        not one per batch (each wakes a task at both ends), and one per ACK_AFTER batches at
        most, so the sender's unacked copies stay far below MAX_UNACKED."""
        with scope, contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await inbound.ack_due.wait()
                with trio.move_on_after(inbound.ack_interval):
                    await inbound.ack_now.wait()
                inbound.ack_due, inbound.ack_now = trio.Event(), trio.Event()
                inbound.unacked = 0
                await inbound.stream.send_all(self._ack_frame(inbound))


class Inbound:
    """One link this node accepted, after its handshake: batches from `origin`."""

    def __init__(
        self,
        links: Links,
        stream: trio.SocketStream,
        reader: FrameReader,
        origin: str,
        target: str,
        nonce: str,
        ack_interval: float,
    ) -> None:
        self._links = links
        self.stream = stream
        self.reader = reader
        self.origin = origin
        self.target = target
        self.nonce = nonce  # the opener's, which its acks carry
        self.ack_interval = ack_interval
        self.ack_due = trio.Event()  # a batch came since the last ack
        self.ack_now = trio.Event()  # ACK_AFTER batches came: ack without waiting
        self.unacked = 0
        self.refused: BadEntry | None = None

    def carry_out(self, frames: list[tuple[bytes, bytes]]) -> None:
        """Raises: BadEntry("malformed") for a frame that is not a batch."""
        for kind, body in frames:
            if kind != BATCH:
                raise BadEntry("malformed")
            self._links._node.link_received(
                self.origin, {b"m": body[:MAC_BYTES], b"p": body[MAC_BYTES:]}
            )
        if frames:
            self.ack_due.set()
            self.unacked += len(frames)
            if self.unacked >= ACK_AFTER:
                self.ack_now.set()

    def on_readable(self) -> None:
        """In the reactor's turn: read what arrived, and carry it out unless something needs
        this link's task (its end, a refusal, or a check after a freeze)."""
        links, fd = self._links, self.stream.socket.fileno()
        reactor = links._reactor
        if reactor is None:
            return
        try:
            data = os.read(fd, RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            reactor.wake(fd, b"")
            return
        self.reader.feed(data)
        if not links._still_wanted(self.target) or links._node.may_be_stale():
            reactor.wake(fd, b"check")
            return
        try:
            self.carry_out(self.reader.ready())
        except BadEntry as bad:
            self.refused = bad
            reactor.wake(fd, b"")


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


def _abort(stream: trio.SocketStream) -> None:
    """Close at once, without waiting (a frozen peer must not hold this node)."""
    stream.socket.close()
