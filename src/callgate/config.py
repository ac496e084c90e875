"""Frozen settings from a TOML file plus the environment, validated once at start.

Every key has a safe default; `config/callgate.toml` documents each one. Any key can be overridden
by `CALLGATE_<SECTION>_<KEY>` (for example `CALLGATE_AUTH_SECRET`, `CALLGATE_SERVER_PORT`); list
values in the environment are a JSON array or a comma-separated string. A bad value is refused
with a `ConfigError` that names the key and where it came from.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import socket
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from limits import parse_many
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from callgate.errors import ConfigError

# The secret shipped in config/callgate.toml. `callgate serve` refuses it on any non-loopback host.
DEVELOPMENT_SECRET = "callgate-development-secret-for-localhost-only"  # noqa: S105 - public on purpose
DEVELOPMENT_AUDIT_KEY = "callgate-development-audit-key-for-localhost-only"
# The Ed25519 seed (base64) of the development checkpoint signing key in config/callgate.toml:
# SHA-256 of "callgate development audit signing key, public on purpose". Its key id is
# ee3d7def71e1a845. Anyone can sign checkpoints with it.
DEVELOPMENT_AUDIT_SIGNING_KEY = "KOQ21CixVI8X3kVm5Fo77kwjvSS3Iz5h0tO84oXKcGY="

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS
# RFC 7518 3.2: an HMAC key must be at least as long as the hash output.
MIN_HMAC_SECRET_BYTES = 32

ENV_PREFIX = "CALLGATE_"


def reuse_port_supported() -> bool:
    """True where processes can share a listening port and the kernel spreads new connections
    over them: Linux's SO_REUSEPORT (3.9 and later). BSD and macOS have an option of that name
    that does not spread connections (the newest socket, or the first, takes them), and Windows
    has none."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


REUSE_PORT_UNSUPPORTED = (
    "needs Linux's SO_REUSEPORT (processes sharing a port, the kernel spreading connections);"
    f" not available on {sys.platform}"
)


def _hmac_key(value: SecretStr | None) -> SecretStr | None:
    """An HMAC key (the token secret, the audit key) as long as the hash output, RFC 7518 3.2."""
    if value is not None and len(value.get_secret_value().encode()) < MIN_HMAC_SECRET_BYTES:
        raise ValueError(f"must be at least {MIN_HMAC_SECRET_BYTES} bytes (RFC 7518 3.2)")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _empty_string_is_unset(cls, value: object) -> object:
        # TOML has no null: `issuer = ""` means "not set", like leaving the key out.
        return None if value == "" else value


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    path: str = Field("/ws", pattern=r"^/[A-Za-z0-9._~/-]*$")
    max_message_bytes: int = Field(65536, ge=4096, le=16 * 1024 * 1024)
    auth_timeout: float = Field(10.0, gt=0, le=300)
    outbound_queue: int = Field(256, ge=8, le=65536)
    # ... and the most characters (bytes, for ASCII) of frames queued for it: a frame count alone
    # let a client that does not read hold 256 frames of max_message_bytes each (16 MiB).
    outbound_queue_bytes: int = Field(1024 * 1024, ge=16384, le=1024 * 1024 * 1024)
    close_timeout: float = Field(3.0, gt=0, le=60)
    # Browsers' `Origin` values allowed to connect; empty allows any. Requests without an
    # `Origin` header (apps, servers) are not affected.
    allowed_origins: tuple[str, ...] = ()
    drain_timeout: float = Field(10.0, gt=0, le=300)
    # Seconds between keepalive pings; a peer that has not answered by the next one is dropped.
    # 0 turns keepalive off.
    ping_interval: float = Field(25.0, ge=0, le=3600)
    max_connections_per_user: int = Field(10, ge=1, le=10000)
    max_connections_per_address: int = Field(256, ge=1, le=1_000_000)
    # The WebSocket implementation: wsproto driven directly (the default: several times cheaper
    # per message), or trio-websocket (docs/performance.md says what each costs).
    engine: Literal["trio-websocket", "wsproto"] = "wsproto"
    # Load balancers and reverse proxies (addresses and CIDR ranges) whose word about the
    # client's address is taken: their forwarding header, or their PROXY protocol header.
    # Empty (the default): the TCP peer is the client, whatever headers say.
    trusted_proxies: tuple[str, ...] = ()
    # The header the trusted proxies write the client's address in (only that one is read).
    proxy_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    # Trusted proxies open every connection with a PROXY protocol (v1 or v2) header.
    proxy_protocol: bool = False
    # Bind with SO_REUSEPORT: several processes listen on the same port and the kernel spreads
    # new connections over them (what `callgate serve --workers N` sets for its workers). Linux.
    reuse_port: bool = False

    @field_validator("reuse_port")
    @classmethod
    def _reuse_port_here(cls, value: bool) -> bool:
        if value and not reuse_port_supported():
            raise ValueError(REUSE_PORT_UNSUPPORTED)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or CIDR range (example: 10.0.0.0/8)"
                ) from None
        return value

    @property
    def outbound_queue_chars(self) -> int:
        """The size bound a connection's queue has: `outbound_queue_bytes`, but never less than
        four messages of `max_message_bytes`, so that a client that reads at its link's pace is
        not closed for two large messages forwarded to it in a row (with `max_message_bytes`
        raised and the queue left as it was)."""
        return max(self.outbound_queue_bytes, 4 * self.max_message_bytes)


class AuthSettings(_Section):
    algorithms: tuple[str, ...] = ("HS256",)
    secret: SecretStr | None = None
    public_key_file: Path | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway: float = Field(10.0, ge=0, le=300)
    allow_query_token: bool = False
    # Seconds before `exp` at which `token-expiring` is sent.
    refresh_before: float = Field(60.0, ge=0, le=86400)
    # More verification keys, chosen by the token's `kid`: a JWKS file, PEM files by kid, a URL.
    jwks_file: Path | None = None
    key_files: dict[str, Path] = Field(default_factory=dict)
    jwks_url: str | None = Field(None, pattern=r"^https?://")
    # Seconds a fetched JWKS is used before it is fetched again; an unknown `kid` refetches at
    # most once per `jwks_min_refresh` seconds.
    jwks_cache_ttl: float = Field(300.0, ge=10, le=86400)
    jwks_min_refresh: float = Field(30.0, ge=1, le=3600)
    # JSON file of revoked tokens (by `jti`) and users (tokens issued before a time).
    revocation_file: Path | None = None

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one algorithm is required")
        unknown = sorted(set(value) - SUPPORTED_ALGORITHMS)
        if unknown:
            raise ValueError(
                f"unsupported {unknown}; choose from {sorted(SUPPORTED_ALGORITHMS)}"
                " ('none' is never accepted)"
            )
        return value

    _secret_long_enough = field_validator("secret")(_hmac_key)


class CallSettings(_Section):
    ring_timeout: float = Field(45.0, gt=0, le=600)
    max_calls_per_user: int = Field(1, ge=1, le=16)
    # Seconds a dropped device's calls wait for it to resume; 0 ends them at once.
    reconnect_grace: float = Field(15.0, ge=0, le=600)
    # Messages kept for a held device during the grace; more are dropped and counted. Also the
    # ICE candidates an unanswered call keeps for callee devices that sign in later ("notify").
    resume_buffer: int = Field(32, ge=0, le=4096)
    # A call to a user with no device online: "unavailable" ends it at once; "notify" holds it
    # pending (a `call.pending` webhook wakes the app) until a device signs in or ring_timeout.
    offline: Literal["unavailable", "notify"] = "unavailable"
    # Missed calls kept per user for the next sign-in (0: none kept, no `missed-calls` event),
    # for how many seconds, and how many across all users (the oldest go first).
    missed_calls: int = Field(0, ge=0, le=1000)
    missed_call_max_age: float = Field(7 * 86400.0, gt=0, le=90 * 86400.0)
    missed_calls_total: int = Field(100_000, ge=1, le=10_000_000)


class LimitSettings(_Section):
    """Rate limits in the `limits` notation; `;` joins several windows that all apply."""

    call_request: str = "10/minute;100/hour"
    call_request_pair: str = "3/minute"
    messages: str = "50/second"
    handshakes: str = "60/minute"
    # More refused (rate-limited) messages than this on one connection closes it with 4029.
    flood: str = "20/10 seconds"

    @field_validator("*")
    @classmethod
    def _parseable(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError:
            raise ValueError(
                f"not a rate limit: {value!r} (example: '10/minute;100/hour')"
            ) from None
        return value


class ValidationSettings(_Section):
    """Field limits of contract section 6, counted in UTF-8 bytes where they say bytes."""

    max_sdp_bytes: int = Field(16384, ge=1024, le=1024 * 1024)
    max_candidate_bytes: int = Field(1024, ge=128, le=65536)
    max_user_id_length: int = Field(128, ge=1, le=1024)
    max_call_id_length: int = Field(128, ge=1, le=1024)


class MetricsSettings(_Section):
    """Prometheus `/metrics`, `/healthz` and `/readyz` on their own port."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class SocketIOSettings(_Section):
    """Socket.IO v4 clients on `/socket.io/` (WebSocket transport only)."""

    enabled: bool = True
    # Engine.IO heartbeat, in seconds (the open packet states them in milliseconds).
    ping_interval: float = Field(25.0, gt=0, le=3600)
    ping_timeout: float = Field(20.0, gt=0, le=3600)


class TlsSettings(_Section):
    """Serve `wss://` when both are set."""

    cert_file: Path | None = None
    key_file: Path | None = None


class AuditSettings(_Section):
    path: str = "-"
    # HMAC key of the per-record MAC chain (optional once checkpoints are signed).
    key: SecretStr | None = None
    # Ed25519 private key that signs checkpoints: base64 of the 32-byte seed or a PEM, inline
    # (signing_key, best from CALLGATE_AUDIT_SIGNING_KEY) or in a file (signing_key_file).
    signing_key: SecretStr | None = None
    signing_key_file: Path | None = None
    # Where checkpoints also go, out of the log writer's reach: a file, syslog, an HTTP(S) POST.
    anchor_path: str | None = None
    anchor_syslog: str | None = Field(None, pattern=r"^(/.+|[^/:]+:\d{1,5})$")
    anchor_url: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    rotate_bytes: int = Field(64 * 1024 * 1024, ge=4096)
    rotate_seconds: float = Field(86400.0, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    checkpoint_seconds: float = Field(60.0, ge=0.1)

    _key_long_enough = field_validator("key")(_hmac_key)


class IceSettings(_Section):
    stun_urls: tuple[str, ...] = ("stun:stun.l.google.com:19302",)
    turn_urls: tuple[str, ...] = ()
    turn_secret: SecretStr | None = None
    turn_ttl: int = Field(3600, ge=60, le=7 * 24 * 3600)

    @field_validator("stun_urls", "turn_urls")
    @classmethod
    def _ice_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
                raise ValueError(f"{url!r} is not a stun:/stuns:/turn:/turns: URL")
        return value


# The webhook event types (docs/protocol.md, "Webhooks"); all but `signin.refused` by default.
CALL_WEBHOOK_EVENTS = (
    "call.requested",
    "call.pending",
    "call.ringing",
    "call.answered",
    "call.rejected",
    "call.missed",
    "call.ended",
)
WEBHOOK_EVENTS = (*CALL_WEBHOOK_EVENTS, "signin.refused")
# Standard Webhooks: a secret of 24 to 64 random bytes, written `whsec_<base64>`.
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - a format's prefix, not a secret


class WebhookSettings(_Section):
    """Signed webhooks for call lifecycle events (Standard Webhooks); off while `url` is unset."""

    url: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    secret: SecretStr | None = None
    events: tuple[str, ...] = CALL_WEBHOOK_EVENTS
    # Seconds one attempt may take (connecting, sending, the response).
    timeout: float = Field(5.0, gt=0, le=120)
    # Attempts after the first; the wait before each doubles from `backoff`, up to `max_backoff`.
    retries: int = Field(5, ge=0, le=30)
    backoff: float = Field(1.0, gt=0, le=600)
    max_backoff: float = Field(60.0, gt=0, le=3600)
    # Webhooks waiting or being sent; more are dropped (counted, audited): never slows calls.
    queue_size: int = Field(1000, ge=1, le=1_000_000)
    # Deliveries in parallel; the webhooks of one call always go one after another, in order.
    workers: int = Field(4, ge=1, le=64)
    # http:// (no TLS) to a host that is not loopback; for development only.
    allow_http: bool = False

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(WEBHOOK_EVENTS))
        if unknown:
            raise ValueError(f"unknown {unknown}; choose from {list(WEBHOOK_EVENTS)}")
        return value

    @field_validator("secret")
    @classmethod
    def _standard_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            webhook_secret_bytes(value.get_secret_value())
        return value


def webhook_secret_bytes(secret: str) -> bytes:
    """The key of a `whsec_<base64>` secret. Raises: ValueError, which names the format."""
    problem = f"must be {WEBHOOK_SECRET_PREFIX}<base64 of 24-64 random bytes>"
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(problem)
    try:
        key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(problem) from None
    if not 24 <= len(key) <= 64:
        raise ValueError(problem)
    return key


class ClusterSettings(_Section):
    """Several nodes behind one address, sharing call state through Redis (docs/cluster.md)."""

    enabled: bool = False
    redis_url: str = Field("redis://127.0.0.1:6379/0", pattern=r"^(rediss?|unix)://")
    # Prefix of every Redis key: nodes with the same name and key form one cluster.
    name: str = Field("callgate", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # HMAC key that signs every message between nodes; all nodes of a cluster share it.
    key: SecretStr | None = None
    # This node's name in connection ids and the audit trail; a random suffix is added per run.
    node_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,32}$")
    heartbeat_interval: float = Field(1.0, gt=0, le=60)
    # A node silent for this long is declared dead; its devices are treated as disconnected.
    node_timeout: float = Field(5.0, gt=0, le=600)
    # How long a sign-in or token refresh waits for the cluster to decide it.
    apply_timeout: float = Field(5.0, gt=0, le=120)
    # Direct links between nodes (docs/cluster.md, "Links"): deliveries go node to node over
    # TCP, each node's Redis inbox behind them. Off: every delivery takes the inbox.
    links: bool = True
    # Where this node's link listener binds (port 0: any free port), and the host other nodes
    # dial (default: link_host; required when link_host is a wildcard address).
    link_host: str = "127.0.0.1"
    link_port: int = Field(0, ge=0, le=65535)
    link_advertise: str | None = None

    _key_long_enough = field_validator("key")(_hmac_key)

    @model_validator(mode="after")
    def _dialable_links(self) -> ClusterSettings:
        wildcard = ("0.0.0.0", "::", "")  # noqa: S104 (refused below without link_advertise)
        if self.links and self.link_host in wildcard and not self.link_advertise:
            raise ValueError(
                f"link_host {self.link_host!r} listens on every address: set link_advertise to"
                " the address other nodes dial to reach this one"
            )
        return self

    @property
    def ack_timeout(self) -> float:
        """Seconds a link may leave a batch unacknowledged before its inbox takes over."""
        return min(2.0, self.node_timeout / 2)


class AdminSettings(_Section):
    """The admin API (docs/admin.md): its own listener, off unless enabled, loopback by default."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9465, ge=0, le=65535)
    # Admin keys by operator name, each at least 32 bytes: `Authorization: Bearer <key>`; the
    # name is who the audit trail says acted. Set them in CALLGATE_ADMIN_KEYS (a JSON object).
    keys: dict[str, SecretStr] = Field(default_factory=dict)
    # Seconds a drain waits after `/readyz` turns 503 before it closes connections, when the
    # request names none.
    drain_grace: float = Field(5.0, ge=0, le=3600)

    @field_validator("keys")
    @classmethod
    def _strong_keys(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, key in value.items():
            if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"{name!r}: an operator name is 1-64 letters, digits, - or _")
            if len(key.get_secret_value().encode()) < MIN_HMAC_SECRET_BYTES:
                raise ValueError(f"{name}: must be at least {MIN_HMAC_SECRET_BYTES} bytes")
        return value


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    calls: CallSettings = CallSettings()
    limits: LimitSettings = LimitSettings()
    validation: ValidationSettings = ValidationSettings()
    audit: AuditSettings = AuditSettings()
    ice: IceSettings = IceSettings()
    tls: TlsSettings = TlsSettings()
    metrics: MetricsSettings = MetricsSettings()
    socketio: SocketIOSettings = SocketIOSettings()
    cluster: ClusterSettings = ClusterSettings()
    webhooks: WebhookSettings = WebhookSettings()
    admin: AdminSettings = AdminSettings()

    def check_coherence(self) -> None:
        """Raises: ConfigError for keys that are valid alone but not together."""
        algorithms = set(self.auth.algorithms)
        if algorithms & HMAC_ALGORITHMS and self.auth.secret is None:
            raise ConfigError(
                "auth.secret: required for HS256/HS384/HS512; set it in the config file"
                " or in CALLGATE_AUTH_SECRET"
            )
        has_public_keys = (
            self.auth.public_key_file or self.auth.jwks_file or self.auth.key_files
        ) or self.auth.jwks_url
        if algorithms & PUBLIC_KEY_ALGORITHMS and not has_public_keys:
            raise ConfigError(
                "auth.public_key_file: RS*/PS*/ES*/EdDSA need a key: public_key_file, key_files,"
                " jwks_file or jwks_url"
            )
        if (self.tls.cert_file is None) != (self.tls.key_file is None):
            raise ConfigError("tls.cert_file, tls.key_file: set both, or neither")
        if self.ice.turn_urls and self.ice.turn_secret is None:
            raise ConfigError("ice.turn_secret: required when ice.turn_urls is set")
        cluster = self.cluster
        if cluster.enabled and cluster.key is None:
            raise ConfigError(
                "cluster.key: required when cluster.enabled is true (it signs messages between"
                " nodes); set it in the config file or in CALLGATE_CLUSTER_KEY"
            )
        if self.admin.enabled and not self.admin.keys:
            raise ConfigError(
                "admin.keys: required when admin.enabled is true; set CALLGATE_ADMIN_KEYS to a"
                ' JSON object such as {"alice": "<at least 32 random bytes>"}'
            )
        if self.server.proxy_protocol and not self.server.trusted_proxies:
            raise ConfigError(
                "server.proxy_protocol: needs server.trusted_proxies (the proxies that send it)"
            )
        if cluster.node_timeout < 2 * cluster.heartbeat_interval:
            raise ConfigError("cluster.node_timeout: must be at least twice heartbeat_interval")
        self._check_webhooks()

    def _check_webhooks(self) -> None:
        webhooks = self.webhooks
        if webhooks.url is None:
            return
        if webhooks.secret is None:
            raise ConfigError(
                "webhooks.secret: required when webhooks.url is set (whsec_<base64>); set it in"
                " the config file or in CALLGATE_WEBHOOKS_SECRET"
            )
        target = urlsplit(webhooks.url)
        if not target.hostname:
            raise ConfigError("webhooks.url: must name a host")
        if (
            target.scheme == "http"
            and not webhooks.allow_http
            and not is_loopback_host(target.hostname)
        ):
            raise ConfigError(
                "webhooks.url: must be https:// (http:// only to loopback, or with"
                " webhooks.allow_http = true)"
            )


_LIST_FIELDS = {
    ("auth", "algorithms"),
    ("ice", "stun_urls"),
    ("ice", "turn_urls"),
    ("server", "allowed_origins"),
    ("webhooks", "events"),
    ("server", "trusted_proxies"),
}


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for key in model.model_fields:
            raw = environ.get(env_variable(section, key))
            if raw is None:
                continue
            value: Any = raw
            if (section, key) in _LIST_FIELDS:
                value = _parse_env_list(section, key, raw)
            elif raw.lstrip().startswith("{"):
                try:
                    value = json.loads(raw)
                except ValueError:
                    raise ConfigError(
                        f"{env_variable(section, key)}: not a JSON object (for {section}.{key})"
                    ) from None
            overrides.setdefault(section, {})[key] = value
    return overrides


def env_variable(section: str, key: str) -> str:
    """The environment variable that overrides `[section] key`."""
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _parse_env_list(section: str, key: str, raw: str) -> list[str]:
    if raw.lstrip().startswith("["):
        problem = f"{env_variable(section, key)}: not a JSON array (for {section}.{key})"
        try:
            parsed = json.loads(raw)
        except ValueError:
            raise ConfigError(problem) from None
        if not isinstance(parsed, list):
            raise ConfigError(problem)
        return [str(item) for item in parsed]
    return [item.strip() for item in raw.split(",") if item.strip()]


def load_settings(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    sections: tuple[str, ...] | None = None,
) -> Settings:
    """Read the TOML file (if any), apply environment overrides, validate.

    `sections`: read and check only these (the others keep their defaults), for a tool that
    needs nothing else: `load_audit_settings`.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key, or a bad value (named).
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    overrides = _env_overrides(os.environ if environ is None else environ)
    for section, values in overrides.items():
        existing = data.get(section, {})
        if not isinstance(existing, dict):
            raise ConfigError(f"{section}: must be a table in {source}")
        data[section] = {**existing, **values}
    if sections is not None:
        data = {name: values for name, values in data.items() if name in sections}
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems, from_file = [], False
        for error in exc.errors(include_url=False, include_input=False):
            loc = [str(part) for part in error["loc"]]
            key = ".".join(loc)
            if len(loc) >= 2 and loc[1] in overrides.get(loc[0], {}):
                # The value came from the environment: name the variable to fix, and the key.
                problems.append(f"{env_variable(loc[0], loc[1])}: {error['msg']} (for {key})")
            else:
                from_file = True
                problems.append(f"{key}: {error['msg']}")
        where = f" ({source})" if from_file else ""
        raise ConfigError(f"invalid configuration{where}: {'; '.join(problems)}") from None
    if sections is None:
        settings.check_coherence()
    return settings


def load_audit_settings(
    path: Path | None = None, *, environ: Mapping[str, str] | None = None
) -> AuditSettings:
    """Only `[audit]`: what `callgate audit` needs, never the token settings."""
    return load_settings(path, environ=environ, sections=("audit",)).audit


def is_loopback_host(host: str) -> bool:
    """True when `host` only listens on this machine (127.0.0.0/8, ::1 or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def development_keys(settings: Settings) -> list[tuple[str, str, str]]:
    """Each setting that still holds a key shipped (public) in config/callgate.toml, what it is,
    and what anyone who has read that file can do with it."""
    keys = []
    secret, audit_key = settings.auth.secret, settings.audit.key
    if secret is not None and secret.get_secret_value() == DEVELOPMENT_SECRET:
        keys.append(("auth.secret", "secret", "anyone can mint tokens this server accepts"))
    if audit_key is not None and audit_key.get_secret_value() == DEVELOPMENT_AUDIT_KEY:
        keys.append(("audit.key", "audit key", "anyone can forge the audit trail's MACs"))
    if uses_development_signing_key(settings.audit):
        keys.append(
            (
                "audit.signing_key",
                "audit signing key",
                "anyone can sign audit checkpoints (development key id ee3d7def71e1a845)",
            )
        )
    return keys


def uses_development_secret(settings: Settings) -> str | None:
    """The setting of the first shipped, public development key the settings use, if any."""
    keys = development_keys(settings)
    return keys[0][0] if keys else None


def uses_development_signing_key(audit: AuditSettings) -> bool:
    key = audit.signing_key
    return key is not None and key.get_secret_value().strip() == DEVELOPMENT_AUDIT_SIGNING_KEY
