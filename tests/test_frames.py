"""The wsproto engine frames text and answers the upgrade itself: as wsproto would."""

from __future__ import annotations

import contextlib
import gc
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed
from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionType
from wsproto.events import AcceptConnection, CloseConnection, Pong, Request, TextMessage
from wsproto.utilities import RemoteProtocolError

from callgate.protocol.dialects import NativeDialect
from callgate.protocol.frames import text_frame
from callgate.transport.engine import WsprotoConnection, WsprotoRequest
from callgate.transport.head import BadHead, HeadParser, RequestHead
from callgate.transport.listener import MAX_HEAD_BYTES
from callgate.transport.upgrade import Refusal, UpgradeRules, read_upgrade

# Around each length boundary of the frame header (7-bit, 16-bit, 64-bit lengths).
SIZES = st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 65537]) | st.integers(0, 70000)


@settings(max_examples=200)
@given(text=st.text(st.characters(exclude_categories=["Cs"])), size=SIZES)
def test_text_frames_match_wsproto(text: str, size: int) -> None:
    message = (text * (size // max(1, len(text)) + 1))[:size] if text else "a" * size
    assert text_frame(message) == Connection(ConnectionType.SERVER).send(TextMessage(data=message))


# -- incoming frames: the fast path decodes exactly what wsproto would ----------------------------

FRAME = st.one_of(
    st.tuples(st.just("text"), st.text(max_size=300)),
    st.tuples(st.just("long"), st.integers(126, 70000)),
    st.tuples(st.just("pong"), st.binary(max_size=8)),
    st.tuples(st.just("fragmented"), st.lists(st.text(max_size=50), min_size=2, max_size=4)),
)


def client_bytes(frames: list[tuple[str, Any]]) -> tuple[bytes, list[str]]:
    """What a (masking) client sends for `frames`, and the text messages the server must see."""
    client = Connection(ConnectionType.CLIENT)
    data, expected = b"", []
    for kind, value in frames:
        if kind == "text":
            data += client.send(TextMessage(data=value))
            expected.append(value)
        elif kind == "long":
            data += client.send(TextMessage(data="x" * value))
            expected.append("x" * value)
        elif kind == "pong":
            data += client.send(Pong(payload=value))
        else:
            for index, part in enumerate(value):
                last = index == len(value) - 1
                data += client.send(TextMessage(data=part, message_finished=last))
            expected.append("".join(value))
    return data, expected


def open_server() -> Any:
    """wsproto's server side after the handshake (the engine's `WSConnection`, minus HTTP)."""
    return Connection(ConnectionType.SERVER)


@settings(max_examples=150, deadline=None)
@given(frames=st.lists(FRAME, max_size=12), chunk=st.integers(1, 9000))
def test_incoming_frames_in_any_chunks_give_the_same_messages(
    frames: list[tuple[str, Any]], chunk: int
) -> None:
    data, expected = client_bytes(frames)

    async def run() -> list[str]:
        server_side, client_side = trio.testing.memory_stream_pair()
        engine = WsprotoConnection(server_side, open_server(), 2**20)
        for start in range(0, len(data), chunk):
            await client_side.send_all(data[start : start + chunk])
        await client_side.aclose()
        received = []
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await engine.get_message()
                assert isinstance(message, str)
                received.append(message)
        return received

    assert trio.run(run) == expected


async def test_a_close_after_fast_frames_is_answered_by_wsproto() -> None:
    server_side, client_side = trio.testing.memory_stream_pair()
    engine = WsprotoConnection(server_side, open_server(), 2**20)
    client = Connection(ConnectionType.CLIENT)
    await client_side.send_all(
        client.send(TextMessage(data="hello")) + client.send(CloseConnection(code=1000))
    )
    assert await engine.get_message() == "hello"
    with pytest.raises(ConnectionClosed):
        await engine.get_message()
    assert engine.closed is not None and engine.closed.code == 1000
    client.receive_data(bytes(await client_side.receive_some()))
    assert [type(event).__name__ for event in client.events()] == ["CloseConnection"]


async def test_a_bad_frame_after_fast_frames_is_refused_like_wsproto_refuses_it() -> None:
    server_side, client_side = trio.testing.memory_stream_pair()
    engine = WsprotoConnection(server_side, open_server(), 2**20)
    client = Connection(ConnectionType.CLIENT)
    # A whole text frame as a server frames it: valid in every way but its missing mask, which
    # only a client must set (RFC 6455 5.1). The same text masked is taken first.
    unmasked_text = open_server().send(TextMessage(data="hi"))
    assert unmasked_text == b"\x81\x02hi"
    await client_side.send_all(client.send(TextMessage(data="ok")) + unmasked_text)
    # The client hangs up: a refusal must come from the frame, not from a wait for more of it.
    await client_side.send_eof()
    assert await engine.get_message() == "ok"
    with pytest.raises(ConnectionClosed):
        await engine.get_message()
    assert engine.closed is not None and engine.closed.code == 1002


# -- the upgrade: parsed once by the front (httptools), checked and answered like wsproto --------

GOOD_HEAD = (
    b"GET /ws HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def parsed(head: bytes) -> tuple[RequestHead, bytes]:
    parser = HeadParser(MAX_HEAD_BYTES)
    request = parser.feed(head)
    assert request is not None
    return request, parser.trailing


def test_the_head_parser_takes_a_head_in_pieces_and_keeps_what_follows_it() -> None:
    parser = HeadParser(MAX_HEAD_BYTES)
    data = GOOD_HEAD.replace(b"Upgrade: websocket", b"UPGRADE:  websocket \t") + b"\x81\x80early"
    pieces = [data[:7], data[7:40], data[40:]]
    assert parser.feed(pieces[0]) is None
    assert parser.feed(pieces[1]) is None
    head = parser.feed(pieces[2])
    assert head is not None
    assert (head.method, head.target) == (b"GET", b"/ws")
    assert (b"upgrade", b"websocket") in head.headers  # names lowercased, blanks stripped
    assert parser.trailing == b"\x81\x80early"  # a client that did not wait for the 101


def test_a_head_parser_is_freed_without_the_cycle_collector() -> None:
    """A parser and its callbacks form no reference cycle: in a connect storm, every cycle is
    left for the garbage collector to find, and it was half of what it found."""
    gc.collect()
    gc.disable()
    try:
        parser = HeadParser(MAX_HEAD_BYTES)
        assert parser.feed(GOOD_HEAD + b"\x81\x80early") is not None
        del parser
        assert gc.collect() == 0  # nothing unreachable was left behind
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nBad Header: x\r\n\r\n",  # a space in a header name
        b"GET /ws HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * (MAX_HEAD_BYTES + 1),  # oversized
    ],
)
def test_a_broken_or_oversized_head_is_refused(data: bytes) -> None:
    def feed_as_the_front_reads(parser: HeadParser) -> None:
        for start in range(0, len(data), 4096):
            assert parser.feed(data[start : start + 4096]) is None

    with pytest.raises(BadHead):
        feed_as_the_front_reads(HeadParser(MAX_HEAD_BYTES))


def wsproto_accepts(head: bytes) -> bytes | None:
    """What wsproto itself answers to `head`: its 101 bytes, or None if it refuses it."""
    protocol = WSConnection(ConnectionType.SERVER)
    try:
        protocol.receive_data(head)
    except RemoteProtocolError:
        return None
    if not any(isinstance(event, Request) for event in protocol.events()):
        return None
    return protocol.send(AcceptConnection())


RULES = UpgradeRules(native_path="/ws", native=NativeDialect(), socketio=None)


def upgrade_request(
    request: RequestHead, trailing: bytes, stream: trio.abc.Stream, max_size: int
) -> WsprotoRequest | None:
    """The wsproto engine's request for a head the front checked (upgrade.py), or None."""
    checked = read_upgrade(request, RULES, "192.0.2.1")
    if isinstance(checked, Refusal):
        return None
    return WsprotoRequest(stream, checked.key, trailing, max_size)


async def test_the_upgrade_is_answered_byte_for_byte_like_wsproto() -> None:
    server_side, client_side = trio.testing.memory_stream_pair()
    request, trailing = parsed(GOOD_HEAD)
    upgrade = upgrade_request(request, trailing, server_side, 2**20)
    assert upgrade is not None
    engine = await upgrade.accept()
    # The 101 is staged: it goes out with the first frame, in one write.
    await engine.send_message("hello")
    with trio.fail_after(5):
        answered = await client_side.receive_some()
    expected_101 = wsproto_accepts(GOOD_HEAD)
    assert expected_101 is not None
    assert answered == expected_101 + text_frame("hello")
    with pytest.raises(RuntimeError):
        await upgrade.accept()  # spent


async def test_the_101_goes_out_before_the_server_waits_for_the_client() -> None:
    """A browser sends `auth` only once it has the 101: a connection that reads before it has
    sent anything writes the staged 101 first."""
    server_side, client_side = trio.testing.memory_stream_pair()
    request, trailing = parsed(GOOD_HEAD)
    upgrade = upgrade_request(request, trailing, server_side, 2**20)
    assert upgrade is not None
    engine = await upgrade.accept()
    client = Connection(ConnectionType.CLIENT)
    async with trio.open_nursery() as nursery:
        got: list[str | bytes] = []

        async def read() -> None:
            got.append(await engine.get_message())

        nursery.start_soon(read)
        with trio.fail_after(5):
            assert await client_side.receive_some() == wsproto_accepts(GOOD_HEAD)
            await client_side.send_all(client.send(TextMessage(data="auth")))
    assert got == ["auth"]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"GET ", b"POST "),
        (b"Connection: keep-alive, Upgrade", b"Connection: keep-alive"),
        (b"Upgrade: websocket", b"Upgrade: h2c"),
        (b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 12"),
        (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""),
        (b"Host: example\r\n", b""),  # HTTP/1.1 requires it
    ],
)
def test_a_broken_upgrade_is_refused_like_wsproto_refuses_it(old: bytes, new: bytes) -> None:
    head = GOOD_HEAD.replace(old, new)
    request, trailing = parsed(head)
    assert wsproto_accepts(head) is None
    assert upgrade_request(request, trailing, trio.testing.memory_stream_pair()[0], 2**20) is None


async def test_frames_sent_with_the_upgrade_are_read_first() -> None:
    server_side, _ = trio.testing.memory_stream_pair()
    early = Connection(ConnectionType.CLIENT).send(TextMessage(data="early"))
    request, trailing = parsed(GOOD_HEAD + early)
    assert trailing == early
    upgrade = upgrade_request(request, trailing, server_side, 2**20)
    assert upgrade is not None
    engine = await upgrade.accept()
    with trio.fail_after(5):
        assert await engine.get_message() == "early"


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=5000), mask=st.binary(min_size=4, max_size=4))
def test_unmasking_is_the_xor_with_the_repeated_mask(payload: bytes, mask: bytes) -> None:
    """RFC 6455 5.3, byte by byte, against the big-integer XOR (both sides of its 4 KiB cache
    limit)."""
    from callgate.protocol.frames import _unmask

    expected = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    assert _unmask(payload, mask) == expected
    assert _unmask(bytearray(payload), bytearray(mask)) == expected
