"""The WebSocket upgrade request, read and checked in one place.

`read_upgrade` takes the request head the front parsed (head.py) and returns either what the
rest of callgate uses of it (`Upgrade`: its dialect, the credentials it carries, the
`Sec-WebSocket-Key` the engine answers) or the HTTP refusal it gets (`Refusal`). Nothing else
reads the request's headers: the engines build the 101 from `Upgrade.key`, the hub signs in
with `Upgrade.bearer` / `query_token` / `resume`.

The order of the checks is the contract's (protocol doc, section 1): the route (404; Socket.IO
long-polling and other Engine.IO versions get 400 with a JSON message), the WebSocket handshake
headers as RFC 6455 4.2.1 and wsproto check them (400), then who the client is (a forwarding
header from a trusted proxy, proxy.py: 400 when it is malformed). Last the `Origin` allow-list,
which refuses nothing here: a page of another origin is upgraded to be closed `4003` at once
(`Upgrade.origin_allowed`; contract section 9), because a browser's page can read a close code
and never the status of a failed upgrade.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from callgate.protocol.dialects import Dialect, NativeDialect, SocketIODialect
from callgate.transport.head import RequestHead
from callgate.transport.proxy import BadForwarding, TrustedProxies, forwarded_client

SOCKETIO_PATH = "/socket.io/"
# The header a client may resume a session with instead of the `auth` message's `resume`.
RESUME_HEADER = b"callgate-resume"


@dataclass(frozen=True, slots=True)
class UpgradeRules:
    """What a server accepts: its paths and dialects, and the browser origins allowed."""

    native_path: str
    native: NativeDialect
    socketio: SocketIODialect | None  # None: Socket.IO clients are not served
    allowed_origins: frozenset[str] = frozenset()
    # `[server] trusted_proxies`, and the header they write the client's address in.
    trusted_proxies: TrustedProxies = field(default_factory=TrustedProxies)
    proxy_header: str = "x-forwarded-for"


@dataclass(frozen=True, slots=True)
class Refusal:
    """The HTTP answer to a request that is not an upgrade callgate takes."""

    status: int
    message: str
    addr: str = ""  # the client's address, when it was known before the refusal


@dataclass(slots=True)
class Upgrade:
    """Everything callgate uses of an upgrade request (the headers are not kept).

    Not frozen: `take_bearer` drops the token once read, so a connection does not carry its
    token (a secret) in memory for its whole life.
    """

    dialect: Dialect
    target: str
    addr: str  # the client's address: the TCP peer, or what a trusted proxy says it is
    key: bytes  # Sec-WebSocket-Key, for the 101's Sec-WebSocket-Accept
    bearer: str | None  # from `Authorization: Bearer`; "" for another scheme or no token
    query_tokens: list[str]  # `?token=` (refused unless allowed: the hub decides)
    resume: str | None
    # More than one `Authorization` header: a proxy that reads the last one would disagree
    # with us (the first) about who connected, so the upgrade's credentials count for nothing.
    repeated_authorization: bool
    # False for a browser page of an origin outside `allowed_origins`: the hub closes it 4003
    # before it reads anything from it (no credentials of it are looked at).
    origin_allowed: bool = True

    def take_bearer(self) -> str | None:
        bearer, self.bearer = self.bearer, None
        return bearer


def _bearer(value: bytes | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


def read_upgrade(head: RequestHead, rules: UpgradeRules, peer: str) -> Upgrade | Refusal:
    """Route and check an upgrade request (see the module docstring for the order); `peer` is
    the address of whoever sent it (the TCP peer, or a PROXY header's source)."""
    target = urlsplit(head.target.decode("ascii", "replace"))
    first: dict[bytes, bytes] = {}  # each header's first value (names are lowercased)
    connection_upgrade = False
    authorizations = 0
    # The header is only read where a proxy is trusted at all (the default trusts none).
    forwarding_name = rules.proxy_header.encode() if rules.trusted_proxies else None
    forwarding: list[bytes] = []  # every line of the trusted proxies' header, in order
    for name, value in head.headers:
        first.setdefault(name, value)
        if name == forwarding_name:
            forwarding.append(value)
        if name == b"connection":
            connection_upgrade |= any(
                token.strip().lower() == b"upgrade" for token in value.split(b",")
            )
        elif name == b"authorization":
            authorizations += 1
    websocket = (first.get(b"upgrade") or b"").lower() == b"websocket"

    dialect: Dialect
    if target.path == rules.native_path:
        dialect = rules.native
    elif target.path == SOCKETIO_PATH and rules.socketio is not None:
        query = parse_qs(target.query)
        if query.get("EIO") != ["4"] or query.get("transport") != ["websocket"] or not websocket:
            return Refusal(
                400,
                "callgate serves Socket.IO over WebSocket only (Engine.IO v4): connect with"
                " io(url, {transports: ['websocket']})",
            )
        dialect = rules.socketio
    else:
        return Refusal(404, "not found")

    key = first.get(b"sec-websocket-key")
    if not (
        head.method == b"GET"
        and connection_upgrade
        and websocket
        and b"host" in first
        and key
        and first.get(b"sec-websocket-version") == b"13"
    ):
        return Refusal(400, "not a WebSocket upgrade")

    try:
        addr = forwarded_client(peer, forwarding, rules.proxy_header, rules.trusted_proxies)
    except BadForwarding as bad:
        return Refusal(400, str(bad), peer)

    origin = first.get(b"origin")
    origin_allowed = (
        not rules.allowed_origins
        or origin is None
        or origin.decode("latin-1") in rules.allowed_origins
    )

    resume = first.get(RESUME_HEADER)
    return Upgrade(
        dialect=dialect,
        target=head.target.decode("ascii", "replace"),
        addr=addr,
        key=key,
        bearer=_bearer(first.get(b"authorization")),
        query_tokens=parse_qs(target.query).get("token", []),
        resume=resume.decode("latin-1") if resume is not None else None,
        repeated_authorization=authorizations > 1,
        origin_allowed=origin_allowed,
    )
