"""Cluster faults on paths that had no test: keys of another type a Redis client without the
cluster key keeps writing (an inbox, `nodes`, `timers`), and timers adopted or rescheduled.

Real nodes on the real Redis (three, dealt as each test says), real clients; the attacker is a
plain redis-py client, which can read, write and delete any key but does not hold the key.
Every wait is bounded (the harness's STEP, or a tighter bound a test is about).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import trio

from callgate.cluster import node as cluster_node
from callgate.cluster.line import DeliveryLine
from conftest import STEP, Client, ClusterHarness, call_request, make_settings
from test_cluster import _until, ice, node_id, sign_in, terminal_records
from test_cluster_tamper import _a_dead_node_holding_bob, _judging, _refused, _stop


async def _connected(caller: Client, callee: Client, call_id: str, names: tuple[str, str]) -> None:
    await caller.send("call-request", call_request(call_id, *names))
    await callee.expect("call-request", id=call_id)
    answer = {"type": "answer", "sdp": "v=0"}
    await callee.send("call-answer", {"callId": call_id, "to": names[0], "answer": answer})
    await caller.expect("call-answer", callId=call_id)


@contextlib.contextmanager
def _kept_retyped(redis_url: str, key: str) -> Iterator[dict[str, int]]:
    """A Redis client without the key that turns `key` into a string over and over (SET
    replaces a key of any type), in a thread of its own, as fast as Redis answers, until the
    block ends. Yields how many rounds it made."""
    stop, made = threading.Event(), {"rounds": 0}

    def retype() -> None:
        attacker = redis.Redis.from_url(redis_url)
        try:
            while not stop.is_set():
                pipe = attacker.pipeline(transaction=False)
                for _ in range(20):
                    pipe.set(key, "x")
                pipe.execute()
                made["rounds"] += 1
        finally:
            attacker.close()

    thread = threading.Thread(target=retype, daemon=True)
    thread.start()
    try:
        yield made
    finally:
        stop.set()
        thread.join(STEP)


async def _two_calls_by_inboxes(cluster: ClusterHarness) -> tuple[Client, Client, Client, Client]:
    """Links off (every delivery by its target's inbox): alice and dave on node 0, bob on node
    1, carol on node 2; alice in a call with carol, dave with bob."""
    await cluster.start(links=False)
    alice = await cluster.connect("alice", node=0)
    dave = await cluster.connect("dave", node=0)
    bob = await cluster.connect("bob", node=1)
    carol = await cluster.connect("carol", node=2)
    await _connected(alice, carol, "ac", ("alice", "carol"))
    await _connected(dave, bob, "db", ("dave", "bob"))
    return alice, dave, bob, carol


# -- the inbox writer: one retyped target holds up no other ------------------------------------


async def test_an_inbox_kept_retyped_holds_up_no_other_nodes_deliveries(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Links off: every delivery goes by its target's inbox, appended by the sending node's
    one writer thread. A client without the key keeps turning node 1's inbox into a string
    while node 0 sends to node 1 (dave to bob) and to node 2 (alice to carol). The writer used
    to give up on node 1's batch after three removals in a row and back off (up to 2 s at a
    time), and every batch for node 2 waited behind it. Now node 1's inbox is replaced in the
    same script that appends to it, and a target whose appends are refused backs off alone:
    each of alice's candidates reaches carol at once, in order. (The client's thread wins
    some races by itself; to win every one that a removal apart from the append would leave
    open, it also writes right after each removal a writer makes.)"""
    alice, dave, bob, carol = await _two_calls_by_inboxes(cluster)
    # (the harness waits for every node to be quiet after each message a client reads: node 1
    # cannot be while its inbox is retyped, so carol reads without it meanwhile)
    carol.after_receive = None
    slowest = 0.0
    inbox = f"{cluster.name}:in:{node_id(cluster, 1)}"
    remove, racing = DeliveryLine._remove_wrong_type, redis.Redis.from_url(cluster.redis_url)

    def race_won(self: DeliveryLine, client: redis.Redis, key: str) -> None:
        remove(self, client, key)
        if key == inbox and threading.current_thread().name == "callgate-line-writer":
            racing.set(key, "x")  # (its next SET lands before the writer's next append)

    monkeypatch.setattr(DeliveryLine, "_remove_wrong_type", race_won)
    with _kept_retyped(cluster.redis_url, inbox) as made, contextlib.closing(racing):
        await _until(lambda: made["rounds"] > 0)
        for _ in range(20):
            await dave.send("ice-candidate", ice("db", "bob"))
            await trio.sleep(0.01)  # (its own round trip of the writer)
            sent = trio.current_time()
            await alice.send("ice-candidate", ice("ac", "carol"))
            await carol.expect("ice-candidate", callId="ac")
            slowest = max(slowest, trio.current_time() - sent)
    assert slowest < 1.0, slowest  # (about a millisecond; a back-off took up to 2 s)
    monkeypatch.undo()
    # Once the client stops, node 1's reader removes the last string it left: bob's call goes on.
    await _until(lambda: _type(cluster, inbox) != "string")
    carol.after_receive = cluster.in_step
    await _until(lambda: ("inbox", "malformed") in {(e, r) for e, r, _ in _refused(cluster)})
    for running in cluster.nodes:
        assert running.hub.cluster is not None and running.hub.cluster.available
    await dave.send("ice-candidate", {**ice("db", "bob"), "candidate": _numbered(99)})
    while (await bob.expect("ice-candidate"))["data"]["candidate"] != _numbered(99):
        pass  # (what came during the retyping: whatever the client's SETs did not wipe out)
    await alice.send("ice-candidate", ice("ac", "carol"))
    await carol.expect("ice-candidate", callId="ac")


def _type(cluster: ClusterHarness, key: str) -> str:
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        return bytes(client.type(key)).decode()  # type: ignore[arg-type]
    finally:
        client.close()


LAST_ID = "18446744073709551615-18446744073709551615"  # the last id a stream can have


async def test_an_inbox_at_the_last_stream_id_holds_up_nothing_for_good(
    cluster: ClusterHarness,
) -> None:
    """One `XADD <node 1's inbox> 18446744073709551615-18446744073709551615` by a client
    without the key: a stream with the last possible id takes no more appends ("exhausted"),
    and no id follows it. Node 0's writer used to take the refused append for Redis away and
    back off for every target (carol, on node 2, got nothing more), and node 1's reader, once
    it had read that entry, trimmed past it with an id Redis refuses, and backed off for good
    (bob got nothing more, links off). Now the reader removes an inbox it has read to its last
    possible id (nothing can follow), the writer holds only node 1's batches until then: carol
    gets alice's candidates at once, bob gets dave's, each once, in order."""
    alice, dave, bob, carol = await _two_calls_by_inboxes(cluster)
    inbox = f"{cluster.name}:in:{node_id(cluster, 1)}"
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        attacker.xadd(inbox, {"x": "y"}, id=LAST_ID)
    finally:
        attacker.close()
    carol.after_receive = bob.after_receive = None  # (node 0 is not quiet while it holds some)
    slowest = 0.0
    for n in range(5):
        await dave.send("ice-candidate", {**ice("db", "bob"), "candidate": _numbered(n)})
        sent = trio.current_time()
        await alice.send("ice-candidate", ice("ac", "carol"))
        await carol.expect("ice-candidate", callId="ac")
        slowest = max(slowest, trio.current_time() - sent)
    assert slowest < 1.0, slowest
    for n in range(5):  # (STEP bounds each: the writer tries node 1 again within 2 s)
        got = await bob.expect("ice-candidate", callId="db")
        assert got["data"]["candidate"] == _numbered(n)
    carol.after_receive = bob.after_receive = cluster.in_step
    await bob.send("ice-candidate", ice("db", "dave"))
    await dave.expect("ice-candidate", callId="db")
    await alice.send("ice-candidate", ice("ac", "carol"))
    await carol.expect("ice-candidate", callId="ac")  # (in_step: nothing else was sent to bob)
    for running in cluster.nodes:
        assert running.hub.cluster is not None and running.hub.cluster.available


def _numbered(n: int) -> dict[str, Any]:
    candidate = dict(ice("x", "y")["candidate"])
    candidate["candidate"] = f"{candidate['candidate']} n{n}"
    return candidate


# -- the inbox reader alone --------------------------------------------------------------------


async def test_the_reader_alone_removes_its_own_inbox_of_another_type_and_reads_on(
    cluster: ClusterHarness,
) -> None:
    """Links off, nothing on its way to node 1: its inbox made a hash. Node 1's reader meets
    it on its own (no writer appends to it meanwhile): it removes it, node 1 audits it
    (`inbox` `malformed`), and it reads on: a batch appended afterwards reaches bob."""
    await cluster.start(links=False)
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await _connected(alice, bob, "ab", ("alice", "bob"))
    inbox = f"{cluster.name}:in:{node_id(cluster, 1)}"
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        attacker.delete(inbox)
        attacker.hset(inbox, "x", "y")
        await _until(lambda: _type(cluster, inbox) != "hash")
        assert _type(cluster, inbox) == "none"  # (no append since: the reader removed it)
    finally:
        attacker.close()
    await _until(lambda: bool(cluster.captures[1].records("cluster.rejected")))  # (told to trio)
    reader_node = cluster.captures[1].records("cluster.rejected")
    assert [(row["entry"], row["reason"]) for row in reader_node] == [("inbox", "malformed")]
    await alice.send("ice-candidate", ice("ab", "bob"))
    await bob.expect("ice-candidate", callId="ab")
    await bob.send("ice-candidate", ice("ab", "alice"))
    await alice.expect("ice-candidate", callId="ab")
    assert [(e, r) for e, r, _ in _refused(cluster)] == [("inbox", "malformed")]


# -- `nodes` of another type around a burial ---------------------------------------------------


def _members(cluster: ClusterHarness) -> set[str] | None:
    """The members of `nodes` (None: it is not a set)."""
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        if client.type(f"{cluster.name}:nodes") not in (b"set", b"none"):
            return None
        found: Any = client.smembers(f"{cluster.name}:nodes")
        return {bytes(member).decode() for member in found}
    finally:
        client.close()


async def _live_beats(cluster: ClusterHarness, stopped: str, count: int = 2) -> None:
    """Every node but `stopped` has gone through `count` more heartbeats."""
    for running in cluster.nodes:
        node = running.hub.cluster
        assert node is not None
        if node.node_id != stopped:
            beat = node.beats
            await _until(lambda node=node, beat=beat: node.beats > beat + count)


def _all_beat_on(cluster: ClusterHarness, stopped: str) -> None:
    for running in cluster.nodes:
        node = running.hub.cluster
        assert node is not None
        assert node.node_id == stopped or node.available


async def test_nodes_made_a_string_while_a_burial_runs_stops_nothing(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`nodes` made a string by a client without the key while the leader buries a dead node
    (between reading its presence set and telling the others). The burial read it for whom
    to tell (`NodeGone`: nobody, the set reading as empty) and removed the node from it (an
    error: the burial stopped before its `cluster.node_down`, and the node, remembered as
    buried, was never recorded down). Now the burial tells every node it knows, removes a
    `nodes` of another type as if deleted (audited `nodes` `malformed`), and ends: one
    `node_down`, the third node told, the nodes beating and back in a `nodes` set."""
    alice, victim, attacker = await _a_dead_node_holding_bob(cluster)
    leader = cluster.nodes[_judging(cluster)].hub.cluster
    assert leader is not None
    third = next(
        running.hub.cluster
        for running in cluster.nodes
        if running.hub.cluster is not None
        and running.hub.cluster.node_id not in (victim, leader.node_id)
    )
    page = leader.store.presence_page

    async def retyped_meanwhile(node: str, cursor: int) -> tuple[int, dict[str, bytes | None]]:
        found = await page(node, cursor)
        if node == victim:
            attacker.set(f"{cluster.name}:nodes", "x")
        return found

    monkeypatch.setattr(leader.store, "presence_page", retyped_meanwhile)
    try:
        _stop(cluster, victim)
        await _until(lambda: bool(cluster.audit.records("cluster.node_down")))
        await _until(lambda: _members(cluster) == {leader.node_id, third.node_id})
        await _until(lambda: victim in third._gone)  # (NodeGone reached it)
    finally:
        attacker.close()
    [down] = cluster.audit.records("cluster.node_down")
    assert (down["node"], down["devices"]) == (victim, 1)
    _all_beat_on(cluster, victim)
    await _until(lambda: ("nodes", "malformed") in {(e, r) for e, r, _ in _refused(cluster)})
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await alice.expect("call-reject", callId="ab", reason="unavailable")  # bob is gone


async def test_nodes_made_a_hash_right_after_a_burial_stops_nothing(
    cluster: ClusterHarness,
) -> None:
    """Right after a burial, `nodes` made a hash: every node's next beat removes it (read as
    absent) and adds itself again, audited `nodes` `malformed`; nothing crashes, no node is
    taken for dead, and the buried one stays buried (one `node_down`)."""
    alice, victim, attacker = await _a_dead_node_holding_bob(cluster)
    live = {node_id(cluster, i) for i in range(3)} - {victim}
    try:
        _stop(cluster, victim)
        await _until(lambda: bool(cluster.audit.records("cluster.node_down")))
        attacker.delete(f"{cluster.name}:nodes")
        attacker.hset(f"{cluster.name}:nodes", "x", "y")
        await _until(lambda: _members(cluster) == live)
        await _live_beats(cluster, victim)
    finally:
        attacker.close()
    _all_beat_on(cluster, victim)
    assert len(cluster.audit.records("cluster.node_down")) == 1
    await _until(lambda: ("nodes", "malformed") in {(e, r) for e, r, _ in _refused(cluster)})
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await alice.expect("call-reject", callId="ab", reason="unavailable")


# -- timers ------------------------------------------------------------------------------------


def _timer_keys(cluster: ClusterHarness) -> tuple[dict[bytes, float], dict[bytes, bytes]]:
    """The shared timer set and the signed deadlines, as any Redis client reads them."""
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        timers: Any = client.zrange(f"{cluster.name}:timers", 0, -1, withscores=True)
        due: Any = client.hgetall(f"{cluster.name}:timer-due")
        return dict(timers), dict(due)
    finally:
        client.close()


async def test_a_dead_nodes_ring_timer_fires_once_on_another_node_on_time(
    cluster: ClusterHarness,
) -> None:
    """alice's node arms the ring timeout of her call to bob, then stops (killed) before it is
    due. Another node's sweep claims it: it fires once, not before its deadline and within a
    sweep (plus a decision) after it; bob gets `call-end` `timeout`, so does alice when she
    resumes on a third node, and one terminal record is written."""
    ring = 2.0
    await cluster.start(make_settings(calls={"reconnect_grace": 10, "ring_timeout": ring}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    sent = trio.current_time()
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await bob.expect("call-request", id="ab")
    assert len(_timer_keys(cluster)[0]) == 1  # (armed by node 0)
    _stop(cluster, node_id(cluster, 0))
    bob.after_receive = None  # (the harness would wait for the stopped node's inbox)
    await bob.expect("call-end", callId="ab", reason="timeout")
    fired = trio.current_time() - sent
    assert ring - cluster_node.TIMER_GRAIN <= fired < ring + cluster_node.TIMER_SWEEP + 1.0, fired
    bob.after_receive = cluster.in_step
    await _until(lambda: bool(cluster.audit.records("session.held")))
    resumed = await sign_in(cluster, "alice", node=2, resume=alice.session["sessionId"])
    await resumed.expect("session", resumed=True)
    await resumed.expect("call-end", callId="ab", reason="timeout")
    await bob.expect_silence()
    assert [row["event"] for row in terminal_records(cluster)] == ["call.timeout"]
    assert _timer_keys(cluster) == ({}, {})


async def test_a_ring_timer_disarmed_then_put_back_never_fires(cluster: ClusterHarness) -> None:
    """alice's ring timer (armed on node 0) is disarmed by bob's answer on node 1, then the
    call ends. It fires nothing afterwards: not at its old deadline (node 0 still claims
    then, and finds nothing), and not when a client without the key puts back the member
    and the signed deadline it recorded while the call rang (claimed and fired, it names a
    timer no call holds any more: nothing happens, and it is removed)."""
    ring = 1.0
    await cluster.start(make_settings(calls={"ring_timeout": ring}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await bob.expect("call-request", id="ab")
    recorded = _timer_keys(cluster)
    assert len(recorded[0]) == len(recorded[1]) == 1
    answer = {"type": "answer", "sdp": "v=0"}
    await bob.send("call-answer", {"callId": "ab", "to": "alice", "answer": answer})
    await alice.expect("call-answer", callId="ab")
    assert _timer_keys(cluster) == ({}, {})  # disarmed with the answer's commit
    await alice.send("call-end", {"callId": "ab", "to": "bob"})
    await bob.expect("call-end", callId="ab")
    await alice.expect_silence(ring + 2 * cluster_node.TIMER_SWEEP)  # past the old deadline
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        [(member, _)] = recorded[0].items()
        attacker.zadd(f"{cluster.name}:timers", {member: 0})
        attacker.hset(f"{cluster.name}:timer-due", member, recorded[1][member])
        await _until(lambda: _timer_keys(cluster) == ({}, {}))  # claimed, fired: nothing
    finally:
        attacker.close()
    await alice.expect_silence()
    await bob.expect_silence()
    assert [row["event"] for row in terminal_records(cluster)] == ["call.ended"]
    assert not [row for row in cluster.audit.records() if row["event"] == "call.timeout"]


@pytest.mark.parametrize("kind", ["string", "hash", "deleted", "padded"])
async def test_ring_timers_survive_their_set_replaced(cluster: ClusterHarness, kind: str) -> None:
    """Two calls ring (alice to bob, carol to dave); a client without the key replaces the
    shared timer set `timers` with a string or a hash, or deletes it (`padded`: and adds
    members of its own, due in a year, so that the set holds more members than `timer-due`
    signed deadlines). The set held their ring timeouts (its scores say when to claim): they
    were lost, and both calls rang until someone hung up. The signed deadlines (`timer-due`)
    still name them: a claim finds one missing (there are more deadlines than members, or a
    deadline drawn at random has no member), the deadlines are put back in the set at their
    signed time, and both calls time out, on time, once."""
    ring = 1.5
    await cluster.start(make_settings(calls={"ring_timeout": ring}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    carol = await cluster.connect("carol", node=2)
    dave = await cluster.connect("dave", node=0)
    sent = trio.current_time()
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await carol.send("call-request", call_request("cd", "carol", "dave"))
    await bob.expect("call-request", id="ab")
    await dave.expect("call-request", id="cd")
    assert len(_timer_keys(cluster)[0]) == 2
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        key = f"{cluster.name}:timers"
        attacker.delete(key)
        if kind == "string":
            attacker.set(key, "x")
        elif kind == "hash":
            attacker.hset(key, "x", "y")
        elif kind == "padded":
            attacker.zadd(key, {f"pad{i}": time.time() + 365 * 86400 for i in range(8)})
    finally:
        attacker.close()
    for caller, callee, call_id in ((alice, bob, "ab"), (carol, dave, "cd")):
        await caller.expect("call-end", callId=call_id, reason="timeout")
        await callee.expect("call-end", callId=call_id, reason="timeout")
    fired = trio.current_time() - sent
    assert fired < ring + cluster_node.TIMER_SWEEP + 1.5, fired
    assert [row["event"] for row in terminal_records(cluster)] == ["call.timeout"] * 2
    timers, due = _timer_keys(cluster)
    assert due == {} and all(member.startswith(b"pad") for member in timers)
    await _until(lambda: ("timers", "missing") in {(e, r) for e, r, _ in _refused(cluster)})
    if kind in ("string", "hash"):
        assert ("timers", "malformed") in {(e, r) for e, r, _ in _refused(cluster)}


async def test_a_ring_timer_whose_score_is_raised_still_fires_on_time(
    cluster: ClusterHarness,
) -> None:
    """A client without the key raises a ringing call's timer score a year ahead (ZADD XX):
    no claim would take it before then, and the call would ring until a side hung up. Claims
    draw a signed deadline at random and compare its score: this one is put back at its
    deadline (audited `timers` `late`) and the call times out on time, once."""
    ring = 1.5
    await cluster.start(make_settings(calls={"ring_timeout": ring}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    sent = trio.current_time()
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await bob.expect("call-request", id="ab")
    [member] = _timer_keys(cluster)[0]
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        attacker.zadd(f"{cluster.name}:timers", {member: time.time() + 365 * 86400}, xx=True)
    finally:
        attacker.close()
    await alice.expect("call-end", callId="ab", reason="timeout")
    await bob.expect("call-end", callId="ab", reason="timeout")
    fired = trio.current_time() - sent
    assert ring <= fired < ring + cluster_node.TIMER_SWEEP + 1.5, fired
    assert [row["event"] for row in terminal_records(cluster)] == ["call.timeout"]
    await _until(lambda: ("timers", "late") in {(e, r) for e, r, _ in _refused(cluster)})
