"""Token checks without sockets (the wire tests cover the 4001 close)."""

from __future__ import annotations

import base64
import hmac
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from callgate.auth import TokenVerifier
from callgate.config import AuthSettings
from callgate.errors import AuthError, ConfigError
from conftest import SECRET, token_for


def verifier(**auth: object) -> TokenVerifier:
    return TokenVerifier.from_settings(AuthSettings.model_validate({"secret": SECRET, **auth}))


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_valid_hs256() -> None:
    identity = verifier().verify(token_for("alice", jti="j1"))
    assert identity.user == "alice" and identity.token_id == "j1"
    assert identity.expires_at > time.time()


@pytest.mark.parametrize(
    ("algorithm", "key", "curve_alg"),
    [
        ("EdDSA", ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
        ("ES256", ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ],
)
def test_public_key_algorithms(
    tmp_path: Path,
    algorithm: str,
    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
    curve_alg: str,
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(pem(key))
    check = verifier(algorithms=[algorithm], public_key_file=str(path))
    token = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, key, algorithm=curve_alg)
    assert check.verify(token).user == "bob"
    # An HS256 token is refused: that algorithm is not configured.
    with pytest.raises(AuthError):
        check.verify(token_for("bob"))


def test_algorithm_must_match_key_type(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ConfigError, match=r"auth\.algorithms: RS256"):
        verifier(algorithms=["RS256"], public_key_file=str(path))
    with pytest.raises(ConfigError, match=r"auth\.algorithms: ES384"):
        verifier(algorithms=["ES384"], public_key_file=str(path))


def test_private_key_file_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "private.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match=r"auth\.public_key_file"):
        verifier(algorithms=["ES256"], public_key_file=str(path))


def test_leeway_applies_to_exp() -> None:
    just_expired = token_for("alice", ttl=-5)
    assert verifier(leeway=30).verify(just_expired).user == "alice"
    with pytest.raises(AuthError) as refused:
        verifier(leeway=0).verify(just_expired)
    assert refused.value.reason == "token expired" and refused.value.detail == "expired"


def test_audience_and_issuer_when_configured() -> None:
    check = verifier(audience="callgate", issuer="https://idp")
    assert check.verify(token_for("a", aud="callgate", iss="https://idp")).user == "a"
    for token in (token_for("a", iss="https://idp"), token_for("a", aud="callgate")):
        with pytest.raises(AuthError) as refused:
            check.verify(token)
        assert refused.value.reason == "invalid token"


@given(st.text(max_size=300))
def test_any_string_is_identity_or_auth_error(token: str) -> None:
    try:
        verifier().verify(token)
    except AuthError:
        pass


def test_a_known_header_still_needs_a_valid_signature() -> None:
    """Headers are read once per distinct header text; the signature is checked every time."""
    check = verifier()
    good = token_for("alice")
    check.verify(good)
    header, payload, _ = good.split(".")
    forged = token_for("mallory", secret="another-secret-that-is-long-enough!!")
    assert forged.split(".")[0] == header  # the same header text as the good token
    with pytest.raises(AuthError) as refused:
        check.verify(forged)
    assert refused.value.detail == "bad_signature"
    with pytest.raises(AuthError):
        check.verify(f"{header}.{payload}.")


def test_an_oversized_header_is_read_but_not_kept() -> None:
    from callgate.auth import _read_header_cached

    big_header = {"kid": "k" * 400}
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, SECRET, headers=big_header)
    before = _read_header_cached.cache_info().currsize
    assert verifier().verify(token).user == "alice"
    assert _read_header_cached.cache_info().currsize == before


def _signed(payload: bytes) -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(payload).rstrip(b"=")
    signature = hmac.digest(SECRET.encode(), header + b"." + body, "sha256")
    return b".".join([header, body, base64.urlsafe_b64encode(signature).rstrip(b"=")]).decode()


@pytest.mark.parametrize(
    "payload",
    [
        b'{"sub":"alice","exp":NaN}',
        b'{"sub":"alice","exp":Infinity}',
        '{"sub":"alice","exp":1}'.encode("utf-16"),
        b'["alice"]',
        b"{",
    ],
)
def test_a_payload_that_is_not_strict_json_is_malformed(payload: bytes) -> None:
    with pytest.raises(AuthError) as refused:
        verifier().verify(_signed(payload))
    assert refused.value.detail == "malformed"


def test_a_properly_signed_payload_of_strict_json_verifies() -> None:
    payload = b'{"sub":"alice","exp":%d,"name":"\\u00e9l\\u00e8ve"}' % (int(time.time()) + 60)
    assert verifier().verify(_signed(payload)).user == "alice"


def test_the_payload_hook_is_where_pyjwt_keeps_it() -> None:
    """Guards the seam into pyjwt: `_Claims` overrides pyjwt's documented payload hook."""
    from callgate.auth import _Claims

    assert isinstance(verifier()._decoder, _Claims)
    assert "_decode_payload" in vars(jwt.PyJWT)  # what _Claims replaces (pyjwt PR #829)


@pytest.mark.parametrize(
    ("claims", "detail"),
    [
        ({"exp": 1e20}, "bad_exp"),
        ({"exp": 1e300}, "bad_exp"),
        ({"exp": 2**53}, "bad_exp"),
        ({"exp": 2**64 + 1}, "bad_exp"),
        ({"exp": 4_000_000_000, "iat": -1}, "bad_iat"),
        ({"exp": 4_000_000_000, "nbf": -1e300}, "bad_nbf"),
        # JSON's true and false are no numbers (pyjwt reads `true` as 1: "token expired")
        ({"exp": True}, "bad_exp"),
        ({"exp": False}, "bad_exp"),
        ({"exp": None}, "bad_exp"),
        ({"exp": 4_000_000_000, "nbf": True}, "bad_nbf"),
        ({"exp": 4_000_000_000, "nbf": "0"}, "bad_nbf"),
        ({"exp": 4_000_000_000, "iat": False}, "bad_iat"),
    ],
)
def test_time_claims_must_fit_in_a_safe_integer(claims: dict[str, object], detail: str) -> None:
    """`exp` = 1e300 is a number to pyjwt, but no deadline and no JSON integer: refused."""
    token = jwt.encode({"sub": "eve", **claims}, SECRET, algorithm="HS256")
    with pytest.raises(AuthError) as refused:
        verifier().verify(token)
    assert refused.value.reason == "invalid token" and refused.value.detail == detail


def test_the_largest_safe_time_claims_are_accepted() -> None:
    top = 2**53 - 1
    token = jwt.encode({"sub": "eve", "exp": top, "iat": 0, "nbf": 0}, SECRET, algorithm="HS256")
    assert verifier().verify(token).expires_at == top
