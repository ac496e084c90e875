"""Cluster mode: nodes on a real Redis, with caller and callee on different nodes.

The call scenarios of the core issue also run on three nodes (test_e2e_call.py and
test_e2e_outcomes.py set ON_CLUSTER). Here: what only a cluster has, namely limits shared by
nodes, a node killed mid-call, resuming on another node, revocation reaching every node, forged
and replayed log entries, and Redis restarting mid-call. The entry format and the replica are
also tested directly, without Redis.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from callgate import trail
from callgate.audit import TERMINAL_CALL_EVENTS
from callgate.cluster.entries import BadEntry, Entry, EntryCodec, NodeDown
from callgate.cluster.link import ClusterLink
from callgate.cluster.replica import RecordedThrottle, Replica
from callgate.config import ClusterSettings
from callgate.core.events import (
    Authenticated,
    Disconnected,
    MessageReceived,
    OperatorDisconnectedUser,
    OperatorEndedCall,
    RevocationChanged,
    TimerFired,
    TokenRefreshed,
)
from callgate.core.policy import CallRules, Throttled
from callgate.core.switchboard import Switchboard
from callgate.protocol.codec import FieldLimits
from callgate.protocol.messages import CallRequest, IceCandidate, UserConnected
from callgate.revocation import RevocationList
from conftest import (
    CANDIDATE,
    CLUSTER_KEY,
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


async def sign_in(h: ClusterHarness, user: str, node: int, resume: str | None = None) -> Client:
    """A connection of `user` to node `node` with a bearer token (and a resume id); the test
    reads what comes back."""
    headers = [(b"authorization", f"Bearer {token_for(user)}".encode())]
    if resume is not None:
        headers.append((b"callgate-resume", resume.encode()))
    return await h.open(headers=headers, url=h.node_url(node))


def terminal_records(h: ClusterHarness) -> list[dict[str, Any]]:
    return [row for row in h.audit.records() if row["event"] in TERMINAL_CALL_EVENTS]


# -- the entry format and the replica, without Redis ------------------------------------------


def codec(key: bytes = KEY, cluster: str = "c1") -> EntryCodec:
    return EntryCodec(cluster, key, FieldLimits())


def sample_events() -> list[Any]:
    request = CallRequest("c1", "alice", "bob", "video", call_request("c1", "alice", "bob"))
    return [
        Authenticated("n1.a", "alice", "s1", {"user": "alice"}, "old", "jti-1", 1.5),
        TokenRefreshed("n1.a", "s2", {"user": "alice"}, None, None),
        MessageReceived("n1.a", request, ref=7),
        MessageReceived("n1.a", IceCandidate("c1", "bob", ice("c1", "bob")), ref="r"),
        Disconnected("n1.a"),
        TimerFired(3),
        RevocationChanged(frozenset({"jti-1"}), {"bob": 12.0}),
        NodeDown("n2"),
        MessageReceived("n1.a", UserConnected("alice"), ref=8),  # its data is a bare string
        OperatorEndedCall("c1", "alice"),
        OperatorEndedCall("c1"),
        OperatorDisconnectedUser("bob", 4010, "disconnected by operator"),
    ]


@pytest.mark.parametrize("event", sample_events(), ids=lambda e: type(e).__name__)
def test_every_replicated_event_survives_the_log(event: Any) -> None:
    sealed = codec().seal(Entry("n1", 4, 100.25, event, Throttled("call_request", 9)))
    opened = codec().open(sealed)
    assert opened == Entry("n1", 4, 100.25, event, Throttled("call_request", 9))


def test_an_entry_signed_with_another_key_or_for_another_cluster_is_refused() -> None:
    sealed = codec().seal(Entry("n1", 1, 1.0, Disconnected("n1.a")))
    for other in (codec(key=b"x" * 40), codec(cluster="c2")):
        with pytest.raises(BadEntry, match="bad_mac"):
            other.open(sealed)


def test_an_edited_or_malformed_entry_is_refused() -> None:
    sealed = codec().seal(Entry("n1", 1, 1.0, Disconnected("n1.a")))
    edited = {**sealed, b"p": sealed[b"p"].replace(b"n1.a", b"n1.b")}
    with pytest.raises(BadEntry, match="bad_mac"):
        codec().open(edited)
    with pytest.raises(BadEntry, match="malformed"):
        codec().open({b"p": b"{}"})
    # Signed with the right key but not an entry (a broken or newer node): refused, no crash.
    body = b'{"v": 1, "o": "n1", "s": 1, "t": 1.0, "k": "launch"}'
    signed = codec()._mac(body)
    with pytest.raises(BadEntry, match="malformed"):
        codec().open({b"p": body, b"m": signed})


def test_the_replica_refuses_a_copied_entry_and_a_stale_connection_is_ignored() -> None:
    board = Switchboard(CallRules(), RecordedThrottle())
    replica = Replica(board, RecordedThrottle(), codec())
    signed_in = codec().seal(Entry("n1", 1, 1.0, sample_events()[0]))
    replica.apply(replica.receive(signed_in))
    assert board.devices_of("alice") == ["n1.a"]
    with pytest.raises(BadEntry, match="replayed"):
        replica.receive(signed_in)
    # A message of a connection the cluster already dropped changes nothing.
    down = replica.receive(codec().seal(Entry("n2", 1, 2.0, NodeDown("n1"))))
    actions = replica.apply(down)
    assert board.devices_of("alice") == []
    assert [type(action).__name__ for action in actions] == ["Audit"]
    late = replica.receive(codec().seal(Entry("n1", 2, 3.0, sample_events()[3])))
    assert replica.apply(late) == []


def test_the_rate_decision_of_the_ingress_node_is_what_every_replica_applies() -> None:
    throttle = RecordedThrottle()
    board = Switchboard(CallRules(), throttle)
    replica = Replica(board, throttle, codec())
    for seq, event in enumerate([sample_events()[0], Authenticated("n2.b", "bob", "s9")], 1):
        replica.apply(replica.receive(codec().seal(Entry("n1", seq, 1.0, event))))
    limited = Entry("n1", 3, 2.0, sample_events()[2], Throttled("call_request", 30))
    actions = replica.apply(replica.receive(codec().seal(limited)))
    assert any(getattr(a, "retry_after", None) == 30 for a in actions)
    assert throttle.decision is None
    assert len(board.calls) == 0


def test_a_snapshot_restores_the_replica_and_a_tampered_one_is_refused() -> None:
    throttle = RecordedThrottle()
    replica = Replica(Switchboard(CallRules(ring_timeout=30), throttle), throttle, codec())
    entries = [sample_events()[0], Authenticated("n2.b", "bob", "s9"), sample_events()[2]]
    sealed = [codec().seal(Entry("n1", seq, 1.0, event)) for seq, event in enumerate(entries, 1)]
    for fields in sealed:
        replica.apply(replica.receive(fields))
    snapshot = codec().seal_snapshot(b"7-0", replica.export_state())
    copy = Replica(Switchboard(CallRules(ring_timeout=30), throttle), throttle, codec())
    position, state = codec().open_snapshot(snapshot)
    copy.restore_state(state)
    assert position == b"7-0"
    assert copy.export_state() == replica.export_state()
    assert copy.timers == {1: 31.0}  # the ring timer, with its deadline
    with pytest.raises(BadEntry, match="replayed"):  # the entry numbers came along
        copy.receive(sealed[2])
    with pytest.raises(BadEntry, match="bad_mac"):
        codec().open_snapshot(snapshot.replace(b"alice", b"mallo"))
    with pytest.raises(BadEntry, match="bad_mac"):
        codec(key=b"y" * 40).open_snapshot(snapshot)


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
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob)
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
    assert session["data"]["connectionId"].startswith(cluster.nodes[2].hub.cluster.link.node_id)  # type: ignore[union-attr]
    await again.expect("ice-candidate", callId="ab")
    await again.send("call-end", {"callId": "ab", "to": "alice"})
    await alice.expect("call-end", callId="ab")
    [ended] = terminal_records(cluster)
    assert (ended["event"], ended["reason"]) == ("call.ended", "hangup")


async def test_a_forged_or_replayed_entry_is_refused_and_audited(cluster: ClusterHarness) -> None:
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        log_key = f"{cluster.name}:log"
        # Someone with access to Redis but not the cluster key "rings" bob as alice.
        forged = codec(key=b"a guessed key that is long enough!!", cluster=cluster.name).seal(
            Entry(
                alice.conn.partition(".")[0],
                10**9,
                0.0,
                MessageReceived(
                    alice.conn,
                    CallRequest("x", "alice", "bob", "video", call_request("x", "alice", "bob")),
                ),
            )
        )
        client.xadd(log_key, forged)  # type: ignore[arg-type]
        # And replays a genuine entry: bob's own sign-in.
        entries: Any = client.xrange(log_key)
        genuine = [fields for _, fields in entries if bob.conn.encode() in fields[b"p"]]
        client.xadd(log_key, genuine[0])
    finally:
        client.close()
    with trio.fail_after(STEP):
        while len(cluster.audit.records("cluster.rejected")) < 6:
            await trio.sleep(0.01)
    reasons = sorted(row["reason"] for row in cluster.audit.records("cluster.rejected"))
    assert reasons == ["bad_mac"] * 3 + ["replayed"] * 3  # each node reports what it refused
    scraped = cluster.nodes[2].hub.metrics.exposition().decode()
    assert 'callgate_cluster_rejected_total{reason="bad_mac"} 1.0' in scraped
    assert "callgate_cluster_available 1.0" in scraped
    await bob.expect_silence()
    await alice.send("call-request", call_request("ab", "alice", "bob"))
    await bob.expect("call-request", id="ab")


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


def _start_redis(port: int, processes: list[subprocess.Popen[bytes]], tmp: Path) -> None:
    server = shutil.which("redis-server") or "redis-server"
    command = [
        server,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    processes.append(
        subprocess.Popen(command, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    )


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


async def _until(predicate: Any) -> None:
    with trio.fail_after(STEP):
        while not predicate():
            await trio.sleep(0.02)


async def test_redis_restarted_mid_call_recovers(
    nursery: trio.Nursery,
    private_redis: tuple[int, list[subprocess.Popen[bytes]]],
    tmp_path: Path,
) -> None:
    port, processes = private_redis
    _start_redis(port, processes, tmp_path)
    await _wait_for_redis(port)
    h = ClusterHarness(nursery, redis_url=f"redis://127.0.0.1:{port}/0")
    async with checked(h):
        await h.start()
        alice = await h.connect("alice", node=0)
        bob = await h.connect("bob", node=1)
        await connected_call(alice, bob)
        processes[0].kill()
        processes[0].wait()
        await _until(lambda: not any(node.hub.ready for node in h.nodes))
        # Without Redis: the connections stay open; what needs the cluster is refused clearly.
        await alice.send("ice-candidate", ice("ab", "bob"), ref=1)
        await alice.expect_error("rate_limited", ref=1)
        await alice.send("call-request", call_request("cd", "alice", "carol"), ref=2)
        error = await alice.expect_error("rate_limited", ref=2)
        assert "cluster unavailable" in error["data"]["message"]
        _start_redis(port, processes, tmp_path)
        await _wait_for_redis(port)
        await _until(lambda: all(node.hub.ready for node in h.nodes))
        # The call goes on where it was.
        await alice.send("ice-candidate", ice("ab", "bob"))
        await bob.expect("ice-candidate", callId="ab", **{"from": "alice"})
        await bob.send("call-end", {"callId": "ab", "to": "alice"})
        await alice.expect("call-end", callId="ab")
        [ended] = terminal_records(h)
        assert ended["reason"] == "hangup"
        # A new call across nodes works again.
        await alice.send("call-request", call_request("ef", "alice", "bob"))
        await bob.expect("call-request", id="ef")


async def test_the_log_is_trimmed_and_a_late_node_starts_from_the_snapshot(
    cluster: ClusterHarness,
) -> None:
    await cluster.start(snapshot_every=10)
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob)
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        # The leader snapshots every 10 entries (checked once per heartbeat) and trims the log
        # to its previous snapshot. Rounds a heartbeat apart, so there are several snapshots
        # however fast the entries go (all 60 at once would give one snapshot, and no trim).
        for _ in range(6):
            for _ in range(10):
                await alice.send("ice-candidate", ice("ab", "bob"))
                await bob.expect("ice-candidate")
            await trio.sleep(0.25)  # heartbeat_interval is 0.2 s in the test cluster
        await _until(lambda: int(client.xlen(f"{cluster.name}:log")) < 40)
        assert client.exists(f"{cluster.name}:snapshot")
        joiner = await cluster.add_node()
    finally:
        client.close()
    # The newest node knows the call without having read the entries that set it up.
    assert [call.call_id for call in joiner.board.calls] == ["ab"]
    carol = await cluster.connect("carol", node=len(cluster.nodes) - 1)
    await carol.send("call-request", call_request("ca", "carol", "alice"))
    await carol.expect("call-reject", reason="busy")
    await alice.send("call-end", {"callId": "ab", "to": "bob"})
    await bob.expect("call-end")
    assert [row["reason"] for row in terminal_records(cluster)] == ["busy", "hangup"]


async def test_the_report_joins_a_call_from_the_trails_of_several_nodes(
    cluster: ClusterHarness, tmp_path: Path
) -> None:
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    await connected_call(alice, bob)
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
        else:  # told it lost, then its answer refused: it is a bystander now
            assert first == {
                "event": "call-end",
                "data": {"callId": "ab", "from": "alice", "reason": "answered_elsewhere"},
            }
            await device.expect_error("forbidden", ref=ref)
            outcomes.append("lost")
    assert sorted(outcomes) == ["lost", "won"]
    assert len(cluster.audit.records("call.answered")) == 1
    await alice.expect_silence()


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
    await _until(lambda: bool(cluster.audit.records("session.held")))
    again = await sign_in(cluster, "bob", node=2, resume=bob.session["sessionId"])
    await again.expect("session", resumed=True)
    await alice.send("ice-candidate", ice("ab", "bob"))
    await again.expect("ice-candidate", callId="ab")
    assert not terminal_records(cluster)  # the call never ended


# -- liveness and leadership against a Redis client without the cluster key -------------------


def test_heartbeat_and_lease_values_verify_only_when_genuine() -> None:
    beat = codec().seal_heartbeat("n1", 7)
    assert codec().open_heartbeat(beat, "n1") == 7
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
    assert codec().open_snapshot(codec().seal_snapshot(b"1-0", {}))[0] == b"1-0"


def test_a_node_dies_after_several_missed_checks_never_one() -> None:
    settings = ClusterSettings(heartbeat_interval=0.2, node_timeout=1.0)
    throttle = RecordedThrottle()
    replica = Replica(Switchboard(CallRules(ring_timeout=30), throttle), throttle, codec())
    link = ClusterLink(settings, replica, codec())
    try:
        assert link.misses_for_death == 5
        link.observe({"n2": 1})
        # Absent, garbage (None) or the same beat copied back: each a miss; a newer beat: seen.
        for beat in (None, 1, None, 1, 2, None, 2, 2, 2):
            link.observe({"n2": beat})
        assert link.missed == {"n2": 4}
        link.observe({"n2": 2})
        assert link.missed == {"n2": 5}
        link.observe({})
        assert link.missed == {}
    finally:
        link.close()


async def test_a_lease_taken_without_the_key_does_not_stop_leadership(
    cluster: ClusterHarness,
) -> None:
    await cluster.start(make_settings(calls={"ring_timeout": 1.0}))
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    attacker = redis.Redis.from_url(cluster.redis_url)
    try:
        # A plain SET, no expiry: before, every node saw the lease held and none led.
        attacker.set(f"{cluster.name}:leader", "attacker")
        await alice.send("call-request", call_request("ab", "alice", "bob"))
        await bob.expect("call-request", id="ab")
        # The ring timeout is a leader's duty: it fires only if a node took the lease over.
        await alice.expect("call-end", callId="ab", reason="timeout")
        assert attacker.get(f"{cluster.name}:leader") != b"attacker"
    finally:
        attacker.close()


async def test_a_heartbeat_deleted_or_forged_without_the_key_is_not_a_death(
    cluster: ClusterHarness,
) -> None:
    await cluster.start()
    alice = await cluster.connect("alice", node=0)
    bob = await cluster.connect("bob", node=1)
    victim = cluster.nodes[1].hub.cluster
    assert victim is not None
    key = f"{cluster.name}:node:{victim.link.node_id}"
    with trio.fail_after(STEP):  # a leader past its grace after start judges liveness
        while not any(node.hub.cluster.link.judging for node in cluster.nodes if node.hub.cluster):
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
