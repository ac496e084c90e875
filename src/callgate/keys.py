"""Verification keys: loaded from the config's files into an immutable `KeyRing`.

Two kinds of key:

* *default keys*, used for tokens without a `kid`: the HMAC `secret` (HS256/384/512) and the
  `public_key_file` (the algorithms of its type);
* *keys by `kid`*, from `key_files` (`kid = "file.pem"`), a `jwks_file`, and a `jwks_url`. Once any
  is configured, a token's `kid` must name one of them: an unknown `kid` is refused.

Every key carries its own algorithm allow-list: the JWK's `alg` if it has one, else the
algorithms its type can verify, always intersected with `[auth] algorithms`. A ring is rebuilt
whole on reload and swapped in one assignment, so a verification never sees half a reload.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from callgate.config import HMAC_ALGORITHMS, AuthSettings
from callgate.errors import ConfigError

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
_EC_ALGORITHM_FOR_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
MAX_JWKS_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class VerificationKey:
    key: Any
    algorithms: frozenset[str]


@dataclass(frozen=True, slots=True)
class KeyRing:
    default: Mapping[str, Any] = field(default_factory=dict)  # algorithm -> key
    by_kid: Mapping[str, VerificationKey] = field(default_factory=dict)
    remote: Mapping[str, VerificationKey] = field(default_factory=dict)  # from jwks_url

    def kid_keys_configured(self) -> bool:
        return bool(self.by_kid or self.remote)

    def for_kid(self, kid: str) -> VerificationKey | None:
        return self.by_kid.get(kid) or self.remote.get(kid)

    def with_remote(self, remote: Mapping[str, VerificationKey]) -> KeyRing:
        return KeyRing(self.default, self.by_kid, dict(remote))


def algorithms_for_key(key: object) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _EC_ALGORITHM_FOR_CURVE.get(key.curve.name)
        return frozenset({algorithm}) if algorithm else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return frozenset({"EdDSA"})
    if isinstance(key, bytes):
        return HMAC_ALGORITHMS
    return frozenset()


def load_public_key(path: Path, setting: str = "auth.public_key_file") -> PublicKey:
    """Raises: ConfigError naming `setting`."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    try:
        key = load_pem_public_key(pem)
    except ValueError:
        raise ConfigError(
            f"{setting}: {path} is not a PEM public key"
            " (a private key does not belong on the server)"
        ) from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ConfigError(f"{setting}: unsupported key type {type(key).__name__}")
    return key


def parse_jwks(raw: bytes, allowed: frozenset[str], source: str) -> dict[str, VerificationKey]:
    """The public keys of a JWKS document, by `kid`.

    Raises:
        ConfigError: not a JWKS, a key without `kid`, or a private key.
    """
    if len(raw) > MAX_JWKS_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(raw)
        entries = document["keys"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f'{source}: not a JWKS document ({{"keys": [...]}})') from None
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'keys' must be a list")
    keys: dict[str, VerificationKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            raise ConfigError(f"{source}: every key needs a string 'kid'")
        kid = entry["kid"]
        if "d" in entry or entry.get("kty") == "oct":
            raise ConfigError(f"{source}: key {kid!r} is private or symmetric; publish public keys")
        if entry.get("use", "sig") != "sig":
            continue  # an encryption key has no business verifying tokens
        try:
            key = jwt.PyJWK(entry).key
        except jwt.PyJWTError as exc:
            raise ConfigError(f"{source}: key {kid!r} is not usable: {exc}") from None
        stated = entry.get("alg")
        usable = frozenset({stated}) if isinstance(stated, str) else algorithms_for_key(key)
        keys[kid] = VerificationKey(key, usable & algorithms_for_key(key) & allowed)
    return keys


def load_keyring(auth: AuthSettings) -> KeyRing:
    """Read every configured key file.

    Raises:
        ConfigError: a file is unreadable or a configured algorithm has no key of its type.
    """
    allowed = frozenset(auth.algorithms)
    default: dict[str, Any] = {}
    if auth.secret is not None:
        for algorithm in allowed & HMAC_ALGORITHMS:
            default[algorithm] = auth.secret.get_secret_value().encode()
    if auth.public_key_file is not None:
        public_key = load_public_key(auth.public_key_file)
        usable = algorithms_for_key(public_key)
        for algorithm in allowed - HMAC_ALGORITHMS:
            if algorithm in usable:
                default[algorithm] = public_key
        has_kid_keys = auth.key_files or auth.jwks_file or auth.jwks_url
        unmatched = allowed - HMAC_ALGORITHMS - usable
        if unmatched and not has_kid_keys:
            raise ConfigError(
                f"auth.algorithms: {', '.join(sorted(unmatched))} does not match the key in"
                f" auth.public_key_file (it can verify: {', '.join(sorted(usable)) or 'nothing'})"
            )
    by_kid: dict[str, VerificationKey] = {}
    for kid, path in auth.key_files.items():
        key = load_public_key(path, f"auth.key_files.{kid}")
        by_kid[kid] = VerificationKey(key, algorithms_for_key(key) & allowed)
    if auth.jwks_file is not None:
        try:
            raw = auth.jwks_file.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"auth.jwks_file: cannot read {auth.jwks_file}: {exc.strerror}"
            ) from None
        by_kid.update(parse_jwks(raw, allowed, "auth.jwks_file"))
    return KeyRing(default, by_kid)
