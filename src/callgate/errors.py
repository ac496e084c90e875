"""One error tree. Each error carries the reply it becomes on the wire.

`Refused` becomes an `error` event (the connection stays open); `CloseConnection` becomes a
WebSocket close with its code. The transport translates these once, at the edge.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """The `code` of an `error` event (contract section 5)."""

    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_EVENT = "unknown_event"
    FORBIDDEN = "forbidden"
    UNKNOWN_CALL = "unknown_call"
    CALL_EXISTS = "call_exists"
    RATE_LIMITED = "rate_limited"


class CloseCode(IntEnum):
    """WebSocket close codes the server uses (contract section 9)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    ABNORMAL = 1006  # audit only: the peer vanished without a close frame (keepalive timeout)
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008  # extension: the client stopped reading (outbound queue full)
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # cluster mode: the node cannot reach the cluster (Redis) right now
    UNAUTHENTICATED = 4001
    FORBIDDEN = 4003
    OPERATOR = 4010  # an operator disconnected the user (the admin API)
    RATE_LIMIT_ABUSE = 4029


# What a connection closed by its client is said to have closed with (the audit trail's
# `conn.close` reason): never the close frame's own reason, which is the client's text.
CLOSED_BY_CLIENT = "closed by the client"
# The codes a connection is failed with when its client's frames are broken (RFC 6455 7.4.1),
# and the reason the server gives with each.
PROTOCOL_FAILURES = {1002: "protocol error", 1007: "invalid UTF-8"}


class CallgateError(Exception):
    """Base of every error callgate raises on purpose."""


class ConfigError(CallgateError):
    """The configuration is unusable; the message names the offending key."""


class Refused(CallgateError):
    """A client message is refused; becomes `{"event": "error", ...}` and the message is dropped."""

    def __init__(self, code: ErrorCode, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class CloseConnection(CallgateError):
    """The connection must be closed with `close_code` and a short, public `reason`."""

    def __init__(self, close_code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.close_code = close_code
        self.reason = reason


class AuthError(CloseConnection):
    """A token was refused.

    `reason` is what the client sees (`invalid token`, `token expired`, ...) and never says which
    check failed; `detail` is a fixed category for the audit log, never token content.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(CloseCode.UNAUTHENTICATED, reason)
        self.detail = detail
