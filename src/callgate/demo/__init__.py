"""`callgate demo`: the browser demo app, served on loopback next to a development server.

Besides the static files it serves `/config.json` (where the signaling server is) and
`/token?user=NAME`, which mints a development token for any name. That endpoint is why the demo
refuses to run anywhere but on loopback with the shipped development secret.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from urllib.parse import parse_qs

import trio

from callgate.auth import mint_token
from callgate.config import Settings, is_loopback_host, uses_development_secret
from callgate.errors import ConfigError
from callgate.protocol.codec import valid_user_id
from callgate.transport.http import Route, get_routes, serve_http

STATIC = {
    "/": ("index.html", b"text/html; charset=utf-8"),
    "/index.html": ("index.html", b"text/html; charset=utf-8"),
    "/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "/style.css": ("style.css", b"text/css; charset=utf-8"),
}
TOKEN_TTL = 3600
FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<circle cx="8" cy="8" r="7" fill="#2f6fde"/></svg>'
)


def check_demo_allowed(settings: Settings) -> None:
    """Raises: ConfigError unless the server runs on loopback with the development secret."""
    if uses_development_secret(settings) != "auth.secret" or not is_loopback_host(
        settings.server.host
    ):
        raise ConfigError(
            "callgate demo hands out tokens for any name: it runs only on loopback with the"
            " shipped development secret (config/callgate.toml)"
        )


def _json(status: int, value: object) -> tuple[int, bytes, bytes]:
    return status, b"application/json", json.dumps(value).encode()


def demo_routes(settings: Settings, websocket_url: str) -> dict[str, Route]:
    check_demo_allowed(settings)
    if settings.auth.secret is None:  # check_demo_allowed has made sure it is there
        raise ConfigError("auth.secret: the demo needs the development secret")
    secret = settings.auth.secret.get_secret_value()
    files = resources.files("callgate.demo") / "static"

    def static(name: str, content_type: bytes) -> Route:
        body = (files / name).read_bytes()
        return lambda _query: (200, content_type, body)

    def token(query: str) -> tuple[int, bytes, bytes]:
        user = parse_qs(query).get("user", [""])[0]
        if not valid_user_id(user, settings.validation.max_user_id_length):
            return _json(400, {"message": "user must be a valid user id"})
        minted = mint_token(secret, user, ttl=TOKEN_TTL, now=int(time.time()))
        return _json(200, {"token": minted})

    routes: dict[str, Route] = {path: static(*entry) for path, entry in STATIC.items()}
    routes["/config.json"] = lambda _query: _json(200, {"url": websocket_url})
    routes["/favicon.ico"] = lambda _query: (200, b"image/svg+xml", FAVICON)
    routes["/token"] = token
    return routes


async def serve_demo(
    settings: Settings,
    websocket_url: str,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the demo app until cancelled; `task_status` gets the bound port."""
    if not is_loopback_host(host):
        raise ConfigError("callgate demo serves its page on loopback only")
    await serve_http(
        host, port, get_routes(demo_routes(settings, websocket_url)), task_status=task_status
    )
