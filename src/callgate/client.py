"""A typed Python client for callgate's native protocol (trio).

    async with connect("ws://127.0.0.1:8765/ws", token) as client:
        print(client.session.user)
        await client.call("call-1", "bob", offer_sdp)          # raises on refusal
        async for event in client.events():
            match event:
                case CallAnswered(call_id=call_id, answer_sdp=sdp): ...
                case CallEnded(reason="timeout"): ...

Every method that sends a message waits for the server's `ack` and raises `ServerError` (one
subclass per error code) when the server refuses it; the events the server sends on its own
(calls, outcomes, `token-expiring`) arrive in order from `events()`. A closed connection raises
`Closed` with the close code, from any method and from the iterator.

These errors arrive as themselves, never wrapped in an `ExceptionGroup`, also outside the
`async with connect(...)` block: the client reads in a trio nursery (whose errors trio groups),
and `connect` re-raises the one error of such a group, so `except CallExists:` or
`except Closed:` around the whole block catches them. A group with more than one error (besides
trio's `Cancelled`) is raised as it is.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import Any, NoReturn

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

# How many server events may wait for `events()` before the reader stops reading (back-pressure).
EVENT_BUFFER = 4096


# -- errors ------------------------------------------------------------------------------------


class ClientError(Exception):
    """Base of every error this client raises."""


class ServerError(ClientError):
    """The server refused a message (`error` event); `code` is the contract's error code."""

    code = "error"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidMessage(ServerError):
    code = "invalid_message"


class UnknownEvent(ServerError):
    code = "unknown_event"


class Forbidden(ServerError):
    code = "forbidden"


class UnknownCall(ServerError):
    code = "unknown_call"


class CallExists(ServerError):
    code = "call_exists"


class RateLimited(ServerError):
    code = "rate_limited"


_ERRORS = {cls.code: cls for cls in ServerError.__subclasses__()}


class Closed(ClientError):
    """The connection is closed; `code` is the WebSocket close code (4001: sign in again)."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"connection closed: {code} {reason or ''}".strip())
        self.code = code
        self.reason = reason


# -- what the server says ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    connection_id: str
    session_id: str
    expires_at: int
    ice_servers: list[dict[str, Any]]
    resumed: bool | None = None


@dataclass(frozen=True, slots=True)
class CallRequested:
    call_id: str
    caller: str
    media: str
    offer_sdp: str
    data: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class CallAnswered:
    call_id: str
    callee: str
    answer_sdp: str
    data: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class CallRejected:
    """The callee declined, or the server decided (`unavailable`, `busy`, `glare`)."""

    call_id: str
    peer: str
    reason: str | None
    data: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class CallEnded:
    """`reason`: None when the peer hung up; else `timeout`, `cancelled`, `answered_elsewhere`,
    `rejected_elsewhere`, `peer_disconnected`, `revoked`, `server_shutdown`."""

    call_id: str
    peer: str
    reason: str | None
    data: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class IceCandidateReceived:
    call_id: str
    peer: str
    candidate: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Renegotiated:
    call_id: str
    peer: str
    description_type: str
    sdp: str


@dataclass(frozen=True, slots=True)
class CallPending:
    """A call we placed waits for a device of the callee to sign in (a server with
    `offline = "notify"`); then `CallRinging` comes, or `CallRejected` `unavailable`."""

    call_id: str
    callee: str


@dataclass(frozen=True, slots=True)
class CallRinging:
    """A pending call of ours rings now, on a device of the callee that signed in."""

    call_id: str
    callee: str


@dataclass(frozen=True, slots=True)
class MissedCall:
    id: str  # what `Client.acknowledge_missed` takes
    call_id: str
    caller: str
    media: str
    reason: str
    time_ms: int | None  # when the call was requested, unix milliseconds


@dataclass(frozen=True, slots=True)
class MissedCalls:
    """Sent after a sign-in: calls to us nobody answered, until we acknowledge them."""

    calls: list[MissedCall]


@dataclass(frozen=True, slots=True)
class TokenExpiring:
    expires_at: int


@dataclass(frozen=True, slots=True)
class SessionRenewed:
    session: Session


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """A refusal of a message sent without waiting for its ack (or of a rate-limited one)."""

    error: ServerError


@dataclass(frozen=True, slots=True)
class OtherEvent:
    """An event this client version does not know (forward compatibility)."""

    event: str
    data: Any


Event = (
    CallRequested
    | CallAnswered
    | CallRejected
    | CallEnded
    | IceCandidateReceived
    | Renegotiated
    | CallPending
    | CallRinging
    | MissedCalls
    | TokenExpiring
    | SessionRenewed
    | ErrorReceived
    | OtherEvent
)


def _session(data: Mapping[str, Any]) -> Session:
    return Session(
        user=data["user"],
        connection_id=data["connectionId"],
        session_id=data["sessionId"],
        expires_at=int(data["expiresAt"]),
        ice_servers=list(data.get("iceServers", [])),
        resumed=data.get("resumed"),
    )


def _missed_call(item: Mapping[str, Any]) -> MissedCall:
    time_ms = item.get("time")
    return MissedCall(
        id=str(item.get("id")),
        call_id=str(item.get("callId")),
        caller=str(item.get("from")),
        media=str(item.get("type")),
        reason=str(item.get("reason")),
        time_ms=int(time_ms) if isinstance(time_ms, int | float) else None,
    )


def _error(data: Mapping[str, Any]) -> ServerError:
    kind = _ERRORS.get(str(data.get("code")), ServerError)
    return kind(str(data.get("message", "")), data.get("retryAfter"))


def parse_event(event: str, data: Any) -> Event:
    """A server message as a typed event."""
    if not isinstance(data, dict):
        return OtherEvent(event, data)
    peer = str(data.get("from", ""))
    call_id = str(data.get("callId", data.get("id", "")))
    match event:
        case "call-request":
            offer = data.get("offer") or {}
            return CallRequested(call_id, peer, str(data.get("type")), str(offer.get("sdp")), data)
        case "call-answer":
            answer = data.get("answer") or {}
            return CallAnswered(call_id, peer, str(answer.get("sdp")), data)
        case "call-reject":
            return CallRejected(call_id, peer, data.get("reason"), data)
        case "call-end":
            return CallEnded(call_id, peer, data.get("reason"), data)
        case "ice-candidate":
            return IceCandidateReceived(call_id, peer, data.get("candidate"))
        case "call-renegotiate":
            description = data.get("description") or {}
            return Renegotiated(
                call_id, peer, str(description.get("type")), str(description.get("sdp"))
            )
        case "call-pending":
            return CallPending(call_id, peer)
        case "call-ringing":
            return CallRinging(call_id, peer)
        case "missed-calls":
            return MissedCalls([_missed_call(item) for item in data.get("calls", [])])
        case "token-expiring":
            return TokenExpiring(int(data["expiresAt"]))
        case "session":
            return SessionRenewed(_session(data))
        case "error":
            return ErrorReceived(_error(data))
        case _:
            return OtherEvent(event, data)


# -- the client ----------------------------------------------------------------------------------


class Client:
    def __init__(self, ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        self._ws = ws
        self._refs = itertools.count(1)
        self._pending: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._events_in, self._events_out = trio.open_memory_channel[Event | Closed](EVENT_BUFFER)
        self._closed: Closed | None = None
        self.session: Session
        self._nursery = nursery

    # -- sending -------------------------------------------------------------------------------

    async def call(
        self,
        call_id: str,
        to: str,
        offer_sdp: str,
        *,
        media: str = "video",
        timestamp: int | None = None,
        **extra: Any,
    ) -> None:
        """Place a call. Outcomes the server decides (`unavailable`, `busy`) arrive as events."""
        data = {
            "id": call_id,
            "from": self.session.user,
            "to": to,
            "type": media,
            "offer": {"type": "offer", "sdp": offer_sdp},
            **({"timestamp": timestamp} if timestamp is not None else {}),
            **extra,
        }
        await self.request("call-request", data)

    async def answer(self, call_id: str, to: str, answer_sdp: str) -> None:
        answer = {"type": "answer", "sdp": answer_sdp}
        await self.request("call-answer", {"callId": call_id, "to": to, "answer": answer})

    async def reject(self, call_id: str, to: str, reason: str | None = None) -> None:
        extra = {"reason": reason} if reason else {}
        await self.request("call-reject", {"callId": call_id, "to": to, **extra})

    async def end(self, call_id: str, to: str) -> None:
        await self.request("call-end", {"callId": call_id, "to": to})

    async def ice_candidate(
        self, call_id: str, to: str, candidate: Mapping[str, Any] | None
    ) -> None:
        """`candidate` as RTCIceCandidate.toJSON() gives it; None for end-of-candidates."""
        await self.request("ice-candidate", {"callId": call_id, "to": to, "candidate": candidate})

    async def renegotiate(self, call_id: str, to: str, description_type: str, sdp: str) -> None:
        description = {"type": description_type, "sdp": sdp}
        await self.request(
            "call-renegotiate", {"callId": call_id, "to": to, "description": description}
        )

    async def acknowledge_missed(self, ids: Iterable[str]) -> None:
        """These missed calls were shown: the server never sends them again, to any device."""
        await self.request("missed-calls-ack", {"ids": list(ids)})

    async def refresh(self, token: str) -> Session:
        """Renew the token on this connection; the new session arrives before the ack."""
        await self.request("auth", {"token": token})
        return self.session

    async def request(self, event: str, data: Any) -> None:
        """Send any event and wait for its ack.

        Raises:
            ServerError: the server refused it (a subclass per error code).
            Closed: the connection closed first.
        """
        ref = next(self._refs)
        done = trio.Event()
        outcome: list[Any] = []
        self._pending[ref] = (done, outcome)
        try:
            await self._send({"event": event, "data": data, "ref": ref})
            await done.wait()
        finally:
            self._pending.pop(ref, None)
        result = outcome[0]
        if isinstance(result, ClientError):
            raise result

    async def _send(self, message: Mapping[str, Any]) -> None:
        if self._closed is not None:
            raise self._closed
        try:
            await self._ws.send_message(json.dumps(message, separators=(",", ":")))
        except ConnectionClosed as closed:
            raise self._close_from(closed) from None

    # -- receiving -----------------------------------------------------------------------------

    def events(self) -> AsyncIterator[Event]:
        """Everything the server sends that is not an answer to a request, in order; leaving
        the `async for` (`break`) is fine.

        Raises: Closed when the connection ends.
        """
        return _Events(self)

    async def next_event(self) -> Event:
        item = await self._events_out.receive()
        if isinstance(item, Closed):
            raise item
        return item

    async def _read(self) -> None:
        try:
            while True:
                message = json.loads(await self._ws.get_message())
                self._route(message.get("event"), message.get("data"), message.get("ref"))
                if message.get("event") not in ("ack", "error") or message.get("ref") is None:
                    parsed = parse_event(str(message.get("event")), message.get("data"))
                    if isinstance(parsed, SessionRenewed):
                        self.session = parsed.session
                    await self._events_in.send(parsed)
        except ConnectionClosed as closed:
            failure = self._close_from(closed)
            for done, outcome in self._pending.values():
                outcome.append(failure)
                done.set()
            await self._events_in.send(failure)

    def _route(self, event: Any, data: Any, ref: Any) -> None:
        waiting = self._pending.get(ref) if isinstance(ref, int) else None
        if waiting is None:
            return
        done, outcome = waiting
        if event == "ack":
            outcome.append(None)
            done.set()
        elif event == "error" and isinstance(data, dict):
            outcome.append(_error(data))
            done.set()

    def _close_from(self, closed: ConnectionClosed) -> Closed:
        self._closed = _closed(closed)
        return self._closed

    async def aclose(self) -> None:
        await self._ws.aclose()


class _Events:
    """`Client.events()`: a plain async iterator rather than an async generator, which trio
    warns about (ResourceWarning) when a loop leaves it unfinished with `break`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> Event:
        return await self._client.next_event()


def _closed(closed: ConnectionClosed) -> Closed:
    reason = closed.reason
    return Closed(reason.code if reason else None, reason.reason if reason else None)


@asynccontextmanager
async def _closing_stream(
    opening: AbstractAsyncContextManager[WebSocketConnection],
) -> AsyncIterator[WebSocketConnection]:
    """trio-websocket's client keeps its TCP stream open after a close the server started
    (it waits for the server's TCP close, then never closes its own): close it on the way out."""
    stream: trio.abc.Stream | None = None
    try:
        async with opening as ws:  # its exit sends the close frame and waits for the reply
            stream = ws._stream
            yield ws
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()


@asynccontextmanager
async def connect(
    url: str,
    token: str,
    *,
    resume: str | None = None,
    ssl_context: SSLContext | None = None,
) -> AsyncIterator[Client]:
    """Connect, sign in with `token` (resuming `resume`, a previous session id, if given).

    Raises:
        Closed: the server refused the token (code 4001 or 4003) or the connection.
    """
    async with _closing_stream(open_websocket_url(url, ssl_context)) as ws:
        auth: dict[str, Any] = {"token": token}
        if resume is not None:
            auth["resume"] = resume
        # Sign in before the reader's nursery opens, so a refusal surfaces as a bare `Closed`.
        try:
            await ws.send_message(json.dumps({"event": "auth", "data": auth}))
            first = json.loads(await ws.get_message())
        except ConnectionClosed as closed:
            raise _closed(closed) from None
        if first.get("event") != "session":
            raise ClientError(f"expected a session, got {first.get('event')!r}")
        try:
            async with trio.open_nursery() as nursery:
                client = Client(ws, nursery)
                client.session = _session(first["data"])
                nursery.start_soon(client._read)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            _raise_single(group)


def _raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the one error of a nursery's group (e.g. the `CallExists` raised in the `async
    with` block) as itself; the `Cancelled` of the tasks it stopped does not count."""
    _, rest = group.split(trio.Cancelled)
    error: BaseException | None = rest
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    if error is None or isinstance(error, BaseExceptionGroup):
        raise group
    # As trio does for `nursery.start`: raising sets the error's __context__ to the group that
    # holds it (a cycle in every traceback); keep the context it had.
    context = error.__context__
    try:
        raise error
    finally:
        error.__context__ = context
        del error
