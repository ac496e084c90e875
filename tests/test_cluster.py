"""Cluster mode: nodes on a real Redis, with caller and callee on different nodes.

The call scenarios of the core issue also run on three nodes (test_e2e_call.py,
test_e2e_outcomes.py and test_e2e_audit_bound.py set ON_CLUSTER). Here: what only a cluster has,
namely limits shared by nodes, a node killed, frozen or drained mid-call and mid-ring, resuming
on another node, revocation reaching every node, forged, replayed and misrouted deliveries,
Redis keys deleted or overwritten by a client without the key, Redis restarting without its
data, pending and missed calls across nodes, and a node outside a call doing nothing for it.
The record and delivery formats and the slice are also tested directly, without Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from callgate import trail
from callgate.audit import TERMINAL_CALL_EVENTS
from callgate.cluster import node as cluster_node
from callgate.cluster.entries import (
    BadEntry,
    EntryCodec,
    Forget,
    forget_after,
    forgettable,
    heard_time,
    is_from_the_future,
    is_stale,
)
from callgate.cluster.node import ClusterNode, RecordedThrottle, Watch
from callgate.cluster.records import KEEP, BadRecord, RecordCodec, Slice, Timer
from callgate.cluster.store import Store
from callgate.cluster.store import delete_cluster_keys as delete_cluster_keys_async
from callgate.config import ClusterSettings
from callgate.core.actions import Ack, Close, Deliver, SendError
from callgate.core.events import Authenticated, MessageReceived
from callgate.core.policy import CallRules
from callgate.errors import ErrorCode
from callgate.protocol.messages import CallAnswer, CallRequest
from callgate.revocation import RevocationList
from conftest import (
    CANDIDATE,
    CLUSTER_KEY,
    REDIS_URL,
    STEP,
    Client,
    ClusterHarness,
    call_request,
    checked,
    make_settings,
    server_config,
    signed_in,
    start_server_process,
    token_for,
)
from test_webhooks import CALL_STEPS, WEBHOOK_SECRET, Receiver

KEY = CLUSTER_KEY.encode()


def ice(call_id: str, to: str) -> dict[str, Any]:
    return {"callId": call_id, "to": to, "candidate": CANDIDATE}


def answer(call_id: str, to: str) -> dict[str, Any]:
    return {"callId": call_id, "to": to, "answer": {"type": "answer", "sdp": "v=0"}}


async def connected_call(alice: Client, bob: Client, call_id: str = "ab") -> None:
    await alice.send("call-request", call_request(call_id, "alice", "bob"))
    await bob.expect("call-request")
    await bob.send("call-answer", answer(call_id, "alice"))
    await alice.expect("call-answer")


async def call_across_nodes(h: ClusterHarness) -> tuple[Client, Client]:
    """The cluster started, alice on node 0 in a connected call with bob on node 1."""
    await h.start()
    alice = await h.connect("alice", node=0)
    bob = await h.connect("bob", node=1)
    await connected_call(alice, bob)
    return alice, bob


async def sign_in(h: ClusterHarness, user: str, node: int, resume: str | None = None) -> Client:
    """A connection of `user` to node `node` with a bearer token (and a resume id); the test
    reads what comes back."""
    headers = [(b"authorization", f"Bearer {token_for(user)}".encode())]
    if resume is not None:
        headers.append((b"callgate-resume", resume.encode()))
    return await h.open(headers=headers, url=h.node_url(node))


def terminal_records(h: ClusterHarness) -> list[dict[str, Any]]:
    return [row for row in h.audit.records() if row["event"] in TERMINAL_CALL_EVENTS]


def node_id(h: ClusterHarness, index: int) -> str:
    node = h.nodes[index].hub.cluster
    assert node is not None
    return node.node_id


# -- records, deliveries and the slice, without Redis -----------------------------------------


def now_ms() -> int:
    """Now, as a batch's seal time (unix milliseconds)."""
    return int(time.time() * 1000)


def online_nodes(cluster: ClusterHarness, user: str) -> set[str]:
    """The nodes where `user`'s signed record in Redis names an online device."""
    reader = redis.Redis.from_url(cluster.redis_url)
    try:
        raw: Any = reader.get(f"{cluster.name}:u:{user}")
    finally:
        reader.close()
    return set() if raw is None else records(cluster=cluster.name).online_nodes(user, raw)


def append_to_inbox(cluster: ClusterHarness, node: str, fields: dict[bytes, bytes]) -> None:
    """Append a batch to `node`'s inbox as any Redis client can (the key not needed)."""
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        client.xadd(f"{cluster.name}:in:{node}", fields)  # type: ignore[arg-type]
    finally:
        client.close()


def codec(key: bytes = KEY, cluster: str = "c1") -> EntryCodec:
    return EntryCodec(cluster, key)


def records(key: bytes = KEY, cluster: str = "c1") -> RecordCodec:
    return RecordCodec(cluster, key)


def test_a_record_verifies_only_under_its_own_name_key_and_cluster() -> None:
    sealed = records().seal("u:alice", {"devices": [], "missed": [], "calls": ["k1"]})
    assert records().open("u:alice", sealed)["calls"] == ["k1"]
    for name, reader, edited in (
        ("u:bob", records(), sealed),  # moved to another user's key
        ("u:alice", records(key=b"another key, long enough to be one"), sealed),
        ("u:alice", records(cluster="c2"), sealed),
        ("u:alice", records(), sealed.replace(b"k1", b"k2")),
    ):
        with pytest.raises(BadRecord) as refused:
            reader.open(name, edited)
        assert refused.value.reason == "bad_mac"
    garbage = records()._mac("u:alice", b"[1]") + b"[1]"  # genuine MAC, not a record
    with pytest.raises(BadRecord, match="malformed"):
        records().open("u:alice", garbage)


RULES = CallRules(ring_timeout=30)


def device(conn: str, user: str) -> dict[str, Any]:
    return {"conn": conn, "user": user, "sid": f"s-{conn}", "jti": None, "iat": None, "hold": None}


def commit(store: dict[str, bytes | None], writes: Any) -> None:
    """What store.py's commit script does, on a dict."""
    for name, (old, new) in writes.records.items():
        assert (store.get(name) or b"") == old
        if new != KEEP:
            store[name] = new or None


def test_a_slice_decides_with_the_core_and_writes_back_only_what_changed() -> None:
    seal = records().seal
    store: dict[str, bytes | None] = {
        "u:alice": seal(
            "u:alice", {"devices": [device("n1.a", "alice")], "missed": [], "calls": []}
        ),
        "u:bob": seal("u:bob", {"devices": [device("n2.b", "bob")], "missed": [], "calls": []}),
    }
    request = CallRequest("c1", "alice", "bob", "video", call_request("c1", "alice", "bob"))
    sliced = Slice(records(), dict(store), RULES, RecordedThrottle(), (1000, 5, 9))
    actions = sliced.board.handle(MessageReceived("n1.a", request, ref=1), now=100.0)
    assert Deliver("n2.b", "call-request", {**request.data, "from": "alice"}) in actions
    writes = sliced.writes(actions)
    [call_name] = [name for name in writes.records if name.startswith("c:")]
    assert call_name == "c:n1.a.6"  # the slice numbers call keys from its base (5)
    assert writes.timers_started == [(Timer(1001, "alice"), 130.0)]
    assert not writes.present and not writes.absent  # nobody came or went
    commit(store, writes)
    # bob's node decides the answer on the records alice's node wrote.
    answered = Slice(
        records(), {**store, call_name: store[call_name]}, RULES, RecordedThrottle(), (2000, 0, 0)
    )
    actions = answered.board.handle(
        MessageReceived("n2.b", CallAnswer("c1", "alice", answer("c1", "alice"))), 101.0
    )
    assert actions[0] == Deliver("n1.a", "call-answer", {**answer("c1", "alice"), "from": "bob"})
    writes = answered.writes(actions)
    assert writes.timers_done == [Timer(1001, "alice")]  # the ring timer is disarmed
    assert writes.records["u:alice"][1] == KEEP  # the user records did not change
    # A read-only refusal writes nothing at all.
    again = Slice(records(), dict(store), RULES, RecordedThrottle(), (3000, 0, 0))
    refused = again.board.handle(MessageReceived("n1.a", request, ref=2), 102.0)
    assert isinstance(refused[0], SendError) and refused[0].code is ErrorCode.CALL_EXISTS
    assert not again.writes(refused).changes


def test_a_sign_in_records_presence_and_a_tampered_record_stops_the_decision() -> None:
    sliced = Slice(records(), {"u:alice": None}, RULES, RecordedThrottle(), (0, 0, 0))
    actions = sliced.board.handle(Authenticated("n1.a", "alice", "s1"), 1.0)
    writes = sliced.writes(actions)
    assert writes.present == {"n1": {"alice"}}
    forged = records(key=b"a guessed key that is long enough!!").seal("u:alice", {})
    with pytest.raises(BadRecord):
        Slice(records(), {"u:alice": forged}, RULES, RecordedThrottle(), (0, 0, 0))


def test_a_users_record_says_on_which_nodes_they_are_online() -> None:
    """What a burial checks before it spends a decision on a user its dead node's (unsigned)
    presence set lists: the signed record names an online device of that node."""
    held = {**device("n2.b", "alice"), "hold": {"timer": 7, "until": 9.0, "buffer": []}}
    raw = records().seal("u:alice", {"devices": [device("n1.a", "alice"), held], "calls": []})
    assert records().online_nodes("alice", raw) == {"n1"}  # (held on n2: not online there)
    assert records().online_nodes("alice", records().seal("u:alice", {})) == set()
    with pytest.raises(BadRecord):  # another user's record, moved under alice's name
        records().online_nodes("alice", raw.replace(b"alice", b"bob"))
    with pytest.raises(BadRecord):
        records().online_nodes("bob", raw)
    odd = records().seal("u:alice", {"devices": [{"conn": 3, "hold": None}]})
    with pytest.raises(BadRecord):
        records().online_nodes("alice", odd)


def test_delivery_batches_are_signed_for_one_node() -> None:
    orders: list[Any] = [
        (Deliver("n2.b", "ice-candidate", {"callId": "c1", "from": "alice"}), "bob"),
        (Ack("n2.b", 7), None),
        (SendError("n2.b", ErrorCode.FORBIDDEN, "no", "r", None), None),
        (Close("n2.b", 4003, "token revoked"), None),
        (Forget("alice", "c1"), None),
    ]
    fields = codec().seal_delivery("n1", "n2", 5, orders, at=now_ms())
    delivery = codec().open_delivery(fields, "n2")
    assert (delivery.origin, delivery.seq, delivery.orders) == ("n1", 5, orders)
    for reader, target, edited, reason in (
        (codec(), "n3", fields, "misrouted"),  # copied into another node's inbox
        (codec(key=b"another key, long enough to be one"), "n2", fields, "bad_mac"),
        (codec(cluster="c2"), "n2", fields, "bad_mac"),
        (codec(), "n2", {**fields, b"p": fields[b"p"].replace(b"bob", b"eve")}, "bad_mac"),
        (codec(), "n2", {b"p": fields[b"p"]}, "malformed"),
    ):
        with pytest.raises(BadEntry) as refused:
            reader.open_delivery(edited, target)
        assert refused.value.reason == reason


def test_a_batch_says_when_it_was_sealed_and_one_kept_too_long_is_stale() -> None:
    """A batch carries, signed, when its origin sealed it: past MAX_BATCH_AGE it is stale,
    whoever kept it. The time cannot be taken out of a genuine batch (the MAC covers it), and
    a batch of the previous release, which has none, is never stale."""
    ring: Any = [
        (Deliver("n2.b", "ice-candidate", {"callId": "c1"}), "bob"),
        (Ack("n2.b", 1), None),
    ]
    sealed_at = 1_700_000_000_000  # unix ms
    fields = codec().seal_delivery("n1", "n2", 5, ring, at=sealed_at)
    delivery = codec().open_delivery(fields, "n2")
    assert (delivery.at, delivery.messages) == (sealed_at, 1)
    hour = 3600.0
    assert not is_stale(delivery, sealed_at / 1000 + hour, hour)
    assert is_stale(delivery, sealed_at / 1000 + hour + 0.01, hour)
    assert not is_stale(delivery, sealed_at / 1000 - 30, hour)  # a clock behind the origin's
    undated = codec().open_delivery(codec().seal_delivery("n1", "n2", 5, ring, at=None), "n2")
    assert undated.at is None and not is_stale(undated, sealed_at / 1000 + 100 * hour, hour)
    stripped = {**fields, b"p": fields[b"p"].replace(b',"at":%d' % sealed_at, b"")}
    assert stripped[b"p"] != fields[b"p"]
    with pytest.raises(BadEntry) as refused:
        codec().open_delivery(stripped, "n2")
    assert refused.value.reason == "bad_mac"
    with pytest.raises(BadEntry) as refused:  # signed, but not a time: a broken node
        codec().open_delivery(codec().seal_delivery("n1", "n2", 5, ring, at=True), "n2")
    assert refused.value.reason == "malformed"


def test_an_origin_is_forgotten_only_once_a_copy_of_its_batches_would_be_stale() -> None:
    """A node forgets an origin's number once it carried out no batch of it for twice the
    batch age (a margin as long again for the clocks): any batch it did carry out, sealed
    before that, is stale by then, so a recorded one appended again is still refused."""
    hour = 3600.0
    heard = {"n1": 10_000.0, "n2": 10_000.0 + hour, "n3": 10_000.0 + 2 * hour}
    assert forget_after(hour) == 2 * hour
    assert forgettable(heard, 10_000.0 + 2 * hour, hour) == []
    assert forgettable(heard, 10_000.0 + 2 * hour + 1, hour) == ["n1"]
    assert forgettable(heard, 10_000.0 + 3 * hour + 1, hour) == ["n1", "n2"]
    # The last batch carried out from n1, sealed then on a clock up to an hour ahead of this
    # node's: stale when n1 is forgotten.
    for skew in (0.0, 600.0, hour - 1):
        last = codec().seal_delivery("n1", "n2", 9, [], at=int((10_000.0 + skew) * 1000))
        delivery = codec().open_delivery(last, "n2")
        assert is_stale(delivery, 10_000.0 + 2 * hour + 1, hour)


def test_a_batch_from_a_clock_far_ahead_is_refused_and_any_other_is_stale_once_forgotten() -> None:
    """The sender's clock may run ahead of this node's. Up to MAX_BATCH_AGE ahead its batch is
    carried out, and its sender counts as heard from at the batch's own time, so a copy of it
    is stale the moment the sender is forgotten, whatever the skew; further ahead it is
    refused (`future`): it would stay fresh for as long as that clock was wrong."""
    hour, now = 3600.0, 10_000.0
    for skew in (-600.0, 0.0, 600.0, hour - 1, hour, hour + 1, 5 * hour, 1e6):
        sealed = codec().seal_delivery("n1", "n2", 9, [], at=int((now + skew) * 1000))
        delivery = codec().open_delivery(sealed, "n2")
        assert is_from_the_future(delivery, now, hour) == (skew > hour), skew
        if skew > hour:
            continue
        heard = {"n1": heard_time(delivery, now)}
        assert heard["n1"] == max(now, now + skew)  # (on its own: safe even past the margin)
        forgotten = heard["n1"] + forget_after(hour) + 0.001
        assert forgettable(heard, forgotten, hour) == ["n1"]
        assert is_stale(delivery, forgotten, hour), skew
    undated = codec().open_delivery(codec().seal_delivery("n1", "n2", 9, [], at=None), "n2")
    assert not is_from_the_future(undated, now, hour) and heard_time(undated, now) == now


# -- three nodes on Redis ----------------------------------------------------------------------


async def test_call_limits_are_counted_across_nodes(cluster: ClusterHarness) -> None:
    await cluster.start(make_settings(limits={"call_request": "2/minute"}))
    # alice's three devices are on three nodes; bob is offline, so each request is answered.
    devices = [await cluster.connect("alice", node=node) for node in range(3)]
    for index, device in enumerate(devices[:2]):
        await device.send("call-request", call_request(f"c{index}", "alice", "bob"))
        await device.expect("call-reject", reason="unavailable")
    await devices[2].send("call-request", call_request("c2", "alice", "bob"), ref=1)
    error = await devices[2].expect_error("rate_limited", ref=1)
    assert error["data"]["retryAfter"] >= 1
    assert len(cluster.audit.records("call.rate_limited")) == 1


async def test_revocation_on_one_node_reaches_every_node(cluster: ClusterHarness) -> None:
    alice, bob = await call_across_nodes(cluster)
    cluster.nodes[0].hub.apply_revocations(RevocationList(users={"bob": 2**40}))
    await bob.expect_closed(4003, "token revoked")
    await alice.expect("call-end", reason="revoked")
    # A node that never read the revocation file refuses bob too.
    refused = await sign_in(cluster, "bob", node=2)
    await refused.expect_closed(4003, "token revoked")
    assert [row["reason"] for row in terminal_records(cluster)] == ["revoked"]


async def test_a_device_resumes_its_call_on_another_node(cluster: ClusterHarness) -> None:
    await cluster.start(make_settings(calls={"reconnect_grace": 10}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob)
    session_id = bob.session["sessionId"]
    await bob.ws.aclose()
    await bob.stream.aclose()
    with trio.fail_after(STEP):
        while not cluster.audit.records("session.held"):
            await trio.sleep(0.01)
    await alice.send("ice-candidate", ice("ab", "bob"))  # buffered for the held device
    again = await sign_in(cluster, "bob", node=2, resume=session_id)
    session = await again.expect("session", resumed=True)
    assert session["data"]["connectionId"].startswith(node_id(cluster, 2))
    await again.expect("ice-candidate", callId="ab")
    await again.send("call-end", {"callId": "ab", "to": "alice"})
    await alice.expect("call-end", callId="ab")
    [ended] = terminal_records(cluster)
    assert (ended["event"], ended["reason"]) == ("call.ended", "hangup")


async def test_a_batch_held_longer_than_max_batch_age_is_refused_as_stale(
    cluster: ClusterHarness,
) -> None:
    """A genuine batch sealed more than MAX_BATCH_AGE (an hour) ago, as a writer would hold it
    through a Redis outage that long, is carried out in no way: refused as stale, and audited
    with the messages for devices it held (none reaches a buffer: it could be a replay)."""
    await cluster.start(links=False)
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob)
    sender, target = node_id(cluster, 0), node_id(cluster, 1)
    late: Any = [(Deliver(bob.conn, "ice-candidate", ice("ab", "bob")), "bob")] * 2
    hours_ago = now_ms() - int(cluster_node.MAX_BATCH_AGE * 1000) - 60_000
    held = codec(cluster=cluster.name).seal_delivery(sender, target, 10**9, late, at=hours_ago)
    append_to_inbox(cluster, target, held)
    await _until(lambda: bool(cluster.audit.records("cluster.rejected")))
    await bob.expect_silence()
    [row] = cluster.audit.records("cluster.rejected")
    assert (row["node"], row["reason"], row["dropped_messages"]) == (target, "stale", 2)
    await alice.send("ice-candidate", ice("ab", "bob"))  # node 0's next batch: carried out
    await bob.expect("ice-candidate", callId="ab")


async def test_forged_replayed_and_misrouted_deliveries_are_refused_and_audited(
    cluster: ClusterHarness,
) -> None:
    await cluster.start(links=False)  # every batch in the inboxes (links: the test below)
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob)  # node 0 has sent node 1 a batch or more by now
    sender, target = node_id(cluster, 0), node_id(cluster, 1)
    ring = (Deliver(bob.conn, "call-request", call_request("x", "alice", "bob")), "bob")
    genuine = codec(cluster=cluster.name)
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        inbox = f"{cluster.name}:in:{target}"
        # Someone with access to Redis but not the cluster key "rings" bob as alice,
        forged = codec(key=b"a guessed key that is long enough!!", cluster=cluster.name)
        client.xadd(inbox, forged.seal_delivery(sender, target, 10**9, [ring], at=now_ms()))  # type: ignore[arg-type]
        # replays a genuine batch (numbered 1: node 0 sent that one long ago),
        client.xadd(inbox, genuine.seal_delivery(sender, target, 1, [ring], at=now_ms()))  # type: ignore[arg-type]
        # and copies a genuine batch meant for node 2 into node 1's inbox.
        other = genuine.seal_delivery(sender, node_id(cluster, 2), 10**9, [ring], at=now_ms())
        client.xadd(inbox, other)  # type: ignore[arg-type]
    finally:
        client.close()
    with trio.fail_after(STEP):
        while len(cluster.audit.records("cluster.rejected")) < 3:
            await trio.sleep(0.01)
    rows = cluster.audit.records("cluster.rejected")
    assert sorted(row["reason"] for row in rows) == ["bad_mac", "misrouted", "replayed"]
    assert {row["node"] for row in rows} == {target}  # only the node whose inbox it was
    scraped = cluster.nodes[1].hub.metrics.exposition().decode()
    assert 'callgate_cluster_rejected_total{reason="bad_mac"} 1.0' in scraped
    await bob.expect_silence()
    await alice.send("ice-candidate", ice("ab", "bob"))
    await bob.expect("ice-candidate", callId="ab")


# -- a node killed mid-call (a real process, SIGKILL) ----------------------------------------


def _cluster_env(h: ClusterHarness, grace: float) -> dict[str, str]:
    return {
        "CALLGATE_CLUSTER_ENABLED": "true",
        "CALLGATE_CLUSTER_REDIS_URL": h.redis_url,
        "CALLGATE_CLUSTER_NAME": h.name,
        "CALLGATE_CLUSTER_KEY": CLUSTER_KEY,
        "CALLGATE_CLUSTER_NODE_NAME": "doomed",
        "CALLGATE_CLUSTER_HEARTBEAT_INTERVAL": "0.2",
        "CALLGATE_CLUSTER_NODE_TIMEOUT": "1.0",
        "CALLGATE_CALLS_RECONNECT_GRACE": str(grace),
    }


@pytest.mark.parametrize("grace", [0, 10])
async def test_a_node_killed_mid_call(
    cluster: ClusterHarness, nursery: trio.Nursery, tmp_path: Path, grace: float
) -> None:
    """Without grace the survivor's side ends `peer_disconnected`; with it, bob resumes."""
    await cluster.start(make_settings(calls={"reconnect_grace": grace}))
    process, url = await start_server_process(server_config(tmp_path), _cluster_env(cluster, grace))
    try:
        alice = await cluster.connect("alice", node=0)
        bob = await signed_in(nursery, url, token_for("bob"))
        cluster.clients.append(bob)
        await connected_call(alice, bob)
        killed_at = trio.current_time()
        process.kill()
        await process.wait()
        if grace == 0:
            with trio.fail_after(STEP):
                await alice.expect("call-end", callId="ab", reason="peer_disconnected")
            # bob's presence went with the node: he no longer rings anywhere.
            await alice.send("call-request", call_request("ab2", "alice", "bob"))
            await alice.expect("call-reject", callId="ab2", reason="unavailable")
        else:
            await _until(lambda: bool(cluster.audit.records("session.held")))
            again = await sign_in(cluster, "bob", node=1, resume=bob.session["sessionId"])
            await again.expect("session", resumed=True)
            await alice.send("ice-candidate", ice("ab", "bob"))
            await again.expect("ice-candidate", callId="ab")
        # Bounded: node_timeout (1 s) plus a heartbeat, with room for a slow machine.
        assert trio.current_time() - killed_at < STEP
        await _until(lambda: bool(cluster.audit.records("cluster.node_down")))
        [down] = cluster.audit.records("cluster.node_down")
        assert down["node"].startswith("doomed-") and down["devices"] == 1
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if grace == 0:
        ended, unavailable = terminal_records(cluster)
        assert (ended["reason"], ended["answered"]) == ("peer_disconnected", True)
        assert unavailable["event"] == "call.unavailable"


async def test_a_node_killed_mid_ring_its_timers_still_fire_on_time(
    cluster: ClusterHarness, tmp_path: Path
) -> None:
    """The caller's node dies while bob's phone rings: the ring timeout, armed by the dead
    node, fires on a survivor, once, and the caller hears of it when it resumes."""
    await cluster.start(make_settings(calls={"reconnect_grace": 10, "ring_timeout": 2.0}))
    env = {**_cluster_env(cluster, 10), "CALLGATE_CALLS_RING_TIMEOUT": "2.0"}
    process, url = await start_server_process(server_config(tmp_path), env)
    try:
        alice = await signed_in(cluster.nursery, url, token_for("alice"))
        cluster.clients.append(alice)
        bob = await cluster.connect("bob", node=0)
        await alice.send("call-request", call_request("ab", "alice", "bob"))
        await bob.expect("call-request", id="ab")
        requested_at = trio.current_time()
        process.kill()
        await process.wait()
        await bob.expect("call-end", callId="ab", reason="timeout")
        # On time: the deadline, plus the timer poll and a slow machine's slack, never a
        # second ring timeout.
        assert trio.current_time() - requested_at < 2.0 + STEP
        again = await sign_in(cluster, "bob", node=2)  # anyone can still call bob
        await again.expect("session")
        await _until(lambda: bool(cluster.audit.records("session.held")))
        resumed = await sign_in(cluster, "alice", node=1, resume=alice.session["sessionId"])
        await resumed.expect("session", resumed=True)
        await resumed.expect("call-end", callId="ab", reason="timeout")
        assert [row["event"] for row in terminal_records(cluster)] == ["call.timeout"]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_frozen_node_loses_no_message(cluster: ClusterHarness, tmp_path: Path) -> None:
    """SIGSTOP the node that holds bob: what alice sends meanwhile waits in his resume buffer,
    wherever he resumes; the node, woken, learns it was declared dead and lets go. The beat
    that told it so added its old id to `nodes` again: that id is removed again, quietly (it
    woke within the time a burial is remembered), and not buried twice."""
    await cluster.start(make_settings(calls={"reconnect_grace": 10}))
    process, url = await start_server_process(server_config(tmp_path), _cluster_env(cluster, 10))
    try:
        alice = await cluster.connect("alice", node=0)
        bob = await signed_in(cluster.nursery, url, token_for("bob"))
        cluster.clients.append(bob)
        await connected_call(alice, bob)
        process.send_signal(signal.SIGSTOP)
        for index in range(3):  # before and after the cluster declares the node dead
            await alice.send("ice-candidate", {**ice("ab", "bob"), "n": index}, ref=index)
            assert (await alice.expect("ack"))["ref"] == index
            await trio.sleep(0.5)
        await _until(lambda: bool(cluster.audit.records("cluster.node_down")))
        again = await sign_in(cluster, "bob", node=1, resume=bob.session["sessionId"])
        await again.expect("session", resumed=True)
        # All three, each once. Their order is not promised across a node's death: one that
        # reached the dead inbox after it was handed over comes by the leader's sweep.
        got = [await again.expect("ice-candidate", callId="ab") for _ in range(3)]
        assert sorted(message["data"]["n"] for message in got) == [0, 1, 2]
        process.send_signal(signal.SIGCONT)
        # The woken node finds its death verdict and closes what it held.
        await bob.expect_closed(1001, "node left the cluster")
        await again.send("call-end", {"callId": "ab", "to": "alice"})
        await alice.expect("call-end", callId="ab")
        assert [row["reason"] for row in terminal_records(cluster)] == ["hangup"]
        # The beat that told it (if its keeper, not a link, heard first) came before that
        # close, and may have added the old id again: within the 30 s a burial is remembered.
        doomed = bob.session["connectionId"].partition(".")[0]
        reader = redis.Redis.from_url(cluster.redis_url)
        try:
            await _until(lambda: not reader.sismember(f"{cluster.name}:nodes", doomed))
        finally:
            reader.close()
        assert len(cluster.audit.records("cluster.node_down")) == 1
        assert [(r["entry"], r["reason"]) for r in cluster.audit.records("cluster.rejected")] == []
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_of_two_decisions_on_the_same_records_only_the_first_commits() -> None:
    """Glare with no luck in the timing: both nodes read the same records and decide, each its
    own call; the store's compare-and-set lets one commit, and the other must decide again
    (and then finds the first call: glare)."""
    name = f"test-{os.urandom(4).hex()}"
    seal = records(cluster=name).seal
    async with Store(REDIS_URL, name) as store:
        try:
            for user, conn in (("alice", "n1.a"), ("bob", "n2.b")):
                record = {"devices": [device(conn, user)], "missed": [], "calls": []}
                await store.put(f"u:{user}", seal(f"u:{user}", record))
            raw = await store.load(["alice", "bob"])
            decided = []
            for conn, caller, callee, call_id in (
                ("n1.a", "alice", "bob", "a-b"),
                ("n2.b", "bob", "alice", "b-a"),
            ):
                request = CallRequest(
                    call_id, caller, callee, "video", call_request(call_id, caller, callee)
                )
                sliced = Slice(records(cluster=name), raw, RULES, RecordedThrottle(), (9, 9, 9))
                actions = sliced.board.handle(MessageReceived(conn, request), 1.0)
                decided.append(sliced.writes(actions))
                decided[-1].sign_timers(codec().seal_timer_due)
            assert [await store.commit(writes) for writes in decided] == [True, False]
            # Decided again on what is there now: the second request meets the first call.
            again = Slice(
                records(cluster=name),
                await store.load(["bob", "alice"]),
                RULES,
                RecordedThrottle(),
                (7, 7, 7),
            )
            request = CallRequest(
                "b-a", "bob", "alice", "video", call_request("b-a", "bob", "alice")
            )
            actions = again.board.handle(MessageReceived("n2.b", request), 2.0)
            assert any(
                isinstance(a, Deliver) and a.event == "call-reject" and a.data["reason"] == "glare"
                for a in actions
            )
        finally:
            await delete_cluster_keys_async(REDIS_URL, name)


async def test_glare_from_two_nodes_at_once(cluster: ClusterHarness) -> None:
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    async with trio.open_nursery() as nursery:  # both frames leave before either is decided
        nursery.start_soon(alice.send, "call-request", call_request("a-b", "alice", "bob"))
        nursery.start_soon(bob.send, "call-request", call_request("b-a", "bob", "alice"))
    await _until(lambda: bool(cluster.audit.records("call.busy")))
    [busy] = cluster.audit.records("call.busy")
    # Whichever was decided first rings; the other is told glare, and rings for the first.
    loser, winner = (alice, bob) if busy["caller"] == "alice" else (bob, alice)
    got = sorted([(await loser.recv())["event"], (await loser.recv())["event"]])
    assert got == ["call-reject", "call-request"]
    await winner.expect_silence()

    assert busy["reason"] == "glare"
    assert len(cluster.audit.records("call.ringing")) == 1


async def test_pending_and_missed_calls_across_nodes(cluster: ClusterHarness) -> None:
    """ "notify" mode in a cluster: a pending call rings the device that signs in on another
    node; a missed call is shown once, at the next sign-in, on any node."""
    settings = make_settings(calls={"offline": "notify", "ring_timeout": 1.0, "missed_calls": 5})
    await cluster.start(settings)
    alice = await cluster.connect("alice", node=0)
    await alice.send("call-request", call_request("p1", "alice", "bob"))
    await alice.expect("call-pending", callId="p1")
    bob = await cluster.connect("bob", node=2)
    await bob.expect("call-request", id="p1")
    await alice.expect("call-ringing", callId="p1")
    await bob.send("call-answer", answer("p1", "alice"))
    await alice.expect("call-answer", callId="p1")
    await alice.send("ice-candidate", ice("p1", "bob"))
    await bob.expect("ice-candidate", callId="p1")
    await bob.send("call-end", {"callId": "p1", "to": "alice"})
    await alice.expect("call-end", callId="p1")
    # Nobody of carol's comes within the ring timeout: unavailable, and a missed call.
    await alice.send("call-request", call_request("p2", "alice", "carol"))
    await alice.expect("call-pending", callId="p2")
    await alice.expect("call-reject", callId="p2", reason="unavailable")
    carol = await cluster.connect("carol", node=1)
    missed = await carol.expect("missed-calls")
    [entry] = missed["data"]["calls"]
    assert (entry["callId"], entry["from"], entry["reason"]) == ("p2", "alice", "unavailable")
    await carol.send("missed-calls-ack", {"ids": [entry["id"]]}, ref=1)
    assert (await carol.expect("ack"))["ref"] == 1
    later = await cluster.connect("carol", node=2)
    await later.expect_silence()
    assert [r["event"] for r in terminal_records(cluster)] == ["call.ended", "call.unavailable"]
    assert len(cluster.audit.records("call.missed")) == 1


# -- Redis restarted mid-call (a private redis-server, so the shared one is left alone) ------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        pytest.skip("redis-server is not installed")
    port = _free_port()
    processes: list[subprocess.Popen[bytes]] = []
    yield port, processes
    for process in processes:
        process.kill()
        process.wait()


def _start_redis(
    port: int, processes: list[subprocess.Popen[bytes]], tmp: Path, *, persist: bool = False
) -> None:
    """A private redis-server in `tmp`: without persistence, or with an append-only file that
    is written at every command (a restart then keeps everything)."""
    server = shutil.which("redis-server") or "redis-server"
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    if persist:
        command += ["--appendonly", "yes", "--appendfsync", "always"]
    else:
        command += ["--appendonly", "no"]
    processes.append(
        subprocess.Popen(command, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    )


async def _cluster_on_private_redis(
    nursery: trio.Nursery,
    port: int,
    processes: list[subprocess.Popen[bytes]],
    tmp: Path,
    *,
    persist: bool,
) -> ClusterHarness:
    """A test cluster (not started) on a private redis-server the test may stop and restart."""
    _start_redis(port, processes, tmp, persist=persist)
    await _wait_for_redis(port)
    return ClusterHarness(nursery, redis_url=f"redis://127.0.0.1:{port}/0")


async def _wait_for_redis(port: int) -> None:
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    try:
        with trio.fail_after(STEP):
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    await trio.sleep(0.05)
    finally:
        client.close()


async def beats(cluster: ClusterHarness, count: int = 2) -> None:
    """Every node has gone through `count` more heartbeats (and the checks they make)."""
    for node in cluster.nodes:
        kept = node.hub.cluster
        assert kept is not None
        beat = kept.beats
        await _until(lambda kept=kept, beat=beat: kept.beats > beat + count)


async def _until(predicate: Any) -> None:
    with trio.fail_after(STEP):
        while not predicate():
            await trio.sleep(0.02)


def marks(cluster: ClusterHarness, node: str) -> dict[str, int]:
    """Per origin, the last batch `node` carried out, as its heartbeat in Redis says (signed)."""
    reader = redis.Redis.from_url(cluster.redis_url)
    try:
        raw: Any = reader.get(f"{cluster.name}:hb:{node}")
        beat = codec(cluster=cluster.name).heartbeat(raw, node)
    finally:
        reader.close()
    return {} if beat is None else beat.done


async def test_a_heartbeat_names_no_node_long_dead(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node ids are new with every process, and a heartbeat says, per origin, the last batch
    the node carried out. Nodes come and go (here three, each with a call to bob's node, each
    stopped and declared dead): once none of theirs came for twice MAX_BATCH_AGE (an hour;
    here a second), bob's node forgets them, its numbers, the verdict and the link peer, and
    its heartbeat names only nodes heard from lately."""
    monkeypatch.setattr(cluster_node, "MAX_BATCH_AGE", 1.0)
    await cluster.start()
    bob = await cluster.connect("bob", node=1)
    keeper = cluster.nodes[1].hub.cluster
    assert keeper is not None
    # A node it sent to and never heard was declared dead (no NodeGone reached it): its peer.
    keeper.links.send("ghost-0a0b0c", Forget("nobody", "none"), None)
    await _until(lambda: keeper.links.batches_inboxed > 0)
    gone: list[str] = ["ghost-0a0b0c"]
    for round_ in range(3):
        await cluster.add_node()
        index = len(cluster.nodes) - 1
        caller = await cluster.connect(f"caller{round_}", node=index)
        await caller.send("call-request", call_request(f"c{round_}", f"caller{round_}", "bob"))
        await bob.expect("call-request", id=f"c{round_}")
        gone.append(node_id(cluster, index))
        await _until(lambda: gone[-1] in marks(cluster, keeper.node_id))  # heard from it
        cluster._running[index][0].cancel()  # it stops: declared dead, its call ends
        await bob.expect("call-end", callId=f"c{round_}", reason="peer_disconnected")
        await _until(lambda: gone[-1] in keeper._gone)
    assert len(cluster.audit.records("cluster.node_down")) == 3
    live = {node_id(cluster, index) for index in range(3)}
    await _until(lambda: not set(gone) & (set(keeper._gone) | set(keeper.links._peers)))
    await _until(lambda: set(marks(cluster, keeper.node_id)) <= live)


async def test_a_node_of_the_previous_release_is_heard_and_never_forgotten(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rolling upgrade: a node of the previous release (the same VERSION) seals batches
    without the time. They are carried out as ever, and its number is never forgotten: a
    recorded batch of it, appended again, could not be told stale, only a replay. A node of
    this release, heard from later and silent since, is forgotten."""
    monkeypatch.setattr(cluster_node, "MAX_BATCH_AGE", 1.0)
    await cluster.start(links=False)
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    target, new = node_id(cluster, 1), node_id(cluster, 0)
    old = "old-release-0a1b2c"
    candidate: Any = [(Deliver(bob.conn, "ice-candidate", ice("x", "bob")), "bob")]
    undated = codec(cluster=cluster.name).seal_delivery(old, target, 7, candidate, at=None)
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        client.xadd(f"{cluster.name}:in:{target}", undated)  # type: ignore[arg-type]
        await bob.expect("ice-candidate", callId="x")
        await _until(lambda: old in marks(cluster, target))
        await connected_call(alice, bob)  # node 0, of this release, heard from after it
        await _until(lambda: new in marks(cluster, target))
        await _until(lambda: new not in marks(cluster, target))  # silent for 2 s: forgotten
        assert marks(cluster, target)[old] == 7  # heard from before it, and kept
        client.xadd(f"{cluster.name}:in:{target}", undated)  # type: ignore[arg-type]
        await _until(lambda: bool(cluster.audit.records("cluster.rejected")))
    finally:
        client.close()
    [row] = cluster.audit.records("cluster.rejected")
    assert (row["node"], row["reason"]) == (target, "replayed")
    await bob.expect_silence()


async def test_redis_restarted_without_its_data_mid_call(
    nursery: trio.Nursery,
    private_redis: tuple[int, list[subprocess.Popen[bytes]]],
    tmp_path: Path,
) -> None:
    """While Redis is away, what needs it is refused clearly; when it comes back empty, the
    call whose state it lost ends for both sides with a reason, and calling works again."""
    port, processes = private_redis
    h = await _cluster_on_private_redis(nursery, port, processes, tmp_path, persist=False)
    async with checked(h):
        alice, bob = await call_across_nodes(h)
        processes[0].kill()
        processes[0].wait()
        await _until(lambda: not any(node.hub.ready for node in h.nodes))
        # Without Redis: the connections stay open; what needs the cluster is refused clearly.
        await alice.send("call-request", call_request("cd", "alice", "carol"), ref=2)
        error = await alice.expect_error("rate_limited", ref=2)
        assert "cluster unavailable" in error["data"]["message"]
        _start_redis(port, processes, tmp_path)
        await _wait_for_redis(port)
        # Both sides learn that the call is gone, each from its own node.
        await alice.expect("call-end", callId="ab", reason="state_lost", **{"from": "bob"})
        await bob.expect("call-end", callId="ab", reason="state_lost", **{"from": "alice"})
        await _until(lambda: all(node.hub.ready for node in h.nodes))
        [ended] = terminal_records(h)  # one record for the call, by the caller's node
        assert (ended["event"], ended["reason"], ended["answered"]) == (
            "call.ended",
            "state_lost",
            True,
        )
        # The devices registered again: a new call across nodes works, and rings.
        await alice.send("call-request", call_request("ef", "alice", "bob"))
        await bob.expect("call-request", id="ef")


async def test_a_redis_that_stops_answering_is_unavailable_not_a_crash(
    nursery: trio.Nursery,
    private_redis: tuple[int, list[subprocess.Popen[bytes]]],
    tmp_path: Path,
) -> None:
    """A frozen Redis (no refusal, no answer: a stalled or partitioned server) is one that is
    away: the client library's own timeout ends each wait, every node stays up with its
    connections, what needs the cluster is refused clearly, and all goes on once it answers."""
    port, processes = private_redis
    h = await _cluster_on_private_redis(nursery, port, processes, tmp_path, persist=True)
    async with checked(h):
        alice, bob = await call_across_nodes(h)
        processes[0].send_signal(signal.SIGSTOP)
        try:
            with trio.fail_after(6 * STEP):  # the library waits 5 s for an answer, and retries
                while any(node.hub.ready for node in h.nodes):
                    await trio.sleep(0.05)
            await alice.send("call-request", call_request("cd", "alice", "carol"), ref=2)
            error = await alice.expect_error("rate_limited", ref=2)
            assert "cluster unavailable" in error["data"]["message"]
        finally:
            processes[0].send_signal(signal.SIGCONT)
        with trio.fail_after(6 * STEP):
            while not all(node.hub.ready for node in h.nodes):
                await trio.sleep(0.05)
        await alice.send("ice-candidate", ice("ab", "bob"))
        await bob.expect("ice-candidate", callId="ab")
        await bob.send("call-end", {"callId": "ab", "to": "alice"})  # decided on Redis again
        await alice.expect("call-end", callId="ab", reason=None)


async def test_a_decision_whose_redis_call_times_out_is_refused_and_a_disconnect_retried(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis not answering a decision in time (the client library's TimeoutError) is Redis
    away: the sender is told `rate_limited` with its ref, and a disconnect is decided later,
    not dropped (its device would stay online for good, and calls would ring it)."""
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    timeouts = 0
    for node in (cluster.nodes[0], cluster.nodes[1]):
        kept = node.hub.cluster
        assert kept is not None
        real_load = kept.store.load

        async def load_once_late(users: list[str], real_load: Any = real_load) -> Any:
            nonlocal timeouts
            if timeouts < 2:  # one decision on each node
                timeouts += 1
                raise TimeoutError("EVALSHA timed out after 5.0 seconds")
            return await real_load(users)

        monkeypatch.setattr(kept.store, "load", load_once_late)
    await alice.send("call-request", call_request("cd", "alice", "carol"), ref=5)
    error = await alice.expect_error("rate_limited", ref=5)
    assert "cluster unavailable" in error["data"]["message"]
    await bob.ws.aclose()  # its node's first try to decide this times out
    await _until(lambda: timeouts == 2)
    # Each node is available again with its next heartbeat (or the retried disconnect), and
    # bob's disconnect, retried, is decided.
    await _until(lambda: all(n.hub.cluster and n.hub.cluster.available for n in cluster.nodes))
    await _until(lambda: online_nodes(cluster, "bob") == set())
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await alice.expect("call-reject", callId="ab", reason="unavailable")


async def test_a_decision_whose_commit_reply_is_lost_is_carried_out_if_redis_ran_it(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis ran a commit, and the connection dropped before its reply: the node asks whether
    the commit took effect, and it did, so the decision is carried out. A ring timeout whose
    commit removed the call and its timer still reaches both sides, with its one record."""
    from coredis.exceptions import ConnectionError as RedisConnectionError

    await cluster.start(make_settings(calls={"ring_timeout": 1.0}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    lost: list[str] = []
    for running in cluster.nodes:
        node = running.hub.cluster
        assert node is not None

        async def commit(writes: Any, node: Any = node, real: Any = node.store.commit) -> bool:
            applied = bool(await real(writes))
            if applied and writes.timers_done and not writes.timers_started and not lost:
                lost.append(node.node_id)  # the timer's firing: run, then its reply lost
                raise RedisConnectionError("Connection lost while receiving response")
            return applied

        monkeypatch.setattr(node.store, "commit", commit)
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await bob.expect("call-request", id="ab")
    await alice.expect("call-end", callId="ab", reason="timeout")
    await bob.expect("call-end", callId="ab", reason="timeout")
    assert lost
    assert [row["event"] for row in terminal_records(cluster)] == ["call.timeout"]


async def test_a_disconnect_that_finds_its_lane_full_waits_and_is_decided(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full lane refuses a message (its sender is told to retry) but never drops a
    disconnect, which nobody would retry: it waits for room, and its device is let go."""
    monkeypatch.setattr(cluster_node, "LANES", 1)  # every user in one lane ...
    monkeypatch.setattr(cluster_node, "LANE_QUEUE", 1)  # ... of one job
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    carol = await cluster.connect("carol", node=1)
    node = cluster.nodes[1].hub.cluster
    assert node is not None
    slow = trio.Event()

    async def held_load(users: list[str], real_load: Any = node.store.load) -> Any:
        await slow.wait()
        return await real_load(users)

    monkeypatch.setattr(node.store, "load", held_load)
    room = node._waiting_room
    assert room is not None
    waiting = len(room.child_tasks)
    await carol.send("user-connected", "carol", ref=1)  # decided first: it holds the lane
    await carol.send("user-connected", "carol", ref=2)  # queued: the lane is full now
    await bob.ws.aclose()  # its disconnect finds the lane full, and waits for room
    await _until(lambda: len(room.child_tasks) == waiting + 1)
    slow.set()
    assert [(await carol.expect("ack"))["ref"] for _ in range(2)] == [1, 2]
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await alice.expect("call-reject", callId="ab", reason="unavailable")


async def test_a_candidate_that_cannot_be_sent_on_is_refused_not_acked(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_OUTBOX orders waiting (Redis away long, links down) a candidate for another
    node could not be sent: its sender gets `rate_limited`, never an `ack` for a message that
    is then dropped."""
    alice, bob = await call_across_nodes(cluster)
    monkeypatch.setattr(cluster_node, "MAX_OUTBOX", 0)  # as if that many were waiting
    await alice.send("ice-candidate", ice("ab", "bob"), ref=7)
    error = await alice.expect_error("rate_limited", ref=7)
    assert "cluster unavailable" in error["data"]["message"]
    offer = {"type": "offer", "sdp": "v=0 restart"}
    await alice.send("call-renegotiate", {"callId": "ab", "to": "bob", "description": offer}, ref=9)
    await alice.expect_error("rate_limited", ref=9)
    await bob.expect_silence()
    assert cluster.audit.records("call.renegotiated") == []  # not sent, so not audited as sent
    monkeypatch.setattr(cluster_node, "MAX_OUTBOX", 100_000)
    await alice.send("ice-candidate", ice("ab", "bob"), ref=8)
    assert (await alice.expect("ack"))["ref"] == 8
    await bob.expect("ice-candidate", callId="ab")


async def test_a_device_that_leaves_while_redis_is_away_is_gone_when_it_returns(
    nursery: trio.Nursery,
    private_redis: tuple[int, list[subprocess.Popen[bytes]]],
    tmp_path: Path,
) -> None:
    """Redis restarts with its data: bob hung up his connection meanwhile; his node decides
    that once Redis is back, in order, so nobody rings a device that is gone."""
    port, processes = private_redis
    h = await _cluster_on_private_redis(nursery, port, processes, tmp_path, persist=True)
    async with checked(h):
        await h.start()
        alice = await h.connect("alice", node=0)
        bob = await h.connect("bob", node=1)
        await alice.send("call-request", call_request("ab", "alice", "bob"))
        await bob.expect("call-request", id="ab")
        processes[0].kill()
        processes[0].wait()
        await _until(lambda: not any(node.hub.ready for node in h.nodes))
        bobs_node = h.nodes[1].hub.cluster
        assert bobs_node is not None
        tried = bobs_node.unavailable
        await bob.ws.aclose()
        await bob.stream.aclose()
        await _until(lambda: bobs_node.unavailable > tried)  # bob's leaving could not be decided
        _start_redis(port, processes, tmp_path, persist=True)
        await _wait_for_redis(port)
        # bob's leaving ends the ringing call (no grace), once Redis is back.
        await alice.expect("call-end", callId="ab", reason="peer_disconnected")
        await _until(lambda: all(node.hub.ready for node in h.nodes))
        await alice.send("call-request", call_request("ab2", "alice", "bob"))
        await alice.expect("call-reject", callId="ab2", reason="unavailable")


@pytest.mark.parametrize("links", [True, False], ids=["links", "inboxes"])
async def test_a_connected_calls_candidates_are_acked_and_arrive_while_redis_is_away(
    nursery: trio.Nursery,
    private_redis: tuple[int, list[subprocess.Popen[bytes]]],
    tmp_path: Path,
    links: bool,
) -> None:
    """A candidate in a connected call needs no decision: while Redis is away it is acked
    (not refused), and delivered: at once over the nodes' link, or once Redis is back when
    every delivery takes the inboxes (docs/protocol.md, section 4)."""
    port, processes = private_redis
    h = await _cluster_on_private_redis(nursery, port, processes, tmp_path, persist=True)
    async with checked(h):
        await h.start(links=links)
        alice = await h.connect("alice", node=0)
        bob = await h.connect("bob", node=1)
        await connected_call(alice, bob)
        await alice.send("ice-candidate", ice("ab", "bob"))  # the route is in use
        await bob.expect("ice-candidate", callId="ab")
        processes[0].kill()
        processes[0].wait()
        await _until(lambda: not any(node.hub.ready for node in h.nodes))
        await alice.send("ice-candidate", {**ice("ab", "bob"), "n": 7}, ref=1)
        assert (await alice.expect("ack"))["ref"] == 1
        if links:
            await bob.expect("ice-candidate", callId="ab", n=7)  # Redis still away
        _start_redis(port, processes, tmp_path, persist=True)
        await _wait_for_redis(port)
        if not links:
            await bob.expect("ice-candidate", callId="ab", n=7)
        await _until(lambda: all(node.hub.ready for node in h.nodes))
        await bob.expect_silence()  # once, either way


async def test_a_node_outside_a_call_spends_nothing_on_it(cluster: ClusterHarness) -> None:
    """Routing, not replication: node 2 holds nobody in the call, and decides nothing for it,
    receives nothing for it, and keeps nothing of it."""
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    bystander = cluster.nodes[2].hub.cluster
    assert bystander is not None
    before = (bystander.decisions, bystander.received)
    await connected_call(alice, bob)
    sender = cluster.nodes[0].hub.cluster
    assert sender is not None
    await alice.send("ice-candidate", ice("ab", "bob"))  # the first one learns the route
    await bob.expect("ice-candidate")
    decided = sender.decisions
    for _ in range(20):
        await alice.send("ice-candidate", ice("ab", "bob"))
        await bob.expect("ice-candidate")
    offer = {"type": "offer", "sdp": "v=0 restart"}
    await alice.send("call-renegotiate", {"callId": "ab", "to": "bob", "description": offer})
    await bob.expect("call-renegotiate", callId="ab")
    # The connected call's messages took the cached route: no decision, no Redis read.
    assert sender.decisions == decided
    assert len(cluster.audit.records("call.renegotiated")) == 1
    await bob.send("call-end", {"callId": "ab", "to": "alice"})
    await alice.expect("call-end")
    assert (bystander.decisions, bystander.received) == before


async def test_the_report_joins_a_call_from_the_trails_of_several_nodes(
    cluster: ClusterHarness, tmp_path: Path
) -> None:
    alice, bob = await call_across_nodes(cluster)
    await bob.send("call-end", {"callId": "ab", "to": "alice"})
    await alice.expect("call-end")
    files = []
    for index, capture in enumerate(cluster.captures):
        files.append(tmp_path / f"node{index}.log")
        files[-1].write_text(capture.text)
    # The request is in node 0's trail, the answer and the hang-up in node 1's.
    assert capture_events(cluster, 0) >= {"call.requested", "call.ringing"}
    assert capture_events(cluster, 1) >= {"call.answered", "call.ended"}
    [row] = list(trail.calls(files))
    assert (row.call_id, row.outcome, row.reason) == ("ab", "ended", "hangup")
    assert row.answered and row.devices == 1


def capture_events(h: ClusterHarness, index: int) -> set[str]:
    return set(h.captures[index].events())


async def test_two_devices_answering_at_once_on_two_nodes_one_wins(cluster: ClusterHarness) -> None:
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob1 = await cluster.connect("bob", node=1)
    bob2 = await cluster.connect("bob", node=2)
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await bob1.expect("call-request")
    await bob2.expect("call-request")
    # Both frames are on their way before either node has heard of the other's.
    await bob1.send("call-answer", answer("ab", "alice"), ref="one")
    await bob2.send("call-answer", answer("ab", "alice"), ref="two")
    await alice.expect("call-answer", **{"from": "bob"})
    outcomes = []
    for device, ref in ((bob1, "one"), (bob2, "two")):
        first = await device.recv()
        if first["event"] == "ack":  # this device won
            outcomes.append("won")
        else:  # told it lost, and its answer refused (it is a bystander now). The two come
            # from two nodes' decisions, so in either order (docs/protocol.md, cluster mode).
            second = await device.recv()
            lost = {
                "event": "call-end",
                "data": {"callId": "ab", "from": "alice", "reason": "answered_elsewhere"},
            }
            assert lost in (first, second)
            [refused] = [m for m in (first, second) if m != lost]
            assert refused["event"] == "error" and refused["data"]["code"] == "forbidden"
            assert refused["ref"] == ref
            outcomes.append("lost")
    assert sorted(outcomes) == ["lost", "won"]
    assert len(cluster.audit.records("call.answered")) == 1
    await alice.expect_silence()


async def test_the_same_revocation_list_again_costs_no_decision(cluster: ClusterHarness) -> None:
    """A node that starts (or reloads) with the list the cluster holds already publishes it
    under a newer version; no node decides anything again for its users."""
    await cluster.start()
    for index in range(3):
        await cluster.connect(f"u{index}", node=index)
    revoked = RevocationList(users={"mallory": 2**40})
    cluster.nodes[0].hub.apply_revocations(revoked)
    await _until(lambda: all("mallory" in n.hub.revocations.users for n in cluster.nodes))
    await beats(cluster)
    nodes = [node.hub.cluster for node in cluster.nodes]
    decided = [node.decisions for node in nodes if node is not None]
    cluster.nodes[1].hub.apply_revocations(revoked)  # the same list, from another node
    await beats(cluster, 3)
    assert [node.decisions for node in nodes if node is not None] == decided


async def test_a_joining_node_brings_its_revocation_list_to_every_node(
    cluster: ClusterHarness, tmp_path: Path
) -> None:
    await cluster.start()
    bob = await cluster.connect("bob", node=0)
    revoked = tmp_path / "revoked.json"
    revoked.write_text('{"users": {"bob": 99999999999}}')
    await cluster.add_node(make_settings(auth={"revocation_file": str(revoked)}))
    await bob.expect_closed(4003, "token revoked")
    await cluster.in_step()  # node 0 applied the list; the others may be a moment behind
    again = await sign_in(cluster, "bob", node=1)
    await again.expect_closed(4003, "token revoked")


async def test_a_node_that_drains_hands_its_calls_to_the_others(cluster: ClusterHarness) -> None:
    """A rolling deploy: SIGTERM's drain on one node; its devices resume elsewhere."""
    await cluster.start(make_settings(calls={"reconnect_grace": 10}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cluster.nodes[1].shutdown)
        await bob.expect_closed(1001, "server shutting down")
        # Sent while bob's node drains: to his connection that is closing, to the node's
        # inbox, or to his resume buffer; whichever, it reaches him where he resumes.
        await alice.send("ice-candidate", {**ice("ab", "bob"), "n": 1})
    await _until(lambda: bool(cluster.audit.records("session.held")))
    again = await sign_in(cluster, "bob", node=2, resume=bob.session["sessionId"])
    await again.expect("session", resumed=True)
    await again.expect("ice-candidate", callId="ab", n=1)
    await alice.send("ice-candidate", ice("ab", "bob"))
    await again.expect("ice-candidate", callId="ab")
    assert not terminal_records(cluster)  # the call never ended


# -- liveness and leadership against a Redis client without the cluster key -------------------


def test_heartbeat_and_lease_values_verify_only_when_genuine() -> None:
    beat = codec().seal_heartbeat("n1", 7, "12-3")
    assert codec().open_heartbeat(beat, "n1") == 7
    assert codec().read_heartbeat(beat, "n1") == (7, "12-3")
    assert codec().open_heartbeat(beat, "n2") is None  # another node's beat is not n1's
    assert codec(key=b"another key, long enough to be one").open_heartbeat(beat, "n1") is None
    assert codec(cluster="c2").open_heartbeat(beat, "n1") is None
    for bad in (None, b"", b"1", b"garbage", beat.replace(b"7", b"8")):
        assert codec().open_heartbeat(bad, "n1") is None
    lease = codec().seal_lease("n1", 100.0)
    assert codec().open_lease(lease, 99.0) == "n1"
    assert codec().open_lease(lease, 100.0) is None  # expired: no lease
    assert codec().open_lease(beat, 99.0) is None  # a heartbeat is not a lease
    assert codec().open_lease(b"n1", 99.0) is None
    verdict = codec().seal_dead("n1")
    assert codec().is_dead(verdict, "n1") and not codec().is_dead(verdict, "n2")
    assert not codec().is_dead(codec().seal_heartbeat("n1", 1), "n1")
    assert not codec().is_dead(b'{"node": "n1"}', "n1")


def test_a_verdict_says_whether_the_burial_was_done_and_a_beat_when_it_beat() -> None:
    """A verdict written as a burial begins says dead, not buried (a burial cut short by an
    outage is finished by the next leader's pass); the one written once it is done says both,
    and the previous release, which reads only `node`, takes it as dead. A heartbeat carries
    the time it was sealed; one of the previous release carries none and is never too old."""
    begun, done = codec().seal_dead("n1"), codec().seal_dead("n1", buried=True)
    assert codec().is_dead(begun, "n1") and not codec().is_buried(begun, "n1")
    assert codec().is_dead(done, "n1") and codec().is_buried(done, "n1")
    assert not codec().is_buried(done, "n2")
    assert not codec().is_buried(codec().seal_heartbeat("n1", 1), "n1")
    week = 7 * 24 * 3_600_000
    dated = codec().heartbeat(codec().seal_heartbeat("n1", 3, at=now_ms() - week - 1), "n1")
    assert dated is not None and dated.at is not None
    assert dated.older_than(week, now_ms()) and not dated.older_than(2 * week, now_ms())
    undated = codec().heartbeat(codec().seal_heartbeat("n1", 3), "n1")
    assert undated is not None and undated.at is None
    assert not undated.older_than(0, now_ms() + week)


def test_a_node_dies_after_several_missed_checks_never_one() -> None:
    watch = Watch(ClusterSettings(heartbeat_interval=0.2, node_timeout=1.0))
    assert watch.misses_for_death == 5
    watch.observe({"n2": 1})
    # Absent, garbage (None) or the same beat copied back: each a miss; a newer beat: seen.
    for beat in (None, 1, None, 1, 2, None, 2, 2, 2):
        watch.observe({"n2": beat})
    assert watch.missed == {"n2": 4} and watch.dead() == []
    watch.observe({"n2": 2})
    assert watch.missed == {"n2": 5} and watch.dead() == ["n2"]
    assert watch.saw("n2") and not watch.saw("n3")
    watch.observe({"n3": None})  # watched, never seen genuine: no evidence it ever ran
    assert not watch.saw("n3")
    watch.forget("n2")
    assert watch.missed == {"n3": 1} and not watch.saw("n2")


def test_a_check_reads_every_node_that_ran_and_a_bounded_number_of_others() -> None:
    """`nodes` is unsigned: the members no node was seen running under are checked at most
    `unknown_at_most` at a time, each until it is seen or dead; nodes seen running always."""
    watch = Watch(ClusterSettings(heartbeat_interval=0.2, node_timeout=1.0))
    watch.observe({"real1": 1, "real2": 1})
    fakes = [f"fake{i}" for i in range(10)]
    first = watch.to_check(["real1", *fakes], unknown_at_most=3)
    assert first == {"real1", "real2", "fake0", "fake1", "fake2"}
    watch.observe({node: (2 if node.startswith("real") else None) for node in first})
    # The same unknown members are counted on; no newcomer while they fill the room.
    assert watch.to_check(reversed(fakes), unknown_at_most=3) == first
    # One seen at last (a real node's first check): it leaves the unknown, room for another.
    watch.observe({"fake1": 1})
    assert watch.to_check(fakes, unknown_at_most=3) == first | {"fake3"}
    # Judged (dropped from `nodes`) and forgotten: room again.
    watch.forget("fake0")
    watch.forget("fake2")
    left = [node for node in fakes if node not in ("fake0", "fake2")]
    assert watch.to_check(left, unknown_at_most=3) == {
        "real1",
        "real2",
        "fake1",
        "fake3",
        "fake4",
        "fake5",
    }


async def test_burying_a_node_of_many_users_stops_no_heartbeat(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader buries a dead node (a decision per user) in a task of its own, with the
    users' decisions spread over the lanes: however long that takes, the leader's heartbeats
    go on, so it is never declared dead itself, and the dead node is buried once."""
    await cluster.start()
    nodes = [running.hub.cluster for running in cluster.nodes]
    await _until(lambda: any(node is not None and node.judging for node in nodes))
    leader = next(i for i, node in enumerate(nodes) if node is not None and node.judging)
    victim, other = (leader + 1) % 3, (leader + 2) % 3
    for n in range(60):
        await cluster.connect(f"u{n}", node=victim)
    watcher = await cluster.connect("watcher", node=leader)
    leader_node, victim_id = nodes[leader], node_id(cluster, victim)
    assert leader_node is not None
    leader_id = leader_node.node_id
    # Each decision slowed: the 60 of the burial take 30 s one after another, 4 s on 8 lanes.
    for index in (leader, other):
        kept = nodes[index]
        assert kept is not None

        async def slow_load(users: list[str], real_load: Any = kept.store.load) -> Any:
            await trio.sleep(0.5)
            return await real_load(users)

        monkeypatch.setattr(kept.store, "load", slow_load)
    cluster._running[victim][0].cancel()  # the victim stops heartbeating, its devices held
    await _until(lambda: cluster.audit.records("cluster.node_down"))
    [down] = cluster.audit.records("cluster.node_down")
    assert (down["node"], down["devices"]) == (victim_id, 60)
    assert leader_node.node_id == leader_id  # never declared dead, never evicted
    await watcher.expect_silence()


async def test_a_lease_taken_without_the_key_does_not_stop_leadership(
    cluster: ClusterHarness,
) -> None:
    await cluster.start(make_settings(calls={"ring_timeout": 1.0}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        # A plain SET, no expiry: a lease that does not verify is no lease, and a node takes
        # it over (the leader is who declares dead nodes dead).
        attacker.set(f"{cluster.name}:leader", "attacker")
        await alice.send("call-request", call_request("ab", "alice", "bob"))
        await bob.expect("call-request", id="ab")
        # Timers need no leader: every node claims due ones from the shared set.
        await alice.expect("call-end", callId="ab", reason="timeout")
        await _until(lambda: attacker.get(f"{cluster.name}:leader") != b"attacker")
        await _until(lambda: any(n.hub.cluster and n.hub.cluster.is_leader for n in cluster.nodes))
    finally:
        attacker.close()


async def test_a_node_fires_the_timers_it_armed_at_their_deadline_without_a_sweep(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ring timeout is claimed when it is due on the node whose decision armed it: with the
    sweep of the shared set pushed out of the test's reach, it still fires."""
    monkeypatch.setattr(cluster_node, "TIMER_SWEEP", 3600.0)
    await cluster.start(make_settings(calls={"ring_timeout": 1.0}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await bob.expect("call-request", id="ab")
    await alice.expect("call-end", callId="ab", reason="timeout")
    await bob.expect("call-end", callId="ab", reason="timeout")
    assert [row["event"] for row in terminal_records(cluster)] == ["call.timeout"]


class Claims:
    """How many timer claims a node made (its store's `claim_timers`, counted)."""

    def __init__(self, node: ClusterNode, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        claim_timers = node.store.claim_timers

        async def counted(
            now: float, hold_until: float, limit: int
        ) -> tuple[list[tuple[Timer, bytes | None]], int]:
            self.count += 1
            return await claim_timers(now, hold_until, limit)

        monkeypatch.setattr(node.store, "claim_timers", counted)


async def claims_counted(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch, ring_timeout: float
) -> tuple[Client, Client, ClusterNode, Claims]:
    """alice on node 0 (which arms her calls' ring timers, its claims counted), bob on node 1."""
    await cluster.start(make_settings(calls={"ring_timeout": ring_timeout}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    armer = cluster.nodes[0].hub.cluster
    assert armer is not None
    return alice, bob, armer, Claims(armer, monkeypatch)


async def test_a_timer_disarmed_where_it_was_armed_costs_no_claim(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice's first call ends before its ring timeout, on the node that armed it: that node
    claims nothing at its deadline, only at the second call's (which does time out)."""
    monkeypatch.setattr(cluster_node, "TIMER_SWEEP", 3600.0)
    alice, bob, _, claims = await claims_counted(cluster, monkeypatch, ring_timeout=1.0)
    await alice.send("call-request", call_request("first", "alice", "bob"))
    await bob.expect("call-request", id="first")
    await alice.send("call-end", {"callId": "first", "to": "bob"})
    await bob.expect("call-end", callId="first")
    await trio.sleep(2 * cluster_node.TIMER_GRAIN)  # the second deadline in a later grain
    await alice.send("call-request", call_request("second", "alice", "bob"))
    await bob.expect("call-request", id="second")
    await alice.expect("call-end", callId="second", reason="timeout")
    assert claims.count == 1


async def test_timer_firings_in_flight_are_capped(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node queues at most TIMERS_IN_FLIGHT timer firings at once (a flood of timers leaves
    its lanes room for its clients); a due timer past that waits for a later claim."""
    monkeypatch.setattr(cluster_node, "TIMERS_IN_FLIGHT", 0)  # no room at all
    alice, bob, _, claims = await claims_counted(cluster, monkeypatch, ring_timeout=0.5)
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await bob.expect("call-request", id="ab")
    await _until(lambda: claims.count >= 3)  # claimed at its deadline, and by sweeps since
    await alice.expect_silence()  # not fired
    monkeypatch.setattr(cluster_node, "TIMERS_IN_FLIGHT", 256)
    await alice.expect("call-end", callId="ab", reason="timeout")
    assert [row["event"] for row in terminal_records(cluster)] == ["call.timeout"]


async def test_due_timers_the_lanes_refuse_wait_for_the_sweep(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose lanes are full hands claimed timers back and claims again at its next
    sweep, not at once: claiming again at once would claim and hand back the same timers for as
    long as the lanes stay full. (A claim of one timer is a full claim here.)"""
    monkeypatch.setattr(cluster_node, "TIMER_CLAIM", 1)
    alice, bob, armer, claims = await claims_counted(cluster, monkeypatch, ring_timeout=0.5)
    enqueue = armer._enqueue
    full_until: float | None = None  # the lanes refuse timers for 0.3 s from the first refusal

    def lanes_full_for_timers(job: Any) -> bool:
        nonlocal full_until
        if job.fired is None:
            return enqueue(job)
        if full_until is None:
            full_until = trio.current_time() + 0.3
        return trio.current_time() >= full_until and enqueue(job)

    monkeypatch.setattr(armer, "_enqueue", lanes_full_for_timers)
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await bob.expect("call-request", id="ab")
    await alice.expect("call-end", callId="ab", reason="timeout")
    assert full_until is not None  # the lanes did refuse it once
    assert claims.count <= 3
    assert [row["event"] for row in terminal_records(cluster)] == ["call.timeout"]


def hold_beats_of_a_new_id(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch, node: int = 1
) -> tuple[ClusterNode, str, trio.Event]:
    """Node `node`'s heartbeats under any id but its present one wait until the returned
    event is set (as if Redis never answered them). Returns the node and its present id."""
    kept = cluster.nodes[node].hub.cluster
    assert kept is not None
    old_id = kept.node_id
    release = trio.Event()

    async def held_keep(beating: str, *rest: Any, real: Any = kept.store.keep) -> Any:
        if beating != old_id:
            await release.wait()
        return await real(beating, *rest)

    monkeypatch.setattr(kept.store, "keep", held_keep)
    return kept, old_id, release


def signing_in(cluster: ClusterHarness, user: str, node: int) -> list[Client]:
    """`user` signs in on `node` in the background: the list holds the client once its
    `session` came (a sign-in that waits for something the test holds back)."""
    signed: list[Client] = []

    async def signs_in() -> None:
        client = await sign_in(cluster, user, node=node)
        await client.expect("session", user=user)
        signed.append(client)

    cluster.nursery.start_soon(signs_in)
    return signed


async def test_a_node_signs_no_one_in_before_its_heartbeat_says_it_runs(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member of `nodes` is buried only if a signed heartbeat of it was ever written
    (`last:<node>`), so a node takes no client under an id before a heartbeat under that id
    went through. Here a node declared dead (as after a freeze) carries on under a new id
    and beats at once; its heartbeats under the new id are held back: a client signing in
    meanwhile waits, and is let in once that first beat is in Redis."""
    await cluster.start()
    kept, old_id, release = hold_beats_of_a_new_id(cluster, monkeypatch)
    attacker = redis.Redis.from_url(cluster.redis_url)  # here: standing for the leader
    try:
        verdict = EntryCodec(cluster.name, KEY).seal_dead(old_id)
        attacker.set(f"{cluster.name}:dead:{old_id}", verdict)
        await _until(lambda: kept.node_id != old_id)
        new_id = kept.node_id
        signed = signing_in(cluster, "alice", node=1)
        # Her sign-in reached the node (queued for a decision at once, before): once the node
        # is quiet, it would have been decided.
        await _until(lambda: len(cluster.nodes[1].hub.signed_in) == 1 and kept.quiet)
        assert attacker.get(f"{cluster.name}:u:alice") is None  # not decided: it waits
        assert attacker.get(f"{cluster.name}:last:{new_id}") is None
        release.set()
        await _until(lambda: signed)
        assert attacker.get(f"{cluster.name}:last:{new_id}") is not None
        assert attacker.sismember(f"{cluster.name}:nodes", new_id)
    finally:
        attacker.close()


async def test_a_beat_of_the_old_id_registers_no_new_one_when_a_link_evicts_meanwhile(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node back from a freeze may be evicted by a link (`still_member`) while its keeper's
    beat, under the old id, waits for Redis. That beat's answer is the old id's: it must not
    let the new id sign anyone in before a beat under the new id went through."""
    await cluster.start()
    kept = cluster.nodes[1].hub.cluster
    assert kept is not None
    old_id = kept.node_id
    release = trio.Event()
    evicted: list[str] = []

    async def keep(node: str, *rest: Any, real: Any = kept.store.keep) -> Any:
        if node != old_id:
            await release.wait()  # the new id's beats are held back
        result = await real(node, *rest)
        if node == old_id and not evicted:
            evicted.append(node)
            kept._evict()  # as `still_member` would, on a link, while this beat waited
        return result

    monkeypatch.setattr(kept.store, "keep", keep)
    await _until(lambda: kept.node_id != old_id)
    new_id = kept.node_id
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        assert not kept._registered.is_set()
        signed = signing_in(cluster, "alice", node=1)
        await _until(lambda: len(cluster.nodes[1].hub.signed_in) == 1 and kept.quiet)
        assert attacker.get(f"{cluster.name}:u:alice") is None  # waits for the new id's beat
        release.set()
        await _until(lambda: signed)
        assert attacker.get(f"{cluster.name}:last:{new_id}") is not None
    finally:
        release.set()
        attacker.close()


async def test_a_heartbeat_deleted_or_forged_without_the_key_is_not_a_death(
    cluster: ClusterHarness,
) -> None:
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    victim = cluster.nodes[1].hub.cluster
    assert victim is not None
    key = f"{cluster.name}:hb:{victim.node_id}"
    with trio.fail_after(STEP):  # a leader past its grace after start judges liveness
        while not any(node.hub.cluster.judging for node in cluster.nodes if node.hub.cluster):
            await trio.sleep(0.01)
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        genuine = attacker.get(key)
        assert genuine is not None
        # Garbage, an old genuine value copied back, deleted: for half of node_timeout (1 s),
        # i.e. fewer checks than the misses that make a death. Before, one missed check did.
        with trio.move_on_after(0.5):
            while True:
                attacker.set(key, "garbage")
                attacker.set(key, genuine)
                attacker.delete(key)
                await trio.sleep(0.005)
    finally:
        attacker.close()
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await bob.expect("call-request", id="ab")
    assert not [row for row in cluster.audit.records() if row["event"] == "cluster.node_down"]


async def test_a_candidate_never_overtakes_the_renegotiation_before_it(
    cluster: ClusterHarness,
) -> None:
    """A renegotiation is decided in full (Redis round trips); the candidates that follow it
    could take the cached route and arrive first. They wait their turn."""
    alice, bob = await call_across_nodes(cluster)
    offer = {"type": "offer", "sdp": "v=0 restart"}
    restart = {"callId": "ab", "to": "bob", "description": offer}
    for round_ in range(3):
        await alice.send("call-renegotiate", restart)
        await alice.send("ice-candidate", {**ice("ab", "bob"), "n": round_})
        await bob.expect("call-renegotiate", callId="ab")
        await bob.expect("ice-candidate", callId="ab", n=round_)


# -- webhooks in a cluster: each sent once, by the node that decided ---------------------------


def _hooks(receiver: Receiver) -> dict[str, Any]:
    return {"url": receiver.url, "secret": WEBHOOK_SECRET}


async def test_each_webhook_is_sent_once_by_the_node_that_decided(cluster: ClusterHarness) -> None:
    receiver = Receiver()
    await cluster.nursery.start(receiver.serve)
    await cluster.start(make_settings(webhooks=_hooks(receiver)))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob)
    await bob.send("call-end", {"callId": "ab", "to": "alice"})
    await alice.expect("call-end")
    await receiver.until(lambda: len(receiver.accepted) >= 4)
    await cluster.in_step()
    assert [r.type for r in receiver.applied] == CALL_STEPS
    assert len(receiver.requests) == 4  # one node each, none twice
    # Requested and ringing were decided by alice's node, answered and ended by bob's.
    assert {r.type for r in receiver.requests} == set(CALL_STEPS)


async def test_a_dead_nodes_calls_get_their_terminal_webhook_from_a_survivor(
    cluster: ClusterHarness, tmp_path: Path
) -> None:
    receiver = Receiver()
    await cluster.nursery.start(receiver.serve)
    await cluster.start(make_settings(webhooks=_hooks(receiver)))
    env = {
        **_cluster_env(cluster, 0),
        "CALLGATE_WEBHOOKS_URL": receiver.url,
        "CALLGATE_WEBHOOKS_SECRET": WEBHOOK_SECRET,
    }
    process, url = await start_server_process(server_config(tmp_path), env)
    try:
        alice = await cluster.connect("alice", node=0)
        bob = await signed_in(cluster.nursery, url, token_for("bob"))
        cluster.clients.append(bob)
        await connected_call(alice, bob)  # answered: decided (and told) by the doomed node
        await receiver.until(lambda: len(receiver.accepted) >= 3)
        process.kill()
        await process.wait()
        await alice.expect("call-end", callId="ab", reason="peer_disconnected")
        await receiver.until(lambda: any(r.type == "call.ended" for r in receiver.accepted))
        [ended] = receiver.delivered("call.ended")
        assert (ended["reason"], ended["answered"]) == ("peer_disconnected", True)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_an_epoch_overwritten_without_the_key_ends_no_call(cluster: ClusterHarness) -> None:
    """The epoch marks a Redis dataset; a new one prompts a check of the signed records, and
    only records that are really gone end calls (`state_lost`)."""
    alice, bob = await call_across_nodes(cluster)
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        attacker.set(f"{cluster.name}:epoch", "forged")
        await _until(lambda: attacker.get(f"{cluster.name}:epoch") == b"forged")
        for node in cluster.nodes:  # every node has looked at the forged epoch
            kept = node.hub.cluster
            assert kept is not None
            beat = kept.beats
            await _until(lambda kept=kept, beat=beat: kept.beats > beat + 1)
    finally:
        attacker.close()
    await alice.send("ice-candidate", ice("ab", "bob"))
    await bob.expect("ice-candidate", callId="ab")
    await bob.send("call-end", {"callId": "ab", "to": "alice"})
    await alice.expect("call-end", callId="ab", reason=None)
    assert [row["reason"] for row in terminal_records(cluster)] == ["hangup"]


async def test_a_connected_calls_messages_take_the_direct_link(cluster: ClusterHarness) -> None:
    """Links: once a link is open, a call's messages go node to node, not through Redis."""
    alice, bob = await call_across_nodes(cluster)
    sender = cluster.nodes[0].hub.cluster
    assert sender is not None
    await alice.send("ice-candidate", ice("ab", "bob"))
    await bob.expect("ice-candidate")
    linked, inboxed = sender.links.batches_linked, sender.links.batches_inboxed
    for _ in range(20):
        await alice.send("ice-candidate", ice("ab", "bob"))
        await bob.expect("ice-candidate")
    assert sender.links.batches_inboxed == inboxed
    assert sender.links.batches_linked >= linked + 20


async def test_a_sign_in_waits_for_the_first_beat_no_longer_than_apply_timeout(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose first beat under its id does not go through (Redis slow, or the beat
    lost) keeps a signing-in client no longer than `apply_timeout`: closed 1013, as any sign-in
    the cluster cannot decide in time, and nothing of it written."""
    await cluster.start(apply_timeout=0.5)
    kept, old_id, release = hold_beats_of_a_new_id(cluster, monkeypatch)
    attacker = redis.Redis.from_url(cluster.redis_url)  # here: standing for the leader
    try:
        attacker.set(
            f"{cluster.name}:dead:{old_id}", EntryCodec(cluster.name, KEY).seal_dead(old_id)
        )
        await _until(lambda: kept.node_id != old_id)
        client = await sign_in(cluster, "alice", node=1)
        await client.expect_closed(1013, "cluster unavailable")
        assert attacker.get(f"{cluster.name}:u:alice") is None
    finally:
        release.set()
        attacker.close()
