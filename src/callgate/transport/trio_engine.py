"""The `trio-websocket` connection engine: the transport's `Engine` over trio-websocket.

trio-websocket runs a reader task per connection that hands each message over a memory channel,
and sends each message with its own lock and `send_all`: simple and widely used, and several
times the CPU per message of the `wsproto` engine (docs/performance.md). Only its public API is
used: the front replays the request head into `wrap_server_stream`, and the request and the
connection it accepts are wrapped here so that both engines offer the transport the same
interface (connection.py's `Engine`), all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from trio_websocket import CloseReason, WebSocketConnection, WebSocketRequest

from callgate.errors import CLOSED_BY_CLIENT, PROTOCOL_FAILURES, CloseCode

if TYPE_CHECKING:
    from callgate.transport.reactor import Reactor


class TrioWebSocketEngine:
    """An accepted trio-websocket connection, as an `Engine`."""

    __slots__ = ("_closing", "_ws")

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._closing = False  # `aclose` was called: the close is ours

    @property
    def closed(self) -> CloseReason | None:
        """Why the connection closed, never in the client's words: trio-websocket keeps the
        reason of the client's close frame, the client's own text, which goes no further."""
        closed = self._ws.closed
        if closed is None or self._closing or closed.code == CloseCode.ABNORMAL:
            return closed  # ours, or the socket was lost (trio-websocket gives no reason)
        if closed.code == CloseCode.MESSAGE_TOO_BIG and (closed.reason or "").startswith(_TOO_BIG):
            return CloseReason(closed.code, "message too big")  # trio-websocket's own close
        if closed.code in PROTOCOL_FAILURES:  # the client's frames were broken (or it says so)
            return CloseReason(closed.code, PROTOCOL_FAILURES[closed.code])
        return CloseReason(closed.code, CLOSED_BY_CLIENT)

    async def get_message(self) -> str | bytes:
        return await self._ws.get_message()

    async def send_messages(self, messages: list[str]) -> None:
        # One frame at a time: trio-websocket sends each with its own lock and write.
        for message in messages:
            await self._ws.send_message(message)

    def try_send_now(self, message: str) -> bool:
        return False  # every frame goes through the connection's writer task

    @property
    def backlog(self) -> bool:
        return False

    @property
    def has_more(self) -> bool:
        return False  # messages come one at a time, through trio-websocket's channel

    def try_ping_now(self, answered: Callable[[], None]) -> bool:
        return False  # trio-websocket pings in a task: `ping`

    async def ping(self) -> None:
        await self._ws.ping()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        self._closing = True
        await self._ws.aclose(code, reason)

    def attach_reactor(self, reactor: Reactor, inline: Callable[[str], bool]) -> None:
        """Not parked: trio-websocket's reader task does the waiting."""

    def detach_reactor(self) -> None:
        """Nothing attached."""

    def count_frames(self, counter: Callable[[], bool] | None) -> None:
        """Not counted: trio-websocket answers pings and joins fragments in its own reader
        task, out of sight of its public API (SECURITY.md, *Abuse limits*)."""


# How trio-websocket's own reason for a message over its size limit begins.
_TOO_BIG = "Exceeded maximum message size"


class TrioWebSocketRequest:
    """trio-websocket's upgrade request, answered through the `UpgradeRequest` interface."""

    def __init__(self, request: WebSocketRequest) -> None:
        self._request = request
        self._accepted: WebSocketConnection | None = None

    async def accept(self) -> TrioWebSocketEngine:
        self._accepted = await self._request.accept()
        return TrioWebSocketEngine(self._accepted)

    async def reject(self, status_code: int, *, body: bytes) -> None:
        await self._request.reject(
            status_code, extra_headers=[(b"content-type", b"application/json")], body=body
        )

    async def aclose(self) -> None:
        """Close what was accepted, if anything (the front's cleanup)."""
        if self._accepted is not None:
            await self._accepted.aclose()
