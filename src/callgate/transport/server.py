"""`serve`: the listening socket, the switchboard and every connection, in one nursery."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import trio
from trio_websocket import serve_websocket

from callgate.audit import AuditLog
from callgate.auth import TokenVerifier
from callgate.config import Settings
from callgate.core.policy import CallRules
from callgate.core.switchboard import Switchboard
from callgate.ratelimit import RateLimiter
from callgate.transport.connection import ConnectionHub


@dataclass(frozen=True, slots=True)
class RunningServer:
    """What `nursery.start(serve, ...)` returns once the server is listening."""

    host: str
    port: int
    path: str
    board: Switchboard
    hub: ConnectionHub

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}{self.path}"


async def serve(
    settings: Settings,
    audit: AuditLog,
    *,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled.

    Raises:
        ConfigError: a key in `auth` cannot be used (checked before listening).
        OSError: the address cannot be bound.
    """
    verifier = TokenVerifier.from_settings(
        settings.auth, max_user_id_length=settings.validation.max_user_id_length
    )
    limiter = RateLimiter(settings.limits)
    board = Switchboard(
        CallRules(settings.calls.ring_timeout, settings.calls.max_calls_per_user), limiter
    )
    async with trio.open_nursery() as nursery:
        hub = ConnectionHub(settings, board, verifier, limiter, audit, nursery)
        ws_server = await nursery.start(
            partial(
                serve_websocket,
                hub.handle,
                settings.server.host,
                settings.server.port,
                None,
                # trio-websocket counts characters; the byte limit is checked per message too.
                max_message_size=settings.server.max_message_bytes,
                connect_timeout=settings.server.auth_timeout,
                disconnect_timeout=settings.server.close_timeout,
            )
        )
        endpoint = ws_server.listeners[0]
        port = getattr(endpoint, "port", settings.server.port)
        task_status.started(
            RunningServer(settings.server.host, port, settings.server.path, board, hub)
        )
