"""ICE servers for the `session` message (contract section 7).

TURN credentials use the TURN REST form that coturn's `use-auth-secret` accepts:
`username = "<expiry unix s>:<user>"`, `credential = base64(HMAC-SHA1(secret, username))`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from callgate.config import IceSettings


def turn_credentials(secret: str, user: str, *, now: int, ttl: int) -> tuple[str, str]:
    username = f"{now + ttl}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def ice_servers(settings: IceSettings, user: str, *, now: int) -> list[dict[str, Any]]:
    """The list a client passes to `RTCPeerConnection({iceServers})`; fresh on every call."""
    servers: list[dict[str, Any]] = []
    if settings.stun_urls:
        servers.append({"urls": list(settings.stun_urls)})
    if settings.turn_urls and settings.turn_secret is not None:
        username, credential = turn_credentials(
            settings.turn_secret.get_secret_value(), user, now=now, ttl=settings.turn_ttl
        )
        servers.append(
            {"urls": list(settings.turn_urls), "username": username, "credential": credential}
        )
    return servers
