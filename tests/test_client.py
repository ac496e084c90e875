"""The Python client library against the real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from callgate.client import (
    CallAnswered,
    CallEnded,
    CallExists,
    CallRejected,
    CallRequested,
    Closed,
    Forbidden,
    IceCandidateReceived,
    RateLimited,
    SessionRenewed,
    TokenExpiring,
    UnknownCall,
    connect,
)
from conftest import SDP_ANSWER, SDP_OFFER, STEP, Harness, make_settings, token_for


async def test_a_whole_call(gate: Harness) -> None:
    async with (
        connect(gate.url, token_for("alice")) as alice,
        connect(gate.url, token_for("bob")) as bob,
    ):
        assert alice.session.user == "alice" and alice.session.ice_servers
        await alice.call("c1", "bob", SDP_OFFER, media="voice")
        ring = await bob.next_event()
        assert isinstance(ring, CallRequested)
        assert (ring.call_id, ring.caller, ring.media, ring.offer_sdp) == (
            "c1",
            "alice",
            "voice",
            SDP_OFFER,
        )
        await bob.answer("c1", "alice", SDP_ANSWER)
        answered = await alice.next_event()
        assert isinstance(answered, CallAnswered) and answered.answer_sdp == SDP_ANSWER
        await alice.ice_candidate("c1", "bob", None)
        ice = await bob.next_event()
        assert isinstance(ice, IceCandidateReceived) and ice.candidate is None
        await bob.end("c1", "alice")
        ended = await alice.next_event()
        assert isinstance(ended, CallEnded) and ended.reason is None and ended.peer == "bob"
    await gate.settle()
    # Leaving the context closes cleanly: a close frame, not a dropped socket.
    assert [r["close_code"] for r in gate.audit.records("conn.close")] == [1000, 1000]


async def test_refusals_raise_typed_errors(gate: Harness) -> None:
    async with connect(gate.url, token_for("alice")) as alice:
        with pytest.raises(UnknownCall):
            await alice.end("nope", "bob")
        with pytest.raises(Forbidden):
            await alice.request("user-connected", "bob")
        await alice.call("c2", "nobody", SDP_OFFER)
        outcome = await alice.next_event()
        assert isinstance(outcome, CallRejected) and outcome.reason == "unavailable"


async def test_rate_limited_carries_retry_after(harness: Harness) -> None:
    await harness.start(make_settings(limits={"call_request_pair": "1/minute"}))
    async with connect(harness.url, token_for("alice")) as alice:
        await alice.call("c1", "nobody", SDP_OFFER)
        with pytest.raises(RateLimited) as limited:
            await alice.call("c2", "nobody", SDP_OFFER)
        assert limited.value.retry_after is not None and limited.value.retry_after >= 1


async def test_bad_token_raises_closed_4001(gate: Harness) -> None:
    with pytest.raises(Closed) as closed:
        async with connect(gate.url, "bad"):
            pass
    assert closed.value.code == 4001 and closed.value.reason == "invalid token"


async def test_refresh_and_expiry_events(harness: Harness) -> None:
    await harness.start(make_settings(auth={"refresh_before": 0.5}))
    async with connect(harness.url, token_for("alice", ttl=1)) as alice:
        first = alice.session
        assert isinstance(await alice.next_event(), TokenExpiring)
        renewed = await alice.refresh(token_for("alice", ttl=600))
        assert renewed.expires_at > first.expires_at and renewed.session_id != first.session_id
        assert isinstance(await alice.next_event(), SessionRenewed)


async def test_closed_is_raised_from_the_iterator(harness: Harness) -> None:
    await harness.start(make_settings(auth={"refresh_before": 0}))
    async with connect(harness.url, token_for("alice", ttl=1)) as alice:
        with pytest.raises(Closed) as closed, trio.fail_after(10):
            async for _ in alice.events():
                pass
        assert closed.value.code == 4001


async def test_a_refusal_raised_in_the_block_is_its_own_type(gate: Harness) -> None:
    # `except CallExists:` around the whole `async with connect(...)` must catch it: the
    # client's nursery must not hand it over wrapped in an ExceptionGroup.
    async def call_twice() -> None:
        async with connect(gate.url, token_for("alice")) as alice:
            await alice.call("c1", "bob", SDP_OFFER)
            await alice.call("c1", "bob", SDP_OFFER)

    async with connect(gate.url, token_for("bob")):
        with pytest.raises(CallExists), trio.fail_after(STEP):
            await call_twice()


async def test_closed_raised_in_the_block_is_its_own_type(harness: Harness) -> None:
    await harness.start(make_settings(auth={"refresh_before": 0}))

    async def wait_for_expiry() -> None:
        async with connect(harness.url, token_for("alice", ttl=1)) as alice:
            while True:
                await alice.next_event()

    with pytest.raises(Closed) as closed, trio.fail_after(STEP):
        await wait_for_expiry()
    assert closed.value.code == 4001


README = Path(__file__).parent.parent / "README.md"


def readme_example() -> str:
    """The code of README.md's "A call from Python", without its `trio.run(...)` line."""
    text = README.read_text()
    example = text.split("## A call from Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    return "\n".join(line for line in example.splitlines() if not line.startswith("trio.run("))


async def test_the_readme_example_runs_twice_and_ends(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # The shipped reconnect grace: a call the example left behind would refuse the next run.
    await harness.start(make_settings(calls={"reconnect_grace": 15}))
    namespace: dict[str, Any] = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102 - our README
    call_ids = []
    async with connect(harness.url, token_for("bob")) as bob:
        for _ in range(2):
            with trio.fail_after(STEP):
                # The nursery waits for the example to end on its own once answered.
                async with trio.open_nursery() as nursery:
                    alice = token_for("alice")
                    nursery.start_soon(namespace["main"], harness.url, alice, SDP_OFFER)
                    ring = await bob.next_event()
                    assert isinstance(ring, CallRequested) and ring.caller == "alice"
                    await bob.answer(ring.call_id, "alice", SDP_ANSWER)
                    ended = await bob.next_event()
                    assert isinstance(ended, CallEnded) and ended.call_id == ring.call_id
                    assert ended.reason is None  # alice hung up, not a dropped connection
            call_ids.append(ring.call_id)
    assert call_ids[0] != call_ids[1]
    assert capsys.readouterr().out.count("answered: v=0") == 2
