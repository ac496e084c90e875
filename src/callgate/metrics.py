"""Prometheus metrics, one registry per server (so tests can run many servers in one process).

Counters are fed from the audit records the server writes, so the metrics and the audit trail
never disagree; gauges (connections and calls by state) are read from the live server at scrape.
The two per-message metrics (messages forwarded, forwarding latency) are plain integers and a
bucket list, turned into samples only at scrape: prometheus-client's lock per increment was
about a tenth of the forwarding path.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from callgate.audit import TERMINAL_CALL_EVENTS


class _LiveGauges(Collector):
    def __init__(self, read: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
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
                ("available", "1 while the cluster's Redis is reachable"),
                ("leader", "1 while this node holds the leader lease"),
                ("pending_orders", "Orders for other nodes not yet sent on a link or appended"),
                ("unacked_batches", "Batches sent on links to other nodes and not yet acked"),
                ("routes", "Connected calls of this node's devices with a cached route"),
            ):
                gauge = GaugeMetricFamily(f"callgate_cluster_{name}", help_text)
                gauge.add_metric([], cluster[name])
                yield gauge
            fallbacks = CounterMetricFamily(
                "callgate_cluster_link_fallbacks",
                "Links to other nodes that failed, their unacked batches copied to the inbox",
            )
            fallbacks.add_metric([], cluster["link_fallbacks"])
            yield fallbacks


LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class ForwardingStats(Collector):
    """Messages forwarded by event, and the forwarding latency histogram, without locks.

    Only the event loop's thread updates them; a scrape reads them from the same thread.
    """

    def __init__(self) -> None:
        self.forwarded: dict[str, int] = {}
        self._counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._sum = 0.0

    def count(self, event: str) -> None:
        self.forwarded[event] = self.forwarded.get(event, 0) + 1

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._sum += seconds

    def collect(self) -> Iterable[Metric]:
        forwarded = CounterMetricFamily(
            "callgate_messages_forwarded",
            "Messages delivered to clients because of a client message, by event",
            labels=["event"],
        )
        for event, count in sorted(self.forwarded.items()):
            forwarded.add_metric([event], count)
        yield forwarded
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self._counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        latency = HistogramMetricFamily(
            "callgate_forward_latency_seconds",
            "From a client frame's arrival to its deliveries being queued",
        )
        latency.add_metric([], buckets, sum_value=self._sum)
        yield latency


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
        self.forwarding = ForwardingStats()
        self.registry.register(self.forwarding)
        self.queue_drops = Counter(
            "callgate_outbound_queue_drops",
            "Connections closed because their outbound queue was full (a client not reading)",
            registry=self.registry,
        )
        self.unencodable = Counter(
            "callgate_unencodable_messages",
            "Messages to clients dropped because they could not be written as JSON, by event",
            ["event"],
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
        # Webhooks (webhooks.py): each attempt's result, deliveries, and what was dropped.
        self.webhook_attempts = Counter(
            "callgate_webhook_attempts",
            "Webhook attempts, by result: 2xx, 3xx, 4xx, 5xx, timeout or error",
            ["result"],
            registry=self.registry,
        )
        self.webhooks_delivered = Counter(
            "callgate_webhooks_delivered",
            "Webhooks a receiver accepted (2xx)",
            registry=self.registry,
        )
        self.webhook_drops = Counter(
            "callgate_webhook_drops",
            "Webhooks dropped: the queue was full (queue_full) or every attempt failed (gave_up)",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_LiveGauges(live))
        self.count_forwarded = self.forwarding.count
        self.observe_forward_latency = self.forwarding.observe

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
