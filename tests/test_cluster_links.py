"""Cluster links (src/callgate/cluster/links.py): deliveries node to node over direct TCP.

On three real nodes, a real Redis and real sockets: a link broken mid-call loses, repeats and
reorders nothing (its inbox takes over, then the link comes back); a connection to a link port
that does not verify (another key, a frame that is not one, a handshake played again) is
refused and audited, a genuine hello for another node id refused without a record; on a link,
a genuinely signed batch with an old number is refused and audited as a replay, one from
another origin or for another target as misrouted; a link's first batch is acked however soon
it comes.
Without nodes: the frame reader on streams cut at every byte, and the ring that tells the other
path's copy of a batch from a replay. And the one link setting the configuration refuses.

Links are opened here by hand, frame by frame (hello, welcome, confirm, batches), to send what
a node never would. Fault injection reaches into the links' internals (`Links._peers`,
`Links._drop_inbound`): that is the only way to break one particular link of a running node.
"""

from __future__ import annotations

import itertools
import math
import random
import secrets
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import trio
import trio.testing

from callgate.cluster import links as links_module
from callgate.cluster import node as cluster_node
from callgate.cluster.entries import BadEntry, EntryCodec, Order
from callgate.cluster.links import (
    ACK,
    ACK_AFTER,
    BATCH,
    CONFIRM,
    HANDSHAKE_FRAME,
    HELLO,
    MAX_FRAME,
    MAX_HANDSHAKES,
    RECEIVE_SIZE,
    WELCOME,
    FrameReader,
    LinkClosed,
    Links,
    RecentPaths,
    frame,
)
from callgate.cluster.node import ClusterNode
from callgate.config import load_settings
from callgate.core.actions import Deliver
from callgate.errors import ConfigError
from conftest import STEP, Client, ClusterHarness
from test_cluster import _until, call_across_nodes, codec, connected_call, ice, marks, now_ms

FORGER_KEY = b"a guessed key that is long enough!!"


def member(h: ClusterHarness, index: int) -> ClusterNode:
    node = h.nodes[index].hub.cluster
    assert node is not None
    return node


def rejected(h: ClusterHarness) -> list[dict[str, Any]]:
    return h.audit.records("cluster.rejected")


async def candidates(alice: Client, bob: Client, numbers: Iterator[int], count: int) -> None:
    """`count` candidates from alice, each read by bob (numbered, so a copy or a swap shows)."""
    for _ in range(count):
        n = next(numbers)
        await alice.send("ice-candidate", {**ice("ab", "bob"), "n": n})
        await bob.expect("ice-candidate", callId="ab", n=n)


# -- a link of its own: what a node, or someone pretending to be one, sends -------------------


async def dial(node: ClusterNode) -> trio.SocketStream:
    host, _, port = node.links.address.rpartition(":")
    with trio.fail_after(STEP):
        return await trio.open_tcp_stream(host, int(port))


def hello(
    sealer: EntryCodec,
    origin: str,
    target: str,
    nonce: str,
    high: int = 0,
    ack_timeout: float | None = None,
) -> bytes:
    body: dict[str, Any] = {"o": origin, "t": target, "n": nonce, "high": high}
    if ack_timeout is not None:
        body["ack"] = ack_timeout
    return frame(HELLO, sealer.seal_link("hello", body))


def batch(fields: dict[bytes, bytes]) -> bytes:
    return frame(BATCH, fields[b"m"] + fields[b"p"])


def local_entry(stream: trio.SocketStream) -> str:
    """The audit entry a node writes for a refused link this end opened: `link:<address>`
    (the host: refusals are audited once per address and reason a while)."""
    host = stream.socket.getsockname()[0]
    return f"link:{host}"


async def closed_without_a_word(stream: trio.SocketStream) -> None:
    """The node at the other end closes this link and sends nothing (no welcome)."""
    with trio.fail_after(STEP):
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except trio.BrokenResourceError:  # reset: it closed with our bytes unread
            data = b""
    assert data == b""


def confirm(sealer: EntryCodec, origin: str, target: str, challenge: str) -> bytes:
    """The opener's answer to a welcome: the target's nonce (`m`), signed back."""
    body = {"o": origin, "t": target, "m": challenge}
    return frame(CONFIRM, sealer.seal_link("confirm", body))


async def welcomed(
    stream: trio.SocketStream, sealer: EntryCodec, node: ClusterNode, origin: str, nonce: str
) -> tuple[FrameReader, dict[str, Any]]:
    """The node's welcome on `stream` (verified), and the reader that read it."""
    reader = FrameReader(stream)
    with trio.fail_after(STEP):
        kind, body = await reader.next()
    assert kind == WELCOME
    welcome = sealer.open_link(body, "welcome")
    assert (welcome["o"], welcome["t"], welcome["n"]) == (node.node_id, origin, nonce)
    return reader, welcome


async def open_link(
    sealer: EntryCodec,
    node: ClusterNode,
    origin: str,
    high: int = 0,
    first: bytes = b"",
    ack_timeout: float | None = None,
) -> tuple[trio.SocketStream, FrameReader, str, dict[str, Any]]:
    """A link to `node` as `origin`, handshake done (`first`: frames sent in the same write
    as the confirmation; `ack_timeout`: the opener's, in its hello): the stream, its reader,
    the nonce, and the node's welcome."""
    stream = await dial(node)
    nonce = secrets.token_hex(16)
    await stream.send_all(hello(sealer, origin, node.node_id, nonce, high, ack_timeout))
    reader, welcome = await welcomed(stream, sealer, node, origin, nonce)
    await stream.send_all(confirm(sealer, origin, node.node_id, welcome["m"]) + first)
    return stream, reader, nonce, welcome


async def acks(sealer: EntryCodec, reader: FrameReader, nonce: str) -> list[int]:
    """The numbers the next acks (one read's worth) say the node has carried out from this
    link's origin."""
    with trio.fail_after(STEP):
        frames = await reader.burst()
    numbers = []
    for kind, body in frames:
        assert kind == ACK
        ack = sealer.open_link(body, "ack")
        assert ack["n"] == nonce
        assert isinstance(ack["s"], int)
        numbers.append(ack["s"])
    return numbers


def ring_bob(bob: Client, n: int) -> tuple[Order, str | None]:
    """An order that would hand bob a candidate numbered `n`, were it carried out."""
    data = {**ice("ab", "bob"), "from": "alice", "n": n}
    return Deliver(bob.conn, "ice-candidate", data), "bob"


# -- a link that breaks mid-call ---------------------------------------------------------------


async def until_now(predicate: Callable[[], bool]) -> None:
    """Wait for `predicate` at every scheduling pass (every node runs in this trio run): for a
    state that lasts a few ticks only, like a batch sent and not acked yet."""
    with trio.fail_after(STEP):
        while not predicate():
            await trio.sleep(0)


def drop_inbound(node: ClusterNode, link: trio.SocketStream) -> None:
    """`node` drops its end of `link` (a link another node opened to it), as it does its
    inbound links when evicted: out of the reactor's set, then closed, unread bytes and all."""
    ends = [stream.socket.getpeername() for stream in node.links._inbound]
    assert link.socket.getsockname() in ends
    node.links._drop_inbound()


async def in_flight(
    alice: Client, bob: Client, sender: ClusterNode, receiver: ClusterNode, n: int, unread: bool
) -> bool:
    """alice sends candidate `n`: True while its batch is on the link, not acked (the target
    acks `ack_interval` after a burst) and, if `unread`, not read by the target yet. False when the
    target read it in the same tick (trio's order within a tick goes both ways): then it has
    been delivered, and another one may be caught."""
    received = receiver.received
    await alice.send("ice-candidate", {**ice("ab", "bob"), "n": n})
    await until_now(lambda: sender.links.unacked > 0)
    if unread and receiver.received != received:
        await bob.expect("ice-candidate", callId="ab", n=n)
        return False
    return True


BREAKS: dict[str, Callable[[ClusterNode, trio.SocketStream], None]] = {
    # The connection goes down under the sender: the target reads what was sent, then the end
    # of the stream; the sender reads the end of the stream.
    "sender": lambda _, link: link.socket.shutdown(socket.SHUT_RDWR),
    # The target drops its end with the batch unread: lost, and a reset for the sender.
    "target": drop_inbound,
}


async def test_a_link_opens_at_once_to_a_node_that_forgot_this_one(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link opens only once the target carried out what the opener put in its inbox. A
    target forgets the number of an origin it carried out nothing of for twice MAX_BATCH_AGE
    (an hour; here a second), and an inbox append that old no longer holds a link back (what
    of it is still unread is stale there): the link reopened after such a silence carries the
    next batch at once, instead of failing its handshake and sending it by the inbox."""
    monkeypatch.setattr(cluster_node, "MAX_BATCH_AGE", 1.0)
    # The opener keeps its peer of the target (it forgets an idle one as long as the target
    # forgets it: the two may cross).
    monkeypatch.setattr(Links, "prune", lambda self: [])
    alice, bob = await call_across_nodes(cluster)
    sender, receiver = member(cluster, 0), member(cluster, 1)
    peer = sender.links._peers[receiver.node_id]
    sender.links._fall_back(peer, "a test")  # the link is lost
    peer.next_try = math.inf  # and not tried again for now: the next batch takes the inbox
    inboxed = sender.links.batches_inboxed
    await alice.send("ice-candidate", {**ice("ab", "bob"), "n": 1})
    await bob.expect("ice-candidate", callId="ab", n=1)
    assert sender.links.batches_inboxed == inboxed + 1 and peer.inbox_high > 0
    await _until(lambda: sender.node_id in marks(cluster, receiver.node_id))
    await _until(lambda: sender.node_id not in marks(cluster, receiver.node_id))  # forgotten
    peer.next_try = 0.0  # tried again with the next batch
    await alice.send("ice-candidate", {**ice("ab", "bob"), "n": 2})
    await bob.expect("ice-candidate", callId="ab", n=2)
    assert sender.links.batches_inboxed == inboxed + 1  # it went on the new link
    assert sender.links.linked(receiver.node_id)
    assert not rejected(cluster)


@pytest.mark.parametrize("end", sorted(BREAKS))
async def test_a_link_broken_mid_call_loses_nothing_and_comes_back(
    cluster: ClusterHarness, end: str
) -> None:
    alice, bob = await call_across_nodes(cluster)
    sender, receiver = member(cluster, 0), member(cluster, 1)
    numbers = itertools.count()
    await candidates(alice, bob, numbers, 3)
    assert sender.links.linked(receiver.node_id)
    fallbacks, inboxed = sender.links.fallbacks, sender.links.batches_inboxed
    duplicates = receiver.duplicates
    for _ in range(50):  # caught at once, unless it must also be unread
        n = next(numbers)
        if await in_flight(alice, bob, sender, receiver, n, unread=end == "target"):
            break
    else:
        raise AssertionError("no batch caught on the link before the target read it")
    link = sender.links._peers[receiver.node_id].stream
    assert link is not None
    BREAKS[end](receiver, link)
    linked = sender.links.batches_linked
    sent = [n] + [next(numbers) for _ in range(5)]
    for n in sent[1:]:
        await alice.send("ice-candidate", {**ice("ab", "bob"), "n": n})
    for n in sent:  # each once, in order: what the link did not ack came by the inbox
        await bob.expect("ice-candidate", callId="ab", n=n)
    await bob.expect_silence()
    assert sender.links.fallbacks == fallbacks + 1
    assert sender.links.batches_inboxed > inboxed
    if end == "sender":  # the link brought the batch, then the inbox its copy: a copy
        assert receiver.duplicates > duplicates
    else:  # the link lost it: the inbox's copy was the only one
        assert receiver.duplicates == duplicates
    assert not rejected(cluster)  # a copy by the other path is no replay
    # More traffic opens the link again (once the target has carried out its inbox).
    with trio.fail_after(STEP):
        while not (sender.links.linked(receiver.node_id) and sender.links.batches_linked > linked):
            await candidates(alice, bob, numbers, 1)
    inboxed = sender.links.batches_inboxed
    await candidates(alice, bob, numbers, 5)
    assert sender.links.batches_inboxed == inboxed  # all on the link again
    await bob.expect_silence()
    assert not rejected(cluster)


# -- connections to a link port that do not verify ----------------------------------------------


def _wrong_key(h: ClusterHarness, bob: Client, nonce: str) -> bytes:
    forger = codec(key=FORGER_KEY, cluster=h.name)
    return hello(forger, member(h, 0).node_id, member(h, 1).node_id, nonce)


def _another_target(h: ClusterHarness, bob: Client, nonce: str) -> bytes:
    genuine = codec(cluster=h.name)
    return hello(genuine, member(h, 0).node_id, member(h, 2).node_id, nonce)


def _oversized(h: ClusterHarness, bob: Client, nonce: str) -> bytes:
    """A length a batch may have, not a handshake frame: nothing big before the key is proven."""
    return struct.pack(">I", HANDSHAKE_FRAME + 1) + HELLO


def _batch_without_hello(h: ClusterHarness, bob: Client, nonce: str) -> bytes:
    """A genuinely signed batch, numbered far ahead: carried out, it would reach bob (and
    make every later batch of node 0 look like a replay)."""
    genuine = codec(cluster=h.name)
    origin, target = member(h, 0).node_id, member(h, 1).node_id
    return batch(genuine.seal_delivery(origin, target, 10**9, [ring_bob(bob, 99)], at=now_ms()))


# What each probe sends, and the reason it is audited with (None: refused, not audited).
PROBES: dict[str, tuple[Callable[[ClusterHarness, Client, str], bytes], str | None]] = {
    "wrong key": (_wrong_key, "bad_mac"),
    # Genuine, for an id the node does not have: taken for an opener that has not heard yet
    # that the node's id changed (evicted, or a restart on the same port), not for an attack.
    "another target": (_another_target, None),
    "oversized frame": (_oversized, "malformed"),
    "batch without hello": (_batch_without_hello, "malformed"),
}


@pytest.mark.parametrize("probe", list(PROBES))
async def test_a_link_that_does_not_verify_is_refused_and_audited(
    cluster: ClusterHarness, probe: str
) -> None:
    """Closed without a welcome, nothing carried out, audited (unless the probe is a genuine
    hello for another node id), and the cluster's own link works on."""
    alice, bob = await call_across_nodes(cluster)
    target = member(cluster, 1)
    received = target.received
    make, reason = PROBES[probe]
    stream = await dial(target)
    try:
        await stream.send_all(make(cluster, bob, secrets.token_hex(16)))
        await closed_without_a_word(stream)
        entry = local_entry(stream)
    finally:
        await stream.aclose()
    expected = [] if reason is None else [(target.node_id, entry, reason)]
    if expected:
        await _until(lambda: bool(rejected(cluster)))
    assert target.received == received  # no batch was carried out
    await bob.expect_silence()
    numbers = itertools.count()
    await candidates(alice, bob, numbers, 2)  # the cluster, and its link, work on
    assert member(cluster, 0).links.linked(target.node_id)
    rows = rejected(cluster)
    assert [(row["node"], row["entry"], row["reason"]) for row in rows] == expected


async def test_a_forged_hello_followed_at_once_by_a_batch_is_audited(
    cluster: ClusterHarness,
) -> None:
    _alice, bob = await call_across_nodes(cluster)
    forger = codec(key=FORGER_KEY, cluster=cluster.name)
    origin, target = member(cluster, 0), member(cluster, 1)
    forged = forger.seal_delivery(
        origin.node_id, target.node_id, 10**9, [ring_bob(bob, 99)], at=now_ms()
    )
    stream = await dial(target)
    try:
        nonce = secrets.token_hex(16)
        await stream.send_all(hello(forger, origin.node_id, target.node_id, nonce) + batch(forged))
        await closed_without_a_word(stream)
        entry = local_entry(stream)
    finally:
        await stream.aclose()
    await bob.expect_silence()
    rows = rejected(cluster)
    assert [(row["entry"], row["reason"]) for row in rows] == [(entry, "bad_mac")]


# -- replays over a link -----------------------------------------------------------------------


async def test_a_replayed_batch_on_a_fresh_link_is_refused_and_audited(
    cluster: ClusterHarness,
) -> None:
    alice, bob = await call_across_nodes(cluster)
    numbers = itertools.count()
    await candidates(alice, bob, numbers, 3)
    sender, receiver = member(cluster, 0), member(cluster, 1)
    assert sender.links.batches_inboxed == 0  # node 0's batches all came by its link
    genuine = codec(cluster=cluster.name)
    stream, reader, nonce, welcome = await open_link(genuine, receiver, sender.node_id)
    try:
        last = welcome["last"]  # the last of node 0's batches node 1 carried out
        assert isinstance(last, int) and last >= 1
        for count, seq in enumerate((last, 1), 1):  # the last one again, and the first one
            orders = [ring_bob(bob, 99)]
            fields = genuine.seal_delivery(
                sender.node_id, receiver.node_id, seq, orders, at=now_ms()
            )
            await stream.send_all(batch(fields))
            await _until(lambda count=count: len(rejected(cluster)) == count)
        # Acked (nothing more was carried out), not closed: a replay is dropped, not the link.
        assert set(await acks(genuine, reader, nonce)) == {last}
    finally:
        await stream.aclose()
    rows = rejected(cluster)
    assert [(row["node"], row["entry"], row["reason"]) for row in rows] == [
        (receiver.node_id, f"link:{sender.node_id}", "replayed")
    ] * 2
    assert receiver.duplicates == 0
    await bob.expect_silence()
    await candidates(alice, bob, numbers, 2)  # node 0's own link carries on
    assert len(rejected(cluster)) == 2


@pytest.mark.parametrize("other", ["origin", "target"])
async def test_a_batch_on_a_link_that_is_not_the_links_is_refused_and_audited(
    cluster: ClusterHarness, other: str
) -> None:
    """On a link node 0 opened to node 1, a genuinely signed, new batch from node 2, or for
    node 2: misrouted, audited, not carried out."""
    alice, bob = await call_across_nodes(cluster)
    sender, receiver, third = member(cluster, 0), member(cluster, 1), member(cluster, 2)
    genuine = codec(cluster=cluster.name)
    origin = third.node_id if other == "origin" else sender.node_id
    target = third.node_id if other == "target" else receiver.node_id
    stream, reader, nonce, welcome = await open_link(genuine, receiver, sender.node_id)
    try:
        fields = genuine.seal_delivery(origin, target, 10**9, [ring_bob(bob, 99)], at=now_ms())
        await stream.send_all(batch(fields))
        await _until(lambda: bool(rejected(cluster)))
        assert set(await acks(genuine, reader, nonce)) == {welcome["last"]}
    finally:
        await stream.aclose()
    rows = rejected(cluster)
    assert [(row["node"], row["entry"], row["reason"]) for row in rows] == [
        (receiver.node_id, f"link:{sender.node_id}", "misrouted")
    ]
    await bob.expect_silence()
    await candidates(alice, bob, itertools.count(), 2)  # node 0's numbers are untouched


async def test_a_batch_from_the_inbox_sent_again_on_a_link_counts_once_then_is_a_replay(
    cluster: ClusterHarness,
) -> None:
    """A number carried out from the inbox that comes on a link: the link's own, late (its
    target was frozen, and read the sender's inbox copy first), so it is counted as the other
    path's copy, once. Again after that, it is a replay, and audited. Never carried out twice."""
    _alice, bob = await call_across_nodes(cluster)
    receiver = member(cluster, 1)
    genuine = codec(cluster=cluster.name)
    origin = "ghost"  # an origin of its own: its numbers do not collide with node 0's
    fields = genuine.seal_delivery(origin, receiver.node_id, 1, [ring_bob(bob, 50)], at=now_ms())
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        client.xadd(f"{cluster.name}:in:{receiver.node_id}", fields)  # type: ignore[arg-type]
    finally:
        client.close()
    await bob.expect("ice-candidate", callId="ab", n=50)  # carried out once, from the inbox
    duplicates = receiver.duplicates
    stream, _, _, welcome = await open_link(genuine, receiver, origin, high=1)
    try:
        assert welcome["last"] == 1
        await stream.send_all(batch(fields))
        await _until(lambda: receiver.duplicates == duplicates + 1)
        assert not rejected(cluster)
        await stream.send_all(batch(fields))
        await _until(lambda: bool(rejected(cluster)))
    finally:
        await stream.aclose()
    await bob.expect_silence()  # not carried out again, either time
    assert [row["reason"] for row in rejected(cluster)] == ["replayed"]
    assert receiver.duplicates == duplicates + 1


# -- acks and handshakes -----------------------------------------------------------------------


async def test_a_links_first_batch_is_acked_however_soon_it_comes(
    cluster: ClusterHarness,
) -> None:
    """An opener may send its first batch with its confirmation, or right after it: either
    way it is acked within `ack_timeout` (after that, a node's sender falls back to the inbox).
    A batch carried out before the target's ack task first ran used to wait for another."""
    await cluster.start()
    receiver = member(cluster, 1)
    genuine = codec(cluster=cluster.name)
    origin = "ghost"  # numbers of its own

    def first(seq: int) -> bytes:
        return batch(genuine.seal_delivery(origin, receiver.node_id, seq, [], at=now_ms()))

    for seq in range(1, 11):
        together = seq % 2 == 1
        stream, reader, nonce, _ = await open_link(
            genuine, receiver, origin, first=first(seq) if together else b""
        )
        try:
            if not together:
                await stream.send_all(first(seq))
            with trio.fail_after(receiver.links.ack_timeout):
                assert await acks(genuine, reader, nonce) == [seq]
        finally:
            await stream.aclose()
    assert not rejected(cluster)


async def acking_hourly(cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch) -> ClusterNode:
    """The cluster started, and node 1, which acks the links it accepts once an hour (unless
    something asks for sooner)."""
    await cluster.start()
    receiver = member(cluster, 1)
    monkeypatch.setattr(links_module, "ACK_INTERVAL", 3600.0)
    monkeypatch.setattr(receiver.links, "ack_timeout", 8 * 3600.0)
    return receiver


async def test_a_busy_link_is_acked_after_so_many_batches_without_waiting_for_the_interval(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acks come once an interval, or as soon as ACK_AFTER batches came since the last: with
    the interval pushed out of the test's reach, the ACK_AFTER-th batch is acked."""
    receiver = await acking_hourly(cluster, monkeypatch)
    genuine = codec(cluster=cluster.name)
    origin = "ghost"
    stream, reader, nonce, _ = await open_link(genuine, receiver, origin)
    try:
        frames = [
            batch(genuine.seal_delivery(origin, receiver.node_id, seq, [], at=now_ms()))
            for seq in range(1, ACK_AFTER + 1)
        ]
        await stream.send_all(b"".join(frames))
        assert await acks(genuine, reader, nonce) == [ACK_AFTER]
    finally:
        await stream.aclose()
    assert not rejected(cluster)


async def test_a_link_is_acked_in_time_for_an_opener_that_waits_less(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opener's hello says how long it waits for acks (its `node_timeout` may be lower
    than the target's during a rolling change): the target acks in time for it, even with
    its own interval an hour."""
    receiver = await acking_hourly(cluster, monkeypatch)
    genuine = codec(cluster=cluster.name)
    origin = "ghost"
    stream, reader, nonce, _ = await open_link(genuine, receiver, origin, ack_timeout=0.5)
    try:
        await stream.send_all(
            batch(genuine.seal_delivery(origin, receiver.node_id, 1, [], at=now_ms()))
        )
        assert await acks(genuine, reader, nonce) == [1]
    finally:
        await stream.aclose()


async def test_a_draining_node_acks_its_links_before_it_closes_them(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At shutdown a node closes its links after one last ack: what it carried out is not
    copied to its inbox (whose handover would put it in a resume buffer a second time)."""
    monkeypatch.setattr(links_module, "ACK_INTERVAL", 3600.0)
    await cluster.start()
    sender, receiver = member(cluster, 0), member(cluster, 1)
    for node in (sender, receiver):  # acks only when asked, and no link failed for it
        monkeypatch.setattr(node.links, "ack_timeout", 8 * 3600.0)
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    for client in (alice, bob):  # (the harness's wait for a quiet cluster waits for acks)
        client.after_receive = trio.lowlevel.checkpoint
    await connected_call(alice, bob)
    await candidates(alice, bob, itertools.count(), 3)
    assert sender.links.linked(receiver.node_id)
    assert sender.links.unacked > 0  # carried out, not acked: the interval is an hour
    inboxed = sender.links.batches_inboxed
    receiver.links.close_inbound()
    await _until(lambda: not sender.links.linked(receiver.node_id))
    assert sender.links.unacked == 0
    assert sender.links.batches_inboxed == inboxed


async def test_a_handshake_played_again_opens_nothing(cluster: ClusterHarness) -> None:
    """A link's hello and confirmation, recorded off the network and played on a new
    connection: the target's welcome asks for a new nonce signed back, so it is refused and
    audited, and what follows is not carried out."""
    alice, bob = await call_across_nodes(cluster)
    receiver = member(cluster, 1)
    genuine = codec(cluster=cluster.name)
    origin, nonce = "ghost", secrets.token_hex(16)
    recorded_hello = hello(genuine, origin, receiver.node_id, nonce)
    first = await dial(receiver)
    try:
        await first.send_all(recorded_hello)
        _, welcome = await welcomed(first, genuine, receiver, origin, nonce)
        recorded_confirm = confirm(genuine, origin, receiver.node_id, welcome["m"])
        await first.send_all(recorded_confirm)
    finally:
        await first.aclose()
    received = receiver.received
    # Signed with the key, numbered as new: carried out on any link that opened.
    fresh = batch(
        genuine.seal_delivery(origin, receiver.node_id, 1, [ring_bob(bob, 99)], at=now_ms())
    )
    again = await dial(receiver)
    try:
        await again.send_all(recorded_hello)
        _, welcome = await welcomed(again, genuine, receiver, origin, nonce)
        await again.send_all(recorded_confirm + fresh)
        await closed_without_a_word(again)
        entry = local_entry(again)
    finally:
        await again.aclose()
    rows = rejected(cluster)
    assert [(row["entry"], row["reason"]) for row in rows] == [(entry, "replayed")]
    assert receiver.received == received
    await bob.expect_silence()
    await candidates(alice, bob, itertools.count(), 2)


# -- links listening on every address ----------------------------------------------------------


async def test_links_on_a_wildcard_address_are_dialled_at_the_advertised_one(
    cluster: ClusterHarness,
) -> None:
    await cluster.start(link_host="0.0.0.0", link_advertise="127.0.0.1")
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob)
    sender = member(cluster, 0)
    assert all(member(cluster, i).links.address.startswith("127.0.0.1:") for i in range(3))
    inboxed = sender.links.batches_inboxed
    await candidates(alice, bob, itertools.count(), 3)
    assert sender.links.linked(member(cluster, 1).node_id)
    assert sender.links.batches_inboxed == inboxed


# -- frames, without nodes ---------------------------------------------------------------------


def _frames() -> list[tuple[bytes, bytes]]:
    sealer = codec()
    fields = sealer.seal_delivery("n1", "n2", 7, [], at=now_ms())
    return [
        (HELLO, sealer.seal_link("hello", {"o": "n1", "t": "n2", "n": "x", "high": 0})),
        (BATCH, fields[b"m"] + fields[b"p"]),
        (ACK, b""),  # the shortest frame: a kind, no body
        (WELCOME, sealer.seal_link("welcome", {"o": "n2", "t": "n1", "n": "x", "last": 3})),
    ]


def fed(chunks: list[bytes], most: int = MAX_FRAME) -> FrameReader:
    """A reader whose stream hands over one chunk per receive, then the end of the stream
    (FrameReader only calls `receive_some`)."""
    stream = trio.testing.MemoryReceiveStream()
    pending = iter(chunks)

    async def one_chunk() -> None:
        chunk = next(pending, None)
        if chunk is None:
            stream.put_eof()
        else:
            stream.put_data(chunk)

    stream.receive_some_hook = one_chunk
    return FrameReader(cast(trio.SocketStream, stream), most)


async def read_all(reader: FrameReader) -> list[tuple[bytes, bytes]]:
    """Every frame until the stream ends (LinkClosed), one `burst` at a time."""
    frames: list[tuple[bytes, bytes]] = []
    while len(frames) <= 100:  # more than any test sends: a reader that repeats itself
        try:
            frames += await reader.burst()
        except LinkClosed:
            return frames
    raise AssertionError(f"more frames than were sent: {len(frames)}")


def cuts(data: bytes, at: list[int]) -> list[bytes]:
    bounds = [0, *at, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


async def test_frames_come_whole_whatever_bytes_each_read_brings() -> None:
    frames = _frames()
    data = b"".join(frame(kind, body) for kind, body in frames)
    assert await read_all(fed([data])) == frames
    assert await read_all(fed([bytes([byte]) for byte in data])) == frames  # a byte per read
    for cut in range(1, len(data)):  # in two, at every byte: inside headers, kinds, bodies
        assert await read_all(fed(cuts(data, [cut]))) == frames, cut
    shuffle = random.Random(7)
    for _ in range(200):
        at = sorted(shuffle.sample(range(1, len(data)), shuffle.randint(2, 12)))
        assert await read_all(fed(cuts(data, at))) == frames, at
    big = (BATCH, b"x" * (RECEIVE_SIZE * 2 + 5))  # more than one receive's worth
    assert await read_all(fed([frame(*big) + data])) == [big, *frames]


def test_frames_fed_by_the_reactor_come_whole_at_any_cut() -> None:
    """The reactor reads a parked link itself and `feed`s the reader; `ready` then has every
    whole frame, and keeps the rest for the next read."""
    frames = _frames()
    data = b"".join(frame(kind, body) for kind, body in frames)
    for cut in range(1, len(data)):
        reader = FrameReader(cast(trio.SocketStream, None))  # never read from: fed
        got = []
        for chunk in cuts(data, [cut]):
            reader.feed(chunk)
            got += reader.ready()
        assert got == frames, cut


async def test_a_frame_reader_refuses_a_length_no_frame_has() -> None:
    for length in (MAX_FRAME + 1, 2**32 - 1, 0):
        # Refused on the header alone: nothing of such a body is waited for.
        with pytest.raises(BadEntry) as refused:
            await fed([struct.pack(">I", length)]).burst()
        assert refused.value.reason == "malformed"
    # The largest frame there may be is waited for; the stream ending first closes the link.
    with pytest.raises(LinkClosed):
        await fed([struct.pack(">I", MAX_FRAME) + BATCH + b"partial"]).burst()


async def test_a_frame_reader_for_handshakes_takes_small_frames_only() -> None:
    largest = frame(HELLO, b"x" * (HANDSHAKE_FRAME - 1))  # a kind and a body: the most
    assert await fed([largest], HANDSHAKE_FRAME).next() == (HELLO, b"x" * (HANDSHAKE_FRAME - 1))
    with pytest.raises(BadEntry, match="malformed"):  # on its header alone
        await fed([frame(HELLO, b"x" * HANDSHAKE_FRAME)[:4]], HANDSHAKE_FRAME).next()


async def test_a_frame_cut_off_by_the_end_of_the_stream_closes_the_link() -> None:
    data = frame(ACK, b"ok")
    for at in range(1, len(data)):
        assert await read_all(fed([data[:at]])) == []


async def test_a_handshake_step_takes_one_frame_and_leaves_the_rest() -> None:
    """`next` (a handshake step) returns one frame; what came after it in the same read is
    kept for `ready` and `burst` (a confirmation may come with the first batches)."""
    frames = _frames()
    data = b"".join(frame(kind, body) for kind, body in frames)
    reader = fed([data])
    assert await reader.next() == frames[0]
    assert await reader.next() == frames[1]
    assert reader.ready() == frames[2:]
    assert reader.ready() == []
    reader = fed(cuts(data, [3, 70, 71, len(data) - 1]))
    assert await reader.next() == frames[0]
    assert await read_all(reader) == frames[1:]


async def test_frames_over_a_real_socket_pair() -> None:
    left, right = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    frames = _frames()
    data = b"".join(frame(kind, body) for kind, body in frames)
    async with sender, receiver:
        reader = FrameReader(receiver)
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                for byte in data:  # a byte per send, the reader reading meanwhile
                    await sender.send_all(bytes([byte]))
                    await trio.sleep(0)
                await sender.send_eof()

            nursery.start_soon(write)
            with trio.fail_after(STEP):
                assert await read_all(reader) == frames


# -- the recent paths of an origin's batches ---------------------------------------------------


def test_recent_paths_say_which_way_a_batch_came() -> None:
    paths = RecentPaths()
    assert paths.came_by_link(1) is None
    paths.add(1, linked=True)
    paths.add(2, linked=False)
    paths.add(5, linked=True)
    assert [paths.came_by_link(seq) for seq in (1, 2, 3, 5)] == [True, False, None, True]


def test_recent_paths_take_the_other_paths_copy_once() -> None:
    paths = RecentPaths()
    paths.add(3, linked=True)
    paths.add(4, linked=False)
    for seq in (3, 4):
        paths.copy_seen(seq)  # the copy came: a third arrival is a replay, whatever its path
        assert paths.came_by_link(seq) is None
    paths.copy_seen(9)  # never carried out: nothing to forget
    assert paths.came_by_link(9) is None


def test_recent_paths_forget_the_oldest_beyond_their_size() -> None:
    paths = RecentPaths(size=4)
    for seq in range(1, 5):
        paths.add(seq, linked=seq % 2 == 0)
    assert [paths.came_by_link(seq) for seq in range(1, 5)] == [False, True, False, True]
    paths.add(5, linked=True)  # takes the place of 1
    paths.add(6, linked=False)  # and of 2
    got = [paths.came_by_link(seq) for seq in range(1, 7)]
    assert got == [None, None, False, True, True, False]


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_wildcard_link_host_without_an_advertised_address_is_refused(
    tmp_path: Path, host: str
) -> None:
    path = tmp_path / "c.toml"
    env = {"CALLGATE_AUTH_SECRET": "y" * 40}
    path.write_text(f"[cluster]\nlink_host = '{host}'\n")
    with pytest.raises(ConfigError, match="link_advertise") as refused:
        load_settings(path, environ=env)
    assert "cluster" in str(refused.value)
    # Told where other nodes dial it, or with links off, the same host is fine.
    for extra in ("link_advertise = '10.0.0.5'\n", "links = false\n"):
        path.write_text(f"[cluster]\nlink_host = '{host}'\n{extra}")
        settings = load_settings(path, environ=env)
        assert settings.cluster.link_host == host


async def test_idle_connections_from_one_address_keep_no_link_shut(
    cluster: ClusterHarness,
) -> None:
    """Anyone who reaches the link port can hold connections open in their handshake; those
    from one address take at most MAX_HANDSHAKES_PER_ADDRESS slots, so the nodes (from
    another address) still open their links."""
    await cluster.start()
    target = cluster.nodes[1].hub.cluster
    assert target is not None
    host, port = target.links.address.rsplit(":", 1)
    held: list[trio.socket.SocketType] = []

    async def hold_slots() -> None:  # from 127.0.0.2, kept full: opened again and again
        while True:
            for sock in held:  # (the node closes each after a second without a hello)
                sock.close()
            held.clear()
            while len(held) < MAX_HANDSHAKES + 6:
                sock = trio.socket.socket()
                await sock.bind(("127.0.0.2", 0))
                try:
                    await sock.connect((host, int(port)))
                except OSError:
                    sock.close()
                    break
                held.append(sock)
            await trio.sleep(0.3)

    async with trio.open_nursery() as attack:
        attack.start_soon(hold_slots)
        await trio.sleep(0.3)
        alice = await cluster.connect("alice", node=0)
        bob = await cluster.connect("bob", node=1)
        await connected_call(alice, bob)
        sender = cluster.nodes[0].hub.cluster
        assert sender is not None
        await _until(lambda: sender.links.linked(target.node_id))
        linked = sender.links.batches_linked
        await alice.send("ice-candidate", ice("ab", "bob"))
        await bob.expect("ice-candidate")
        assert sender.links.batches_linked == linked + 1
        attack.cancel_scope.cancel()
    for sock in held:
        sock.close()


async def test_refused_links_are_summed_and_the_sum_is_audited_when_the_window_ends(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused links are audited once per address and reason a window (a minute; here
    shortened): the first at once, and those after it, with their count, once it has ended,
    without waiting for a next refusal."""
    monkeypatch.setattr(links_module, "REFUSAL_WINDOW", 0.5)
    await cluster.start()
    forger = codec(key=FORGER_KEY, cluster=cluster.name)
    origin, target = member(cluster, 0), member(cluster, 1)
    for _ in range(3):
        stream = await dial(target)
        try:
            await stream.send_all(hello(forger, origin.node_id, target.node_id, "n"))
            await closed_without_a_word(stream)
            entry = local_entry(stream)
        finally:
            await stream.aclose()
    await _until(lambda: len(rejected(cluster)) == 2)
    summary = [(row["entry"], row["reason"], row.get("count", 1)) for row in rejected(cluster)]
    assert summary == [(entry, "bad_mac", 1), (entry, "bad_mac", 2)]


async def test_with_links_off_a_slow_lookup_backs_off_as_no_link_does(
    cluster: ClusterHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With links off a node still looks a target up (its death verdict) before it uses the
    target's inbox. A lookup Redis does not answer in time dialled nothing: what was queued
    goes by the inbox, and the target is asked again after NO_LINK_RETRY, not on a link's
    short back-off, which counts failed dials towards a warning about a link that does not
    open."""
    monkeypatch.setattr(links_module, "HANDSHAKE_TIMEOUT", 0.2)
    await cluster.start(links=False)
    sender = member(cluster, 0)

    async def unanswered(node: str) -> str | None:
        await trio.sleep_forever()
        return None

    monkeypatch.setattr(sender, "link_address", unanswered)
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob)  # (its messages to bob went by the inbox)
    peer = sender.links._peers[member(cluster, 1).node_id]
    assert peer.attempts == 0
    assert peer.next_try - time.monotonic() > links_module.NO_LINK_RETRY / 2
