"""What a Redis client without the cluster key can write, and what it must not achieve.

Each test plays an attacker who can read, write and delete any key of the cluster's Redis but
does not hold `[cluster] key`: nodes on a real Redis, real clients. (test_cluster.py has the
first of these: a lease taken, heartbeats deleted or forged, an epoch overwritten, forged and
replayed deliveries.)
"""

from __future__ import annotations

import redis

from conftest import ClusterHarness, call_request, make_settings
from test_cluster import _until, terminal_records


async def test_a_timer_member_no_node_wrote_is_dropped_and_crashes_nothing(
    cluster: ClusterHarness,
) -> None:
    """The shared timer set is unsigned: a member that is not `<digits>|<user>` (here a digit
    `int` refuses) is removed and audited, and the timers beside it still fire."""
    await cluster.start(make_settings(calls={"ring_timeout": 1.0}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    timers = f"{cluster.name}:timers"
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        attacker.zadd(timers, {"\u00b2|alice": 0, "12x|bob": 0, "7|": 0})
        await alice.send("call-request", call_request("ab", "alice", "bob"))
        await bob.expect("call-request", id="ab")
        await alice.expect("call-end", callId="ab", reason="timeout")
        await bob.expect("call-end", callId="ab", reason="timeout")
        assert attacker.zscore(timers, "\u00b2|alice") is None
    finally:
        attacker.close()
    assert [row["event"] for row in terminal_records(cluster)] == ["call.timeout"]
    refused = [row for row in cluster.audit.records() if row["event"] == "cluster.rejected"]
    await _until(lambda: any(row.get("entry") == "timers" for row in refused))
    assert sum(row.get("count", 1) for row in refused if row["entry"] == "timers") == 3
    for node in cluster.nodes:  # every node still runs
        assert node.hub.cluster is not None and node.hub.cluster.available
