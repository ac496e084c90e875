"""The executor: carries out the switchboard's actions on this server's connections.

The core decides (events in, actions out, core/switchboard.py); this is the one place its
decisions meet sockets, timers and the audit trail. `LocalDispatch` is how a single server feeds
the core; a cluster node feeds it through the cluster instead (cluster/node.py), and both hand
the actions here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import trio

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
from callgate.core.events import Event, ShuttingDown, TimerFired, TimerId
from callgate.errors import CloseCode, ErrorCode
from callgate.log import get_logger
from callgate.metrics import Metrics
from callgate.protocol.codec import UnencodableMessage
from callgate.transport.timers import Deadlines, Timers

if TYPE_CHECKING:
    from callgate.audit import AuditLog
    from callgate.core.switchboard import Switchboard
    from callgate.transport.connection import Connection

log = get_logger("callgate.connection")


def trio_deadline(unix_time: float) -> float:
    """The trio-clock moment of a unix time (such as a token's `exp`)."""
    remaining = unix_time - time.time()
    return trio.current_time() + max(0.0, remaining) if math.isfinite(remaining) else math.inf


class Executor:
    """Deliveries, acks, errors, closes, audit records and timers, as the core asks."""

    def __init__(
        self,
        live: Mapping[str, Connection],
        deadlines: Deadlines,
        audit_log: AuditLog,
        metrics: Metrics,
    ) -> None:
        self._live = live  # the hub's signed-in connections, by id
        self._audit_log = audit_log
        self.metrics = metrics
        self.timers = Timers(deadlines, self._timer_due)
        # Where a due core timer goes: set by the dispatch in use (`LocalDispatch`, cluster).
        self.timer_due: Callable[[TimerId], None] = lambda timer: None
        # A cluster's core runs on the unix clock; a single server's on trio's.
        self.unix_clock = False
        # Told when a core timer is cancelled (a cluster node tells the cluster).
        self.timer_cancelled: Callable[[TimerId], None] = lambda timer: None

    def _timer_due(self, timer: TimerId) -> None:
        self.timer_due(timer)

    def audit(self, event: str, fields: Mapping[str, Any]) -> None:
        """Every audit record goes through here: the trail, and the metrics derived from it."""
        self._audit_log.write(event, fields)
        self.metrics.observe_audit(event, fields)

    def execute(self, actions: list[Action], *, forwarded: bool = False) -> None:
        """Carry out the core's actions; `forwarded` counts deliveries a client message caused.

        In cluster mode a node executes only its own connections' actions and the audit
        records of what it decided (cluster/node.py sends the rest to the nodes that hold them).
        """
        for action in actions:
            match action:
                case Deliver(conn=conn, event=event, data=data):
                    if (connection := self._live.get(conn)) is not None:
                        try:
                            connection.send_event(event, data)
                        except UnencodableMessage as err:
                            self._unencodable(conn, event, err)
                    if forwarded:
                        self.metrics.count_forwarded(event)
                case Ack(conn=conn, ref=ref):
                    if (connection := self._live.get(conn)) is not None:
                        connection.send_ack(ref)
                case SendError(conn=conn, code=code, message=message, ref=ref, retry_after=retry):
                    if (connection := self._live.get(conn)) is not None:
                        connection.send_error(code, message, ref, retry)
                    if code is ErrorCode.RATE_LIMITED:
                        self._count_strike(conn)
                case Audit(event=event, fields=fields):
                    self.audit(event, fields)
                case Close(conn=conn, code=code, reason=reason):
                    if (connection := self._live.get(conn)) is not None:
                        connection.close(code, reason)
                case StartTimer(timer=timer, deadline=deadline):
                    self.timers.start(
                        timer, trio_deadline(deadline) if self.unix_clock else deadline
                    )
                case CancelTimer(timer=timer):
                    self.timers.cancel(timer)
                    self.timer_cancelled(timer)

    def _unencodable(self, conn_id: str, event: str, err: UnencodableMessage) -> None:
        """One message that cannot be written is dropped alone: the connection, its calls and
        the rest of these actions go on. Decoding keeps clients from causing this (nesting and
        number limits), so it is a server fault: logged without the message, and counted."""
        log.error("message not encodable, dropped", conn=conn_id, event_name=event, error=str(err))
        self.metrics.unencodable.labels(event).inc()

    def _count_strike(self, conn_id: str) -> None:
        connection = self._live.get(conn_id)
        if connection is not None and connection.limits.is_flooding():
            connection.close(CloseCode.RATE_LIMIT_ABUSE, "rate limit exceeded")


class Dispatch(Protocol):
    """Where the hub's events go: `LocalDispatch` here, or a cluster (cluster/node.py)."""

    @property
    def available(self) -> bool: ...

    def dispatch(self, event: Event, *, forwarded: bool = False) -> None: ...

    async def dispatch_and_wait(self, event: Event) -> None:
        """Raises: CloseConnection 1013 when it cannot be applied in time."""
        ...

    def shutting_down(self) -> None: ...

    async def flush(self) -> None: ...


class LocalDispatch:
    """A single server's events go straight into its switchboard, on trio's clock."""

    available = True

    def __init__(self, board: Switchboard, executor: Executor) -> None:
        self._board = board
        self._executor = executor
        executor.timer_due = lambda timer: self.dispatch(TimerFired(timer))

    def dispatch(self, event: Event, *, forwarded: bool = False) -> None:
        self._executor.execute(self._board.handle(event, trio.current_time()), forwarded=forwarded)

    async def dispatch_and_wait(self, event: Event) -> None:
        self.dispatch(event)

    def shutting_down(self) -> None:
        """Every call ends: nobody is left to resume it."""
        self.dispatch(ShuttingDown())

    async def flush(self) -> None:
        """Nothing is pending anywhere else."""
