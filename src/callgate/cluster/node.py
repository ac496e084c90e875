"""A server as one node of a cluster: how its events reach the core, and the core's actions it.

The transport's seam to the cluster (`ConnectionHub.attach_cluster`). A single server hands each
event straight to its switchboard (transport/executor.py's `LocalDispatch`); a node submits it to
the cluster's log (link.py) instead, and carries out what concerns its own connections when the
log applies an entry, here or on another node. Same interface, so the hub does not care which.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio
from limits.errors import StorageError

from callgate.cluster.entries import NODE_SEPARATOR, Entry
from callgate.core.actions import Action
from callgate.core.events import Event, MessageReceived, RevocationChanged
from callgate.errors import CloseCode, CloseConnection, ErrorCode
from callgate.protocol.messages import CallRequest
from callgate.transport.executor import trio_deadline

if TYPE_CHECKING:
    from callgate.cluster.link import ClusterLink
    from callgate.ratelimit import RateLimiter
    from callgate.transport.connection import Connection
    from callgate.transport.executor import Executor


class ClusterNode:
    """Events through the cluster's log; the log's entries into this node's executor."""

    inline = False  # every message waits for its submission, in the connection's task

    def __init__(
        self,
        link: ClusterLink,
        executor: Executor,
        limiter: RateLimiter,
        apply_timeout: float,
        adopt_revocations: Callable[[RevocationChanged], None],
        evicted: Callable[[], None],
    ) -> None:
        self.link = link
        self._executor = executor
        self._limiter = limiter
        self._apply_timeout = apply_timeout
        self._adopt_revocations = adopt_revocations
        self._evicted = evicted
        executor.unix_clock = True  # the cluster's core runs on the unix clock
        executor.timer_due = link.timer_due
        executor.timer_cancelled = link.timer_cancelled
        link.execute = self._execute_entry
        link.rejected = self._entry_rejected
        link.evicted = evicted
        link.restored = self._restored

    @property
    def available(self) -> bool:
        """The cluster log is reachable and caught up."""
        return self.link.available

    def new_conn_id(self, token: str) -> str:
        """Connection ids name their node, so every node knows where a device lives."""
        return self.link.node_id + NODE_SEPARATOR + token

    def dispatch(self, event: Event, *, forwarded: bool = False) -> None:
        self.link.submit(event)

    async def dispatch_and_wait(self, event: Event) -> None:
        """Submit, and wait (bounded) until the log has applied it here.

        Raises: CloseConnection 1013 when the cluster log does not apply it in time.
        """
        seq = self.link.submit(event)
        with trio.move_on_after(self._apply_timeout):
            await self.link.wait_applied(seq)
            return
        raise CloseConnection(CloseCode.TRY_AGAIN_LATER, "cluster unavailable")

    async def submit_message(self, connection: Connection, received: MessageReceived) -> None:
        """A client message: counted against the shared limits here, once, then submitted.

        Without Redis nothing can be decided for the cluster: the client is told to retry.
        """
        unavailable = (ErrorCode.RATE_LIMITED, "cluster unavailable; try again", received.ref, 1)
        if not self.link.available:
            connection.send_error(*unavailable)
            return
        message, user = received.message, connection.user
        throttled = None
        # Counted only for a request the core will not refuse outright (not from yourself).
        if isinstance(message, CallRequest) and message.from_user == user != message.to:
            try:
                throttled = await trio.to_thread.run_sync(
                    self._limiter.admit_call, user, message.to, abandon_on_cancel=True
                )
            except StorageError:
                connection.send_error(*unavailable)
                return
        self.link.submit(received, throttled=throttled)

    def shutting_down(self) -> None:
        """A node ends no call: its devices disconnect, so their calls are held for
        `reconnect_grace` and the clients resume them on another node."""

    async def flush(self) -> None:
        await self.link.flush()

    def live_counts(self) -> dict[str, int]:
        return {
            "available": int(self.link.available),
            "leader": int(self.link.is_leader),
            "pending_entries": self.link.pending,
        }

    # -- the log's callbacks -------------------------------------------------------------------

    def _execute_entry(self, entry: Entry, actions: list[Action], own: bool) -> None:
        """A cluster entry was applied: do what concerns this node's connections."""
        if isinstance(entry.event, RevocationChanged):
            self._adopt_revocations(entry.event)
        forwarded = own and isinstance(entry.event, MessageReceived)
        self._executor.execute(actions, forwarded=forwarded, own=own)

    def _entry_rejected(self, entry_id: str, reason: str) -> None:
        self._executor.audit(
            "cluster.rejected", {"node": self.link.node_id, "entry": entry_id, "reason": reason}
        )

    def _restored(self) -> None:
        """The replica was loaded from a snapshot: arm its timers, adopt its revocations."""
        replica = self.link.replica
        self._executor.timers.cancel_all()
        for timer, deadline in replica.timers.items():
            self._executor.timers.start(timer, trio_deadline(deadline))
        self._adopt_revocations(replica.revocations)
