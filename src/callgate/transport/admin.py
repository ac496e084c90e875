"""The admin API: live state and an operator's actions, over HTTP with JSON (docs/admin.md).

It runs on its own listener (`[admin]`, off by default, loopback by default), served by the same
small h11 endpoint as the metrics (http.py). Every request carries an admin key
(`Authorization: Bearer <key>`, one of `[admin] keys`, named by operator); a client's token is
never one. What it reads is this node's (connections) or the switchboard's (users, calls); in
cluster mode that is the cluster's shared state, read from Redis before each request
(`prepare`). What it changes goes the way every other change goes: an event into the core
(`OperatorEndedCall`, `OperatorDisconnectedUser`), whose actions the executor carries out, so in
cluster mode it is decided on the shared state and the node that holds each device closes it or
tells it.
Draining and reloading are this node's own. Every action writes one `admin.*` audit record with
the operator and the `reason` the request must give, before it acts.

Sans-I/O apart from its callbacks: `handle(Request) -> Response`.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
import trio

from callgate.core.calls import CallState
from callgate.core.events import OperatorDisconnectedUser, OperatorEndedCall
from callgate.errors import CloseCode
from callgate.transport.http import Request, Response

if TYPE_CHECKING:
    from callgate.config import Settings
    from callgate.core.calls import Call
    from callgate.core.switchboard import Switchboard
    from callgate.transport.hub import ConnectionHub

MAX_ADMIN_BODY = 8192
MAX_REASON_CHARS = 200
DEFAULT_PAGE = 100
MAX_PAGE = 1000
# What a client disconnected by an operator sees (its close code is CloseCode.OPERATOR, 4010).
DISCONNECT_REASON = "disconnected by operator"
_JSON = b"application/json"


class _Failed(Exception):
    """An answer other than 200: its status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str) -> _Failed:
    return _Failed(400, message)


Reload = Callable[[], "str | None"]
Action = Callable[["AdminApi", str, Request], dict[str, Any]]


class AdminApi:
    def __init__(
        self,
        settings: Settings,
        board: Switchboard,
        hub: ConnectionHub,
        reload_keys: Reload,
        reload_revocations: Reload,
    ) -> None:
        self._board = board
        self._hub = hub
        self._reload_keys = reload_keys
        self._reload_revocations = reload_revocations
        self._keys = [
            (name, key.get_secret_value().encode()) for name, key in settings.admin.keys.items()
        ]
        self._drain_grace = settings.admin.drain_grace
        self._max_user = settings.validation.max_user_id_length
        self._max_call_id = settings.validation.max_call_id_length

    # -- the one entry point -------------------------------------------------------------------

    async def prepare(self, request: Request) -> None:
        """Cluster mode: read the cluster's users and calls for this request (its handler
        runs right after, without waiting, so it sees this view)."""
        cluster = self._hub.cluster
        if cluster is not None and request.path in ROUTES and self._keys:
            self._board = await cluster.cluster_view()

    def handle(self, request: Request) -> Response:
        methods = ROUTES.get(request.path)
        if methods is None:
            return _answer(404, {"error": "no such endpoint"})
        route = methods.get(request.method)
        if route is None:
            return _answer(405, {"error": f"use {' or '.join(sorted(methods))}"})
        try:
            operator = self._authenticate(request)
            return _answer(200, route(self, operator, request))
        except _Failed as failed:
            return _answer(failed.status, {"error": failed.message})

    def _authenticate(self, request: Request) -> str:
        """The operator whose key the request carries. Raises: _Failed 401 or 403."""
        scheme, _, presented = request.headers.get(b"authorization", b"").partition(b" ")
        presented = presented.strip()
        operator = None
        if scheme.lower() == b"bearer" and presented:
            for name, key in self._keys:  # every key is compared: no early exit to time
                if hmac.compare_digest(presented, key):
                    operator = name
        if operator is not None:
            return operator
        # A JWT (three dot-separated parts) is a client's token: never an admin credential.
        client_token = presented.count(b".") == 2
        status = 403 if client_token else 401
        self._hub.audit("admin.denied", {"addr": request.peer, "code": status})
        if client_token:
            raise _Failed(403, "a client token is not an admin credential")
        raise _Failed(401, "an admin key is required: Authorization: Bearer <key>")

    # -- reading -------------------------------------------------------------------------------

    def status(self, operator: str, request: Request) -> dict[str, Any]:
        _query(request, set())
        hub = self._hub
        return {
            "node": self._node(),
            "accepting": hub.accepting,
            "ready": hub.ready,
            "connections": hub.connection_count,
            "calls": len(self._board.calls),
        }

    def _filters(
        self, request: Request, states: tuple[str, ...]
    ) -> tuple[dict[str, str], str | None, str | None, float]:
        """A listing's query, and its `user`, `state` (one of `states`) and `min_age` filters."""
        query = _query(request, {"user", "state", "min_age", "limit", "cursor"})
        user = self._user(query.get("user"), required=False)
        state = _choice(query.get("state"), "state", states)
        return query, user, state, _number(query.get("min_age"), "min_age")

    def list_connections(self, operator: str, request: Request) -> dict[str, Any]:
        query, user, state, min_age = self._filters(request, ("authenticated", "unauthenticated"))
        now = time.time()
        rows = []
        for connection in self._hub.connections:
            row_state = "authenticated" if connection.identity is not None else "unauthenticated"
            age = now - connection.opened_at
            if user is not None and connection.user != user:
                continue
            if (state is not None and row_state != state) or age < min_age:
                continue
            rows.append(
                {
                    "id": connection.id,
                    "user": connection.user,
                    "addr": connection.addr,
                    "state": row_state,
                    "age": round(age, 3),
                }
            )
        return _page(rows, query)

    def list_users(self, operator: str, request: Request) -> dict[str, Any]:
        query = _query(request, {"user", "limit", "cursor"})
        user = self._user(query.get("user"), required=False)
        users: dict[str, dict[str, Any]] = {}
        for device in self._board.devices():
            if user is not None and device.user != user:
                continue
            row = users.setdefault(
                device.user, {"user": device.user, "devices": [], "held": 0, "calls": 0}
            )
            row["devices"].append(device.conn)
            row["held"] += device.hold is not None
        for row in users.values():
            row["calls"] = self._board.calls.count_for(row["user"])
        return _page(list(users.values()), query)

    def list_calls(self, operator: str, request: Request) -> dict[str, Any]:
        query, user, state, min_age = self._filters(request, ("ringing", "connected"))
        now = self._core_now()
        rows = []
        for call in self._board.calls:
            age = now - call.requested_at
            if user is not None and user not in (call.caller, call.callee):
                continue
            if (state is not None and call.state.name.lower() != state) or age < min_age:
                continue
            rows.append(_call_row(call, now))
        return _page(rows, query)

    # -- acting --------------------------------------------------------------------------------

    def end_call(self, operator: str, request: Request) -> dict[str, Any]:
        body = _body(request, required={"call_id", "reason"}, optional={"user"})
        reason = _reason(body)
        call_id = _text(body["call_id"], "call_id", self._max_call_id)
        user = self._user(body.get("user"), required=False)
        calls = self._board.calls_with_id(call_id, user)
        if not calls:
            raise _Failed(404, "no such call")
        if len(calls) > 1:
            raise _Failed(409, f"{len(calls)} calls have this id: name one of its users (user)")
        call = calls[0]
        row = _call_row(call, self._core_now())
        self._audit(
            "admin.call_end",
            operator,
            reason,
            call_id=call.call_id,
            caller=call.caller,
            callee=call.callee,
        )
        self._hub.dispatch(OperatorEndedCall(call.call_id, call.caller))
        return {"ended": row}

    def disconnect_user(self, operator: str, request: Request) -> dict[str, Any]:
        body = _body(request, required={"user", "reason"}, optional=set())
        reason = _reason(body)
        user = _text(body["user"], "user", self._max_user)
        devices = [device.conn for device in self._board.devices() if device.user == user]
        if not devices:
            raise _Failed(404, "the user has no device")
        self._audit("admin.disconnect", operator, reason, user=user, devices=len(devices))
        self._hub.dispatch(OperatorDisconnectedUser(user, CloseCode.OPERATOR, DISCONNECT_REASON))
        return {"user": user, "devices": devices, "close_code": int(CloseCode.OPERATOR)}

    def drain(self, operator: str, request: Request) -> dict[str, Any]:
        body = _body(request, required={"reason"}, optional={"grace"})
        reason = _reason(body)
        grace = self._drain_grace
        if "grace" in body:
            grace = _number(body["grace"], "grace")
            if grace > 3600:
                raise _bad("grace: at most 3600 seconds")
        self._audit("admin.drain", operator, reason)
        self._hub.drain(grace)
        return {"accepting": False, "grace": grace}

    def undrain(self, operator: str, request: Request) -> dict[str, Any]:
        reason = _reason(_body(request, required={"reason"}, optional=set()))
        if self._hub.accepting:
            return {"accepting": True}  # nothing to undo: no record
        if not self._hub.undrain():
            raise _Failed(409, "the server is shutting down")
        self._audit("admin.undrain", operator, reason)
        return {"accepting": True}

    def reload(self, operator: str, request: Request) -> dict[str, Any]:
        reason = _reason(_body(request, required={"reason"}, optional=set()))
        self._audit("admin.reload", operator, reason)
        keys, revocations = self._reload_keys(), self._reload_revocations()
        return {
            "ok": keys is None and revocations is None,
            "keys": keys or "reloaded",
            "revocations": revocations or "reloaded",
        }

    # -- helpers -------------------------------------------------------------------------------

    def _audit(self, event: str, operator: str, reason: str, **fields: object) -> None:
        self._hub.audit(event, {"operator": operator, "reason": reason, **fields})

    def _node(self) -> str | None:
        cluster = self._hub.cluster
        return cluster.node_id if cluster is not None else None

    def _core_now(self) -> float:
        """The switchboard's clock: unix time in a cluster, trio's on a single server."""
        return time.time() if self._hub.executor.unix_clock else trio.current_time()

    def _user(self, value: object, *, required: bool) -> str | None:
        if value is None and not required:
            return None
        return _text(value, "user", self._max_user)


ROUTES: dict[str, dict[str, Action]] = {
    "/v1/status": {"GET": AdminApi.status},
    "/v1/connections": {"GET": AdminApi.list_connections},
    "/v1/users": {"GET": AdminApi.list_users},
    "/v1/calls": {"GET": AdminApi.list_calls},
    "/v1/calls/end": {"POST": AdminApi.end_call},
    "/v1/users/disconnect": {"POST": AdminApi.disconnect_user},
    "/v1/drain": {"POST": AdminApi.drain},
    "/v1/undrain": {"POST": AdminApi.undrain},
    "/v1/reload": {"POST": AdminApi.reload},
}


def _answer(status: int, body: Mapping[str, Any]) -> Response:
    return Response(status, _JSON, orjson.dumps(body))


def _call_row(call: Call, now: float) -> dict[str, Any]:
    return {
        "call_id": call.call_id,
        "caller": call.caller,
        "callee": call.callee,
        "media": call.media,
        "state": call.state.name.lower(),
        "age": round(now - call.requested_at, 3),
        "connected_for": None
        if call.state is not CallState.CONNECTED or call.answered_at is None
        else round(now - call.answered_at, 3),
    }


def _query(request: Request, allowed: set[str]) -> dict[str, str]:
    """The query parameters, each at most once. Raises: _Failed 400."""
    try:
        parsed = parse_qs(request.query, keep_blank_values=True, strict_parsing=bool(request.query))
    except ValueError:
        raise _bad("malformed query string") from None
    unknown = sorted(set(parsed) - allowed)
    if unknown:
        raise _bad(f"unknown parameter {unknown[0][:32]!r}; allowed: {', '.join(sorted(allowed))}")
    query = {}
    for name, values in parsed.items():
        if len(values) != 1:
            raise _bad(f"{name}: give it once")
        query[name] = values[0]
    return query


def _page(rows: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """`limit` rows from the opaque `cursor` on, and the cursor of the next page (or null)."""
    limit = _integer(query.get("limit"), "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    start = _integer(query.get("cursor"), "cursor", 0, 0, 1 << 31)
    end = start + limit
    return {
        "items": rows[start:end],
        "total": len(rows),
        "next_cursor": str(end) if end < len(rows) else None,
    }


def _integer(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    # ASCII digits only: `str.isdigit` also takes superscripts (which `int` refuses) and other
    # scripts' digits (which `int` reads).
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise _bad(f"{name}: a whole number from {low} to {high}")
    return int(value)


def _number(value: object, name: str) -> float:
    """A number of seconds, at least 0 (from a query string or a JSON body)."""
    if value is None:
        return 0.0
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _bad(f"{name}: a number of seconds") from None
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1e9:
        raise _bad(f"{name}: a number of seconds, at least 0")
    return float(value)


def _choice(value: str | None, name: str, choices: tuple[str, ...]) -> str | None:
    if value is not None and value not in choices:
        raise _bad(f"{name}: one of {', '.join(choices)}")
    return value


def _text(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _bad(f"{name}: a string of 1 to {limit} characters")
    return value


def _body(request: Request, *, required: set[str], optional: set[str]) -> dict[str, Any]:
    """The JSON object in the body, with exactly the fields allowed. Raises: _Failed 400."""
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        raise _bad("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    missing = sorted(required - set(body))
    if missing:
        raise _bad(f"missing field {missing[0]!r}")
    unknown = sorted(set(body) - required - optional)
    if unknown:
        raise _bad(f"unknown field {unknown[0][:32]!r}")
    return body


def _reason(body: Mapping[str, Any]) -> str:
    """Why the operator acts: required, for the audit trail; one line of printable text."""
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise _bad("reason: say why (a non-empty string); it goes to the audit trail")
    reason = reason.strip()
    if len(reason) > MAX_REASON_CHARS or not reason.isprintable():
        raise _bad(f"reason: one line of at most {MAX_REASON_CHARS} printable characters")
    return reason
