"""Who the client is behind a load balancer: trusted proxies, forwarding headers, PROXY protocol.

Sans-I/O and strict. The TCP peer is the client unless it is one of `[server] trusted_proxies`;
only then is the client's address taken from what that proxy says:

* a PROXY protocol header (HAProxy's spec, v1 text or v2 binary) at the very start of the TCP
  stream, when `[server] proxy_protocol` is on (`ProxyHeaderParser`; the listener reads it before
  the HTTP request). A PROXY header from a peer that is not trusted is refused, as is a trusted
  peer's connection without one;
* the forwarding header the proxy writes, `X-Forwarded-For` or `Forwarded` (RFC 7239), by
  `[server] proxy_header` (`forwarded_client`, called once, from upgrade.py). Only the one
  header named is read: a proxy that writes `X-Forwarded-For` passes a client's own `Forwarded`
  through untouched, so reading both would let a client choose its address.

The client is the right-most address of the chain that is not a trusted proxy (what nginx's
`real_ip_recursive on` does): every proxy appends the address it saw, so the entries to the
right of the first untrusted one were written by our proxies, and the ones to its left by
whoever the client is, who may lie. A chain that cannot be parsed up to that entry, an entry
there that is not an IP address (`unknown`, an obfuscated `_node`), or more than `MAX_HOPS`
trusted hops is refused (`BadForwarding`): it never grants an address, not even the proxy's.

A third-party parser was considered (`proxy-protocol` on PyPI): it is built around an asyncio
server, so its reading would not fit trio; the format is small, and the parser here is bounded
by the spec's own limits (107 bytes for v1, a declared length for v2, capped here).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Forwarding hops read from the right of a chain before it is refused as too long.
MAX_HOPS = 16
# The largest forwarding header value (all its lines together) that is read at all.
MAX_FORWARDING_BYTES = 4096

V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107  # the spec's worst case, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_BYTES = 16
# The spec allows 65535 bytes of addresses and TLVs; real balancers send a few hundred at most.
V2_MAX_BYTES = V2_HEADER_BYTES + 2048


class BadForwarding(Exception):
    """A forwarding header or PROXY header that is malformed, too long, or not allowed here."""


def parse_address(text: str) -> IPAddress:
    """An IP address, IPv6 possibly in brackets or with a zone; an IPv4-mapped IPv6 address
    (`::ffff:192.0.2.1`, from a dual-stack socket) is its IPv4 address, so one client has one
    address for the per-address limits. Raises: ValueError."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The addresses and networks of `[server] trusted_proxies`."""

    __slots__ = ("_networks",)

    def __init__(self, entries: Iterable[str] = ()) -> None:
        """Raises: ValueError for an entry that is neither an address nor a CIDR range."""
        self._networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(entry.strip(), strict=False) for entry in entries
        )

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: object) -> bool:
        if not self._networks:  # the default: no proxy trusted, nothing to parse
            return False
        if isinstance(address, str):
            try:
                address = parse_address(address)
            except ValueError:
                return False
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return any(address in network for network in self._networks)


# -- forwarding headers -------------------------------------------------------------------------


def forwarded_client(peer: str, values: list[bytes], header: str, trusted: TrustedProxies) -> str:
    """The client's address: `peer`, or, when `peer` is trusted, what its header says.

    `values` are the lines of the header named by `header` (`x-forwarded-for` or `forwarded`),
    in order; several lines are one comma-separated list (RFC 9110 5.3).

    Raises: BadForwarding (the module docstring says when).
    """
    if peer not in trusted or not values:
        return peer
    joined = b", ".join(values)
    if len(joined) > MAX_FORWARDING_BYTES:
        raise BadForwarding("forwarding header too large")
    try:
        text = joined.decode("ascii")
    except UnicodeDecodeError:
        raise BadForwarding("forwarding header is not ASCII") from None
    hops = _forwarded_for(text) if header == "forwarded" else _x_forwarded_for(text)
    client = peer
    for count, hop in enumerate(reversed(hops)):
        if count >= MAX_HOPS:
            raise BadForwarding("too many forwarding hops")
        try:
            address = parse_address(hop)
        except ValueError:
            raise BadForwarding("forwarding header names no address") from None
        client = str(address)
        if address not in trusted:
            return client
    return client  # every hop is one of ours: the left-most is as close to the client as known


def _x_forwarded_for(text: str) -> list[str]:
    """`X-Forwarded-For: client, proxy1, proxy2`: the addresses, empty entries refused."""
    hops = [item.strip() for item in text.split(",")]
    if any(not hop for hop in hops):
        raise BadForwarding("empty X-Forwarded-For entry")
    return [_strip_port(hop) for hop in hops]


_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _forwarded_for(text: str) -> list[str]:
    """The `for=` of each element of an RFC 7239 `Forwarded` value, in order.

    forwarded-element = [ pair ] *( ";" [ pair ] ), pair = token "=" value, value = token or
    quoted-string; elements are separated by commas. An element without `for` is refused: the
    chain would have a hole exactly where a hop should be.
    """
    hops: list[str] = []
    found: str | None = None
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        start = i
        while i < n and text[i] in _TCHAR:
            i += 1
        name = text[start:i].lower()
        if not name or i >= n or text[i] != "=":
            raise BadForwarding("malformed Forwarded header")
        i += 1
        if i < n and text[i] == '"':
            i += 1
            value_chars: list[str] = []
            while True:
                if i >= n:
                    raise BadForwarding("unterminated quoted string in Forwarded header")
                char = text[i]
                if char == '"':
                    i += 1
                    break
                if char == "\\":
                    i += 1
                    if i >= n:
                        raise BadForwarding("malformed Forwarded header")
                    char = text[i]
                value_chars.append(char)
                i += 1
            value = "".join(value_chars)
        else:
            start = i
            while i < n and text[i] in _TCHAR:
                i += 1
            value = text[start:i]
            if not value:
                raise BadForwarding("malformed Forwarded header")
        if name == "for":
            if found is not None:
                raise BadForwarding("two 'for' parameters in one Forwarded element")
            found = _strip_port(value)
        while i < n and text[i] in " \t":
            i += 1
        if i >= n or text[i] == ",":
            if found is None:
                raise BadForwarding("Forwarded element without 'for'")
            hops.append(found)
            found = None
            if len(hops) > 2 * MAX_HOPS + 1:
                raise BadForwarding("too many forwarding hops")
            if i >= n:
                return hops
            i += 1
        elif text[i] == ";":
            i += 1
        else:
            raise BadForwarding("malformed Forwarded header")


def _strip_port(node: str) -> str:
    """RFC 7239 6: `192.0.2.43:47011` or `"[2001:db8::1]:4711"` without the port."""
    if node.startswith("["):
        close = node.find("]")
        return node[: close + 1] if close > 0 else node
    host, _, port = node.rpartition(":")
    return host if node.count(":") == 1 and port.isdigit() else node


# -- PROXY protocol -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete PROXY header: the client's address (None for `LOCAL`/`UNKNOWN`, where the
    connection's own peer stands), and the bytes that followed it (the HTTP request)."""

    source: str | None
    rest: bytes


def looks_like_proxy_header(data: bytes) -> bool:
    """True when `data` (the first bytes of a stream) is, or begins, a PROXY header."""
    probe = data[: len(V2_SIGNATURE)]
    return V1_PREFIX.startswith(probe[:6]) or V2_SIGNATURE.startswith(probe)


class ProxyHeaderParser:
    """Collects the first bytes of a stream until its PROXY header is complete.

    Sans-I/O: `feed` the bytes as they arrive; it returns the header once complete.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Raises: BadForwarding for anything but a well-formed v1 or v2 header."""
        self._buffer += data
        buffer = self._buffer
        if buffer.startswith(V2_SIGNATURE):
            return self._v2(buffer)
        if len(buffer) < len(V2_SIGNATURE) and V2_SIGNATURE.startswith(buffer):
            return None  # could still be either
        if buffer.startswith(V1_PREFIX) or (len(buffer) < 6 and V1_PREFIX.startswith(buffer)):
            return self._v1(buffer)
        raise BadForwarding("no PROXY protocol header")

    def _v1(self, buffer: bytes) -> ProxyHeader | None:
        end = buffer.find(b"\r\n", 0, V1_MAX_BYTES)
        if end < 0:
            if len(buffer) >= V1_MAX_BYTES:
                raise BadForwarding("PROXY v1 header too long")
            return None
        rest = buffer[end + 2 :]
        try:
            line = buffer[:end].decode("ascii")
        except UnicodeDecodeError:
            raise BadForwarding("PROXY v1 header is not ASCII") from None
        parts = line.split(" ")
        if parts[:2] == ["PROXY", "UNKNOWN"]:
            return ProxyHeader(None, rest)  # the spec: use the connection's own addresses
        if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6"):
            raise BadForwarding("malformed PROXY v1 header")
        _, family, source, destination, source_port, destination_port = parts
        try:
            addresses = [ipaddress.ip_address(source), ipaddress.ip_address(destination)]
        except ValueError:
            raise BadForwarding("malformed PROXY v1 address") from None
        version = 4 if family == "TCP4" else 6
        if any(address.version != version for address in addresses):
            raise BadForwarding("PROXY v1 address of the wrong family")
        for port in (source_port, destination_port):
            if not port.isdigit() or (len(port) > 1 and port[0] == "0") or int(port) > 65535:
                raise BadForwarding("malformed PROXY v1 port")
        return ProxyHeader(str(parse_address(source)), rest)

    def _v2(self, buffer: bytes) -> ProxyHeader | None:
        if len(buffer) < V2_HEADER_BYTES:
            return None
        version_command, family, length = struct.unpack_from("!BBH", buffer, 12)
        if version_command >> 4 != 2 or version_command & 0x0F not in (0, 1):
            raise BadForwarding("malformed PROXY v2 header")
        total = V2_HEADER_BYTES + length
        if total > V2_MAX_BYTES:
            raise BadForwarding("PROXY v2 header too long")
        if len(buffer) < total:
            return None
        body, rest = buffer[V2_HEADER_BYTES:total], buffer[total:]
        if version_command & 0x0F == 0:  # LOCAL: the proxy's own connection (a health check)
            return ProxyHeader(None, rest)
        address_family, transport = family >> 4, family & 0x0F
        if transport not in (1, 2):  # STREAM or DGRAM; UNSPEC is for LOCAL only
            raise BadForwarding("PROXY v2 header without an address")
        if address_family == 1 and length >= 12:
            return ProxyHeader(str(ipaddress.IPv4Address(body[:4])), rest)
        if address_family == 2 and length >= 36:
            return ProxyHeader(str(parse_address(str(ipaddress.IPv6Address(body[:16])))), rest)
        raise BadForwarding("PROXY v2 header without an IP address")
