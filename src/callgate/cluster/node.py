"""A server as one node of a cluster: decisions on shared state, deliveries routed to one node.

The transport's seam to the cluster (`ConnectionHub.attach_cluster`), with the interface of a
single server's `LocalDispatch`. What a node's clients do becomes a core event, decided here:

1. **Decide** (`_decide`): load the records the event concerns (records.py), let the unchanged
   switchboard decide on that slice, and commit what changed atomically (store.py); if another
   node changed one of those records meanwhile, load again and decide again.
2. **Carry out**: actions for this node's connections go to its executor; those for another
   node's connections go to that node only, signed and numbered (entries.py), batched per node:
   over a direct link, with its Redis inbox behind it (links.py). Audit records are written
   here, once: by the node that decided.
3. **Cache what the call allows**: once a call is connected, the node of each side remembers
   the other side's device, so an `ice-candidate` or `call-renegotiate` costs no Redis round
   trip beyond its delivery. The route is dropped when the call ends or the other side moves
   (a delivery that finds no connection is decided again and the sender told to forget it).

Events are decided in lanes, one per hash of the user they start from, so one user's events
are decided in the order they happened; different users' events run side by side.

Other duties, each a task: the inbox reader; the timer loop (a node claims due timers from the
shared sorted set at the deadline of each timer it armed, and sweeps the set every
TIMER_SWEEP, so a dead node's timers fire elsewhere; a claim expires, so a timer is never
lost, and the commit makes its outcome happen once); the keeper
(heartbeats, the leader lease, and, on the leader, declaring dead the nodes whose signed
heartbeats lapsed: their devices are disconnected (held for `reconnect_grace`) and their unread
inboxes go to the held devices' resume buffers). `nodes` and the presence sets are unsigned:
only a node of which a genuine heartbeat was seen is buried (a node signs no one in before its
first beat), and only users whose signed record names an online device of it cost a decision.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import math
import random
import secrets
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from limits.errors import StorageError

from callgate.cluster.entries import (
    NODE_SEPARATOR,
    BadEntry,
    EntryCodec,
    Forget,
    Heartbeat,
    Learn,
    NodeGone,
    Order,
    RevocationVersion,
    forget_after,
    forgettable,
    heard_time,
    is_from_the_future,
    is_stale,
    node_of,
)
from callgate.cluster.line import RETRY_DELAYS, DeliveryLine, Entries
from callgate.cluster.links import Links, RecentPaths, Refusals
from callgate.cluster.records import USER_PREFIX, BadRecord, RecordCodec, Slice, Timer, Writes
from callgate.cluster.store import (
    LAST_BEAT_MS,
    STORE_ERRORS,
    Store,
    WrongType,
    WrongTypeError,
)
from callgate.config import ClusterSettings
from callgate.core.actions import (
    Ack,
    Action,
    Audit,
    CancelTimer,
    Close,
    Deliver,
    SendError,
    StartTimer,
)
from callgate.core.calls import Call, CallState, Role
from callgate.core.events import (
    Authenticated,
    DeliveryFailed,
    Disconnected,
    Event,
    MessageReceived,
    OperatorDisconnectedUser,
    OperatorEndedCall,
    RevocationChanged,
    ShuttingDown,
    TimerFired,
    TokenRefreshed,
)
from callgate.core.policy import CallRules, Throttled
from callgate.core.switchboard import Switchboard, ended_record, renegotiated_record
from callgate.errors import CloseCode, CloseConnection, ErrorCode
from callgate.log import get_logger
from callgate.protocol.messages import CallRenegotiate, CallRequest, IceCandidate, UserId

if TYPE_CHECKING:
    from callgate.ratelimit import RateLimiter
    from callgate.transport.connection import Connection
    from callgate.transport.executor import Executor
    from callgate.transport.reactor import Reactor

log = get_logger("callgate.cluster")

LANES = 8
LANE_QUEUE = 4096
ATTEMPTS = 50  # compare-and-set conflicts in a row before a decision gives up
# A node claims due timers when one it armed is due, and every TIMER_SWEEP seconds anyway:
# the sweep fires what a dead node armed, and what a node that died after claiming held.
TIMER_SWEEP = 0.5
TIMER_GRAIN = 0.1  # seconds: its own timers due within one grain cost a node one claim
TIMER_CLAIM = 64
# Seconds a timer's unsigned score may be past its signed deadline, and past any claim's hold
# as this node's clock sees it, before it counts as raised by a Redis client without the key.
TIMER_LATE_SLACK = 10.0
# How many of its devices' records a node checks when the epoch changed (Redis lost its data?),
# chosen at random so that a client of Redis without the key cannot know which to delete.
RECOVERY_SAMPLE = 16
_chance = secrets.SystemRandom()
MAX_OUTBOX = 100_000  # orders waiting for Redis; past this new ones are refused, counted, logged
# How long a node's death verdict (`dead:<node>`) is kept, and the leader's memory that it
# buried it: as long as its `last:<node>` counts as evidence that it ran (a week after the beat,
# and an hour more for the clocks of the node that beat and the one that judges), so that a
# recorded `last:` put back never gets a node buried twice. A `last:` older than that is refused.
# Besides the node itself (frozen, it finds it when it wakes), the other nodes read it before
# they send to a node they do not know to be dead (`link_address`): a signed record may name
# a device of it online long after its burial (its presence set was deleted), and its inbox
# is read by nobody. One small key per dead node.
DEAD_VERDICT_MS = LAST_BEAT_MS + 3_600_000
REPLAYED = "replayed"  # a member of `nodes` buried already, or a `last:` older than a verdict
# Seconds after its origin sealed it that a batch is refused (`stale`): far longer than any
# link, inbox, handover or ack delay, and than the nodes' clocks differ. What this node keeps
# per origin (its last batch number, the paths of recent batches) is forgotten once no dated
# batch came from that origin for `forget_after` (twice this): a copy of any batch it carried
# out is refused as stale by then, so forgetting its number reopens no replay.
MAX_BATCH_AGE = 3600.0
STALE = "stale"
FUTURE = "future"
# The close reason of a connection whose device the cluster no longer holds.
LET_GO = "node left the cluster"
# The `call-end` reason when Redis lost a call's state (restarted without its data).
STATE_LOST = "state_lost"
TIMERS_IN_FLIGHT = 256  # timer firings queued at once (the rest wait for the next sweep)
BURIAL_IN_FLIGHT = 64  # a dead node's users decided at once while it is buried (8 per lane)
# Members of `nodes` never seen running that the leader checks at once (Watch.to_check): the
# set is unsigned, and each checked member costs a heartbeat read with every beat.
MAX_UNKNOWN_WATCHED = 256
BURIED_SWEEP = 30.0  # seconds the burying node keeps emptying a dead node's inbox


def new_node_id(name: str | None) -> str:
    """`<name>-<random>`: a node that restarts is a new node (its old devices are gone)."""
    return f"{name or 'node'}-{secrets.token_hex(3)}"


class Unavailable(Exception):
    """Redis cannot be reached, or a decision kept conflicting: try again later."""


class Tampered(Unavailable):
    """A record the decision needs does not verify (written without the key): refused like
    an unavailable cluster, but never tried again, durable or not (it would not verify the
    next time either, and would hold its lane for good)."""


class RecordedThrottle:
    """The core's `CallThrottle` in a cluster: the decision the caller's node already took.

    Call limits are counted in Redis (`limits`), once per request, before the decision; a
    decision retried after a conflict must not count again.
    """

    def __init__(self) -> None:
        self.decision: Throttled | None = None

    def admit_call(self, caller: UserId, callee: UserId) -> Throttled | None:
        return self.decision


@dataclass(slots=True)
class Route:
    """A connected call as one of this node's devices sees it: where the other side is."""

    conn: str  # this node's device in the call
    peer: UserId
    peer_conns: list[str]
    # Each of the other side's devices, with its user: what `_carry_out` needs to know.
    users: dict[str, UserId] = field(init=False)

    def __post_init__(self) -> None:
        self.users = dict.fromkeys(self.peer_conns, self.peer)


@dataclass(slots=True)
class Job:
    """One decision for a lane: `events` on the slice of `users`."""

    users: list[UserId]
    events: list[Event] | Callable[[Slice], list[Event]]
    fired: Timer | None = None
    throttled: Throttled | None = None
    forwarded: bool = False
    done: trio.Event | None = None
    error: BaseException | None = None
    # Deliveries that failed once are not retried again if they fail a second time.
    retry: bool = True
    # Must happen even if Redis is away for a while (a device that left, a dead node's devices,
    # a message for a resume buffer): tried again until it is decided.
    durable: bool = False
    check_devices: int | None = None  # sign-in: refuse when the user has this many online
    count_call: bool = False  # a call-request: counted against the shared call limits first
    # A device registered again after Redis lost its data: its client has its session already.
    again: bool = False


@dataclass(slots=True)
class LocalDevice:
    user: UserId
    session_id: str
    token_id: str | None
    issued_at: float | None
    # The calls this device takes part in, as of the last decision here about them.
    calls: dict[str, Call] = field(default_factory=dict)


class Watch:
    """The leader's view of the other nodes' heartbeats. Pure.

    A check "sees" a node only when its heartbeat value verifies and carries a newer beat
    number than the last one seen; a node is dead after `misses_for_death` =
    ceil(node_timeout / heartbeat_interval) checks in a row (at least 2) that did not see it,
    so a key deleted, overwritten or copied back by a Redis client without the key is a missed
    check, never a death by itself.
    """

    def __init__(self, settings: ClusterSettings) -> None:
        self.misses_for_death = max(
            2, math.ceil(settings.node_timeout / settings.heartbeat_interval - 1e-9)
        )
        self._last_beat: dict[str, int] = {}
        self._missed: dict[str, int] = {}

    @property
    def missed(self) -> dict[str, int]:
        """Per watched node, the checks in a row that did not see it."""
        return dict(self._missed)

    def observe(self, beats: Mapping[str, int | None]) -> None:
        """One check: each watched node's verified beat number (None: absent or not genuine)."""
        for node, beat in beats.items():
            last = self._last_beat.get(node)
            if beat is not None and (last is None or beat > last):
                self._last_beat[node] = beat
                self._missed[node] = 0
            else:
                self._missed[node] = self._missed.get(node, 0) + 1

    def saw(self, node: str) -> bool:
        """Whether a genuine heartbeat of `node` was ever seen here (since it was last
        forgotten): evidence that it ran."""
        return node in self._last_beat

    def is_newer(self, node: str, beat: int) -> bool:
        last = self._last_beat.get(node)
        return last is None or beat > last

    def to_check(self, members: Iterable[str], unknown_at_most: int) -> set[str]:
        """The nodes the next check reads: every node seen running, however many, and those
        of `members` (as read from the unsigned `nodes`) never seen running, up to
        `unknown_at_most` of them at a time, the first in `members`' order (the caller's:
        random, so that no name takes the room before others). An unknown node is checked
        again at every check until it is seen or declared dead (then judged and forgotten), so
        each is counted to the end; newcomers wait for room. A real node's first heartbeat
        adds it to `nodes` with that beat: it is unknown only until its first check. Members
        added by a Redis client without the key, however many, cost each check at most
        `unknown_at_most` reads, and this watch at most that many entries beyond the nodes
        that ran."""
        unknown = [node for node in self._missed if node not in self._last_beat]
        chosen = set(self._missed)
        for node in members:
            if len(unknown) >= unknown_at_most:
                break
            if node not in chosen:
                chosen.add(node)
                unknown.append(node)
        return chosen

    def dead(self) -> list[str]:
        return sorted(n for n, missed in self._missed.items() if missed >= self.misses_for_death)

    def forget(self, node: str) -> None:
        self._missed.pop(node, None)
        self._last_beat.pop(node, None)


class ClusterNode:
    """Decisions on the shared state in Redis; deliveries to the node that holds the target."""

    def __init__(
        self,
        settings: ClusterSettings,
        rules: CallRules,
        executor: Executor,
        live: Mapping[str, Connection],
        limiter: RateLimiter,
        max_devices: int,
        adopt_revocations: Callable[[RevocationChanged], None],
        evicted: Callable[[], None],
        reactor: Reactor | None = None,
    ) -> None:
        if settings.key is None:  # refused by the config check; kept for the type checker
            raise ValueError("cluster.key is required")
        key = settings.key.get_secret_value().encode()
        self._settings = settings
        self._rules = rules
        self._executor = executor
        self._live = live
        self._limiter = limiter
        self._max_devices = max_devices
        self._adopt_revocations = adopt_revocations
        self._evicted = evicted
        self.node_id = new_node_id(settings.node_name)
        self.store = Store(settings.redis_url, settings.name, removed=self._retyped)
        self.records = RecordCodec(settings.name, key)
        self.codec = EntryCodec(settings.name, key)
        self._throttle = RecordedThrottle()
        executor.unix_clock = True
        self._lanes: list[tuple[trio.MemorySendChannel[Job], trio.MemoryReceiveChannel[Job]]] = [
            trio.open_memory_channel[Job](LANE_QUEUE) for _ in range(LANES)
        ]
        self._busy_lanes = 0
        self._idle = trio.Event()
        self._devices: dict[str, LocalDevice] = {}  # this node's signed-in devices
        self._routes: dict[tuple[UserId, str], Route] = {}
        # Per connection, its messages queued for a decision: an ice-candidate behind one of
        # them waits its turn instead of taking the cached route (it must not overtake a
        # renegotiation or a hang-up).
        self._undecided: dict[str, int] = {}
        # Deliveries to and from other nodes: direct links (links.py), with each node's
        # inbox behind them (line.py: redis-py in two threads).
        self.line = DeliveryLine(settings.redis_url, settings.name)
        self.line.node_id = self.node_id
        self.max_batch_age = MAX_BATCH_AGE  # (read when the node is made: tests shorten it)
        self.links = Links(
            self.codec,
            self.line,
            self,
            ack_timeout=settings.ack_timeout,
            forget_after=forget_after(self.max_batch_age),
            enabled=settings.links,
            reactor=reactor,
        )
        self._inbox: list[tuple[str, Entries]] = []  # batches read, not yet carried out
        self._inbox_changed = trio.Event()
        # Per origin node: the last batch number carried out, and by which path the recent
        # ones came ("link" or "inbox"): a batch a link failed to ack is copied to the inbox,
        # and that copy is not a replay. Node ids are new with every process, so both are
        # forgotten for an origin whose last batch carried out here, dated, came longer than
        # `forget_after` ago (`_heard_at`: unix time it was carried out); an origin of the
        # previous release dates no batch and is never forgotten.
        self._last_seq: dict[str, int] = {}
        self._paths: dict[str, RecentPaths] = {}
        self._heard_at: dict[str, float] = {}
        self.duplicates = 0
        self._inbox_position = b"0-0"
        self._beat = 0
        self.watch = Watch(settings)
        # Per watched node, how far it had read its inbox at its last genuine heartbeat.
        self._read_up_to: dict[str, str] = {}
        # Per watched node, per origin, the last batch it had carried out at its last genuine
        # heartbeat; and per buried node (and this one, leaving), the batches its inbox has
        # handed over: a batch appended there again is handed over once.
        self._done_of: dict[str, dict[str, int]] = {}
        self._handed_over: dict[str, set[tuple[str, int]]] = {}
        self._unsigned_refusals = Refusals()
        self._waiting_room: trio.Nursery | None = None  # durable jobs a full lane made wait
        self._timers_in_flight = 0  # timer firings queued or being decided
        self.is_leader = False
        self._epoch: bytes | None = None
        self._connected_since = time.monotonic()
        self._kept_at = time.monotonic()  # when the last heartbeat went through
        self._checked_at = 0.0  # when a link last asked whether this node is still a member
        self._store_ok = False
        self.joined = trio.Event()
        # Set once a heartbeat under the current node id went through (its signed `last:<node>`
        # is in Redis before it is a member of `nodes`): only then are sign-ins decided, so a
        # node that dies holding devices always left the evidence that gets it buried.
        self._registered = trio.Event()
        # The revocation list this node holds: its version, and its sealed value (written
        # again whenever Redis holds an older or no genuine one).
        self._revocation_version: RevocationVersion = (-1, "")  # none: any genuine list is newer
        self._revocations_sealed: bytes | None = None
        self._revocation_content: tuple[frozenset[str], dict[str, float]] | None = None
        self._pending_revocations: bytes | None = None
        self.lost_orders = 0
        # Nodes declared dead, with when this node heard of it: nothing is sent to them (a
        # delivery for one of their devices retires it, if a signed record still names it
        # online, and follows it: `_undelivered`), for `forget_after`; after that the verdict
        # `dead:<node>`, read before anything is sent to a node with no link
        # (`link_address`), puts it back here. A leader that buried one takes what still lands
        # in its inbox for a while.
        self._gone: dict[str, float] = {}
        self._buried: dict[str, float] = {}
        # The nodes this one buried as leader, with when (unix time, in order), for
        # DEAD_VERDICT_MS: a member of that name is never buried again, even if its verdict
        # was deleted.
        self._burials: dict[str, float] = {}
        # The leader's heartbeat asks for dead nodes to be buried; a task of their own buries
        # them, so that a long burial (a node of many users) never stops this node's beats.
        self._judge_wanted = trio.Event()
        self._keeping = trio.Lock()  # one heartbeat at a time (the inbox loop may ask for one)
        # The timers this node armed and has not seen disarmed (member -> unix deadline, rounded
        # up to TIMER_GRAIN), a heap of (deadline, member) over them (with stale entries,
        # skipped), and the timer loop's sleep.
        self._timers_armed: dict[str, float] = {}
        self._timer_deadlines: list[tuple[float, str]] = []
        self._timer_wait: trio.CancelScope | None = None
        self._next_sweep = math.inf  # (unix time; set when the loop starts)
        self._claim_again = False  # the last claim took a full TIMER_CLAIM: there may be more
        # Counted for tests and `live_counts`: decisions taken here, batches received.
        self.decisions = 0
        self.received = 0
        self.unavailable = 0  # decisions that Redis could not take (each attempt)

    # -- what the hub asks -------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """Redis answers: new work can be decided."""
        return self._store_ok

    def new_conn_id(self, token: str) -> str:
        """Connection ids name their node, so every node knows where a device lives."""
        return self.node_id + NODE_SEPARATOR + token

    def dispatch(self, event: Event, *, forwarded: bool = False) -> None:
        if type(event) is MessageReceived:  # the per-message case, before the match's tests
            self._take_message(event)
            return
        match event:
            case Disconnected(conn=conn):
                device = self._devices.get(conn)
                if device is not None:
                    self._enqueue(Job([device.user], [event], durable=True))
            case RevocationChanged():
                self._publish_revocations(event)
            case OperatorEndedCall(user=user) if user is not None:
                self._enqueue(Job([user], [event]))
            case OperatorDisconnectedUser(user=user):
                self._enqueue(Job([user], [event]))
            case MessageReceived():
                self._take_message(event)
            case ShuttingDown():
                pass  # a node ends no call: its devices are held, and resume elsewhere
            case _:
                log.warning("event not routable in a cluster", event_name=type(event).__name__)

    async def dispatch_and_wait(self, event: Event) -> None:
        """Decide a sign-in or a token refresh, and wait (bounded) for it.

        Raises: CloseConnection 1013 when the cluster cannot decide it in time.
        """
        match event:
            case Authenticated(conn=conn, user=user):
                await self._wait_registered(conn)
                self._devices[conn] = LocalDevice(
                    user, event.session_id, event.token_id, event.issued_at
                )
                job = Job([user], [event], check_devices=self._max_devices)
            case TokenRefreshed(conn=conn):
                device = self._devices.get(conn)
                if device is None:
                    return
                device.session_id = event.session_id
                device.token_id, device.issued_at = event.token_id, event.issued_at
                job = Job([device.user], [event])
            case _:
                self.dispatch(event)
                return
        job.done = trio.Event()
        if self._enqueue(job):
            with trio.move_on_after(self._settings.apply_timeout):
                await job.done.wait()
            if not job.done.is_set():
                # It may still be decided: the hub closes the connection, and its
                # Disconnected, queued behind it, undoes it.
                raise CloseConnection(CloseCode.TRY_AGAIN_LATER, "cluster unavailable")
            if job.error is None:
                return
        if isinstance(event, Authenticated):
            self._devices.pop(event.conn, None)  # not decided: nothing to undo
        if isinstance(job.error, CloseConnection):
            raise job.error
        raise CloseConnection(CloseCode.TRY_AGAIN_LATER, "cluster unavailable")

    async def _wait_registered(self, conn: str) -> None:
        """Before a sign-in: wait (bounded) until a heartbeat under this node's id went
        through, which writes the signed evidence that the node ran (a node without it is
        never buried: its devices would stay in their users' records).

        Raises: CloseConnection 1001 when `conn` is of an id this node no longer has (it was
        declared dead meanwhile), 1013 when no heartbeat went through in time."""
        if not self._registered.is_set() and node_of(conn) == self.node_id:
            with trio.move_on_after(self._settings.apply_timeout):
                await self._registered.wait()
        if node_of(conn) != self.node_id:
            raise CloseConnection(CloseCode.GOING_AWAY, LET_GO)
        if not self._registered.is_set():
            raise CloseConnection(CloseCode.TRY_AGAIN_LATER, "cluster unavailable")

    def _take_message(self, received: MessageReceived) -> None:
        """A client message, where it was read (the hub calls this inline, without waking the
        connection's task): the cached route of a connected call, or a decision queued."""
        connection = self._live.get(received.conn)
        device = self._devices.get(received.conn)
        if connection is None or device is None:
            return  # it left meanwhile
        message, user = received.message, device.user
        if (
            isinstance(message, _RELAYED)
            and not self._undecided.get(received.conn)
            and self._relay(connection, received, user)
        ):
            return  # (behind an undecided message of the same device, it waits its turn)
        if not self.available:
            connection.send_error(*_unavailable(received))
            return
        users = [user]
        to = getattr(message, "to", None)
        if isinstance(to, str) and to != user:
            users.append(to)
        # Counted (in the lane, before the decision) only for a request the core will not
        # refuse outright (not from yourself).
        count_call = isinstance(message, CallRequest) and message.from_user == user != message.to
        job = Job(users, [received], forwarded=True, count_call=count_call)
        if not self._enqueue(job):
            connection.send_error(*_unavailable(received))
            return
        self._undecided[received.conn] = self._undecided.get(received.conn, 0) + 1

    def shutting_down(self) -> None:
        """A node ends no call: its devices disconnect, so their calls are held for
        `reconnect_grace` and the clients resume them on another node."""

    async def flush(self) -> None:
        """Decide what is queued, hand over what is left in the inbox, send every order."""
        await self._lanes_idle()
        # Links carry out nothing more: their senders copy what was not acked to the inbox.
        self.links.close_inbound()
        try:
            await self._take_over_inbox(self.node_id)
        except STORE_ERRORS as exc:
            log.warning("inbox not handed over at shutdown", error=str(exc))
        await self._lanes_idle()
        # Acked on their links, or copied to the inboxes (a poll: at shutdown only, and the
        # caller bounds the wait).
        while self.links.pending:  # noqa: ASYNC110
            await trio.sleep(0.01)
        # The writer thread says when it has appended everything (the caller bounds the wait).
        while not await trio.to_thread.run_sync(
            self.line.wait_drained, 1.0, abandon_on_cancel=True
        ):
            pass

    async def _lanes_idle(self) -> None:
        while self._busy_lanes or any(
            receive.statistics().current_buffer_used for _, receive in self._lanes
        ):
            self._idle = trio.Event()
            await self._idle.wait()

    @property
    def beats(self) -> int:
        """Heartbeats begun so far (tests wait for one to have gone by)."""
        return self._beat

    @property
    def inbox_position(self) -> bytes:
        """The id of the last inbox entry this node has read."""
        return self._inbox_position

    @property
    def quiet(self) -> bool:
        """Nothing queued, being decided, or waiting to be sent (tests wait for this)."""
        return (
            not self._busy_lanes
            and not any(receive.statistics().current_buffer_used for _, receive in self._lanes)
            and not self.line.pending
            and not self.links.pending
            and not self._inbox
        )

    def live_counts(self) -> dict[str, int]:
        return {
            "available": int(self.available),
            "leader": int(self.is_leader),
            "pending_orders": self.line.pending + self.links.queued,
            "unacked_batches": self.links.unacked,
            "batches_linked": self.links.batches_linked,
            "batches_inboxed": self.links.batches_inboxed,
            "link_fallbacks": self.links.fallbacks,
            "duplicates": self.duplicates,
            "routes": len(self._routes),
            "lost_orders": self.lost_orders,
            "decisions": self.decisions,
            "received": self.received,
            "unavailable": self.unavailable,
        }

    async def cluster_view(self) -> Switchboard:
        """Every user and call of the cluster in one switchboard, to read (the admin API).
        Reads the whole shared state: meant for operators, not for every request. A record
        that does not verify is left out (and audited)."""
        raw = await self.store.all_records()
        while True:
            try:
                return Slice(self.records, raw, self._rules, self._throttle, (0, 0, 0)).board
            except BadRecord as bad:
                self._executor.audit(
                    "cluster.rejected",
                    {"node": self.node_id, "entry": bad.name, "reason": bad.reason},
                )
                raw.pop(bad.name, None)

    # -- the fast path -----------------------------------------------------------------------

    def _relay(self, connection: Connection, received: MessageReceived, user: UserId) -> bool:
        """An ice-candidate or a renegotiation in a connected call, by its cached route: the
        core's RELAY and RENEGOTIATE steps, which change nothing shared (renegotiations are
        not counted in the shared record in a cluster)."""
        message = received.message
        if not isinstance(message, _RELAYED):
            return False
        route = self._routes.get((user, message.call_id))
        if route is None or route.conn != received.conn:
            return False
        if message.to != route.peer:
            return False  # decided in full: the core says `forbidden`
        forwarded = {**message.data, "from": user}
        call = None
        if isinstance(message, CallRenegotiate):
            device = self._devices.get(route.conn)
            call = device.calls.get(message.call_id) if device is not None else None
            if call is None:
                return False
        if self._outbox_full and any(node_of(c) != self.node_id for c in route.peer_conns):
            # Redis away long and the links down: it could not be sent, so it is not acked
            # (nor audited as sent).
            connection.send_error(*_unavailable(received))
            return True
        if call is not None:
            self._executor.audit(*_fields(renegotiated_record(call, received.conn, user)))
        if received.ref is not None:
            connection.send_ack(received.ref)
        deliveries: list[Action] = [
            Deliver(conn, message.event, forwarded) for conn in route.peer_conns
        ]
        self._carry_out(deliveries, route.users, forwarded=True)
        return True

    def _learn_routes(self, sliced: Slice) -> None:
        """After a decision: the calls of this node's devices in the slice, as they are now."""
        for loaded in sliced.calls.values():
            conns = [loaded["caller_conn"], loaded["callee_conn"], *loaded["ringing"]]
            for conn in conns:
                device = self._devices.get(conn) if conn is not None else None
                if device is not None:
                    device.calls.pop(loaded["call_id"], None)
                    self._routes.pop((device.user, loaded["call_id"]), None)
        for call in sliced.board.calls:
            for conn in call.devices():
                device = self._devices.get(conn)
                if device is None:
                    continue
                role = call.role_of(conn)
                peer = call.peer_of(device.user)
                device.calls[call.call_id] = copy.copy(call)
                if call.state is CallState.CONNECTED and role is not Role.BYSTANDER:
                    self._routes[(device.user, call.call_id)] = Route(
                        conn, peer, call.other_side(role)
                    )

    def _share_routes(self, sliced: Slice) -> None:
        """A call this decision connected, or whose devices it moved (a resume): the other
        nodes in it learn the new route at once (their next message needs no decision); a
        call not connected whose devices moved: they forget theirs."""
        for call in sliced.board.calls:
            loaded = sliced.calls.get(call.key)
            before = (
                set()
                if loaded is None
                else {loaded["caller_conn"], loaded["callee_conn"], *loaded["ringing"]} - {None}
            )
            connected = call.state is CallState.CONNECTED
            was_connected = loaded is not None and loaded["state"] == CallState.CONNECTED.name
            if set(call.devices()) == before and connected == was_connected:
                continue
            for conn in call.devices():
                node = node_of(conn)
                if node == self.node_id:
                    continue
                role = call.role_of(conn)
                user = call.caller if role is Role.CALLER else call.callee
                if connected and role is not Role.BYSTANDER:
                    peer_conns = tuple(call.other_side(role))
                    learned = Learn(user, call.call_id, conn, call.peer_of(user), peer_conns)
                    self._send(node, learned, None)
                else:
                    self._send(node, Forget(user, call.call_id), None)

    # -- decisions ---------------------------------------------------------------------------

    @staticmethod
    def _lane_of(job: Job) -> int:
        return zlib.crc32(job.users[0].encode()) % LANES

    def _enqueue(self, job: Job) -> bool:
        """Queue `job` in its users' lane. A full lane refuses it (False: the sender is told
        to retry), unless it is durable (a disconnect, a delivery that found no connection):
        that one waits for room in a task of its own, since nobody would retry it."""
        lane = self._lane_of(job)
        try:
            self._lanes[lane][0].send_nowait(job)
        except trio.WouldBlock:
            if job.durable and self._waiting_room is not None:
                log.warning("cluster lane full; durable event waits for room", lane=lane)
                self._waiting_room.start_soon(self._lanes[lane][0].send, job)
                return True
            log.warning("cluster lane full; event refused", lane=lane)
            return False
        return True

    async def _lane(self, receive: trio.MemoryReceiveChannel[Job]) -> None:
        async for job in receive:
            self._busy_lanes += 1
            try:
                attempt = 0
                while True:
                    try:
                        await self._run(job)
                        break
                    except Unavailable as unavailable:
                        if not job.durable or isinstance(unavailable, Tampered):
                            raise
                    # Redis is away: the lane waits with it (its other events could not be
                    # decided either), then decides this one, in its order.
                    await trio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
                    attempt += 1
            except Exception as exc:
                job.error = exc
                if not isinstance(exc, (Unavailable, CloseConnection)):
                    log.exception("cluster decision failed")
            finally:
                self._busy_lanes -= 1
                if job.fired is not None:
                    self._timers_in_flight -= 1
                if job.done is not None:
                    job.done.set()
                if not self._busy_lanes:
                    self._idle.set()

    async def _run(self, job: Job) -> None:
        self.decisions += 1
        try:
            if job.count_call and not await self._count_call(job):
                return
            actions, sliced = await self._decide(job)
        except Unavailable:
            self.unavailable += 1
            self._refuse_unavailable(job)
            raise
        finally:
            for event in job.events if not callable(job.events) else []:
                if isinstance(event, MessageReceived):
                    left = self._undecided.pop(event.conn, 1) - 1
                    if left:
                        self._undecided[event.conn] = left
        self._after(job, actions, sliced)

    async def _count_call(self, job: Job) -> bool:
        """A call-request against the shared call limits (in Redis, through `limits`, from a
        worker thread); False when they cannot be reached (the client is told to retry)."""
        [received] = job.events if not callable(job.events) else [None]
        if not isinstance(received, MessageReceived) or not isinstance(
            received.message, CallRequest
        ):
            return True
        message = received.message
        retyped: list[str] = []  # (appended in the worker thread, read here after it)
        try:
            job.throttled = await trio.to_thread.run_sync(
                self._limiter.admit_call,
                message.from_user,
                message.to,
                retyped.append,
                abandon_on_cancel=True,
            )
        except StorageError:
            self._carry_out([SendError(received.conn, *_unavailable(received))], {})
            return False
        finally:
            for _ in retyped:  # windows of another type, cleared: audited, summed
                self._entry_rejected("limits", "malformed", source="limits")
        job.count_call = False  # a retried decision does not count again
        return True

    async def _decide(self, job: Job) -> tuple[list[Action], Slice]:
        """Load, decide, commit; again on a conflict. Raises: Unavailable, CloseConnection."""
        for attempt in range(ATTEMPTS):
            try:
                raw = await self.store.load(job.users)
            except WrongTypeError as exc:  # (a guard: the script reads none of another type)
                raise Tampered from exc
            except STORE_ERRORS as exc:
                self._store_failed(exc)
                raise Unavailable from exc
            self._store_ok = True  # it answered (the keeper may not have noticed yet)
            try:
                sliced = Slice(self.records, raw, self._rules, self._throttle, self._bases())
            except BadRecord as bad:
                self._executor.audit(
                    "cluster.rejected",
                    {"node": self.node_id, "entry": bad.name, "reason": bad.reason},
                )
                log.warning("cluster record refused", record=bad.name, reason=bad.reason)
                raise Tampered from bad
            limit = job.check_devices
            if limit is not None and len(sliced.board.devices_of(job.users[0])) >= limit:
                raise CloseConnection(CloseCode.RATE_LIMIT_ABUSE, "too many connections")
            events = job.events(sliced) if callable(job.events) else job.events
            now = time.time()
            actions: list[Action] = []
            self._throttle.decision = job.throttled
            try:
                for event in events:
                    try:
                        actions += sliced.board.handle(event, now)
                    except ValueError:
                        # An event of a device the cluster let go already (its node was
                        # declared dead, or it was taken over): nothing to decide; a client
                        # still talking on it is closed, so it resumes and learns what happened.
                        conn = getattr(event, "conn", None)
                        if isinstance(event, MessageReceived | TokenRefreshed) and conn:
                            actions.append(Close(conn, CloseCode.GOING_AWAY, LET_GO))
                        continue
            finally:
                self._throttle.decision = None
            writes = sliced.writes(actions, job.fired)
            if not writes.changes:
                return actions, sliced
            for event in events:
                if isinstance(event, Authenticated) and node_of(event.conn) != self.node_id:
                    # Signed in under an id this node lost while it waited (declared dead,
                    # maybe buried already): never registered under it.
                    raise CloseConnection(CloseCode.GOING_AWAY, LET_GO)
            writes.sign_timers(self.codec.seal_timer_due)
            try:
                committed = await self.store.commit(writes)
            except WrongTypeError as exc:
                # Not expected: the script checks every key's type before its first write (and
                # runs atomically). Kept as a guard for a key the checks miss: an error answer
                # is then no outage, and this event alone is refused.
                log.warning("cluster commit refused a key of another type", error=str(exc))
                raise Tampered from exc
            except STORE_ERRORS as exc:
                # Refused, or lost on the way back: Redis may have run it. Asked once; when
                # it did, the decision stands and is carried out (a fired timer is gone from
                # the set: its outcome would otherwise reach nobody).
                committed = await self._committed_anyway(writes)
                if not committed:
                    self._store_failed(exc)
                    raise Unavailable from exc
            if committed:
                if writes.timers_started or writes.timers_done:
                    self._timers_committed(writes.timers_started, writes.timers_done)
                return actions, sliced
            # Another node changed what this decision read: read again, decide again.
            await trio.sleep(secrets.randbelow(1000) / 1e6 * min(attempt + 1, 20))
        log.error("cluster decision kept conflicting; given up", users=job.users)
        raise Unavailable

    async def _committed_anyway(self, writes: Writes) -> bool:
        """After a commit that raised: whether it took effect all the same (False when that
        cannot be told now; the decision is then not carried out, as before)."""
        with trio.move_on_after(self._settings.apply_timeout):
            try:
                return await self.store.committed(writes)
            except STORE_ERRORS:
                return False
        return False

    @staticmethod
    def _bases() -> tuple[int, int, int]:
        """Random starts for the slice's new timer ids, call keys and missed-call ids: safe
        integers (JSON), far apart, so two nodes never hand out the same id."""
        return (secrets.randbits(40) << 12, secrets.randbits(40) << 12, secrets.randbits(40) << 12)

    def _refuse_unavailable(self, job: Job) -> None:
        for event in job.events if not callable(job.events) else []:
            if isinstance(event, MessageReceived):
                self._carry_out(
                    [SendError(event.conn, *_unavailable(event))],
                    {},
                )

    def _after(self, job: Job, actions: list[Action], sliced: Slice) -> None:
        if job.again:
            actions = [a for a in actions if not (isinstance(a, Deliver) and a.event == "session")]
        self._learn_routes(sliced)
        self._share_routes(sliced)
        for event in job.events if not callable(job.events) else []:
            if isinstance(event, Disconnected):
                gone = self._devices.pop(event.conn, None)
                if gone is not None:
                    for call_id in gone.calls:
                        self._routes.pop((gone.user, call_id), None)
        users = {device.conn: device.user for device in sliced.board.devices()}
        for call in sliced.board.calls:
            for conn in call.devices():
                users.setdefault(conn, call.caller if conn == call.caller_conn else call.callee)
        self._carry_out(actions, users, forwarded=job.forwarded, retry=job.retry)

    # -- carrying out ------------------------------------------------------------------------

    def _carry_out(
        self,
        actions: list[Action],
        users: Mapping[str, UserId],
        *,
        forwarded: bool = False,
        retry: bool = True,
    ) -> None:
        """This node's actions to its executor; other nodes' to those nodes (links.py). A
        delivery a client message caused (`forwarded`) is counted where it was decided, here,
        wherever it goes."""
        local: list[Action] = []
        here = self.node_id
        for action in actions:
            if type(action) is Deliver:  # most actions, and every relay's: before the match
                conn = action.conn
                node = node_of(conn)
                if node != here:
                    self._send(node, action, users.get(conn))
                    if forwarded:
                        self._executor.metrics.count_forwarded(action.event)
                elif conn not in self._live:
                    self._undelivered(action, users.get(conn), retry)
                else:
                    local.append(action)
                    self._heard(conn, action.event, action.data)
                continue
            match action:
                case StartTimer() | CancelTimer():
                    continue  # the commit armed or disarmed it in the shared set
                case Audit():
                    local.append(action)
                case Ack(conn=conn) | SendError(conn=conn) | Close(conn=conn):
                    node = node_of(conn)
                    if node != here:
                        self._send(node, action, None)
                    else:
                        local.append(action)
        self._executor.execute(local, forwarded=forwarded)

    def _undelivered(
        self, action: Deliver, user: UserId | None, retry: bool, *, dead: bool = False
    ) -> None:
        """A delivery found no open connection here: decided again, once, on the shared
        state (the device is held: its resume buffer; it resumed elsewhere: its call's
        device now). A device that is gone altogether left its calls: nothing to keep.

        `dead`: it was for a device of a node known dead. Its burial retires every device
        the node's presence set lists, but a signed record may still name one online there (the
        set was deleted by a Redis client without the key, the node was dropped unburied, or
        the burial has not reached that user yet): decided again as it is, the delivery would
        come straight back here, for as long as the record says so. So that device is
        disconnected first, in the same decision, as a burial does (held for
        `reconnect_grace`, or its calls end): the record heals, and the delivery follows the
        device like any other (its resume buffer, or the sender is told the call ended). So is
        every other online device of the user on a node known dead: the delivery, decided
        again, would go to them next (a call's other ringing devices)."""
        if user is None or not (retry or dead):
            return
        failed = DeliveryFailed(action.conn, user, action.event, action.data)
        if not dead:
            self._enqueue(Job([user], [failed], retry=False, durable=True))
            return

        def retire_then_deliver(sliced: Slice) -> list[Event]:
            stale = _disconnects(sliced, self._gone.__contains__)  # as its burial would have
            if stale:
                log.warning("dead node's devices still online; disconnected", devices=len(stale))
            return [*stale, failed]

        self._enqueue(Job([user], retire_then_deliver, retry=False, durable=True))

    def _heard(self, conn: str, event: str, data: Mapping[str, Any]) -> None:
        """What this node's device is told about its calls keeps its copy of them current
        (after a Redis reset it says how each call stood): answered, or ended."""
        if event in _ENDS_CALL:
            self._forget_call(conn, data)
        elif event == "call-answer":
            device = self._devices.get(conn)
            call = device.calls.get(str(data.get("callId"))) if device is not None else None
            if call is not None and call.answered_at is None:
                call.state, call.answered_at = CallState.CONNECTED, time.time()

    def _forget_call(self, conn: str, data: Mapping[str, Any]) -> None:
        device = self._devices.get(conn)
        call_id = data.get("callId")
        if device is not None and isinstance(call_id, str):
            self._routes.pop((device.user, call_id), None)
            device.calls.pop(call_id, None)

    @property
    def _outbox_full(self) -> bool:
        return self.line.pending + self.links.queued >= MAX_OUTBOX

    def _send(self, node: str, order: Order, user: str | None) -> None:
        if node in self._gone:  # its inbox is read by nobody: its device is let go
            if isinstance(order, Deliver):
                self._undelivered(order, user, True, dead=True)
            return
        # (links' unacked batches are bounded on their own: MAX_UNACKED per link)
        if self._outbox_full:  # Redis away long: say so
            self.lost_orders += 1
            if self.lost_orders == 1 or self.lost_orders % 10_000 == 0:
                log.error("cluster deliveries dropped: Redis away", dropped=self.lost_orders)
            return
        self.links.send(node, order, user)

    # -- what links.py needs of this node (LinkHost) ------------------------------------------

    def carried_out(self, origin: str) -> int:
        return self._last_seq.get(origin, 0)

    async def link_address(self, node: str) -> str | None:
        """Where `node`'s links listen, from its signed heartbeat (None: use its inbox).

        Asked before anything is sent to a node this node has no link to, and again at most
        every few seconds while there is none (links.py), never per message. So it is also
        where a node not known here to be dead is checked: one this node never heard was
        declared dead (it joined later), or heard of over `forget_after` ago, may still be
        named online by a signed record (see `_undelivered`), and its inbox is read by nobody.
        Its signed verdict `dead:<node>`, if there is one, makes it gone here, and what was
        queued for it is decided again. Only the verdict counts: a client without the key
        can delete a live node's `hb:`, `last:` and membership, never write a verdict."""
        try:
            # One round trip; either of another type (no node wrote it) reads as absent: a
            # verdict of another type would otherwise keep every link to that node shut.
            (heartbeat, verdict), wrong = await self.store.strings([f"hb:{node}", f"dead:{node}"])
            if wrong:
                self._retyped(wrong)
            if node not in self._gone and self.codec.is_dead(verdict, node):
                log.info("a node this one sends to was declared dead", node=node)
                self._node_gone(node)
                return None
            return self.codec.link_of(heartbeat, node)
        except STORE_ERRORS:
            return None

    def link_received(self, origin: str, fields: Mapping[bytes, bytes]) -> None:
        self._receive(f"link:{origin}", fields, origin=origin)

    def may_be_stale(self) -> bool:
        """No heartbeat went through for `node_timeout`, nor was membership checked for a
        heartbeat interval: back from a freeze, this node may have been declared dead."""
        now = time.monotonic()
        return (
            now - self._kept_at > self._settings.node_timeout
            and now - self._checked_at > self._settings.heartbeat_interval
        )

    async def still_member(self) -> bool:
        """Before carrying out what a link brought, when `may_be_stale`: this node may have
        been declared dead, and its deliveries handed to others. False when it was (it is a
        new node now, and what the link brought is not its own). It reads the verdict only
        (the heartbeat is the keeper's, and is never cut short); while Redis is away it asks
        once per heartbeat interval, for at most a second, and carries on."""
        node = self.node_id
        if self.may_be_stale():
            self._checked_at = time.monotonic()
            verdict = None
            with trio.move_on_after(1.0), contextlib.suppress(*STORE_ERRORS):
                (verdict,), wrong = await self.store.strings([f"dead:{node}"])
                if wrong:
                    self._retyped(wrong)
            if self.codec.is_dead(verdict, node) and self.node_id == node:
                self._evict()
        return self.node_id == node

    def _inbox_received(self, node: str, entries: Entries) -> None:
        """From the reader thread (on trio's thread, between tasks): queue the batch."""
        self._inbox.append((node, entries))
        self._inbox_changed.set()

    async def _inbox_loop(self) -> None:
        while True:
            if not self._inbox:
                self._inbox_changed = trio.Event()
                await self._inbox_changed.wait()
            self._store_ok = True  # the reader got an answer from Redis
            if time.monotonic() - self._kept_at > self._settings.node_timeout:
                # Back from a freeze (or a long stall): this node may have been declared dead
                # meanwhile, and its inbox handed to others. Ask before delivering anything.
                with contextlib.suppress(*STORE_ERRORS):
                    await self._keep()
            batches, self._inbox = self._inbox, []
            for node, entries in batches:
                if node != self.node_id:
                    continue  # evicted meanwhile: what it read went to the held devices' buffers
                if not entries:  # read to the last id a stream can have, removed: from its start
                    self._inbox_position = b"0-0"
                    continue
                for entry_id, fields in entries:
                    self._inbox_position = entry_id
                    self._receive(entry_id.decode(), fields)
                # The reader trims what is finished with its next read; the heartbeat tells
                # the cluster how far this node has read (a node burying it hands over the
                # rest).
                self.line.finished(self._inbox_position)

    def _receive(
        self,
        entry_id: str,
        fields: Mapping[bytes, bytes],
        *,
        to: str | None = None,
        origin: str | None = None,
        handover: tuple[Mapping[str, int], set[tuple[str, int]]] | None = None,
    ) -> None:
        """Carry out a batch of orders from another node: from this node's inbox, from a
        link with `origin` (the node that opened it), or, `to` given, from a dead node's
        inbox. Each origin's batches are carried out once each, in the order of their
        numbers (links.py says why that order holds on both paths)."""
        target = to or self.node_id
        # An inbox is open to any Redis client: its refusals are summed up (a link's are not:
        # only a node with the key gets to send on one).
        refuse = self.rejected if origin is not None else self._entry_rejected
        try:
            delivery = self.codec.open_delivery(fields, target)
        except BadEntry as bad:
            refuse(entry_id, bad.reason)
            return
        if origin is not None and delivery.origin != origin:
            refuse(entry_id, "misrouted")  # another node's batch, on this link
            return
        now = time.time()
        if is_stale(delivery, now, self.max_batch_age):
            # Sealed too long ago: held that long (Redis away for longer), or recorded and
            # appended again, which cannot be told apart once the origin's number is
            # forgotten. Carried out in no way (handing its deliveries to buffers would be the
            # replay itself); an hour-old message is of no use to a call. Audited, with how
            # many messages for devices it held.
            refuse(entry_id, STALE, messages=delivery.messages)
            return
        if is_from_the_future(delivery, now, self.max_batch_age):
            # Its sender's clock runs ahead by more than the hour: dated that far ahead, a
            # recorded copy would stay fresh past the time its sender is forgotten here.
            refuse(entry_id, FUTURE, messages=delivery.messages)
            return
        if handover is not None:  # a dead or leaving node's inbox, handed over
            done, handed = handover
            if delivery.seq <= done.get(delivery.origin, 0):
                # Carried out by that node already: the copy of a link batch its sender made
                # when the link failed (expected), or a replay. Either way nothing to do.
                return
            if (delivery.origin, delivery.seq) in handed:
                refuse(entry_id, "replayed")  # appended again after its hand-over
                return
            handed.add((delivery.origin, delivery.seq))
        if to is None:
            self.received += 1
            linked = origin is not None
            paths = self._paths.get(delivery.origin)
            if paths is None:
                paths = self._paths[delivery.origin] = RecentPaths()
            if delivery.seq <= self._last_seq.get(delivery.origin, 0):
                came_by_link = paths.came_by_link(delivery.seq)
                if came_by_link is not None and came_by_link != linked:
                    # The other path's copy of a batch carried out (a link failed before its
                    # ack): expected once. Only a node with the key sends on a link, and only
                    # copies of link batches are in an inbox, so a replay gets no further.
                    self.duplicates += 1
                    paths.copy_seen(delivery.seq)
                else:
                    refuse(entry_id, "replayed")
                return
            self._last_seq[delivery.origin] = delivery.seq
            if delivery.at is not None:
                self._heard_at[delivery.origin] = heard_time(delivery, now)
            paths.add(delivery.seq, linked)
            self.links.carried_out_more()
        local: list[Action] = []
        for order, user in delivery.orders:
            if isinstance(order, Forget):
                self._routes.pop((order.user, order.call_id), None)
                continue
            if isinstance(order, Learn):
                if order.conn in self._devices:
                    route = Route(order.conn, order.peer, list(order.peer_conns))
                    self._routes[(order.user, order.call_id)] = route
                continue
            if isinstance(order, NodeGone):
                self._node_gone(order.node)
                continue
            if to is not None:  # a dead node's inbox: its deliveries follow their devices
                if isinstance(order, Deliver) and user is not None:
                    failed = DeliveryFailed(order.conn, user, order.event, order.data)
                    self._enqueue(Job([user], [failed], retry=False, durable=True))
                continue
            if isinstance(order, Deliver) and order.conn not in self._live:
                self._undelivered(order, user, True)
                if user is not None:
                    self._tell_sender_to_forget(delivery.origin, user, order.data)
                continue
            if isinstance(order, Deliver):
                self._heard(order.conn, order.event, order.data)
            local.append(order)
        self._executor.execute(local, forwarded=False)

    def _tell_sender_to_forget(self, origin: str, user: UserId, data: Mapping[str, Any]) -> None:
        sender, call_id = data.get("from"), data.get("callId")
        if isinstance(sender, str) and isinstance(call_id, str) and origin != self.node_id:
            self._send(origin, Forget(sender, call_id), None)

    def _entry_rejected(
        self,
        entry_id: str,
        reason: str,
        count: int = 1,
        source: str = "inbox",
        *,
        messages: int | None = None,
    ) -> None:
        """Refused what any Redis client can write (inbox entries, timer-set members): audited
        once per source and reason per REFUSAL_WINDOW, with how many (a client without the
        key can write garbage as fast as Redis takes it), and with how many messages for
        devices they held (`messages`, for stale batches)."""
        total = self._unsigned_refusals.admit(source, reason, count, messages or 0)
        if total is not None:
            refused, lost = total
            self.rejected(entry_id, reason, refused, messages=None if messages is None else lost)

    def _retyped(self, names: Sequence[str]) -> None:
        """Keys of another type than nodes write, found and removed (read as absent or
        empty, as if deleted; only a Redis client without the key makes one): audited
        `malformed`. A record under its name, like a record that does not verify; the rest
        summed per kind, once a minute (any client can write them as fast as Redis takes it):
        `timers` (the set or the deadlines), `presence`, `inbox`, `nodes` (liveness keys),
        `revocations`."""
        for name in names:
            if name.startswith((USER_PREFIX, "c:")):
                self._executor.audit(
                    "cluster.rejected", {"node": self.node_id, "entry": name, "reason": "malformed"}
                )
                log.warning("cluster record refused", record=name, reason="malformed")
                continue
            kind, _, _ = name.partition(":")
            source = _RETYPED_SOURCES.get(kind, kind)
            self._entry_rejected(source, "malformed", source=source)

    def rejected(
        self, entry_id: str, reason: str, count: int = 1, *, messages: int | None = None
    ) -> None:
        log.warning(
            "cluster delivery refused", entry=entry_id, reason=reason, dropped_messages=messages
        )
        fields: dict[str, Any] = {"node": self.node_id, "entry": entry_id, "reason": reason}
        if count > 1:  # links refused from one address, audited once a window (links.py)
            fields["count"] = count
        if messages is not None:  # a stale batch: the messages for devices it held, dropped
            fields["dropped_messages"] = messages
        self._executor.audit("cluster.rejected", fields)

    # -- timers ------------------------------------------------------------------------------

    def _timers_committed(self, started: list[tuple[Timer, float]], done: list[Timer]) -> None:
        """A commit armed `started` (with their unix deadlines) and disarmed `done`: the timer
        loop claims when the ones this node armed and has not seen disarmed are due. Deadlines
        are rounded up to TIMER_GRAIN, so timers due together cost one claim."""
        armed = self._timers_armed
        for timer in done:
            armed.pop(timer.member, None)
        for timer, deadline in started:
            due = math.ceil(deadline / TIMER_GRAIN) * TIMER_GRAIN
            armed[timer.member] = due
            heapq.heappush(self._timer_deadlines, (due, timer.member))
        wait = self._timer_wait
        if wait is not None:  # sleeping: until the new next claim, earlier or later
            wait.deadline = trio.current_time() + self._next_claim() - time.time()

    def _next_claim(self) -> float:
        """When the timer loop claims next (unix time): at once after a full claim, else when
        the earliest timer this node armed, still armed, is due, or at the next sweep."""
        if self._claim_again:
            return time.time()
        deadlines, armed = self._timer_deadlines, self._timers_armed
        while deadlines and armed.get(deadlines[0][1]) != deadlines[0][0]:
            heapq.heappop(deadlines)  # disarmed, or armed again for another time
        return min(deadlines[0][0] if deadlines else math.inf, self._next_sweep)

    async def _timer_loop(self) -> None:
        """Claims the due timers of the whole cluster (each fires once, wherever claimed): when
        a timer this node armed is due, so its own fire on time without polling Redis, and
        every TIMER_SWEEP seconds, so a dead or stopped node's fire on another node, and so do
        timers whose claim lapsed or that were due while Redis was away."""
        hold = max(2.0, self._settings.node_timeout)
        deadlines, armed = self._timer_deadlines, self._timers_armed
        self._next_sweep = time.time() + TIMER_SWEEP
        while True:
            wake = self._next_claim()
            with trio.CancelScope(
                deadline=trio.current_time() + wake - time.time()
            ) as self._timer_wait:
                await trio.sleep_forever()
            self._timer_wait = None
            now = time.time()
            while deadlines and deadlines[0][0] <= now:
                _, member = heapq.heappop(deadlines)
                if armed.get(member, math.inf) <= now:
                    del armed[member]  # due: this claim takes it
            # A claim takes every due timer, whoever armed it.
            self._next_sweep, self._claim_again = now + TIMER_SWEEP, False
            if not self._store_ok:
                continue
            try:
                claimed, malformed = await self.store.claim_timers(now, now + hold, TIMER_CLAIM)
            except STORE_ERRORS as exc:
                self._store_failed(exc)
                continue
            if malformed:  # written by a Redis client without the key: dropped, and said
                self._entry_rejected("timers", "malformed", malformed, source="timers")
            due = await self._due_only(claimed, now)
            # At most TIMERS_IN_FLIGHT firings queued at once: a flood of timers (thousands
            # due together, or members a Redis client without the key added) leaves the lanes
            # room for this node's clients; the rest wait for the next sweep.
            room = max(0, TIMERS_IN_FLIGHT - self._timers_in_flight)
            refused = due[room:]
            for timer in due[:room]:
                if self._enqueue(Job([timer.user], [TimerFired(timer.timer)], fired=timer)):
                    self._timers_in_flight += 1
                else:
                    refused.append(timer)
            if refused:  # the lanes are full: due again at the next sweep, not at once
                with contextlib.suppress(*STORE_ERRORS):  # (else when the claim lapses)
                    await self.store.release_timers(refused, now)
            else:
                self._claim_again = len(claimed) + malformed == TIMER_CLAIM
            if self.store.timers_missing:
                with contextlib.suppress(*STORE_ERRORS):  # (else at the next claim)
                    if await self._rearm_timers(now):
                        self._claim_again = True  # (some are due: claimed at once)
            if self.store.timer_drawn is not None:
                with contextlib.suppress(*STORE_ERRORS):  # (another is drawn next claim)
                    if await self._pull_back_late(*self.store.timer_drawn, now + hold):
                        self._claim_again = True

    async def _pull_back_late(
        self, member: str, score: float, sealed: bytes, held_until: float
    ) -> bool:
        """A timer drawn at random by a claim: its unsigned score raised past both its signed
        deadline and any claim's hold (a Redis client without the key, to keep a call ringing
        for good) is put back at its deadline, and audited (`timers` `late`). Whether it was.
        A genuine score is its deadline, or a claim's time plus its hold: TIMER_LATE_SLACK
        leaves room for nodes' clocks that differ."""
        deadline = self.codec.open_timer_due(sealed, member)
        if deadline is None or score <= max(deadline, held_until) + TIMER_LATE_SLACK:
            return False
        await self.store.reschedule_timers({member: deadline})
        self._entry_rejected("timers", "late", source="timers")
        return deadline <= time.time() + TIMER_GRAIN

    async def _rearm_timers(self, now: float) -> bool:
        """Signed deadlines whose member is gone from the timer set: the set was deleted, or
        replaced by a key of another type (removed by a claim or a commit), by a Redis client
        without the key, and with it every ring timeout and reconnect grace it held, so calls
        rang, and held devices waited, for good. Each deadline that verifies puts its member
        back at that deadline (audited `timers` `missing`, summed); one that does not is
        removed (`malformed`). Whether any of those put back is due already."""
        found = await self.store.missing_timers(TIMER_CLAIM * 4)
        due: dict[str, tuple[float, bytes]] = {}
        spoiled: dict[str, bytes] = {}
        for member, sealed in found.items():
            deadline = self.codec.open_timer_due(sealed, member)
            if deadline is None or Timer.parse(member) is None:
                spoiled[member] = sealed
            else:
                due[member] = (deadline, sealed)
        if not found:
            return False
        await self.store.rearm_timers(due, spoiled)
        if due:
            self._entry_rejected("timers", "missing", len(due), source="timers")
        if spoiled:
            self._entry_rejected("timers", "malformed", len(spoiled), source="timers")
        return any(deadline <= now + TIMER_GRAIN for deadline, _ in due.values())

    async def _due_only(self, claimed: list[tuple[Timer, bytes | None]], now: float) -> list[Timer]:
        """Of the claimed timers, those whose signed deadline has come. The set's scores are
        unsigned: one claimed early had its score lowered (due again at its deadline, and
        audited). One with no genuine deadline was armed by a release before signed deadlines
        (a rolling upgrade), or added by a Redis client without the key: it is given one now,
        as late as any timer can be (the longest of `ring_timeout` and `reconnect_grace` from
        now), which is never before its own deadline, since it was armed before it was seen."""
        due, early, adopted = [], {}, {}
        for timer, sealed in claimed:
            deadline = self.codec.open_timer_due(sealed, timer.member)
            if deadline is None:
                adopted[timer.member] = now + self._longest_timer
            elif deadline > now + TIMER_GRAIN:
                early[timer.member] = deadline
            else:
                due.append(timer)
        with contextlib.suppress(*STORE_ERRORS):  # (else when the claim lapses)
            if adopted:  # (audited, summed: an earlier release's, or a forgery)
                signed = {m: self.codec.seal_timer_due(m, d) for m, d in adopted.items()}
                await self.store.adopt_timers(adopted, signed)
                self._entry_rejected("timers", "unsigned", len(adopted), source="timers")
            if early:
                await self.store.reschedule_timers(early)
                self._entry_rejected("timers", "early", len(early), source="timers")
        return due

    @property
    def _longest_timer(self) -> float:
        return max(self._rules.ring_timeout, self._rules.reconnect_grace)

    # -- liveness ----------------------------------------------------------------------------

    async def _keep_loop(self) -> None:
        interval = self._settings.heartbeat_interval
        while True:
            try:
                await self._keep()
            except STORE_ERRORS as exc:
                self._store_failed(exc)
                self.is_leader = False
            except Exception:
                # A bug, or a value in Redis nothing foresaw: this beat is lost, never the
                # node with every connection it holds.
                log.exception("cluster heartbeat failed")
                self.is_leader = False
            await trio.sleep(interval)

    async def _keep(self) -> None:
        async with self._keeping:
            node = self.node_id
            await self._keep_once()
            if self.node_id != node:  # evicted: the new id beats at once (sign-ins wait for it)
                await self._keep_once()

    async def _keep_once(self) -> None:
        settings, codec = self._settings, self.codec
        timeout_ms = int(settings.node_timeout * 1000)
        self._beat += 1
        # The id this beat is for: a link that wakes after a freeze may evict this node while
        # the beat waits for Redis (`still_member`), and what the beat brings back is then
        # about the old id, never the new one (`_keep` beats again under the new id).
        node = self.node_id
        watched = []
        if self.is_leader:
            # In random order, not by name, and without this node: the room for members never
            # seen running goes to names a client without the key picked to sort first no
            # more than to any others, so a new leader (which has seen no node yet) finds the
            # nodes that ran among them, and so does any leader a node that joined meanwhile.
            members = [member for member in await self.store.members() if member != node]
            random.shuffle(members)
            watched = sorted(self.watch.to_check(members, MAX_UNKNOWN_WATCHED) - {node})
        self._forget_silent(time.time())  # (before the beat, whose marks it bounds)
        read_up_to = self._inbox_position
        if self.node_id != node:
            return
        epoch, lease, beats, dead = await self.store.keep(
            node,
            codec.seal_heartbeat(
                node,
                self._beat,
                read_up_to.decode(),
                self.links.address,
                self._last_seq,
                at=int(time.time() * 1000),
            ),
            timeout_ms,
            watched,
            codec.seal_epoch(secrets.token_hex(8)),  # set only if absent
        )
        if not self._store_ok:
            log.info("cluster store reachable", node=self.node_id)
            self._connected_since = time.monotonic()
        self._store_ok = True
        self._kept_at = time.monotonic()
        self.joined.set()
        if self.node_id != node:
            return  # evicted meanwhile: this beat's answers are the old id's
        if codec.is_dead(dead, node):
            self._evict()
            return
        self._registered.set()
        if self._epoch is not None and epoch != self._epoch:
            # A new epoch value, or one that does not verify: Redis may have lost its data.
            # Decided on signed records, not on that value: are this node's devices still there?
            self._epoch = epoch
            if await self._records_lost():
                log.warning("cluster store was reset (Redis restarted without its data)")
                await self._recover()
            else:
                log.warning("cluster epoch changed but the shared records are intact: ignored")
        self._epoch = epoch
        # Refusals kept quiet in a window that has ended: their count, audited now.
        for source, reason, count, lost in self._unsigned_refusals.overdue():
            dated = reason in (STALE, FUTURE)  # refused for their time: what they held is said
            self.rejected(source, reason, count, messages=lost if dated else None)
        self.links.audit_overdue()
        await self._check_revocations()
        seen: dict[str, int | None] = {}
        for node, value in zip(watched, beats, strict=True):
            heartbeat = codec.heartbeat(value, node)
            seen[node] = None if heartbeat is None else heartbeat.beat
            if heartbeat is not None and self.watch.is_newer(node, heartbeat.beat):
                self._read_up_to[node], self._done_of[node] = heartbeat.read, heartbeat.done
        self.watch.observe(seen)
        now = time.time()
        holder = codec.open_lease(lease, now)
        if holder is None or holder == self.node_id:
            renewed = codec.seal_lease(self.node_id, now + settings.node_timeout)
            self.is_leader = await self.store.take_lease(lease, renewed, timeout_ms)
        else:
            self.is_leader = False
        if self.is_leader and self.judging and self.watch.dead():
            self._judge_wanted.set()
        await self._sweep_buried()

    def _forget_silent(self, now: float) -> None:
        """Forget what is kept per node id for the nodes gone or silent for `forget_after`:
        each origin's number and recent paths (so the heartbeat's marks name only the nodes
        heard from lately), nodes declared dead, and link peers unused. Node ids are new with
        every process: without this, months of restarts would fill them."""
        for origin in forgettable(self._heard_at, now, self.max_batch_age):
            del self._heard_at[origin]
            self._last_seq.pop(origin, None)
            self._paths.pop(origin, None)
        horizon = now - forget_after(self.max_batch_age)
        for node in [node for node, when in self._gone.items() if when < horizon]:
            del self._gone[node]
        self.links.prune()

    @property
    def judging(self) -> bool:
        """This node leads and is past its grace after (re)connecting: it declares deaths."""
        return (
            self.is_leader
            and time.monotonic() - self._connected_since >= self._settings.node_timeout
        )

    async def _sweep_buried(self) -> None:
        """What landed in a buried node's inbox before every node heard of its death; and the
        burials this node remembers, forgotten once their verdict expires."""
        remembered = time.time() - DEAD_VERDICT_MS / 1000
        for node, when in list(self._burials.items()):
            if when >= remembered:
                break  # (in the order they were buried)
            del self._burials[node]
        horizon = time.monotonic() - BURIED_SWEEP
        for node, buried_at in list(self._buried.items()):
            if buried_at < horizon:
                del self._buried[node]
                self._handed_over.pop(node, None)  # (kept while its inbox is still emptied)
                self._done_of.pop(node, None)
            else:
                await self._take_over_inbox(node)

    async def _judge_loop(self) -> None:
        while True:
            await self._judge_wanted.wait()
            self._judge_wanted = trio.Event()
            try:
                await self._judge()
            except STORE_ERRORS as exc:
                self._store_failed(exc)  # the next heartbeat asks again
            except Exception:
                log.exception("burying a dead node failed")

    async def _judge(self) -> None:
        """Each dead member, judged on its own: what Redis holds under one node's name (any
        client may write it) never keeps the others from being judged. A Redis outage stops
        the pass (the next heartbeat asks again)."""
        for node in self.watch.dead():
            if not self.judging:
                return  # no longer the leader: the one that is buries it
            if node in self._buried:
                # Buried moments ago: a beat read before the burial saw it again, or a frozen
                # node that woke added its old id back with the beat that told it it is dead.
                # Its keys go again, quietly (it is no one's doing), and it is not buried twice.
                await self.store.forget_node(
                    node, self.codec.seal_dead(node, buried=True), DEAD_VERDICT_MS
                )
                self.watch.forget(node)
                continue
            try:
                await self._judge_one(node)
            except (WrongType, WrongTypeError):
                # A key under its name of another type than any node writes, where none was
                # foreseen: that node waits for the next pass, the others are judged now.
                log.warning("a dead node's keys were tampered with", node=node)
                self._entry_rejected("nodes", "malformed", source="nodes")
                continue
            except STORE_ERRORS:
                raise
            except Exception:
                log.exception("judging a dead node failed", node=node)
                continue
            self.watch.forget(node)
            self._read_up_to.pop(node, None)

    async def _judge_one(self, node: str) -> None:
        """Bury a dead member that ran and was not buried yet; drop any other unread."""
        (raw_last, raw_dead), wrong = await self.store.strings([f"last:{node}", f"dead:{node}"])
        if wrong:  # read as absent: no evidence, no verdict (the burial's verdict replaces it)
            self._entry_rejected("nodes", "malformed", len(wrong), source="nodes")
        if node in self._burials or self.codec.is_buried(raw_dead, node):
            # Buried already: a recorded `last:` put back with the name added to `nodes`
            # again, or a frozen node's old id that added itself again on waking. Buried
            # twice it would be declared dead, announced to every node and audited again.
            await self.store.drop_member(node)
            self._entry_rejected("nodes", REPLAYED, source="nodes")
            return
        last = self.codec.heartbeat(raw_last, node)
        expired = last is not None and last.older_than(DEAD_VERDICT_MS, int(time.time() * 1000))
        if expired:  # kept past its expiry: put back (its verdict may have expired, or gone)
            last = None
        if last is None and not self.watch.saw(node):
            # No genuine beat of it, ever: no node ran under that name (a Redis client
            # without the key added it). Dropped unread: its presence set, however large,
            # costs no decision.
            await self.store.drop_member(node)
            if expired:
                self._entry_rejected("nodes", REPLAYED, source="nodes")
            elif f"last:{node}" not in wrong:  # (audited above)
                self._entry_rejected("nodes", "unsigned", source="nodes")
            return
        log.warning("node stopped heartbeating; its devices are disconnected", node=node)
        await self._bury(node, last)

    async def _bury(self, node: str, last: Heartbeat | None) -> None:
        """A dead node: its verdict, its devices disconnected, its inbox to their buffers.
        `last`: its last heartbeat as kept in Redis (`last:<node>`), if genuine."""
        await self.store.declare_dead(node, self.codec.seal_dead(node), DEAD_VERDICT_MS)
        # How far it got: from its beats this node read as leader, and from its last beat as
        # kept in Redis (the newer of the two for each origin: another leader may have read
        # its later beats, or it led itself).
        if last is not None:
            marks = self._done_of.setdefault(node, {})
            for origin, seq in last.done.items():
                marks[origin] = max(marks.get(origin, 0), seq)
        disconnected: list[Event] = []

        def disconnect(sliced: Slice) -> list[Event]:
            events = _disconnects(sliced, lambda of: of == node)
            disconnected.extend(events)
            return events

        # The users' disconnects go BURIAL_IN_FLIGHT at a time, spread over the lanes: a node
        # of many users is buried as fast as the lanes decide, not one decision at a time,
        # and the lanes keep room for this node's own clients meanwhile. Its presence set is
        # unsigned: it is read a page at a time with the users' records, and only a user whose
        # signed record names an online device of that node costs a decision.
        decided: list[trio.Event] = []
        cursor = 0
        while True:
            try:
                cursor, records = await self.store.presence_page(node, cursor)
            except WrongType:  # not a set: removed, read as empty (its users stay online)
                self._entry_rejected("presence", "malformed", source="presence")
                cursor, records = 0, {}
            for user, raw in records.items():
                if not self._online_on(user, raw, node):
                    continue
                job = Job([user], disconnect, durable=True)
                job.done = trio.Event()
                decided.append(job.done)
                await self._lanes[self._lane_of(job)][0].send(job)  # (full: wait for room)
                if len(decided) == BURIAL_IN_FLIGHT:
                    for finished in decided:
                        await finished.wait()
                    decided = []
            if not cursor:
                break
        for finished in decided:
            await finished.wait()
        devices = len({event.conn for event in disconnected if isinstance(event, Disconnected)})
        self._node_gone(node)
        # Every node this leader knows of and saw running: the members of `nodes`, and those
        # it watches (a `nodes` of another type reads as empty, and the others must still be
        # told). Only nodes seen running: `nodes` is unsigned, and a node never seen is either
        # one no node ran under, or one that joined within the last beat, which learns of the
        # death when it first sends there (`link_address` reads the verdict).
        for other in sorted(set(await self.store.members()) | set(self.watch.missed)):
            if other not in (node, self.node_id) and self.watch.saw(other):
                self._send(other, NodeGone(node), None)
        await self._take_over_inbox(node)
        self._buried[node] = time.monotonic()
        self._burials[node] = time.time()
        await self.store.forget_node(node, self.codec.seal_dead(node, buried=True), DEAD_VERDICT_MS)
        self._executor.audit("cluster.node_down", {"node": node, "devices": devices})

    def _online_on(self, user: UserId, raw: bytes | None, node: str) -> bool:
        """Whether `user`'s record (as read, None: absent) names an online device of `node`:
        a user a presence set lists without one costs a burial nothing more. A record that
        does not verify could not be decided on either: audited, summed (the presence set
        that listed it is open to any Redis client)."""
        if raw is None:
            return False
        try:
            return node in self.records.online_nodes(user, raw)
        except BadRecord as bad:
            self._entry_rejected("presence", bad.reason, source="presence")
            return False

    def _node_gone(self, node: str) -> None:
        self._gone[node] = time.time()
        # (Its `_paths` stay until `_forget_silent`: a frozen node that wakes evicted copies
        # the link batches it saw no ack for to the inboxes, and those copies are expected,
        # not replays.)
        # What its link never acked, or was still to send, is decided again (its buffers).
        for order, user in self.links.forget(node):
            if isinstance(order, Deliver):
                self._undelivered(order, user, True, dead=True)
        for key, route in list(self._routes.items()):
            if any(node_of(conn) == node for conn in route.peer_conns):
                del self._routes[key]

    async def _take_over_inbox(self, node: str) -> None:
        """What `node` had not read of its inbox (per its last genuine heartbeat; what it read
        after that beat is handed over again: at least once) goes to its devices' buffers."""
        if node == self.node_id:  # this node, leaving: what it has not read
            read, done = _stream_id(self._inbox_position), self._last_seq  # (as it grows)
        else:
            read = _stream_id(self._read_up_to.get(node, "0-0").encode())
            done = self._done_of.get(node, {})
        handed = self._handed_over.setdefault(node, set())
        try:
            entries = await self.store.take_inbox(node)
        except WrongType:  # not a stream: removed, read as empty
            self._entry_rejected("inbox", "malformed", source="inbox")
            return
        for entry_id, fields in entries:
            if _stream_id(entry_id) > read:
                self._receive(entry_id.decode(), fields, to=node, handover=(done, handed))

    def _evict(self) -> None:
        """The cluster declared this node dead: close what it holds, and start as a new node."""
        log.warning("this node was declared dead by the cluster; closing its connections")
        self._routes.clear()
        self._devices.clear()
        self.links.reset()
        self._registered.set()  # (sign-ins waiting under the old id: refused)
        self._registered = trio.Event()
        self.node_id = new_node_id(self._settings.node_name)
        self._inbox_position = b"0-0"
        self.line.node_id, self.line.finished_up_to = self.node_id, b"0-0"
        self._evicted()

    async def _records_lost(self) -> bool:
        """Whether the shared records of this node's devices are gone: none of a random
        sample of them is there. A record that is there and does not verify is tampering,
        not loss: it is audited and left out of the sample (a client of Redis without the key
        cannot make a node end its calls by spoiling one record and the epoch)."""
        devices = list(self._devices.items())
        sample = _chance.sample(devices, min(len(devices), RECOVERY_SAMPLE))
        raw = await self.store.load(sorted({device.user for _, device in sample}))
        while sample:
            try:
                sliced = Slice(self.records, raw, self._rules, self._throttle, (0, 0, 0))
                break
            except BadRecord as bad:
                self.rejected(bad.name, bad.reason)
                raw.pop(bad.name, None)
                user = bad.name.removeprefix(USER_PREFIX)
                sample = [(conn, device) for conn, device in sample if device.user != user]
        else:
            return False  # nothing of this node's to recover, or no evidence either way
        present = {device.conn for device in sliced.board.devices()}
        return not any(conn in present for conn, _ in sample)

    async def _recover(self) -> None:
        """Redis lost its data: every call of this node's devices ends (its state is gone),
        and the devices sign in again, with their sessions, to the new store."""
        self._routes.clear()
        ends: list[Action] = []
        now = time.time()
        for conn, device in self._devices.items():
            for call_id, call in device.calls.items():
                peer = call.peer_of(device.user)
                lost = {"callId": call_id, "from": peer, "reason": STATE_LOST}
                ends.append(Deliver(conn, "call-end", lost))
                if conn == call.caller_conn:  # one terminal record: the caller's node writes it
                    ends.append(ended_record(call, now, reason=STATE_LOST, by=None))
            device.calls.clear()
        self._executor.execute(ends)
        for conn, device in list(self._devices.items()):
            again = Authenticated(
                conn, device.user, device.session_id, {}, None, device.token_id, device.issued_at
            )
            self._enqueue(Job([device.user], [again], again=True))

    def _store_failed(self, exc: Exception) -> None:
        if self._store_ok:
            log.warning("cluster store not reachable", error=str(exc))
        self._store_ok = False

    # -- revocations -------------------------------------------------------------------------

    def _publish_revocations(self, event: RevocationChanged) -> None:
        """This node's file was (re)loaded: the cluster's list from now on, under a version
        newer than any this node has seen."""
        generation = max(int(time.time() * 1000), self._revocation_version[0] + 1)
        version = (generation, self.node_id)
        sealed = self.codec.seal_revocations(event.token_ids, event.users_before, version)
        self._pending_revocations = sealed
        self._adopt(event, version, sealed)

    async def _check_revocations(self) -> None:
        """With each heartbeat: take the cluster's list if it is newer than this node's; write
        this node's back if Redis holds an older one (put back by a client without the key),
        or none that is genuine."""
        pending = self._pending_revocations
        if pending is not None:
            await self.store.put("revocations", pending)
            self._pending_revocations = None
        # Of another type (no node wrote it) it reads as absent and is removed: a WRONGTYPE
        # here would fail every beat of every node, so none would be available or lead.
        (raw,), wrong = await self.store.strings(["revocations"])
        if wrong:
            self._retyped(wrong)
        current = self.codec.open_revocations(raw)
        if current is not None and current.version > self._revocation_version:
            event = RevocationChanged(current.token_ids, current.users_before)
            self._adopt(event, current.version, raw)
        elif self._revocations_sealed is not None and (
            current is None or current.version < self._revocation_version
        ):
            self._pending_revocations = self._revocations_sealed  # written with the next beat

    def _adopt(
        self, event: RevocationChanged, version: RevocationVersion, sealed: bytes | None
    ) -> None:
        self._revocation_version, self._revocations_sealed = version, sealed
        if (event.token_ids, dict(event.users_before)) == self._revocation_content:
            return  # the same list again (a node started with the same file): nothing to do
        self._revocation_content = (event.token_ids, dict(event.users_before))
        self._adopt_revocations(event)
        for user in sorted({device.user for device in self._devices.values()}):
            self._enqueue(Job([user], [event]))

    # -- the tasks ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run_tasks()
        finally:
            self.line.stop()

    async def _run_tasks(self) -> None:
        settings = self._settings
        async with self.store, trio.open_nursery() as nursery:
            # Listening before the first heartbeat, which says where.
            await nursery.start(
                self.links.run, settings.link_host, settings.link_port, settings.link_advertise
            )
            self._waiting_room = nursery
            for _, receive in self._lanes:
                nursery.start_soon(self._lane, receive)
            nursery.start_soon(self._keep_loop)
            nursery.start_soon(self._judge_loop)
            nursery.start_soon(self._inbox_loop)
            self.line.start(self._inbox_received, lambda key: self._retyped([key]))
            nursery.start_soon(self._timer_loop)


_ENDS_CALL = frozenset({"call-end", "call-reject"})
# Under which `entry` a key of another type is audited, by the start of its name.
_RETYPED_SOURCES = {
    "timer-due": "timers",
    "n": "presence",
    "in": "inbox",
    "hb": "nodes",
    "last": "nodes",
    "dead": "nodes",
    "nodes": "nodes",
    "epoch": "nodes",
}
_RELAYED = (IceCandidate, CallRenegotiate)  # what a connected call's cached route carries


def _disconnects(sliced: Slice, dead: Callable[[str], bool]) -> list[Event]:
    """What a burial decides on a slice: each online device of a node that `dead` names (by
    its id) is disconnected (held for `reconnect_grace`, or its calls end)."""
    return [Disconnected(conn) for conn in sliced.board.online_connections() if dead(node_of(conn))]


def _unavailable(received: MessageReceived) -> tuple[ErrorCode, str, Any, int]:
    """The `error` for a message the cluster cannot decide now: retry in a second."""
    return ErrorCode.RATE_LIMITED, "cluster unavailable; try again", received.ref, 1


def _fields(record: Audit) -> tuple[str, Mapping[str, Any]]:
    return record.event, record.fields


def _stream_id(value: bytes) -> tuple[int, int]:
    try:
        milliseconds, _, sequence = value.partition(b"-")
        return int(milliseconds), int(sequence or 0)
    except ValueError:
        return (0, 0)
