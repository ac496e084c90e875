"""The key-once HMAC-SHA256 gives exactly the standard library's MACs (pure, no sockets)."""

from __future__ import annotations

import hmac
import os

import pytest

from callgate.hmac_sha256 import HmacSha256


@pytest.mark.parametrize("key_length", [0, 1, 32, 63, 64, 65, 100, 200])
@pytest.mark.parametrize("message_length", [0, 1, 55, 56, 64, 300, 5000])
def test_same_mac_as_the_standard_library(key_length: int, message_length: int) -> None:
    key, message = os.urandom(key_length), os.urandom(message_length)
    mac = HmacSha256(key)
    assert mac.digest(message) == hmac.digest(key, message, "sha256")
    assert mac.hexdigest(message) == hmac.digest(key, message, "sha256").hex()


def test_each_message_starts_from_the_key_alone() -> None:
    """Copies of the keyed states: one message leaves nothing behind for the next."""
    mac = HmacSha256(b"cluster key")
    first = mac.digest(b"first")
    mac.digest(b"something else entirely")
    assert mac.digest(b"first") == first


def test_repr_hides_the_key() -> None:
    assert "secret" not in repr(HmacSha256(b"secret")) and "<key>" in repr(HmacSha256(b"x"))
