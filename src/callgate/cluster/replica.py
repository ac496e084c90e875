"""One node's replica of the cluster's switchboard: verified entries in, the core's actions out.

Pure, like the core: the link (link.py) reads entries from Redis and carries out the actions;
this class decides which entries are genuine, in order, and what they do. Every node holds an
identical replica because every node applies the same entries in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from callgate.cluster.entries import BadEntry, Entry, EntryCodec, NodeDown, node_of
from callgate.core.actions import Action, Audit, CancelTimer, StartTimer
from callgate.core.events import Disconnected, RevocationChanged, TimerFired, TimerId
from callgate.core.policy import Throttled
from callgate.core.switchboard import Switchboard
from callgate.protocol.messages import UserId


class RecordedThrottle:
    """The core's `CallThrottle` on a replica: the decision the ingress node already took.

    Rate limits are counted once, in Redis, by the node the caller is connected to; the decision
    travels in the entry so that every replica takes the same branch without counting again.
    """

    def __init__(self) -> None:
        self.decision: Throttled | None = None

    def admit_call(self, caller: UserId, callee: UserId) -> Throttled | None:
        return self.decision


class Replica:
    def __init__(self, board: Switchboard, throttle: RecordedThrottle, codec: EntryCodec) -> None:
        self.board = board
        self._throttle = throttle
        self._codec = codec
        # The highest entry number applied per origin node: a copied entry is refused.
        self._last_seq: dict[str, int] = {}
        # Armed timers and their deadlines (unix time): a node restored from a snapshot arms
        # them, and a new leader knows which are due.
        self.timers: dict[TimerId, float] = {}
        # The cluster's revocation list, as the last `RevocationChanged` entry set it.
        self.revocations = RevocationChanged()

    def receive(self, fields: Mapping[bytes, bytes]) -> Entry:
        """Verify one stream entry. Raises: BadEntry("malformed" | "bad_mac" | "replayed")."""
        entry = self._codec.open(fields)
        if entry.seq <= self._last_seq.get(entry.origin, 0):
            raise BadEntry("replayed")
        self._last_seq[entry.origin] = entry.seq
        return entry

    def apply(self, entry: Entry) -> list[Action]:
        self._throttle.decision = entry.throttled
        event = entry.event
        try:
            if isinstance(event, NodeDown):
                actions = self._node_down(event.node, entry.now)
            else:
                actions = self.board.handle(event, entry.now)
        except ValueError:
            # An event of a connection the cluster has already let go (its node was declared
            # dead while the node still ran): that node closes it; nothing else to do.
            return []
        finally:
            self._throttle.decision = None
        if isinstance(event, TimerFired):
            self.timers.pop(event.timer, None)
        elif isinstance(event, RevocationChanged):
            self.revocations = event
        for action in actions:
            if isinstance(action, StartTimer):
                self.timers[action.timer] = action.deadline
            elif isinstance(action, CancelTimer):
                self.timers.pop(action.timer, None)
        return actions

    def export_state(self) -> dict[str, Any]:
        """The replica as plain data: what a snapshot holds."""
        return {
            "board": self.board.export_state(),
            "last_seq": dict(self._last_seq),
            "timers": [[timer, deadline] for timer, deadline in self.timers.items()],
            "revoked_tokens": sorted(self.revocations.token_ids),
            "revoked_users": dict(self.revocations.users_before),
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Become the replica `state` describes. Raises: KeyError, TypeError, ValueError."""
        self.board.restore_state(state["board"])
        self._last_seq = {str(node): int(seq) for node, seq in state["last_seq"].items()}
        self.timers = {int(timer): float(deadline) for timer, deadline in state["timers"]}
        self.revocations = RevocationChanged(
            frozenset(state["revoked_tokens"]), dict(state["revoked_users"])
        )

    def _node_down(self, node: str, now: float) -> list[Action]:
        conns = [conn for conn in self.board.online_connections() if node_of(conn) == node]
        actions: list[Action] = [Audit("cluster.node_down", {"node": node, "devices": len(conns)})]
        for conn in conns:
            actions += self.board.handle(Disconnected(conn), now)
        return actions

    def nodes_with_devices(self) -> set[str]:
        """The nodes the replica believes have online devices (the leader checks they live)."""
        return {node_of(conn) for conn in self.board.online_connections()}
