"""Token verification: a JWT in, an `Identity` or `AuthError` out. Only this module knows pyjwt.

What is checked, in the order RFC 8725 (JWT Best Current Practices) asks:

* the algorithm is read from the header only to pick a *configured* key, and must be on the
  allow-list for that key: the HMAC secret verifies only HS256/384/512, the PEM public key only
  the algorithms of its own type (RSA: RS*/PS*; EC: the ES* of its curve; Ed25519: EdDSA).
  `none` is never accepted, and a public key is never used as an HMAC secret (key confusion);
* the signature, then `exp` (required), `nbf` and `iat` (honoured when present) with `leeway`;
  each must be a number of seconds from 0 to 2^53-1 (`bad_exp`, `bad_nbf`, `bad_iat`);
* `iss` and `aud` when configured; `sub` (required) must be a valid user id;
* `kid` only selects among keys the operator configured (`keys.py`); once keys by `kid` are
  configured, an unknown `kid` is refused. Header fields that point at keys (`jku`, `x5u`, `jwk`)
  are never followed.

Every failure becomes `AuthError` with a public reason (`invalid token` or `token expired`) and a
fixed audit category; token content never appears in either.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jwt
import orjson

from callgate.config import AuthSettings
from callgate.errors import AuthError
from callgate.keys import KeyRing, load_keyring
from callgate.protocol.codec import valid_user_id

INVALID = "invalid token"
EXPIRED = "token expired"

# pyjwt exception -> audit category. Order matters: subclasses first.
_CATEGORIES: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "bad_audience"),
    (jwt.InvalidIssuerError, "bad_issuer"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.InvalidAlgorithmError, "algorithm_not_allowed"),
    (jwt.InvalidIssuedAtError, "bad_iat"),
    (jwt.DecodeError, "malformed"),
)


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    expires_at: int  # the token's `exp`, unix seconds
    token_id: str | None = None  # `jti`, for revocation
    issued_at: float | None = None  # `iat`, for revoking a user's older tokens


class TokenVerifier:
    """Verifies tokens against the current `KeyRing`, which reloads swap in whole."""

    def __init__(
        self,
        ring: KeyRing,
        *,
        issuer: str | None = None,
        audience: str | None = None,
        leeway: float = 10.0,
        max_user_id_length: int = 128,
    ) -> None:
        self.ring = ring
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._max_user_id_length = max_user_id_length
        self._decoder = _decoder()

    @classmethod
    def from_settings(cls, auth: AuthSettings, *, max_user_id_length: int = 128) -> TokenVerifier:
        """Raises: ConfigError when a key file is unusable."""
        return cls(
            load_keyring(auth),
            issuer=auth.issuer,
            audience=auth.audience,
            leeway=auth.leeway,
            max_user_id_length=max_user_id_length,
        )

    def verify(self, token: str) -> Identity:
        """Raises: AuthError (reason `invalid token` or `token expired`; detail `unknown_kid`
        when the token names a key this ring does not have)."""
        if not isinstance(token, str):
            raise AuthError(INVALID, "malformed")
        try:
            algorithm, kid = _unverified_header(token.partition(".")[0])
            if not isinstance(algorithm, str):
                raise AuthError(INVALID, "algorithm_not_allowed")
            key = self._key_for(kid, algorithm)
            claims = self._decoder.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self._audience is not None,
                    "verify_iss": self._issuer is not None,
                },
            )
        except AuthError:
            raise
        except jwt.PyJWTError as exc:
            raise AuthError(
                EXPIRED if isinstance(exc, jwt.ExpiredSignatureError) else INVALID,
                _category(exc),
            ) from None
        except (ValueError, TypeError, KeyError, OverflowError):
            # pyjwt lets a few malformed inputs through as plain errors.
            raise AuthError(INVALID, "malformed") from None
        subject = claims.get("sub")
        if not valid_user_id(subject, self._max_user_id_length):
            raise AuthError(INVALID, "bad_subject")
        expires_at = _unix_time(claims, "exp")
        if expires_at is None:  # pyjwt requires it already; explicit for the reader and mypy
            raise AuthError(INVALID, "missing_claim")
        _unix_time(claims, "nbf")
        issued_at = _unix_time(claims, "iat")
        token_id = claims.get("jti")
        return Identity(
            user=subject,
            expires_at=int(expires_at),
            token_id=token_id if isinstance(token_id, str) else None,
            issued_at=float(issued_at) if issued_at is not None else None,
        )

    def _key_for(self, kid: object, algorithm: str) -> Any:
        ring = self.ring
        if kid is not None and ring.kid_keys_configured():
            entry = ring.for_kid(kid) if isinstance(kid, str) else None
            if entry is None:
                raise AuthError(INVALID, "unknown_kid")
            if algorithm not in entry.algorithms:
                raise AuthError(INVALID, "algorithm_not_allowed")
            return entry.key
        key = ring.default.get(algorithm)
        if key is None:
            raise AuthError(INVALID, "algorithm_not_allowed")
        return key


# A time claim must be a number every part of callgate (and a JavaScript client) can hold:
# 0 to 2^53-1 seconds. `1e300` is a valid JSON number and a "valid" `exp` to pyjwt, but it cannot be
# written back as JSON (`expiresAt`) nor be a deadline.
MAX_TIME_CLAIM = 2**53 - 1


_TIME_CLAIMS = ("exp", "nbf", "iat")


def _unix_time(claims: dict[str, Any], name: str) -> int | float | None:
    """A time claim (`exp`, `nbf`, `iat`) if present. Raises: AuthError `invalid token` if it is
    not a finite number of seconds from 0 to `MAX_TIME_CLAIM` (`true` and `false` are not)."""
    value = claims.get(name)
    if value is None and name not in claims:
        return None
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not 0 <= value <= MAX_TIME_CLAIM  # also false for NaN
    ):
        raise AuthError(INVALID, f"bad_{name}")
    return value


def _unverified_header(segment: str) -> tuple[object, object]:
    """`alg` and `kid` of a token's header segment, to pick the key that verifies it.

    An issuer signs every token with the same few headers, and the header is the same text each
    time: reading it once per distinct segment saves pyjwt a second parse of every token
    (its base64 check runs in Python, per character). The token is still parsed and verified
    whole by `decode`, which also checks this header. Raises: jwt.DecodeError.
    """
    if len(segment) > _CACHED_HEADER_CHARS:  # not an issuer's usual header: not kept
        return _read_header(segment)
    return _read_header_cached(segment)


# Real headers are a few dozen characters (alg, typ, kid); a client's oversized ones are read
# but not kept, so the cache holds at most 64 x 256 characters.
_CACHED_HEADER_CHARS = 256


def _read_header(segment: str) -> tuple[object, object]:
    header = jwt.get_unverified_header(segment + ".e30.")  # any payload and signature will do
    return header.get("alg"), header.get("kid")


_read_header_cached = lru_cache(maxsize=64)(_read_header)


class _Claims(jwt.PyJWT):
    """pyjwt's JWT, its payload parsed by orjson, through the hook pyjwt added for custom
    payload decoding (`_decode_payload`, pyjwt PR #829; tests/test_auth.py holds the seam).

    Strict JSON (RFC 8259): what only the standard library's parser takes, `NaN`, `Infinity`
    and UTF-16 or UTF-32 text, makes a token malformed. No issuer writes those.
    """

    def _decode_payload(self, decoded: dict[str, Any]) -> dict[str, Any]:
        try:
            payload = orjson.loads(decoded["payload"])
        except orjson.JSONDecodeError as err:
            raise jwt.DecodeError("Invalid payload string") from err
        if not isinstance(payload, dict):
            raise jwt.DecodeError("Invalid payload string: must be a json object")
        # The time claims' type and range, before pyjwt reads them: it takes `true` for 1 (an
        # `exp` of `true` was "token expired"). pyjwt calls this once the signature is checked.
        for name in _TIME_CLAIMS:
            _unix_time(payload, name)
        return payload


def _decoder() -> jwt.PyJWT:
    """pyjwt's decoder, its payload parsed by orjson (`_Claims`).

    Only pyjwt's public API and its one documented hook: an earlier version replaced pyjwt's
    signing half (`PyJWT._jws`) to check segments in C and each HMAC key once, about 10 µs of a
    token's verification, but pyjwt offers no public way to do that (docs/performance.md).
    """
    return _Claims()


def _category(exc: Exception) -> str:
    for kind, name in _CATEGORIES:
        if isinstance(exc, kind):
            return name
    return "invalid"


def mint_token(
    secret: str, user: str, *, ttl: int, now: int, algorithm: str = "HS256", **claims: object
) -> str:
    """A development token signed with the HMAC secret (`callgate token`, tests)."""
    payload = {"sub": user, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, secret, algorithm=algorithm)
