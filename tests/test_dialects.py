"""The two wire dialects and the upgrade check, without sockets (protocol/dialects.py,
transport/upgrade.py)."""

from __future__ import annotations

import pytest

from callgate.errors import AuthError, ErrorCode
from callgate.protocol.codec import FieldLimits, ProtocolError
from callgate.protocol.dialects import Credentials, Incoming, NativeDialect, SocketIODialect
from callgate.protocol.messages import IceCandidate
from callgate.transport.head import RequestHead
from callgate.transport.upgrade import Refusal, Upgrade, UpgradeRules, read_upgrade

LIMITS = FieldLimits()
NATIVE = NativeDialect()
SOCKETIO = SocketIODialect(25, 20, 65536)
ICE = '{"candidate": null, "callId": "c1", "to": "bob"}'


def test_native_sign_in_is_an_auth_message_and_nothing_else() -> None:
    text = '{"event": "auth", "data": {"token": "t.k.n", "resume": "s1"}, "ref": 7}'
    assert NATIVE.sign_in(text, LIMITS) == Credentials("t.k.n", "s1", 7)
    others = (
        '{"event": "ice-candidate", "data": ' + ICE + "}",
        "not json",
        "[]",
        '{"event": "auth", "data": {"token": "t.k.n", "resume": 5}}',
    )
    for other in others:
        with pytest.raises(AuthError) as refused:
            NATIVE.sign_in(other, LIMITS)
        assert refused.value.reason == "authentication required"
    # An `auth` message that carries no token at all (no field, `data` not an object) carries a
    # bad one: `invalid token`, as the contract says for a token that does not verify.
    for tokenless in ('{"event": "auth", "data": {}}', '{"event": "auth", "data": "t.k.n"}'):
        with pytest.raises(AuthError) as refused:
            NATIVE.sign_in(tokenless, LIMITS)
        assert refused.value.reason == "invalid token"


def test_socketio_sign_in_answers_pings_and_other_namespaces_and_reads_the_token() -> None:
    assert SOCKETIO.greeting("sid1")[0].startswith('0{"sid":"sid1"')
    assert SOCKETIO.sign_in("2probe", LIMITS) == Incoming(reply="3probe")
    assert SOCKETIO.sign_in("3", LIMITS) == Incoming(pong=True)
    assert SOCKETIO.sign_in("1", LIMITS) == Incoming(left=True)
    other = SOCKETIO.sign_in('40/admin,{"token":"x"}', LIMITS)
    assert isinstance(other, Incoming) and other.reply == '44/admin,{"message":"Invalid namespace"}'
    assert SOCKETIO.sign_in('40{"token":"t.k.n","resume":"s1"}', LIMITS) == Credentials(
        "t.k.n", "s1"
    )
    assert SOCKETIO.welcome("sid1") == ['40{"sid":"sid1"}']


@pytest.mark.parametrize("dialect", [NATIVE, SOCKETIO], ids=["native", "socketio"])
@pytest.mark.parametrize("token", ['""', "1", "null", '["t"]', '{"t": 1}'])
def test_a_token_that_is_empty_or_no_string_is_an_invalid_token(
    dialect: NativeDialect | SocketIODialect, token: str
) -> None:
    text = (
        '{"event": "auth", "data": {"token": ' + token + "}}"
        if dialect is NATIVE
        else '40{"token": ' + token + "}"
    )
    with pytest.raises(AuthError) as refused:
        dialect.sign_in(text, LIMITS)
    assert refused.value.reason == "invalid token"


def test_reading_after_sign_in() -> None:
    native = NATIVE.read('{"event": "ice-candidate", "data": ' + ICE + ', "ref": "r"}', LIMITS)
    assert isinstance(native.envelope and native.envelope.message, IceCandidate)
    socketio = SOCKETIO.read('421["ice-candidate",' + ICE + "]", LIMITS)
    assert socketio.envelope is not None and socketio.envelope.ref == 1
    assert SOCKETIO.read("3", LIMITS) == Incoming(pong=True)
    assert SOCKETIO.read("41", LIMITS) == Incoming(left=True)
    with pytest.raises(ProtocolError):
        SOCKETIO.read("6", LIMITS)


def test_replies_in_each_dialect() -> None:
    assert NATIVE.ack(3) == '{"event":"ack","ref":3}'
    assert SOCKETIO.ack(3) == '433[{"ok":true}]'
    assert SOCKETIO.ack("named") is None  # Socket.IO acks are numbers
    assert SOCKETIO.error(ErrorCode.FORBIDDEN, "no", 4, None).startswith('434[{"ok":false')
    assert SOCKETIO.error(ErrorCode.FORBIDDEN, "no", None, 2).startswith('42["error"')
    assert NATIVE.farewell(4003, "revoked") == []
    assert SOCKETIO.farewell(4003, "revoked")[-1] == "41"  # do not come back
    assert SOCKETIO.farewell(1001, "bye") == ['42["closing",{"code":1001,"reason":"bye"}]']
    assert NATIVE.refusal(4029, "slow down", "the error") == ["the error"]
    assert SOCKETIO.refusal(4001, "invalid token", "ignored") == ['44{"message":"invalid token"}']


GOOD = [
    (b"host", b"example"),
    (b"connection", b"keep-alive, Upgrade"),
    (b"upgrade", b"websocket"),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
]
RULES = UpgradeRules("/ws", NATIVE, SOCKETIO, frozenset({"https://app.example"}))


def head(
    target: bytes = b"/ws", *extra: tuple[bytes, bytes], method: bytes = b"GET"
) -> RequestHead:
    return RequestHead(method, target, [*GOOD, *extra])


def test_an_upgrade_yields_its_dialect_and_credentials() -> None:
    upgrade = read_upgrade(
        head(b"/ws", (b"authorization", b"Bearer t.k.n"), (b"callgate-resume", b"s1")),
        RULES,
        "192.0.2.1",
    )
    assert isinstance(upgrade, Upgrade)
    assert (upgrade.dialect, upgrade.bearer, upgrade.resume) == (NATIVE, "t.k.n", "s1")
    assert upgrade.take_bearer() == "t.k.n" and upgrade.bearer is None  # not kept
    assert not upgrade.repeated_authorization
    sio = read_upgrade(head(b"/socket.io/?EIO=4&transport=websocket"), RULES, "192.0.2.1")
    assert isinstance(sio, Upgrade) and sio.dialect is SOCKETIO


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (head(b"/nope"), 404),
        (head(b"/socket.io/?EIO=4&transport=polling"), 400),
        (head(b"/socket.io/?EIO=3&transport=websocket"), 400),
        (head(method=b"POST"), 400),
        (RequestHead(b"GET", b"/ws", GOOD[1:]), 400),  # no Host
        (RequestHead(b"GET", b"/ws", GOOD[:-1]), 400),  # no key
    ],
)
def test_what_is_refused_before_the_upgrade(request_head: RequestHead, status: int) -> None:
    refused = read_upgrade(request_head, RULES, "192.0.2.1")
    assert isinstance(refused, Refusal) and refused.status == status


def test_two_authorization_headers_void_the_credentials_and_an_allowed_origin_passes() -> None:
    twice = read_upgrade(
        head(b"/ws", (b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")),
        RULES,
        "192.0.2.1",
    )
    assert isinstance(twice, Upgrade) and twice.repeated_authorization
    allowed = read_upgrade(head(b"/ws", (b"origin", b"https://app.example")), RULES, "192.0.2.1")
    assert isinstance(allowed, Upgrade) and not allowed.origin_refused
    # Another origin is upgraded too, to be closed 4003 where the page can see it (contract 9).
    evil = read_upgrade(head(b"/ws", (b"origin", b"https://evil.example")), RULES, "192.0.2.1")
    assert isinstance(evil, Upgrade) and evil.origin_refused
    apps = read_upgrade(head(b"/ws"), RULES, "192.0.2.1")  # no Origin: not a browser
    assert isinstance(apps, Upgrade) and not apps.origin_refused
