"""Token verification: a JWT in, an `Identity` or `AuthError` out. Only this module knows pyjwt.

What is checked, in the order RFC 8725 (JWT Best Current Practices) asks:

* the algorithm is read from the header only to pick a *configured* key, and must be on the
  allow-list for that key: the HMAC secret verifies only HS256/384/512, the PEM public key only
  the algorithms of its own type (RSA: RS*/PS*; EC: the ES* of its curve; Ed25519: EdDSA).
  `none` is never accepted, and a public key is never used as an HMAC secret (key confusion);
* the signature, then `exp` (required), `nbf` and `iat` (honoured when present) with `leeway`;
* `iss` and `aud` when configured; `sub` (required) must be a valid user id;
* header fields that point at keys (`jku`, `x5u`, `jwk`, `kid`) are never followed.

Every failure becomes `AuthError` with a public reason (`invalid token` or `token expired`) and a
fixed audit category; token content never appears in either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from callgate.config import HMAC_ALGORITHMS, AuthSettings
from callgate.errors import AuthError, ConfigError
from callgate.protocol.codec import valid_user_id

INVALID = "invalid token"
EXPIRED = "token expired"

_EC_ALGORITHM_FOR_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})

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
    token_id: str | None = None  # `jti`, for revocation (later)


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def _algorithms_for_key(key: PublicKey) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _EC_ALGORITHM_FOR_CURVE.get(key.curve.name)
        return frozenset({algorithm}) if algorithm else frozenset()
    return frozenset({"EdDSA"})


def load_public_key(path: Path) -> PublicKey:
    """Raises: ConfigError naming `auth.public_key_file`."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"auth.public_key_file: cannot read {path}: {exc.strerror}") from None
    try:
        key = load_pem_public_key(pem)
    except ValueError:
        raise ConfigError(
            f"auth.public_key_file: {path} is not a PEM public key"
            " (a private key does not belong on the server)"
        ) from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ConfigError(f"auth.public_key_file: unsupported key type {type(key).__name__}")
    return key


class TokenVerifier:
    def __init__(
        self,
        *,
        keys: dict[str, Any],
        issuer: str | None = None,
        audience: str | None = None,
        leeway: float = 10.0,
        max_user_id_length: int = 128,
    ) -> None:
        """`keys` maps each allowed algorithm to the one key that may verify it."""
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._max_user_id_length = max_user_id_length

    @classmethod
    def from_settings(cls, auth: AuthSettings, *, max_user_id_length: int = 128) -> TokenVerifier:
        """Raises: ConfigError when a configured algorithm has no key of its type."""
        keys: dict[str, Any] = {}
        public_key = load_public_key(auth.public_key_file) if auth.public_key_file else None
        usable = _algorithms_for_key(public_key) if public_key is not None else frozenset()
        for algorithm in auth.algorithms:
            if algorithm in HMAC_ALGORITHMS and auth.secret is not None:
                keys[algorithm] = auth.secret.get_secret_value().encode()
            elif algorithm in usable:
                keys[algorithm] = public_key
            else:
                raise ConfigError(
                    f"auth.algorithms: {algorithm} does not match the key in auth.public_key_file"
                    f" (it can verify: {', '.join(sorted(usable)) or 'nothing'})"
                )
        return cls(
            keys=keys,
            issuer=auth.issuer,
            audience=auth.audience,
            leeway=auth.leeway,
            max_user_id_length=max_user_id_length,
        )

    @property
    def algorithms(self) -> frozenset[str]:
        return frozenset(self._keys)

    def verify(self, token: str) -> Identity:
        """Raises: AuthError (reason `invalid token` or `token expired`)."""
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            key = self._keys.get(algorithm) if isinstance(algorithm, str) else None
            if key is None or not isinstance(algorithm, str):
                raise AuthError(INVALID, "algorithm_not_allowed")
            claims = jwt.decode(
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
        expires_at = claims.get("exp")
        if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            raise AuthError(INVALID, "malformed")
        token_id = claims.get("jti")
        return Identity(
            user=subject,
            expires_at=int(expires_at),
            token_id=token_id if isinstance(token_id, str) else None,
        )


def _category(exc: Exception) -> str:
    for kind, name in _CATEGORIES:
        if isinstance(exc, kind):
            return name
    return "invalid"


def mint_token(
    secret: str, user: str, *, ttl: int, now: int, algorithm: str = "HS256", **claims: Any
) -> str:
    """A development token signed with the HMAC secret (`callgate token`, tests)."""
    payload = {"sub": user, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, secret, algorithm=algorithm)
