"""What a Redis client without the cluster key can write, and what it must not achieve.

Each test plays an attacker who can read, write and delete any key of the cluster's Redis but
does not hold `[cluster] key`: nodes on a real Redis, real clients. (test_cluster.py has the
first of these: a lease taken, heartbeats deleted or forged, an epoch overwritten, forged and
replayed deliveries.)
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from callgate.cluster import links as links_module
from callgate.cluster import node as cluster_node
from callgate.cluster import store as store_module
from callgate.cluster.line import DeliveryLine
from callgate.cluster.node import ClusterNode
from callgate.cluster.records import Timer, Writes
from callgate.cluster.store import Store
from callgate.cluster.store import delete_cluster_keys as delete_cluster_keys_async
from callgate.config import CallSettings
from callgate.core.actions import Deliver
from callgate.revocation import RevocationList
from conftest import (
    REDIS_URL,
    Client,
    ClusterHarness,
    call_request,
    make_settings,
    server_config,
    signed_in,
    start_server_process,
    token_for,
)
from test_cluster import (
    _cluster_env,
    _until,
    append_to_inbox,
    beats,
    codec,
    connected_call,
    ice,
    marks,
    node_id,
    now_ms,
    online_nodes,
    sign_in,
    terminal_records,
)


def record_inbox(
    cluster: ClusterHarness, inbox: str, captured: list[dict[bytes, bytes]], stop: threading.Event
) -> None:
    """A Redis client without the key records every entry appended to `inbox` into `captured`
    (in a thread of its own, until `stop`), to append it again later."""

    def sniff() -> None:
        spy = redis.Redis.from_url(cluster.redis_url)
        position: Any = "0-0"
        while not stop.is_set():
            reply: Any = spy.xread({inbox: position}, block=100)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    captured.append(fields)
                    position = entry_id
        spy.close()

    threading.Thread(target=sniff, daemon=True).start()


async def test_a_timer_member_no_node_wrote_is_dropped_and_crashes_nothing(
    cluster: ClusterHarness,
) -> None:
    """The shared timer set is unsigned: a member that is not `<digits>|<user>` as a node
    writes it (a digit `int` refuses, leading zeros) is removed and audited, and the timers
    beside it still fire."""
    await cluster.start(make_settings(calls={"ring_timeout": 1.0}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    timers = f"{cluster.name}:timers"
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        attacker.zadd(timers, {"\u00b2|alice": 0, "12x|bob": 0, "7|": 0, "007|alice": 0})
        await alice.send("call-request", call_request("ab", "alice", "bob"))
        await bob.expect("call-request", id="ab")
        await alice.expect("call-end", callId="ab", reason="timeout")
        await bob.expect("call-end", callId="ab", reason="timeout")
        assert attacker.zscore(timers, "\u00b2|alice") is None
        assert attacker.zscore(timers, "007|alice") is None
    finally:
        attacker.close()
    assert [row["event"] for row in terminal_records(cluster)] == ["call.timeout"]
    refused = [row for row in cluster.audit.records() if row["event"] == "cluster.rejected"]
    await _until(lambda: any(row.get("entry") == "timers" for row in refused))
    malformed = [row for row in refused if (row["entry"], row["reason"]) == ("timers", "malformed")]
    assert sum(row.get("count", 1) for row in malformed) == 4
    for node in cluster.nodes:  # every node still runs
        assert node.hub.cluster is not None and node.hub.cluster.available


async def test_one_spoiled_record_and_a_forged_epoch_end_no_call(cluster: ClusterHarness) -> None:
    """A new epoch makes a node check whether Redis lost its records; a record that is there
    but does not verify is tampering (audited), not loss, so no call ends on one side only."""
    await cluster.start()
    await cluster.connect("zed", node=1)  # in no call: its record is the one spoiled
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob, "ab")
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        raw = attacker.get(f"{cluster.name}:u:zed")
        assert isinstance(raw, bytes)
        attacker.set(f"{cluster.name}:u:zed", raw[:-2] + b" }")  # its MAC no longer verifies
        attacker.set(f"{cluster.name}:epoch", "forged")
        await beats(cluster)
    finally:
        attacker.close()
    await alice.send("ice-candidate", ice("ab", "bob"))
    await bob.expect("ice-candidate", callId="ab")  # (no call-end before it)
    await bob.send("ice-candidate", ice("ab", "alice"))
    await alice.expect("ice-candidate", callId="ab")
    assert terminal_records(cluster) == []
    refused = [row for row in cluster.audit.records() if row["event"] == "cluster.rejected"]
    assert {(row["entry"], row["reason"]) for row in refused} == {("u:zed", "bad_mac")}


async def _carol_revoked(cluster: ClusterHarness) -> tuple[str, redis.Redis]:
    """A started cluster whose revocation list, in Redis, revokes carol: its key, and a Redis
    client without the cluster key (close it)."""
    await cluster.start()
    key = f"{cluster.name}:revocations"
    attacker = redis.Redis.from_url(cluster.redis_url)
    cluster.nodes[0].hub.apply_revocations(RevocationList(users={"carol": 2**40}))
    await _until(lambda: attacker.get(key) is not None)
    return key, attacker


async def test_an_older_revocation_list_put_back_revives_no_token(cluster: ClusterHarness) -> None:
    """The revocation list carries a version that only grows: an older genuine list written
    back is not taken by any node, and the nodes write the newer one back over it."""
    key, attacker = await _carol_revoked(cluster)
    try:
        older = attacker.get(key)  # kept by the attacker
        assert isinstance(older, bytes)
        cluster.nodes[0].hub.apply_revocations(RevocationList(users={"carol": 2**40, "bob": 2**40}))
        await _until(lambda: attacker.get(key) != older)
        newer = attacker.get(key)
        await beats(cluster)  # every node has the newer list
        attacker.set(key, older)
        await beats(cluster)
        await _until(lambda: attacker.get(key) == newer)  # written back by the nodes
    finally:
        attacker.close()
    for index in range(3):
        assert "bob" in cluster.nodes[index].hub.revocations.users
        refused = await sign_in(cluster, "bob", node=index)
        await refused.expect_closed(4003, "token revoked")


async def test_a_timer_score_lowered_fires_nothing_early(cluster: ClusterHarness) -> None:
    """The timer set's scores are unsigned; each timer's deadline is also kept signed, and a
    node fires a claimed timer only once that deadline has come. A score lowered to "now" is
    put back (audited `early`); a member with no signed deadline (one no node armed) is given
    the latest deadline any timer could have (audited `unsigned`); the ring timeout fires
    once, at its time."""
    await cluster.start(make_settings(calls={"ring_timeout": 3.0}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await bob.expect("call-request", id="ab")
    timers = f"{cluster.name}:timers"
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        scored: Any = attacker.zrange(timers, 0, -1, withscores=True)
        [(member, deadline)] = scored
        forged = bytes(member).partition(b"|")[0] + b"|bob"  # the same timer, another user
        attacker.zadd(timers, {member: 0, forged: 0})  # "due now", twice

        def refused() -> set[str]:
            rows = cluster.audit.records("cluster.rejected")
            return {row["reason"] for row in rows if row["entry"] == "timers"}

        await _until(lambda: refused() == {"early", "unsigned"})
        assert attacker.zscore(timers, member) == deadline  # due again at its own time
        await _until(lambda: (attacker.zscore(timers, forged) or 0) >= deadline)  # not before
    finally:
        attacker.close()
    assert terminal_records(cluster) == []  # nothing fired early
    await alice.expect("call-end", callId="ab", reason="timeout")
    await bob.expect("call-end", callId="ab", reason="timeout")
    assert [row["event"] for row in terminal_records(cluster)] == ["call.timeout"]


async def test_a_timer_armed_without_a_signed_deadline_still_fires(cluster: ClusterHarness) -> None:
    """A rolling upgrade: a node of an earlier release arms timers without a signed deadline.
    Such a timer still fires, late rather than early: it is given the latest deadline a timer
    could have when first claimed. Here a held device's reconnect grace retires it."""
    await cluster.start(make_settings(calls={"ring_timeout": 2.0, "reconnect_grace": 1.0}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob, "ab")
    attacker = redis.Redis.from_url(cluster.redis_url)  # here: standing for the old release
    try:
        await bob.ws.aclose()
        await _until(lambda: attacker.hlen(f"{cluster.name}:timer-due") == 1)
        attacker.delete(f"{cluster.name}:timer-due")  # as an earlier release arms it
    finally:
        attacker.close()
    await alice.expect("call-end", callId="ab", reason="peer_disconnected")
    assert [row["reason"] for row in terminal_records(cluster)] == ["peer_disconnected"]


@pytest.mark.parametrize("doomed_leads", [False, True])
async def test_batches_appended_again_to_a_dead_nodes_inbox_reach_nobody(
    cluster: ClusterHarness, tmp_path: Path, doomed_leads: bool
) -> None:
    """A dead node's inbox is handed over to its devices' buffers. What that node had carried
    out (its last heartbeat says how far, signed) is not handed over again, and a batch
    appended twice is handed over once: genuine batches recorded by a Redis client without
    the key and appended again after the death reach nobody. Also when the dead node was the
    leader, so that the node burying it never read its heartbeats."""
    env = {**_cluster_env(cluster, 10), "CALLGATE_CLUSTER_LINKS": "false"}
    attacker = redis.Redis.from_url(cluster.redis_url)
    if doomed_leads:
        process, url = await start_server_process(server_config(tmp_path), env)
        await _until(lambda: b"doomed" in (attacker.get(f"{cluster.name}:leader") or b""))
        await cluster.start(make_settings(calls={"reconnect_grace": 10}), links=False)
    else:
        await cluster.start(make_settings(calls={"reconnect_grace": 10}), links=False)
        process, url = await start_server_process(server_config(tmp_path), env)
    captured: list[dict[bytes, bytes]] = []
    stop = threading.Event()
    try:
        alice = await cluster.connect("alice", node=0)
        bob = await signed_in(cluster.nursery, url, token_for("bob"))
        cluster.clients.append(bob)
        doomed = bob.session["connectionId"].partition(".")[0]
        inbox = f"{cluster.name}:in:{doomed}"

        record_inbox(cluster, inbox, captured, stop)  # the doomed node's
        await connected_call(alice, bob)
        await alice.send("ice-candidate", {**ice("ab", "bob"), "n": "original"})
        assert (await bob.expect("ice-candidate", callId="ab"))["data"]["n"] == "original"
        await _until(lambda: any(b"original" in fields[b"p"] for fields in captured))
        [batch] = [fields for fields in captured if b"original" in fields[b"p"]]
        beat = attacker.get(f"{cluster.name}:hb:{doomed}")
        for _ in range(2):  # two heartbeats since: the latest says the batch was carried out
            await _until(lambda beat=beat: attacker.get(f"{cluster.name}:hb:{doomed}") != beat)
            beat = attacker.get(f"{cluster.name}:hb:{doomed}")
        process.kill()
        await process.wait()
        await _until(lambda: bool(cluster.audit.records("cluster.node_down")))
        again = await sign_in(cluster, "bob", node=1, resume=bob.session["sessionId"])
        again.session = (await again.expect("session", resumed=True))["data"]
        for _ in range(3):  # within the 30 s the leader keeps emptying the dead inbox
            attacker.xadd(inbox, batch)  # type: ignore[arg-type]
        await _until(lambda: not attacker.exists(inbox))  # taken and handed over
        await again.expect_silence()  # neither the hand-over nor the copies gave it again
        await alice.send("ice-candidate", {**ice("ab", "bob"), "n": "after"})
        assert (await again.expect("ice-candidate", callId="ab"))["data"]["n"] == "after"
    finally:
        stop.set()
        attacker.close()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_garbage_appended_to_an_inbox_is_audited_once_a_window(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inbox is open to any Redis client: what it refuses is audited once per reason a
    window (a minute; here shortened), the first at once and the rest summed when the window
    has ended, not once per entry, and the node goes on."""
    monkeypatch.setattr(links_module, "REFUSAL_WINDOW", 0.5)
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    target = bob.session["connectionId"].partition(".")[0]
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        pipe = attacker.pipeline(transaction=False)
        for _ in range(200):
            pipe.xadd(f"{cluster.name}:in:{target}", {b"p": b"x", b"m": b"y"})
        pipe.execute()
        await _until(lambda: attacker.xlen(f"{cluster.name}:in:{target}") == 0)  # all read
    finally:
        attacker.close()
    await _until(lambda: len(cluster.audit.records("cluster.rejected")) == 2)
    refused = cluster.audit.records("cluster.rejected")
    summary = [(row["entry"], row["reason"], row.get("count", 1)) for row in refused]
    assert summary[1:] == [("inbox", "bad_mac", 199)]
    assert summary[0][1:] == ("bad_mac", 1)  # (the first, at once, under its stream id)
    await connected_call(alice, bob, "ab")
    await alice.send("ice-candidate", ice("ab", "bob"))
    await bob.expect("ice-candidate", callId="ab")
    assert len(cluster.audit.records("cluster.rejected")) == 2


async def test_a_spoiled_record_holds_no_lane(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record that does not verify stops the decision that needs it (audited), and that
    decision is not tried again, even a disconnect's: it would never verify, and would hold
    its lane, and every user behind it, for good."""
    monkeypatch.setattr(cluster_node, "LANES", 1)  # every user of a node in one lane
    await cluster.start()
    bob = await cluster.connect("bob", node=1)
    carol = await cluster.connect("carol", node=1)
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        raw = attacker.get(f"{cluster.name}:u:bob")
        assert isinstance(raw, bytes)
        attacker.set(f"{cluster.name}:u:bob", raw[:-2] + b" }")  # its MAC no longer verifies
    finally:
        attacker.close()
    await bob.ws.aclose()  # its disconnect cannot be decided
    await _until(lambda: cluster.audit.records("cluster.rejected"))
    await carol.send("user-connected", "carol", ref=1)  # behind it in the one lane
    assert (await carol.expect("ack"))["ref"] == 1
    refused = cluster.audit.records("cluster.rejected")
    assert [(row["entry"], row["reason"]) for row in refused] == [("u:bob", "bad_mac")]


async def test_a_batch_recorded_and_appended_after_its_origin_was_forgotten_is_stale(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node ids are new with every process, so a node forgets the number of an origin it
    carried out no batch of for twice MAX_BATCH_AGE (an hour; here a second), and its
    heartbeat stops naming it. A genuine batch of that origin, recorded by a Redis client
    without the key and appended again after that, is refused as stale (audited with the
    messages it held), not carried out: its number is forgotten, its time is not."""
    monkeypatch.setattr(cluster_node, "MAX_BATCH_AGE", 1.0)
    await cluster.start(links=False)  # every batch in the inboxes, where a client records it
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    sender, target = node_id(cluster, 0), node_id(cluster, 1)
    inbox = f"{cluster.name}:in:{target}"
    captured: list[dict[bytes, bytes]] = []
    stop = threading.Event()

    record_inbox(cluster, inbox, captured, stop)  # bob's node's
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        await connected_call(alice, bob)
        await alice.send("ice-candidate", {**ice("ab", "bob"), "n": "original"})
        assert (await bob.expect("ice-candidate", callId="ab"))["data"]["n"] == "original"
        await _until(lambda: any(b"original" in fields[b"p"] for fields in captured))
        [batch] = [fields for fields in captured if b"original" in fields[b"p"]]
        await _until(lambda: sender in marks(cluster, target))
        await _until(lambda: sender not in marks(cluster, target))  # silent for 2 s: forgotten
        attacker.xadd(inbox, batch)  # type: ignore[arg-type]
        await _until(lambda: bool(cluster.audit.records("cluster.rejected")))
        await bob.expect_silence()  # not carried out
        [row] = cluster.audit.records("cluster.rejected")
        assert (row["node"], row["reason"], row["dropped_messages"]) == (target, "stale", 1)
        await alice.send("ice-candidate", {**ice("ab", "bob"), "n": "after"})
        assert (await bob.expect("ice-candidate", callId="ab"))["data"]["n"] == "after"
    finally:
        stop.set()
        attacker.close()


def _decisions(cluster: ClusterHarness) -> int:
    """Decisions taken so far on every running node (each costs Redis round trips)."""
    return sum(node.hub.cluster.decisions for node in cluster.nodes if node.hub.cluster)


async def test_a_member_of_nodes_that_never_ran_is_dropped_not_buried(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`nodes` and the presence sets are unsigned. Members a client without the key added,
    each with a presence set of thousands of users (one of them real), are dropped once the
    leader finds them silent: no node ever wrote a signed heartbeat under their names, so
    none is declared dead or buried, and their presence sets cost no decision. Audited once
    (`nodes`, `unsigned`), the rest summed when the window ends (here shortened)."""
    monkeypatch.setattr(links_module, "REFUSAL_WINDOW", 0.5)
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await _until(lambda: any(n.hub.cluster and n.hub.cluster.judging for n in cluster.nodes))
    before = _decisions(cluster)
    fakes = [f"ghost{n}-0badc0" for n in range(3)]
    members = f"{cluster.name}:nodes"
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        pipe = attacker.pipeline(transaction=True)  # (all at once: judged in one pass)
        for fake in fakes:
            pipe.sadd(f"{cluster.name}:n:{fake}", "alice", *(f"user{n}" for n in range(2000)))
            pipe.sadd(members, fake)
        pipe.execute()
        await _until(lambda: not any(attacker.sismember(members, fake) for fake in fakes))
        assert not any(attacker.exists(f"{cluster.name}:n:{fake}") for fake in fakes)
        assert not any(attacker.exists(f"{cluster.name}:dead:{fake}") for fake in fakes)
    finally:
        attacker.close()
    assert _decisions(cluster) == before  # not one decision for the 6,003 listed users
    assert not cluster.audit.records("cluster.node_down")

    def refused() -> list[tuple[str, str, int]]:
        rows = cluster.audit.records("cluster.rejected")
        return [(row["entry"], row["reason"], row.get("count", 1)) for row in rows]

    await _until(lambda: sum(count for *_, count in refused()) == 3)
    # The first at once, the others summed (on a slow machine a window may end between two
    # of them: more records, never more than one each).
    assert {(entry, reason) for entry, reason, _ in refused()} == {("nodes", "unsigned")}
    assert refused()[0][2] == 1 and len(refused()) <= 3
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await bob.expect("call-request", id="ab")  # alice, listed under a fake, still reachable


async def test_users_listed_under_a_dead_nodes_name_cost_its_burial_no_decision(
    cluster: ClusterHarness,
) -> None:
    """A real node dies: its presence set, padded by a client without the key with users
    who have no device there (no record, a record naming none, a record that does not
    verify), costs one decision per user whose signed record names an online device of that
    node, and the node's own devices are retired as before."""
    await cluster.start()
    nodes = [running.hub.cluster for running in cluster.nodes]
    await _until(lambda: any(node is not None and node.judging for node in nodes))
    leader = next(i for i, node in enumerate(nodes) if node is not None and node.judging)
    victim, other = (leader + 1) % 3, (leader + 2) % 3
    alice = await cluster.connect("alice", node=leader)
    await cluster.connect("bob", node=victim)
    await cluster.connect("carol", node=other)  # a real record that names no victim device
    await cluster.connect("mallory", node=other)
    victim_id = node_id(cluster, victim)
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        raw = attacker.get(f"{cluster.name}:u:mallory")
        assert isinstance(raw, bytes)
        attacker.set(f"{cluster.name}:u:mallory", raw[:-2] + b" }")  # no longer verifies
        padding = ["alice", "carol", "mallory", *(f"user{n}" for n in range(1000))]
        attacker.sadd(f"{cluster.name}:n:{victim_id}", *padding)
    finally:
        attacker.close()
    before = _decisions(cluster)
    cluster._running[victim][0].cancel()  # the victim stops heartbeating, its devices stay
    await _until(lambda: cluster.audit.records("cluster.node_down"))
    [down] = cluster.audit.records("cluster.node_down")
    assert (down["node"], down["devices"]) == (victim_id, 1)
    assert _decisions(cluster) - before == 1  # bob's disconnect, nothing for the padding
    refused = cluster.audit.records("cluster.rejected")
    assert [(row["entry"], row["reason"]) for row in refused] == [("presence", "bad_mac")]
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await alice.expect("call-reject", callId="ab", reason="unavailable")  # bob is gone


async def test_a_batch_dated_further_ahead_than_a_batch_may_age_is_refused(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A genuine node whose clock runs ahead by more than MAX_BATCH_AGE (an hour; here 1 s,
    ahead by 5 s) dates its batches in the future: carried out, such a batch would stay fresh
    after its sender is forgotten, and a recorded copy would be carried out again. It is
    refused (`future`), audited with the messages it held, and never reaches the device."""
    monkeypatch.setattr(cluster_node, "MAX_BATCH_AGE", 1.0)
    await cluster.start(links=False)
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob)
    target = node_id(cluster, 1)
    orders: Any = [(Deliver(bob.conn, "ice-candidate", {**ice("ab", "bob"), "n": "ahead"}), "bob")]
    fields = codec(cluster=cluster.name).seal_delivery(
        "skewed-0a0b0c", target, 1, orders, at=now_ms() + 5_000
    )
    append_to_inbox(cluster, target, fields)
    await _until(lambda: bool(cluster.audit.records("cluster.rejected")))
    [row] = cluster.audit.records("cluster.rejected")
    assert (row["node"], row["reason"], row["dropped_messages"]) == (target, "future", 1)
    await alice.send("ice-candidate", {**ice("ab", "bob"), "n": "next"})
    assert (await bob.expect("ice-candidate", callId="ab"))["data"]["n"] == "next"


async def _kill_after_its_presence_set_is_deleted(
    cluster: ClusterHarness, devices: int = 1
) -> tuple[int, int, list[Client]]:
    """A node that holds bob (`devices` of his) dies after a client without the key deleted its
    presence set: its burial retires none of its devices, and bob's signed record still names
    them. Returns the dead node's index, the index of the survivor that does not lead, and
    bob's clients."""
    nodes = [running.hub.cluster for running in cluster.nodes]
    await _until(lambda: any(node is not None and node.judging for node in nodes))
    leader = next(i for i, node in enumerate(nodes) if node is not None and node.judging)
    victim, other = (leader + 1) % 3, (leader + 2) % 3
    bobs = [await cluster.connect("bob", node=victim) for _ in range(devices)]
    victim_id = node_id(cluster, victim)
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        attacker.delete(f"{cluster.name}:n:{victim_id}")
    finally:
        attacker.close()
    cluster._running[victim][0].cancel()  # it stops heartbeating; bob's record stays
    await _until(lambda: bool(cluster.audit.records("cluster.node_down")))
    [down] = cluster.audit.records("cluster.node_down")
    assert (down["node"], down["devices"]) == (victim_id, 0)  # the burial missed bob
    assert online_nodes(cluster, "bob") == {victim_id}
    return victim, other, bobs


def _survivors_quiet(cluster: ClusterHarness, dead: int) -> bool:
    return all(
        running.hub.cluster.quiet
        for index, running in enumerate(cluster.nodes)
        if index != dead and running.hub.cluster is not None
    )


@pytest.mark.parametrize("devices", [1, 2])
async def test_a_device_its_dead_nodes_burial_missed_is_retired_by_its_first_delivery(
    cluster: ClusterHarness, devices: int
) -> None:
    """A client without the key deletes a node's presence set before the node dies: its
    burial retires none of its devices. The first delivery for such a device, from a node that
    knows its node is dead, retires it as the burial would have (held for `reconnect_grace`;
    with two ringing, the one that rang last is held) and puts the message in its resume
    buffer: one decision per delivery, not one per round trip to Redis for as long as the
    message lives."""
    await cluster.start(make_settings(calls={"reconnect_grace": 10}))
    victim, other, bobs = await _kill_after_its_presence_set_is_deleted(cluster, devices)
    victim_id = node_id(cluster, victim)
    sender = cluster.nodes[other].hub.cluster
    assert sender is not None
    await _until(lambda: victim_id in sender._gone)
    alice = await cluster.connect("alice", node=other)
    before = _decisions(cluster)
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await _until(lambda: online_nodes(cluster, "bob") == set())  # no longer online there
    await _until(lambda: _survivors_quiet(cluster, victim))
    # The call-request, then one decision per delivery: the first disconnects every device
    # of bob's on the dead node and hands the message on; nothing more.
    assert _decisions(cluster) - before == 1 + devices
    [held] = cluster.audit.records("session.held")
    [bob] = [client for client in bobs if client.conn == held["conn"]]
    again = await sign_in(cluster, "bob", node=other, resume=bob.session["sessionId"])
    await again.expect("session", resumed=True)
    await again.expect("call-request", id="ab")  # from his resume buffer


@pytest.mark.parametrize("links", [True, False])
async def test_a_device_of_a_node_dead_and_forgotten_is_retired_not_sent_to_its_inbox(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch, links: bool
) -> None:
    """The same stale device, once the sender has forgotten the dead node (two hours after
    it heard of it; here shortened): the node's id has no heartbeat, and its signed death
    verdict is still there, so the sender knows it is dead again before anything goes to an
    inbox nobody reads. The caller is told (`reconnect_grace` 0: the call ends)."""
    monkeypatch.setattr(cluster_node, "MAX_BATCH_AGE", 1.0)
    monkeypatch.setattr(cluster_node, "BURIED_SWEEP", 0.5)  # (the leader's sweep ends first)
    await cluster.start(links=links)
    victim, other, _ = await _kill_after_its_presence_set_is_deleted(cluster)
    victim_id = node_id(cluster, victim)
    sender = cluster.nodes[other].hub.cluster
    assert sender is not None
    await _until(lambda: victim_id in sender._gone)
    await _until(lambda: victim_id not in sender._gone)  # forgotten (after 2 s here)
    leader = cluster.nodes[3 - victim - other].hub.cluster
    assert leader is not None
    await _until(lambda: not leader._buried)  # its inbox is no longer emptied by anyone
    alice = await cluster.connect("alice", node=other)
    before = _decisions(cluster)
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await alice.expect("call-end", callId="ab", reason="peer_disconnected")
    await _until(lambda: _survivors_quiet(cluster, victim))
    assert online_nodes(cluster, "bob") == set()
    assert victim_id in sender._gone
    assert _decisions(cluster) - before == 2
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        assert not attacker.exists(f"{cluster.name}:in:{victim_id}")  # nothing lost there
    finally:
        attacker.close()


async def _alice_calls_across(cluster: ClusterHarness) -> tuple[Client, Client, ClusterNode, str]:
    """A started cluster with alice on node 0 (the sender) and bob on node 1: alice, bob,
    node 0, and node 1's id."""
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    sender = cluster.nodes[0].hub.cluster
    assert sender is not None
    return alice, bob, sender, node_id(cluster, 1)


async def test_a_live_node_whose_keys_are_deleted_keeps_its_devices(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a client without the key can delete or write is no evidence of a death: with the
    node's heartbeat gone when the sender looks for its link, its `last:` deleted, it taken
    out of `nodes` and a forged verdict in its `dead:` key, bob, on that live node, is not
    retired: the message reaches him through the node's inbox."""
    alice, bob, sender, target = await _alice_calls_across(cluster)
    attacker = redis.Redis.from_url(cluster.redis_url)
    strings = sender.store.strings

    async def heartbeat_deleted(names: list[str]) -> tuple[list[bytes | None], list[str]]:
        # (deleted between the target's beats, just when the sender looks: deterministic here)
        values, wrong = await strings(names)
        hidden = [None if n == f"hb:{target}" else v for n, v in zip(names, values, strict=True)]
        return hidden, wrong

    monkeypatch.setattr(sender.store, "strings", heartbeat_deleted)
    try:
        attacker.delete(f"{cluster.name}:last:{target}")
        attacker.srem(f"{cluster.name}:nodes", target)
        attacker.set(f"{cluster.name}:dead:{target}", b'{"node": "%s"}' % target.encode())
        await alice.send("call-request", call_request("ab", "alice", "bob"))
        await bob.expect("call-request", id="ab")
    finally:
        attacker.close()
    assert target not in sender._gone
    assert online_nodes(cluster, "bob") == {target}
    assert not sender.links.linked(target)  # (it went by the inbox)


def _judging(cluster: ClusterHarness) -> int:
    """The index of the node that judges (leads, past its grace)."""
    nodes = [running.hub.cluster for running in cluster.nodes]
    return next(i for i, node in enumerate(nodes) if node is not None and node.judging)


def _refused(cluster: ClusterHarness) -> list[tuple[str, str, int]]:
    rows = cluster.audit.records("cluster.rejected")
    return [(row["entry"], row["reason"], row.get("count", 1)) for row in rows]


async def _a_dead_node_holding_bob(
    cluster: ClusterHarness,
) -> tuple[Client, str, redis.Redis]:
    """Three nodes; alice on the judging node, bob on another (the victim, not yet stopped);
    an attacker's Redis connection (closed with the test's cluster)."""
    await cluster.start()
    await _until(lambda: any(n.hub.cluster and n.hub.cluster.judging for n in cluster.nodes))
    leader = _judging(cluster)
    victim = (leader + 1) % 3
    alice = await cluster.connect("alice", node=leader)
    await cluster.connect("bob", node=victim)
    return alice, node_id(cluster, victim), redis.Redis.from_url(cluster.redis_url)


def _stop(cluster: ClusterHarness, node: str) -> None:
    """The node stops heartbeating (killed); its devices' records still name it online."""
    index = next(i for i in range(len(cluster.nodes)) if node_id(cluster, i) == node)
    cluster._running[index][0].cancel()


async def test_a_fake_member_whose_last_beat_is_not_a_string_keeps_no_node_from_burial(
    cluster: ClusterHarness,
) -> None:
    """Two writes without the key: a member `0fake` (sorted before every real id) whose
    `last:0fake` is a hash. Redis answers WRONGTYPE to reading it: tampering, not an outage.
    It counts as no evidence (the member is dropped, its keys of any type unlinked, audited
    `malformed`), and the real dead node judged in the same pass is buried."""
    alice, victim, attacker = await _a_dead_node_holding_bob(cluster)
    try:
        attacker.sadd(f"{cluster.name}:nodes", "0fake")
        attacker.hset(f"{cluster.name}:last:0fake", "x", "y")
        _stop(cluster, victim)
        await _until(lambda: bool(cluster.audit.records("cluster.node_down")))
        await _until(lambda: not attacker.sismember(f"{cluster.name}:nodes", "0fake"))
        assert not attacker.exists(f"{cluster.name}:last:0fake")
        assert not attacker.sismember(f"{cluster.name}:nodes", victim)
    finally:
        attacker.close()
    [down] = cluster.audit.records("cluster.node_down")
    assert (down["node"], down["devices"]) == (victim, 1)
    assert _refused(cluster) == [("nodes", "malformed", 1)]  # not also `unsigned`
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await alice.expect("call-reject", callId="ab", reason="unavailable")  # bob is gone


async def test_fake_members_by_the_thousand_cost_each_beat_a_bounded_read(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members of `nodes` added without the key (here 12, with room for 4 at a time; in a
    release, 256 of however many) are checked a few at a time: each beat of the leader reads
    the heartbeats of the nodes that ran and of at most 4 others. The fakes are dropped all
    the same, a few at a time, and a real node that dies meanwhile is buried as usual."""
    monkeypatch.setattr(cluster_node, "MAX_UNKNOWN_WATCHED", 4)
    reads: list[list[str]] = []
    keep = Store.keep

    async def counted_keep(store: Store, node: str, *args: Any) -> Any:
        reads.append(list(args[2]))  # (heartbeat, timeout_ms, watched, epoch)
        return await keep(store, node, *args)

    monkeypatch.setattr(Store, "keep", counted_keep)
    alice, victim, attacker = await _a_dead_node_holding_bob(cluster)
    fakes = {f"0fake{i:02}" for i in range(12)}
    try:
        attacker.sadd(f"{cluster.name}:nodes", *fakes)
        reads.clear()
        _stop(cluster, victim)
        await _until(lambda: bool(cluster.audit.records("cluster.node_down")))
        members = f"{cluster.name}:nodes"
        await _until(lambda: not any(attacker.sismember(members, fake) for fake in fakes))
    finally:
        attacker.close()
    [down] = cluster.audit.records("cluster.node_down")
    assert (down["node"], down["devices"]) == (victim, 1)
    real = {node_id(cluster, index) for index in range(3)}
    assert reads and all(len(set(watched) - real) <= 4 for watched in reads)
    assert fakes <= {node for watched in reads for node in watched}  # each one was checked
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await alice.expect("call-reject", callId="ab", reason="unavailable")  # bob is gone


async def test_fake_members_named_to_sort_first_keep_no_new_leader_from_a_dead_node(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client without the key keeps adding members named to sort before every real id
    (`0fake…`), more than the leader checks at once. The leader dies: the node that takes the
    lease has seen no node running yet, so every member is unknown to it. Its room for
    unknown members must not go to the fakes every time because of their names: it finds the
    dead leader among them and buries it (before, it checked the first names in order, the
    fakes, again as soon as they were dropped, and the old leader was never judged)."""
    monkeypatch.setattr(cluster_node, "MAX_UNKNOWN_WATCHED", 4)
    await cluster.start()
    await _until(lambda: any(n.hub.cluster and n.hub.cluster.judging for n in cluster.nodes))
    leader = node_id(cluster, _judging(cluster))
    members = f"{cluster.name}:nodes"
    fakes = [f"0fake{i:02}" for i in range(8)]
    attacker = redis.Redis.from_url(cluster.redis_url)

    async def flood() -> None:
        while True:
            attacker.sadd(members, *fakes)
            await trio.sleep(0.05)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await trio.sleep(0.3)
            _stop(cluster, leader)
            with trio.fail_after(20):
                while not any(
                    row["node"] == leader for row in cluster.audit.records("cluster.node_down")
                ):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        attacker.close()


@pytest.mark.parametrize(
    ("key", "entry", "devices"),
    [("n", "presence", 0), ("in", "inbox", 1)],
    ids=["presence-set-a-string", "inbox-a-hash"],
)
async def test_a_dead_nodes_key_of_another_type_is_read_as_empty(
    cluster: ClusterHarness, key: str, entry: str, devices: int
) -> None:
    """A dead node's presence set replaced by a string, or its inbox by a hash: the burial
    reads it as empty (removed, audited `malformed` under `presence` or `inbox`) and is done
    once: verdict, the node out of `nodes`, one `node_down`, not started again with every
    heartbeat. With its presence set gone its devices stay online in their users' records (as
    when the set is deleted: `devices` 0); with its inbox gone, bob is disconnected as usual."""
    alice, victim, attacker = await _a_dead_node_holding_bob(cluster)
    retyped = f"{cluster.name}:{key}:{victim}"
    try:
        _stop(cluster, victim)
        attacker.delete(retyped)
        if key == "n":
            attacker.set(retyped, "not a set")
        else:
            attacker.hset(retyped, "x", "y")
        await _until(lambda: bool(cluster.audit.records("cluster.node_down")))
        assert not attacker.sismember(f"{cluster.name}:nodes", victim)
        assert not attacker.exists(retyped)
    finally:
        attacker.close()
    [down] = cluster.audit.records("cluster.node_down")
    assert (down["node"], down["devices"]) == (victim, devices)
    assert _refused(cluster) == [(entry, "malformed", 1)]
    if devices:
        await alice.send("call-request", call_request("ab", "alice", "bob"))
        await alice.expect("call-reject", callId="ab", reason="unavailable")


async def test_a_buried_nodes_last_beat_put_back_gets_it_buried_no_more(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any Redis client can record `last:<node>` of a node while it runs. Put back after
    the node was buried, with the id added to `nodes` again, it is a genuine beat of a node
    that ran; but the node is buried already: the leader remembers it, and its signed
    verdict says so for as long as that beat counts (so a leader that did not bury it knows
    too). Dropped, no verdict, no `NodeGone`, no `node_down` again; audited `replayed`,
    summed."""
    monkeypatch.setattr(cluster_node, "BURIED_SWEEP", 0.5)  # (its own 30 s check is not this)
    monkeypatch.setattr(links_module, "REFUSAL_WINDOW", 0.5)
    _, victim, attacker = await _a_dead_node_holding_bob(cluster)
    leader = cluster.nodes[_judging(cluster)].hub.cluster
    assert leader is not None
    members, last = f"{cluster.name}:nodes", f"{cluster.name}:last:{victim}"
    try:
        recorded = attacker.get(last)
        assert recorded is not None
        _stop(cluster, victim)
        await _until(lambda: bool(cluster.audit.records("cluster.node_down")))
        for replay in range(3):
            if replay == 2:  # as a leader that did not bury it: only the verdict says so
                leader._burials.clear()
            attacker.set(last, recorded)  # no expiry
            attacker.sadd(members, victim)
            await _until(lambda: not attacker.sismember(members, victim))
        await _until(lambda: sum(count for *_, count in _refused(cluster)) == 3)
        assert len(cluster.audit.records("cluster.node_down")) == 1
        assert not attacker.exists(last)  # unlinked with it
        verdict: Any = attacker.get(f"{cluster.name}:dead:{victim}")
    finally:
        attacker.close()
    assert codec(cluster=cluster.name).is_buried(verdict, victim)
    assert {(entry, reason) for entry, reason, _ in _refused(cluster)} == {("nodes", "replayed")}


async def test_a_last_beat_older_than_a_verdict_is_kept_is_no_evidence(
    cluster: ClusterHarness,
) -> None:
    """A heartbeat is dated. A genuine `last:` older than a week (and an hour for clocks) can
    only have been put back (Redis expires it): no evidence that its node ran, since its
    verdict may have expired too. The member is dropped, audited `replayed`. One of the
    previous release carries no date and still counts: during a rolling upgrade such a node
    that dies is buried."""
    await cluster.start()
    await _until(lambda: any(n.hub.cluster and n.hub.cluster.judging for n in cluster.nodes))
    seal = codec(cluster=cluster.name).seal_heartbeat
    old, previous = "old-0a0b0c", "previous-0a0b0c"
    attacker = redis.Redis.from_url(cluster.redis_url)
    members = f"{cluster.name}:nodes"
    try:
        eight_days = 8 * 24 * 3_600_000
        attacker.set(f"{cluster.name}:last:{old}", seal(old, 41, at=now_ms() - eight_days))
        attacker.set(f"{cluster.name}:last:{previous}", seal(previous, 41))  # undated
        attacker.sadd(members, old, previous)
        await _until(lambda: not attacker.smembers(members) & {b"old-0a0b0c", b"previous-0a0b0c"})
        assert not attacker.exists(f"{cluster.name}:dead:{old}")
        assert attacker.exists(f"{cluster.name}:dead:{previous}")
    finally:
        attacker.close()
    assert [row["node"] for row in cluster.audit.records("cluster.node_down")] == [previous]
    assert _refused(cluster) == [("nodes", "replayed", 1)]


@pytest.mark.parametrize("key", ["leader", "epoch", "nodes", "hb:0fake"])
async def test_a_liveness_key_of_another_type_stops_no_heartbeat_and_no_burial(
    cluster: ClusterHarness, key: str
) -> None:
    """One write without the key: the lease, the epoch or `nodes` made a hash (or a member
    whose heartbeat is a hash). Each node's beat reads and writes them: a WRONGTYPE there
    failed every beat of every node (or of every leader), so no node led, none was buried,
    and nodes took Redis for unreachable. Read as absent instead, `nodes` and `epoch` removed
    so that they are written again: the nodes stay available and the dead node is buried."""
    _, victim, attacker = await _a_dead_node_holding_bob(cluster)
    try:
        attacker.delete(f"{cluster.name}:{key}")
        attacker.hset(f"{cluster.name}:{key}", "x", "y")
        if key == "hb:0fake":
            attacker.sadd(f"{cluster.name}:nodes", "0fake")
        _stop(cluster, victim)
        await _until(lambda: bool(cluster.audit.records("cluster.node_down")))
        for running in cluster.nodes:
            node = running.hub.cluster
            assert node is not None
            assert node.node_id == victim or node.available
        assert attacker.type(f"{cluster.name}:nodes") == b"set"
        assert attacker.type(f"{cluster.name}:epoch") == b"string"
    finally:
        attacker.close()
    [down] = cluster.audit.records("cluster.node_down")
    assert (down["node"], down["devices"]) == (victim, 1)


# -- keys a node writes, of another type: one write without the key, no outage -----------------


def _retype(attacker: redis.Redis, key: str, kind: str) -> None:
    """What a client without the key can do to any key: replace it by one of another type
    (Redis never changes a key's type; SET replaces any key, the others need it gone)."""
    attacker.delete(key)
    if kind == "string":
        attacker.set(key, "x")
    elif kind == "hash":
        attacker.hset(key, "x", "y")
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(("key", "kind"), [("timers", "string"), ("timer-due", "string")])
async def test_a_timer_key_of_another_type_stops_no_timer(
    cluster: ClusterHarness, key: str, kind: str
) -> None:
    """`timers` (a sorted set) or `timer-due` (a hash) replaced by a string: every commit that
    arms or disarms a timer and every claim failed on it (WRONGTYPE), so no ring timeout or
    reconnect grace fired anywhere, for good. The commit and the claim read it as empty and
    write it again (what deleting it does: removed, audited `timers` `malformed`); the ring
    timeout fires on time, once."""
    await cluster.start(make_settings(calls={"ring_timeout": 1.0}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        _retype(attacker, f"{cluster.name}:{key}", kind)
        await alice.send("call-request", call_request("ab", "alice", "bob"))
        await bob.expect("call-request", id="ab")
        started = trio.current_time()
        await alice.expect("call-end", callId="ab", reason="timeout")
        assert trio.current_time() - started < 1.0 + 0.8  # on time (a claim, a decision)
        await bob.expect("call-end", callId="ab", reason="timeout")
        for name, kinds in (("timers", {b"zset", b"none"}), ("timer-due", {b"hash", b"none"})):
            assert attacker.type(f"{cluster.name}:{name}") in kinds
    finally:
        attacker.close()
    assert [row["event"] for row in terminal_records(cluster)] == ["call.timeout"]
    assert ("timers", "malformed") in {(entry, reason) for entry, reason, _ in _refused(cluster)}
    for node in cluster.nodes:
        assert node.hub.cluster is not None and node.hub.cluster.available


async def test_a_live_nodes_presence_set_of_another_type_is_written_again(
    cluster: ClusterHarness,
) -> None:
    """`n:<live node>` replaced by a string: a commit that adds a user to it failed halfway
    (Lua keeps what it wrote before an error: the user's record said online, the set did not
    list them), and the node took the records it read back for a commit that went through.
    The commit reads it as empty and writes it again before it writes anything (audited
    `presence` `malformed`), so when that node dies its burial finds bob."""
    await cluster.start()
    await _until(lambda: any(n.hub.cluster and n.hub.cluster.judging for n in cluster.nodes))
    leader = _judging(cluster)
    victim = (leader + 1) % 3
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        _retype(attacker, f"{cluster.name}:n:{node_id(cluster, victim)}", "string")
        alice = await cluster.connect("alice", node=leader)
        await cluster.connect("bob", node=victim)
        presence = f"{cluster.name}:n:{node_id(cluster, victim)}"
        assert attacker.smembers(presence) == {b"bob"}
        _stop(cluster, node_id(cluster, victim))
        await _until(lambda: bool(cluster.audit.records("cluster.node_down")))
    finally:
        attacker.close()
    [down] = cluster.audit.records("cluster.node_down")
    assert down["devices"] == 1
    assert ("presence", "malformed") in {(entry, reason) for entry, reason, _ in _refused(cluster)}
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await alice.expect("call-reject", callId="ab", reason="unavailable")  # bob is gone


async def test_a_live_nodes_inbox_of_another_type_is_written_again(
    cluster: ClusterHarness,
) -> None:
    """`in:<live node>` replaced by a hash, links off (every delivery by the inbox): the
    writer's XADD and the reader's XREAD failed for good, so nothing reached that node's
    devices. Whichever thread meets it removes it (audited `inbox` `malformed`) and goes on:
    the call connects."""
    await cluster.start(links=False)
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        _retype(attacker, f"{cluster.name}:in:{node_id(cluster, 1)}", "hash")
        await connected_call(alice, bob, "ab")
        await alice.send("ice-candidate", ice("ab", "bob"))
        await bob.expect("ice-candidate", callId="ab")
    finally:
        attacker.close()
    await _until(lambda: ("inbox", "malformed") in {(e, r) for e, r, _ in _refused(cluster)})
    for node in cluster.nodes:
        assert node.hub.cluster is not None and node.hub.cluster.available


async def test_records_of_another_type_are_read_as_absent(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's or a call's record replaced by a hash: loading it failed (WRONGTYPE), so
    every decision about that user failed as if Redis were away, a disconnect's for good,
    holding its lane and every user behind it. Read as absent instead, as if deleted (a
    call whose record is gone is gone, as after a Redis restart), removed and audited
    (`malformed`, under the record's name): carol signs in, and alice calls bob again."""
    monkeypatch.setattr(cluster_node, "LANES", 1)  # every user of a node in one lane
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob, "ab")
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        keys: Any = attacker.keys(f"{cluster.name}:c:*")
        [call_key] = [bytes(key).decode() for key in keys]
        _retype(attacker, call_key, "hash")
        _retype(attacker, f"{cluster.name}:u:carol", "hash")
        carol = await cluster.connect("carol", node=1)  # (her sign-in loads her record)
        await alice.send("call-end", {"callId": "ab", "to": "bob"}, ref=5)
        reply = await alice.recv()  # the call is gone: refused, not "cluster unavailable"
        assert reply["event"] == "error" and reply["data"]["code"] != "rate_limited", reply
        await connected_call(alice, bob, "ab2")
        await carol.send("user-connected", "carol", ref=1)
        assert (await carol.expect("ack"))["ref"] == 1
        assert attacker.type(call_key) == b"none"
        assert attacker.type(f"{cluster.name}:u:carol") == b"string"  # written again
    finally:
        attacker.close()
    refused = {(entry, reason) for entry, reason, _ in _refused(cluster)}
    call_name = call_key.removeprefix(f"{cluster.name}:")
    assert refused == {(call_name, "malformed"), ("u:carol", "malformed")}
    for node in cluster.nodes:
        assert node.hub.cluster is not None and node.hub.cluster.available


async def test_a_revocation_list_of_another_type_stops_no_heartbeat(
    cluster: ClusterHarness,
) -> None:
    """`revocations` replaced by a hash: every node reads it with every heartbeat, and the
    WRONGTYPE made every beat count as an outage (no node available, none leading). Read as
    absent (removed, audited `revocations` `malformed`): the nodes write their list back."""
    key, attacker = await _carol_revoked(cluster)
    try:
        _retype(attacker, key, "hash")
        await beats(cluster)
        await _until(lambda: attacker.type(key) == b"string")
        await beats(cluster)
        for node in cluster.nodes:
            assert node.hub.cluster is not None and node.hub.cluster.available
        await _until(lambda: any(n.hub.cluster and n.hub.cluster.judging for n in cluster.nodes))
    finally:
        attacker.close()
    assert ("revocations", "malformed") in {(e, r) for e, r, _ in _refused(cluster)}
    refused = await sign_in(cluster, "carol", node=2)
    await refused.expect_closed(4003, "token revoked")


async def test_a_live_nodes_verdict_of_another_type_keeps_no_link_shut(
    cluster: ClusterHarness,
) -> None:
    """`dead:<live node>` made a hash: the sender reads it before it opens a link, and the
    WRONGTYPE counted as Redis away, so no link to that node ever opened (every delivery went
    by its inbox). Read as absent (removed, audited `nodes` `malformed`): the link opens."""
    alice, bob, sender, target = await _alice_calls_across(cluster)
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        _retype(attacker, f"{cluster.name}:dead:{target}", "hash")
        await connected_call(alice, bob, "ab")
        await _until(lambda: sender.links.linked(target))
        assert not attacker.exists(f"{cluster.name}:dead:{target}")
    finally:
        attacker.close()
    assert target not in sender._gone
    assert ("nodes", "malformed") in {(e, r) for e, r, _ in _refused(cluster)}


async def test_the_store_scripts_remove_keys_of_another_type_before_they_write() -> None:
    """The store's scripts, on the real Redis, every key they touch of another type. Lua keeps
    what a script wrote before an error: the commit used to write the user's record, then fail
    on the presence set or the timers (WRONGTYPE), half-written. Now each key is read as absent
    or empty and removed (said to the store's `removed`) before the first write, and the
    commit writes everything; a record of another type is a conflict (nothing written), and
    loaded again it reads as absent."""
    name = f"test-{os.urandom(4).hex()}"
    removed: list[str] = []
    attacker = redis.Redis.from_url(REDIS_URL)
    async with Store(REDIS_URL, name, removed=removed.extend) as store:
        try:
            for key in ("timers", "timer-due", "n:n1", "u:bob"):
                _retype(attacker, f"{name}:{key}", "hash" if key != "timer-due" else "string")
            writes = Writes(
                records={"u:alice": (b"", b"alice's"), "u:bob": (b"", b"bob's")},
                timers_started=[(Timer(7, "alice"), 12.0)],
                timer_deadlines={"7|alice": b"sealed"},
                present={"n1": {"alice"}},
            )
            assert await store.commit(writes) is False  # u:bob is no string: nothing written
            assert attacker.get(f"{name}:u:alice") is None
            assert await store.load(["alice", "bob"]) == {"u:alice": None, "u:bob": None}
            assert removed == ["u:bob"] and attacker.type(f"{name}:u:bob") == b"none"
            assert await store.commit(writes) is True
            assert sorted(removed[1:]) == ["n:n1", "timer-due", "timers"]
            assert attacker.get(f"{name}:u:bob") == b"bob's"
            assert attacker.smembers(f"{name}:n:n1") == {b"alice"}
            assert attacker.zscore(f"{name}:timers", "7|alice") == 12.0
            assert attacker.hget(f"{name}:timer-due", "7|alice") == b"sealed"
            del removed[:]
            for key in ("timers", "timer-due"):
                _retype(attacker, f"{name}:{key}", "string")
            assert await store.claim_timers(20.0, 30.0, 64) == ([], 0)
            assert sorted(removed) == ["timer-due", "timers"]
            assert not attacker.exists(f"{name}:timers", f"{name}:timer-due")
        finally:
            attacker.close()
            await delete_cluster_keys_async(REDIS_URL, name)


async def test_a_user_record_listing_many_calls_costs_a_load_no_more_than_a_genuine_one() -> None:
    """The load script reads a user's call records by the `calls` list of the user's record,
    before any node has checked that record's MAC. One written without the key listing 10,000
    call keys made every load of that user read 10,000 keys inside Redis (Redis answering
    no one meanwhile). At most MAX_CALLS_READ of them are read (a genuine record lists at most
    `max_calls_per_user`, 16); the record itself fails its check on the node."""
    name = f"test-{os.urandom(4).hex()}"
    attacker = redis.Redis.from_url(REDIS_URL)
    listed = b'{"devices": [], "missed": [], "calls": [%s]}' % b", ".join(
        b'"k%d"' % i for i in range(10_000)
    )
    async with Store(REDIS_URL, name) as store:
        try:
            attacker.set(f"{name}:u:bob", b"0" * 64 + listed)
            found = await store.load(["bob"])
            assert len(found) == 1 + store_module.MAX_CALLS_READ  # u:bob and 64 of its calls
            most_calls = CallSettings.model_fields["max_calls_per_user"].metadata[1].le
            assert 4 * most_calls <= store_module.MAX_CALLS_READ  # room for any genuine record
        finally:
            attacker.close()
            await delete_cluster_keys_async(REDIS_URL, name)


async def test_an_inbox_kept_of_another_type_delays_only_its_own_batches() -> None:
    """A Redis client that kept turning one inbox into a string won the race with the
    writer's removal (a script of its own, then the append again) every time, until the
    writer backed off, and every other inbox's batches waited behind it. The writer now
    removes it and appends in one script: no race to win, each batch appended once. An
    inbox whose appends Redis refuses by themselves (here one at the last id a stream can
    have: "exhausted") holds only its own batches, in order, tried again on a back-off of
    their own; the other inboxes' batches queued after them go out at once."""
    prefix = f"test-{os.urandom(4).hex()}"
    attacker = redis.Redis.from_url(REDIS_URL)
    line = DeliveryLine(REDIS_URL, prefix)
    line.node_id = "node-self"
    retyped: list[str] = []

    def bodies(inbox: str) -> list[bytes]:
        entries: Any = attacker.xrange(f"{prefix}:in:{inbox}")
        return [fields[b"m"] for _, fields in entries]

    attacker.set(f"{prefix}:in:node-y", "x")
    attacker.xadd(
        f"{prefix}:in:node-w", {"m": "last"}, id="18446744073709551615-18446744073709551615"
    )
    try:
        line.start(lambda node, entries: None, retyped.append)
        line.send("node-y", {b"m": b"batch-for-y"}, 1)
        line.send("node-w", {b"m": b"w1"}, 1)
        line.send("node-z", {b"m": b"batch-for-z"}, 1)
        await _until(lambda: line.pending == 1)  # all but node-w's
        assert bodies("node-z") == [b"batch-for-z"]  # once: not appended again
        assert bodies("node-y") == [b"batch-for-y"]
        line.send("node-w", {b"m": b"w2"}, 1)
        line.send("node-z", {b"m": b"z2"}, 1)
        await _until(lambda: bodies("node-z") == [b"batch-for-z", b"z2"])  # not held up
        assert line.pending == 2 and bodies("node-w") == [b"last"]
        attacker.delete(f"{prefix}:in:node-w")  # (its reader would: nothing follows that id)
        await _until(lambda: line.pending == 0)  # (node-w's own back-off: 2 s at most)
        assert bodies("node-w") == [b"w1", b"w2"]
        assert bodies("node-y") == [b"batch-for-y"]
        assert retyped == ["in:node-y"]  # (told to trio: audited)
    finally:
        line.stop()
        attacker.close()
        await delete_cluster_keys_async(REDIS_URL, prefix)


async def test_a_call_limit_key_of_another_type_stops_no_caller(cluster: ClusterHarness) -> None:
    """alice's call-limit windows (`limits:*`, the `limits` library's lists) replaced by
    hashes: counting her call requests failed (WRONGTYPE), and every one she sent was
    refused as "cluster unavailable", for good. The windows are cleared (as if deleted,
    audited `limits` `malformed`) and counted again: her call rings."""
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await bob.expect("call-request", id="ab")
    await alice.send("call-end", {"callId": "ab", "to": "bob"})
    await bob.expect("call-end", callId="ab")
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        windows: Any = attacker.keys(f"{cluster.name}:limits*")
        assert windows
        for key in windows:
            _retype(attacker, bytes(key).decode(), "hash")
        await alice.send("call-request", call_request("ab2", "alice", "bob"))
        await bob.expect("call-request", id="ab2")
        assert {attacker.type(key) for key in windows} == {b"list"}
    finally:
        attacker.close()
    assert ("limits", "malformed") in {(e, r) for e, r, _ in _refused(cluster)}
