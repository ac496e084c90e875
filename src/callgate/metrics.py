"""Prometheus metrics, one registry per server (so tests can run many servers in one process).

Counters are fed from the audit records the server writes, so the metrics and the audit trail
never disagree; gauges (connections and calls by state) are read from the live server at scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from callgate.audit import TERMINAL_CALL_EVENTS


class _LiveGauges(Collector):
    def __init__(self, read: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        live = self._read()
        connections = GaugeMetricFamily(
            "callgate_connections", "Open connections by state", labels=["state"]
        )
        for state, count in live["connections"].items():
            connections.add_metric([state], count)
        calls = GaugeMetricFamily("callgate_calls_active", "Live calls by state", labels=["state"])
        for state, count in live["calls"].items():
            calls.add_metric([state], count)
        yield connections
        yield calls
        cluster = live.get("cluster")
        if cluster is not None:  # cluster mode: is this node useful, leading, keeping up?
            for name, help_text in (
                ("available", "1 while the cluster log is reachable and caught up"),
                ("leader", "1 while this node holds the leader lease"),
                ("pending_entries", "This node's entries not yet written to the cluster log"),
            ):
                gauge = GaugeMetricFamily(f"callgate_cluster_{name}", help_text)
                gauge.add_metric([], cluster[name])
                yield gauge


class Metrics:
    def __init__(self, live: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "callgate_calls",
            "Calls that ended, by outcome and reason",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "callgate_auth_failures",
            "Refused authentications, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "callgate_rate_limited",
            "Requests refused by a rate limit or connection cap, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.forwarded = Counter(
            "callgate_messages_forwarded",
            "Messages delivered to clients because of a client message, by event",
            ["event"],
            registry=self.registry,
        )
        self.forward_latency = Histogram(
            "callgate_forward_latency_seconds",
            "From a client frame's arrival to its deliveries being queued",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
            registry=self.registry,
        )
        self.queue_drops = Counter(
            "callgate_outbound_queue_drops",
            "Connections closed because their outbound queue was full (a client not reading)",
            registry=self.registry,
        )
        self.cluster_rejected = Counter(
            "callgate_cluster_rejected",
            "Cluster log entries this node refused (forged, replayed, malformed), by reason",
            ["reason"],
            registry=self.registry,
        )
        self.cluster_nodes_down = Counter(
            "callgate_cluster_nodes_down",
            "Nodes this node, as leader, declared dead",
            registry=self.registry,
        )
        self.registry.register(_LiveGauges(live))
        self._forwarded_by_event: dict[str, Any] = {}

    def count_forwarded(self, event: str) -> None:
        """Per delivered message: the labelled child is looked up once per event name."""
        child = self._forwarded_by_event.get(event)
        if child is None:
            child = self._forwarded_by_event[event] = self.forwarded.labels(event)
        child.inc()

    def observe_audit(self, event: str, fields: Mapping[str, Any]) -> None:
        if event in TERMINAL_CALL_EVENTS:
            outcome = event.removeprefix("call.")
            self.calls.labels(outcome, str(fields.get("reason", outcome))).inc()
            if event == "call.rate_limited":
                self.rate_limited.labels(str(fields.get("reason", "call_request"))).inc()
        elif event == "auth.failed":
            self.auth_failures.labels(str(fields.get("reason", "invalid"))).inc()
        elif event == "conn.refused" and fields.get("code") == 4029:
            self.rate_limited.labels("handshakes").inc()
        elif event == "cluster.rejected":
            self.cluster_rejected.labels(str(fields.get("reason", "malformed"))).inc()
        elif event == "cluster.node_down":
            self.cluster_nodes_down.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
