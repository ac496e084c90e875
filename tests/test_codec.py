"""The codec: valid messages decode to typed values; no input raises anything but ProtocolError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callgate.errors import ErrorCode
from callgate.protocol.codec import (
    MAX_NESTING,
    FieldLimits,
    ProtocolError,
    UnencodableMessage,
    decode,
    dump_json,
    encode,
    encode_error,
    valid_call_id,
)
from callgate.protocol.messages import Auth, CallRequest, IceCandidate, UserConnected

LIMITS = FieldLimits()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
events = st.sampled_from(
    [
        "auth",
        "call-request",
        "call-answer",
        "call-reject",
        "call-end",
        "ice-candidate",
        "call-renegotiate",
        "user-connected",
        "other",
    ]
)


@settings(max_examples=400)
@given(st.text())
def test_any_text_decodes_or_raises_protocol_error(text: str) -> None:
    try:
        decode(text, LIMITS)
    except ProtocolError:
        pass


@settings(max_examples=600)
@given(
    events,
    st.dictionaries(
        st.sampled_from(
            [
                "id",
                "from",
                "to",
                "type",
                "offer",
                "answer",
                "callId",
                "candidate",
                "token",
                "description",
                "timestamp",
                "resume",
            ]
        ),
        json_values,
    ),
    json_values,
)
def test_structured_garbage_decodes_or_raises_protocol_error(
    event: str, data: dict[str, Any], ref: Any
) -> None:
    frame = json.dumps({"event": event, "data": data, "ref": ref})
    try:
        envelope = decode(frame, LIMITS)
    except ProtocolError as error:
        assert error.code in {ErrorCode.INVALID_MESSAGE, ErrorCode.UNKNOWN_EVENT}
    else:
        # Anything accepted can be forwarded: it encodes as valid UTF-8 JSON.
        data_out = getattr(envelope.message, "data", {})
        encode(event, {**data_out, "from": "x"}).encode("utf-8")


def test_call_request_decodes() -> None:
    data = {
        "id": "c-1:2.3_x",
        "from": "alice",
        "to": "bob",
        "type": "voice",
        "offer": {"type": "offer", "sdp": "v=0"},
        "timestamp": 1,
        "extra": [1],
    }
    envelope = decode(json.dumps({"event": "call-request", "data": data, "ref": 7}), LIMITS)
    assert envelope.ref == 7
    assert envelope.message == CallRequest("c-1:2.3_x", "alice", "bob", "voice", data)


def test_user_connected_and_auth() -> None:
    assert decode('{"event":"user-connected","data":"al ice"}', LIMITS).message == UserConnected(
        "al ice"
    )
    assert decode('{"event":"auth","data":{"token":"t"}}', LIMITS).message == Auth("t")
    # Any other data is no invalid message but a claim the switchboard refuses (`forbidden`).
    for data in ('{"user":"a"}', "42", "null", '"\\u0007"'):
        message = decode('{"event":"user-connected","data":' + data + "}", LIMITS).message
        assert isinstance(message, UserConnected) and message.user != "a"
    assert decode('{"event":"user-connected"}', LIMITS).message == UserConnected(None)


def test_end_of_candidates_is_null() -> None:
    frame = '{"event":"ice-candidate","data":{"callId":"c","to":"b","candidate":null}}'
    assert isinstance(decode(frame, LIMITS).message, IceCandidate)


@pytest.mark.parametrize(
    "frame",
    [
        '{"event":"x","data":{},"ref":true}',
        '{"event":"x","data":{},"ref":9007199254740993}',
        '{"event":"call-end","data":{"callId":"c","to":"b"},"ref":NaN}',
        '{"event":"call-end","data":{"callId":"c","to":"b","x":Infinity}}',
        "[" * 100_000,
        '{"event":"call-end","data":{"callId":"c","to":"b","n":' + "9" * 5000 + "}}",
        '{"event":"call-end","data":{"callId":"c","to":"b","x":"\\udc00"}}',
        '{"event":"call-end","data":{"callId":"' + "c" * 129 + '","to":"b"}}',
        '{"event":"call-end","data":{"callId":"c","to":"' + "b" * 129 + '"}}',
        '{"event":"call-end","data":{"callId":"c","to":"\\u202etxt"}}',
        '{"event":"call-request","data":{"id":"c","from":"a","to":"b","type":"fax",'
        '"offer":{"type":"offer","sdp":""}}}',
        '{"event":"call-request","data":{"id":"c","from":"a","to":"b","type":"video",'
        '"offer":{"type":"answer","sdp":""}}}',
        '{"event":"call-request","data":{"id":"c","from":"a","to":"b","type":"video",'
        '"offer":{"type":"offer","sdp":""},"timestamp":true}}',
        '{"event":"ice-candidate","data":{"callId":"c","to":"b"}}',
        '{"event":"ice-candidate","data":{"callId":"c","to":"b","candidate":{"candidate":1}}}',
        '{"event":"ice-candidate","data":{"callId":"c","to":"b",'
        '"candidate":{"candidate":"x","sdpMLineIndex":-1}}}',
    ],
)
def test_invalid_messages(frame: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode(frame, LIMITS)
    assert refused.value.code is ErrorCode.INVALID_MESSAGE


def test_sizes_count_utf8_bytes() -> None:
    limits = FieldLimits(max_sdp_bytes=1024, max_candidate_bytes=128)
    sdp = "é" * 600  # 600 characters, 1200 bytes
    frame = json.dumps(
        {
            "event": "call-answer",
            "data": {"callId": "c", "to": "a", "answer": {"type": "answer", "sdp": sdp}},
        }
    )
    with pytest.raises(ProtocolError):
        decode(frame, limits)
    candidate = {"candidate": "€" * 50}  # 150 bytes
    frame = json.dumps(
        {"event": "ice-candidate", "data": {"callId": "c", "to": "a", "candidate": candidate}}
    )
    with pytest.raises(ProtocolError):
        decode(frame, limits)


def test_unknown_event_keeps_ref_and_escapes_name() -> None:
    with pytest.raises(ProtocolError) as refused:
        decode('{"event":"\\u001b[31mred","data":{},"ref":"r1"}', LIMITS)
    assert refused.value.code is ErrorCode.UNKNOWN_EVENT
    assert refused.value.ref == "r1"
    assert "\x1b" not in refused.value.message


def test_encode_error_shape() -> None:
    assert json.loads(encode_error(ErrorCode.RATE_LIMITED, "slow down", 5, 3)) == {
        "event": "error",
        "data": {"code": "rate_limited", "message": "slow down", "retryAfter": 3},
        "ref": 5,
    }


def test_a_remembered_call_id_is_still_held_to_the_length_limit() -> None:
    assert valid_call_id("call-1234", 128)
    assert valid_call_id("call-1234", 128)  # now from the cache of checked ids
    assert not valid_call_id("call-1234", 4)
    assert not valid_call_id("call 1234", 128)
    assert not valid_call_id("call 1234", 128)  # refusals are never remembered


def _end_with_extra(levels: int) -> str:
    """A call-end whose extra field nests `levels` arrays: the message is `levels + 2` deep."""
    return (
        '{"event":"call-end","ref":7,"data":{"callId":"c","to":"b","x":'
        + "[" * levels
        + "]" * levels
        + "}}"
    )


def test_nesting_up_to_the_limit_is_accepted() -> None:
    assert decode(_end_with_extra(MAX_NESTING - 2), LIMITS).ref == 7
    assert decode(
        '{"event":"call-end","data":{"callId":"c","to":"b","x":"' + "[" * 99 + '"}}', LIMITS
    )


@pytest.mark.parametrize("levels", [MAX_NESTING - 1, 253, 254, 1000])
def test_nesting_past_the_limit_is_refused_with_the_ref(levels: int) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode(_end_with_extra(levels), LIMITS)
    assert refused.value.code.value == "invalid_message" and refused.value.ref == 7
    assert f"nested deeper than {MAX_NESTING} levels" in refused.value.message


def test_nesting_in_objects_counts_as_well() -> None:
    deep = '{"a":' * (MAX_NESTING - 1) + "1" + "}" * (MAX_NESTING - 1)
    with pytest.raises(ProtocolError):
        decode('{"event":"call-end","data":{"callId":"c","to":"b","x":' + deep + "}}", LIMITS)


def test_an_empty_ref_is_a_ref() -> None:
    assert decode('{"event":"user-connected","data":"a","ref":""}', LIMITS).ref == ""


def test_what_cannot_be_encoded_is_one_error_type() -> None:
    deep: object = 0
    for _ in range(300):
        deep = [deep]
    with pytest.raises(UnencodableMessage):
        dump_json({"x": deep})
    with pytest.raises(UnencodableMessage):
        encode("call-end", {"n": 2**64})
