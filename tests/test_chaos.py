"""Chaos: many users calling, answering, dropping, resuming, refreshing and flooding at random.

Seeded and bounded (a fixed number of users, steps and seconds, loopback only). Afterwards:
every requested call has exactly one terminal audit line, every resume the devices were told of
is in the trail, the server holds no call, device, session or timer, and its traced memory is
back near where it started.

Its seconds are trio's, on a mock clock that moves only when every task waits: the reconnect
grace, the ring timeout, a token's refresh and the actors' pauses are measured against each
other, not against how much CPU a loaded machine lends this process. (A wall clock let a slow
run reconnect after every grace had passed: no resume, and a failed test.)
"""

from __future__ import annotations

import gc
import json
import random
import tracemalloc
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from callgate.audit import TERMINAL_CALL_EVENTS
from conftest import Client, Harness, call_request, connect_ws, make_settings, token_for

USERS = [f"user{n}" for n in range(10)]
SECONDS = 4.0


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """The test's trio clock (pytest-trio runs the test on it): it jumps to the next deadline
    once every task has waited this long in real time with nothing to read. The threshold,
    not zero, leaves loopback bytes in flight the time to arrive before a timer is let run."""
    return trio.testing.MockClock(autojump_threshold=0.005)


class Actor:
    """One user's device, driven by its own seeded random generator."""

    def __init__(self, harness: Harness, name: str, seed: int) -> None:
        self.harness = harness
        self.name = name
        self.rng = random.Random(seed)
        self.session_id: str | None = None
        self.calls: dict[str, str] = {}  # call id -> peer
        self.counter = 0
        # What the server answered to each resume this device asked for: resumed or not.
        self.resumes: Counter[bool] = Counter()

    async def run(self, deadline: float) -> None:
        while trio.current_time() < deadline:
            client = await self._connect()
            if client is None:
                continue
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, client)
                    for _ in range(self.rng.randint(3, 25)):
                        if trio.current_time() >= deadline:
                            break
                        await self._step(client)
                        # On the mock clock only pauses take time: they set how many
                        # steps fit in SECONDS (about forty per device).
                        await trio.sleep(self.rng.uniform(0, 0.2))
                    nursery.cancel_scope.cancel()
            except* ConnectionClosed:
                pass  # closed by the server (flooding 4029, token expired): reconnect
            if self.rng.random() < 0.5:
                await client.stream.aclose()  # vanish without a close frame
            else:
                with trio.move_on_after(1):
                    await client.ws.aclose()
                await client.stream.aclose()
            self.calls.clear()

    async def _connect(self) -> Client | None:
        ws, stream = await connect_ws(self.harness.nursery, self.harness.url)
        client = Client(ws, stream)
        resume = self.session_id if self.rng.random() < 0.7 else None
        data: dict[str, Any] = {"token": token_for(self.name, ttl=self.rng.choice([2, 600]))}
        if resume:
            data["resume"] = resume
        try:
            await client.send("auth", data)
            session = await client.recv()
        except (ConnectionClosed, trio.TooSlowError):
            await stream.aclose()
            return None
        if session.get("event") != "session":
            await stream.aclose()
            return None
        self.session_id = session["data"]["sessionId"]
        if resume:
            self.resumes[session["data"]["resumed"]] += 1
        return client

    async def _read(self, client: Client) -> None:
        while True:
            message = json.loads(await client.ws.get_message())
            event, data = message.get("event"), message.get("data") or {}
            if event == "session":
                self.session_id = data["sessionId"]
            elif event == "call-request":
                call_id, peer = data["id"], data["from"]
                self.calls[call_id] = peer
                choice = self.rng.random()
                if choice < 0.6:
                    answer = {"type": "answer", "sdp": "v=0"}
                    await client.send(
                        "call-answer", {"callId": call_id, "to": peer, "answer": answer}
                    )
                elif choice < 0.8:
                    await client.send("call-reject", {"callId": call_id, "to": peer})
            elif event in {"call-end", "call-reject"}:
                self.calls.pop(str(data.get("callId")), None)
            elif event == "token-expiring":
                await client.send("auth", {"token": token_for(self.name, ttl=600)})

    async def _step(self, client: Client) -> None:
        roll = self.rng.random()
        if roll < 0.35:
            self.counter += 1
            peer = self.rng.choice([u for u in USERS if u != self.name])
            call_id = f"{self.name}-{self.counter}"
            self.calls[call_id] = peer
            await client.send("call-request", call_request(call_id, self.name, peer))
        elif roll < 0.7 and self.calls:
            call_id, peer = self.rng.choice(list(self.calls.items()))
            await client.send("ice-candidate", {"candidate": None, "callId": call_id, "to": peer})
        elif roll < 0.85 and self.calls:
            call_id, peer = self.rng.choice(list(self.calls.items()))
            await client.send("call-end", {"callId": call_id, "to": peer})
            self.calls.pop(call_id, None)
        elif roll < 0.9:
            for _ in range(self.rng.randint(10, 80)):  # a burst, sometimes past the flood limit
                await client.send("user-connected", self.name)
        elif roll < 0.95:
            await client.ws.send_message("{ not json")
        else:
            await client.send("auth", {"token": token_for(self.name, ttl=600)})


async def test_chaos_leaves_a_consistent_trail_and_nothing_behind(
    harness: Harness, clock: trio.testing.MockClock
) -> None:
    tracemalloc.start()
    try:
        settings = make_settings(
            calls={"reconnect_grace": 0.5, "ring_timeout": 1.0, "resume_buffer": 4},
            auth={"refresh_before": 1.0},
            limits={
                "messages": "40/second",
                "flood": "15/5 seconds",
                "call_request": "20/second",
                "call_request_pair": "5/second",
            },
        )
        running = await harness.start(settings)
        gc.collect()
        baseline = tracemalloc.get_traced_memory()[0]
        deadline = trio.current_time() + SECONDS
        actors = [Actor(harness, name, seed) for seed, name in enumerate(USERS)]
        async with trio.open_nursery() as nursery:
            for actor in actors:
                nursery.start_soon(actor.run, deadline)
        await harness.settle()
        assert running.board.is_idle()
        assert running.hub.armed_timers == 0
        assert running.hub.connection_count == 0

        records = harness.audit.records()
        requested = Counter(
            (r["call_id"], r["caller"]) for r in records if r["event"] == "call.requested"
        )
        terminal = Counter(
            (r["call_id"], r["caller"]) for r in records if r["event"] in TERMINAL_CALL_EVENTS
        )
        assert requested, "the chaos placed no call at all"
        assert requested == terminal
        assert all(count == 1 for count in terminal.values())
        events = Counter(r["event"] for r in records)
        for expected in ("call.answered", "session.resumed", "token.refreshed"):
            assert events[expected] > 0, (expected, events)
        # Each resume the devices asked for is in the trail as the server answered it.
        resumes = sum((actor.resumes for actor in actors), Counter[bool]())
        assert events["session.resumed"] == resumes[True], (resumes, events)
        assert events["session.resume_failed"] == resumes[False], (resumes, events)

        # Measure the server, not this test: the parsed records alone are several times the
        # size of the trail they were read from.
        del records, requested, terminal, events, actors
        harness.clients.clear()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - baseline
        # The audit capture grows with the test (it is the test's own StringIO); the server must
        # not. Everything else is allowed a small margin for caches and interned strings.
        audit_size = len(harness.audit.text.encode())
        assert grown - 2 * audit_size < 2 * 1024 * 1024, (grown, audit_size)
    finally:
        tracemalloc.stop()
