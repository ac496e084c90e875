"""Trusted proxies: the client's address from a forwarding header or a PROXY protocol header.

Parsing is tested directly (proxy.py is sans-I/O); then real sockets: a client behind a trusted
proxy is limited and audited by its own address, the same headers from anybody else change
nothing, and malformed or oversized headers are refused cleanly.
"""

from __future__ import annotations

import ipaddress
import ssl
import struct
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
from trio_websocket import wrap_client_stream

from callgate.config import LimitSettings, ServerSettings, load_settings
from callgate.errors import ConfigError
from callgate.transport.proxy import (
    MAX_HOPS,
    V2_SIGNATURE,
    BadForwarding,
    ProxyHeader,
    ProxyHeaderParser,
    TrustedProxies,
    forwarded_client,
)
from conftest import STEP, Client, Harness, exchange_raw, make_settings, token_for
from test_e2e_operations import self_signed

TRUSTED = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "2001:db8:ffff::/48"])


# -- forwarding headers, pure -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "values", "client"),
    [
        ("127.0.0.1", [b"203.0.113.5"], "203.0.113.5"),
        # the right-most address that is not a trusted proxy; what the client wrote is ignored
        ("127.0.0.1", [b"198.51.100.1, 203.0.113.5"], "203.0.113.5"),
        ("127.0.0.1", [b"203.0.113.5, 10.1.2.3, 10.9.9.9"], "203.0.113.5"),
        ("127.0.0.1", [b"garbage, 203.0.113.5"], "203.0.113.5"),
        # several header lines are one list
        ("127.0.0.1", [b"198.51.100.1", b"203.0.113.5, 10.0.0.1"], "203.0.113.5"),
        # every hop is ours: the left-most one
        ("127.0.0.1", [b"10.0.0.2, 10.0.0.1"], "10.0.0.2"),
        ("127.0.0.1", [b"2001:db8::7"], "2001:db8::7"),
        ("127.0.0.1", [b"203.0.113.5:4711"], "203.0.113.5"),
        ("127.0.0.1", [b"[2001:db8::7]:4711"], "2001:db8::7"),
        ("127.0.0.1", [b"::ffff:203.0.113.5"], "203.0.113.5"),
        ("::ffff:127.0.0.1", [b"203.0.113.5"], "203.0.113.5"),
        # no header: the proxy itself
        ("127.0.0.1", [], "127.0.0.1"),
        # an untrusted peer: its headers change nothing
        ("192.0.2.1", [b"203.0.113.5"], "192.0.2.1"),
        ("192.0.2.1", [b"not even an address"], "192.0.2.1"),
    ],
)
def test_x_forwarded_for(peer: str, values: list[bytes], client: str) -> None:
    assert forwarded_client(peer, values, "x-forwarded-for", TRUSTED) == client


@pytest.mark.parametrize(
    ("values", "client"),
    [
        ([b"for=203.0.113.5"], "203.0.113.5"),
        ([b'for="[2001:db8::7]:4711";proto=https'], "2001:db8::7"),
        ([b"for=198.51.100.1, for=203.0.113.5;by=10.0.0.1, for=10.0.0.2"], "203.0.113.5"),
        ([b'For="203.0.113.5:80"'], "203.0.113.5"),
        ([b'for=198.51.100.1;host="a,b;c", for=203.0.113.5'], "203.0.113.5"),
    ],
)
def test_forwarded(values: list[bytes], client: str) -> None:
    assert forwarded_client("127.0.0.1", values, "forwarded", TRUSTED) == client


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-forwarded-for", b"203.0.113.5, "),
        ("x-forwarded-for", b"unknown"),
        ("x-forwarded-for", b"203.0.113.5, 10.0.0.1, not-an-address"),
        ("x-forwarded-for", b"203.0.113.5, " + "é".encode()),
        ("x-forwarded-for", b", ".join([b"10.0.0.1"] * (MAX_HOPS + 1))),
        ("x-forwarded-for", b"1.2.3.4, " * 1000),
        ("forwarded", b"for=unknown"),
        ("forwarded", b"for=_hidden"),
        ("forwarded", b'for="203.0.113.5'),
        ("forwarded", b"for=203.0.113.5;for=198.51.100.1"),
        ("forwarded", b"proto=https"),
        ("forwarded", b"for=203.0.113.5,,for=198.51.100.1"),
        ("forwarded", b"for"),
        ("forwarded", b"for=203.0.113.5 junk"),
    ],
)
def test_malformed_chains_grant_nothing(header: str, value: bytes) -> None:
    with pytest.raises(BadForwarding):
        forwarded_client("127.0.0.1", [value], header, TRUSTED)


def test_trusted_proxies_match_addresses_and_ranges() -> None:
    assert "10.200.0.1" in TRUSTED
    assert "2001:db8:ffff:1::9" in TRUSTED
    assert "::ffff:10.0.0.1" in TRUSTED
    assert "11.0.0.1" not in TRUSTED
    assert "not an address" not in TRUSTED
    assert not TrustedProxies()


def test_config_refuses_bad_proxy_settings() -> None:
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_settings(None, environ={"CALLGATE_SERVER_TRUSTED_PROXIES": "10.0.0.0/33"})
    with pytest.raises(ConfigError, match="proxy_protocol"):
        load_settings(
            None,
            environ={
                "CALLGATE_AUTH_SECRET": "x" * 32,
                "CALLGATE_SERVER_PROXY_PROTOCOL": "true",
            },
        )
    settings = load_settings(
        None,
        environ={
            "CALLGATE_AUTH_SECRET": "x" * 32,
            "CALLGATE_SERVER_TRUSTED_PROXIES": "10.0.0.0/8, ::1",
        },
    )
    assert settings.server.trusted_proxies == ("10.0.0.0/8", "::1")


# -- PROXY protocol, pure -----------------------------------------------------------------------


def proxy_v2(source: str, *, command: int = 1, tlvs: bytes = b"") -> bytes:
    address = ipaddress.ip_address(source)
    if address.version == 4:
        family, body = 0x11, address.packed + bytes([192, 0, 2, 9]) + struct.pack("!HH", 5, 443)
    else:
        family = 0x21
        body = address.packed + ipaddress.ip_address("2001:db8::9").packed
        body += struct.pack("!HH", 5, 443)
    body += tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"PROXY TCP4 203.0.113.5 192.0.2.9 5 443\r\nGET", ProxyHeader("203.0.113.5", b"GET")),
        (b"PROXY TCP6 2001:db8::7 2001:db8::9 5 443\r\n", ProxyHeader("2001:db8::7", b"")),
        (b"PROXY UNKNOWN\r\nGET", ProxyHeader(None, b"GET")),
        (proxy_v2("203.0.113.5") + b"GET", ProxyHeader("203.0.113.5", b"GET")),
        (proxy_v2("2001:db8::7", tlvs=b"\x01\x00\x02h2"), ProxyHeader("2001:db8::7", b"")),
        (proxy_v2("203.0.113.5", command=0) + b"GET", ProxyHeader(None, b"GET")),
    ],
)
def test_proxy_headers_whole_and_in_pieces(data: bytes, expected: ProxyHeader) -> None:
    assert ProxyHeaderParser().feed(data) == expected
    parser = ProxyHeaderParser()
    results = [parser.feed(data[i : i + 1]) for i in range(len(data))]
    complete = [result for result in results if result is not None]
    assert complete and complete[0].source == expected.source


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 203.0.113.5 192.0.2.9 5\r\n",
        b"PROXY TCP4 2001:db8::7 192.0.2.9 5 443\r\n",
        b"PROXY TCP4 203.0.113.5 192.0.2.9 05 443\r\n",
        b"PROXY TCP4 203.0.113.5 192.0.2.9 5 65536\r\n",
        b"PROXY TCP5 203.0.113.5 192.0.2.9 5 443\r\n",
        b"PROXY TCP4 203.0.113.5  192.0.2.9 5 443\r\n",
        b"PROXY " + b"1" * 200,
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # too short for IPv4
        V2_SIGNATURE + b"\x21\x00\x00\x00",  # PROXY without an address
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # longer than allowed
    ],
)
def test_malformed_proxy_headers_are_refused(data: bytes) -> None:
    with pytest.raises(BadForwarding):
        ProxyHeaderParser().feed(data)


# -- real sockets -------------------------------------------------------------------------------


async def open_raw(h: Harness, prefix: bytes, headers: list[tuple[bytes, bytes]]) -> Client:
    """A client whose TCP stream starts with `prefix` (a PROXY header), then the upgrade."""
    target = urlsplit(h.url)
    stream = await trio.open_tcp_stream(target.hostname or "127.0.0.1", target.port or 80)
    await stream.send_all(prefix)
    ws = await wrap_client_stream(
        h.nursery, stream, target.hostname or "127.0.0.1", target.path, extra_headers=headers
    )
    client = Client(ws, stream)
    h.clients.append(client)
    return client


def bearer(user: str) -> tuple[bytes, bytes]:
    return (b"authorization", f"Bearer {token_for(user)}".encode())


async def signed_in(client: Client, user: str) -> Client:
    client.session = (await client.expect("session", user=user))["data"]
    return client


async def exchange(h: Harness, data: bytes) -> bytes:
    """Send raw bytes to the server; everything it answers before it closes."""
    assert h.server is not None
    return await exchange_raw(h.server.port, data)


def upgrade_request(extra: str = "") -> bytes:
    return (
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode()


def proxied(**server: Any) -> Any:
    return make_settings(server={"trusted_proxies": ["127.0.0.1"], **server})


def opened_addrs(h: Harness) -> list[str]:
    return [record["addr"] for record in h.audit.records("conn.open")]


async def test_clients_behind_a_trusted_proxy_are_limited_by_their_own_address(
    harness: Harness,
) -> None:
    await harness.start(proxied(max_connections_per_address=1))
    xff = b"x-forwarded-for"
    await signed_in(await harness.open(headers=[bearer("a"), (xff, b"203.0.113.5")]), "a")
    # A client that writes its own entry gets the one the proxy appended, not its choice.
    spoof = [bearer("b"), (xff, b"203.0.113.5, 203.0.113.6")]
    await signed_in(await harness.open(headers=spoof), "b")
    third = await harness.open(headers=[bearer("c"), (xff, b"203.0.113.5")])
    await third.expect_error("rate_limited")
    await third.expect_closed(4029)
    assert opened_addrs(harness) == ["203.0.113.5", "203.0.113.6", "203.0.113.5"]
    refused = harness.audit.records("conn.refused")
    assert [record["addr"] for record in refused] == ["203.0.113.5"]


async def test_the_handshake_rate_counts_each_client_behind_the_proxy(harness: Harness) -> None:
    settings = proxied()
    settings = settings.model_copy(
        update={"limits": settings.limits.model_copy(update={"handshakes": "1/minute"})}
    )
    await harness.start(settings)
    xff = b"x-forwarded-for"
    await signed_in(await harness.open(headers=[bearer("a"), (xff, b"203.0.113.5")]), "a")
    again = await harness.open(headers=[bearer("a"), (xff, b"203.0.113.5")])
    await again.expect_error("rate_limited")
    await again.expect_closed(4029)
    await signed_in(await harness.open(headers=[bearer("b"), (xff, b"203.0.113.6")]), "b")


async def test_forwarding_headers_from_an_untrusted_peer_change_nothing(harness: Harness) -> None:
    await harness.start(
        make_settings(server={"trusted_proxies": ["10.0.0.0/8"], "max_connections_per_address": 1})
    )
    xff, forwarded = b"x-forwarded-for", b"forwarded"
    await signed_in(await harness.open(headers=[bearer("a"), (xff, b"203.0.113.5")]), "a")
    second = await harness.open(headers=[bearer("b"), (xff, b"203.0.113.6"), (forwarded, b"for=x")])
    await second.expect_error("rate_limited")
    await second.expect_closed(4029)
    assert opened_addrs(harness) == ["127.0.0.1", "127.0.0.1"]


async def test_forwarded_header_when_configured_and_only_it(harness: Harness) -> None:
    await harness.start(proxied(proxy_header="forwarded"))
    headers = [
        bearer("a"),
        (b"forwarded", b'for=198.51.100.1, for="[2001:db8::7]:4711";proto=https'),
        (b"x-forwarded-for", b"203.0.113.99"),  # not the header the proxy writes: ignored
    ]
    await signed_in(await harness.open(headers=headers), "a")
    assert opened_addrs(harness) == ["2001:db8::7"]


async def test_malformed_and_oversized_forwarding_headers_are_refused(harness: Harness) -> None:
    await harness.start(proxied())
    answer = await exchange(harness, upgrade_request("X-Forwarded-For: unknown\r\n"))
    assert answer.startswith(b"HTTP/1.1 400 ") and b"forwarding header" in answer
    long_chain = ", ".join(["10.0.0.1"] * 600)
    answer = await exchange(harness, upgrade_request(f"X-Forwarded-For: {long_chain}\r\n"))
    assert answer.startswith(b"HTTP/1.1 400 ") and b"too large" in answer
    assert harness.audit.records("conn.open") == []


async def test_a_connect_storm_behind_a_trusted_proxy_gets_every_session(
    harness: Harness,
) -> None:
    """Issue 17's storm: 2,000 clients through one balancer address, with the shipped limits
    (256 connections per address, 60 handshakes a minute): each client is counted on its own
    address, so all 2,000 sign in (from an untrusted address, 60 do)."""
    shipped = ServerSettings()
    settings = proxied(max_connections_per_address=shipped.max_connections_per_address)
    settings = settings.model_copy(update={"limits": LimitSettings()})
    await harness.start(settings)
    target = urlsplit(harness.url)
    streams: list[trio.abc.Stream] = []
    sessions = 0

    async def one(index: int) -> None:
        nonlocal sessions
        address = f"198.18.{index // 256}.{index % 256}".encode()
        headers = [bearer(f"u{index}"), (b"x-forwarded-for", address)]
        stream = await trio.open_tcp_stream(target.hostname or "", target.port or 80)
        streams.append(stream)
        ws = await wrap_client_stream(
            harness.nursery, stream, target.hostname or "", target.path, extra_headers=headers
        )
        if '"session"' in await ws.get_message():
            sessions += 1

    try:
        with trio.fail_after(STEP * 12):
            async with trio.open_nursery() as storm:
                for index in range(2000):
                    storm.start_soon(one, index)
        assert sessions == 2000
    finally:
        for stream in streams:
            await stream.aclose()


@pytest.mark.both_engines
async def test_proxy_protocol_v1_and_v2_name_the_client(harness: Harness) -> None:
    await harness.start(proxied(proxy_protocol=True, max_connections_per_address=1))
    v1 = b"PROXY TCP4 203.0.113.5 192.0.2.9 5 443\r\n"
    await signed_in(await open_raw(harness, v1, [bearer("a")]), "a")
    await signed_in(await open_raw(harness, proxy_v2("2001:db8::7"), [bearer("b")]), "b")
    # The PROXY header decides, not a forwarding header the client added.
    spoof = [bearer("c"), (b"x-forwarded-for", b"198.51.100.1")]
    third = await open_raw(harness, proxy_v2("203.0.113.5"), spoof)
    await third.expect_error("rate_limited")
    await third.expect_closed(4029)
    # LOCAL (a balancer's own health check) stands for the proxy itself.
    await signed_in(await open_raw(harness, proxy_v2("0.0.0.0", command=0), [bearer("d")]), "d")
    assert opened_addrs(harness) == ["203.0.113.5", "2001:db8::7", "203.0.113.5", "127.0.0.1"]


@pytest.mark.both_engines
async def test_proxy_protocol_refusals(harness: Harness) -> None:
    await harness.start(proxied(proxy_protocol=True))
    # A trusted proxy must send the header; a malformed or oversized one is refused.
    assert await exchange(harness, upgrade_request()) == b""
    assert await exchange(harness, b"PROXY TCP4 203.0.113.5 nowhere 5 443\r\n") == b""
    assert await exchange(harness, b"PROXY " + b"1" * 300) == b""
    assert await exchange(harness, V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(100)) == b""
    assert harness.audit.records("conn.open") == []


@pytest.mark.both_engines
async def test_proxy_headers_from_untrusted_peers_are_refused(harness: Harness) -> None:
    await harness.start(
        make_settings(server={"trusted_proxies": ["10.0.0.0/8"], "proxy_protocol": True})
    )
    v1 = b"PROXY TCP4 203.0.113.5 192.0.2.9 5 443\r\n"
    assert await exchange(harness, v1 + upgrade_request()) == b""
    assert await exchange(harness, proxy_v2("203.0.113.5") + upgrade_request()) == b""
    # The peer itself, without a header, is served as it is.
    client = await harness.open(headers=[bearer("a"), (b"x-forwarded-for", b"203.0.113.5")])
    await signed_in(client, "a")
    assert opened_addrs(harness) == ["127.0.0.1"]


async def test_a_trusted_proxy_is_not_capped_by_half_open_handshakes(harness: Harness) -> None:
    """The per-address cap on handshakes in progress would cap a balancer's clients together;
    a trusted proxy's sockets are counted per client once their heads name them."""
    running = await harness.start(proxied(max_connections_per_address=2, auth_timeout=30))
    silent = [await trio.open_tcp_stream("127.0.0.1", running.port) for _ in range(2)]
    extra = await trio.open_tcp_stream("127.0.0.1", running.port)
    await extra.send_all(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(STEP):
        assert (await extra.receive_some(1024)).startswith(b"HTTP/1.1 404")
    for stream in [*silent, extra]:
        await stream.aclose()


@pytest.mark.both_engines
async def test_proxy_protocol_before_tls(harness: Harness, tmp_path: Path) -> None:
    """A TCP balancer passing TLS through sends its PROXY header in the clear, then the client's
    TLS handshake follows on the same connection."""
    cert_file, key_file, cert_pem = self_signed(tmp_path)
    tls = {"cert_file": str(cert_file), "key_file": str(key_file)}
    settings = make_settings(
        tls=tls, server={"trusted_proxies": ["127.0.0.1"], "proxy_protocol": True}
    )
    running = await harness.start(settings)
    assert running.url.startswith("wss://")
    raw = await trio.open_tcp_stream("127.0.0.1", running.port)
    await raw.send_all(proxy_v2("203.0.113.5"))
    context = ssl.create_default_context(cadata=cert_pem.decode())
    stream = trio.SSLStream(raw, context, server_hostname="localhost")
    with trio.fail_after(STEP):
        ws = await wrap_client_stream(
            harness.nursery, stream, "localhost", "/ws", extra_headers=[bearer("alice")]
        )
    client = Client(ws, stream)
    harness.clients.append(client)
    await signed_in(client, "alice")
    assert opened_addrs(harness) == ["203.0.113.5"]
