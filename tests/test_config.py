"""Configuration: the shipped file is valid, bad values are refused naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from callgate.config import DEVELOPMENT_SECRET, ServerSettings, is_loopback_host, load_settings
from callgate.errors import ConfigError

SHIPPED = Path(__file__).parent.parent / "config" / "callgate.toml"


def test_shipped_config_is_valid_and_safe() -> None:
    settings = load_settings(SHIPPED, environ={})
    assert settings.server.host == "127.0.0.1"
    assert settings.auth.allow_query_token is False
    assert settings.auth.secret is not None
    assert settings.auth.secret.get_secret_value() == DEVELOPMENT_SECRET
    assert settings.limits.call_request == "10/minute;100/hour"


def test_every_required_key_is_in_the_shipped_file() -> None:
    text = SHIPPED.read_text()
    for key in (
        "host",
        "port",
        "path",
        "max_message_bytes",
        "auth_timeout",
        "algorithms",
        "secret",
        "public_key_file",
        "issuer",
        "audience",
        "leeway",
        "allow_query_token",
        "ring_timeout",
        "max_calls_per_user",
        "call_request",
        "call_request_pair",
        "messages",
        "handshakes",
        "stun_urls",
        "turn_urls",
        "turn_secret",
        "turn_ttl",
        # token lifecycle and resilience
        "refresh_before",
        "jwks_file",
        "jwks_url",
        "revocation_file",
        "reconnect_grace",
        "allowed_origins",
        "drain_timeout",
        "ping_interval",
        "outbound_queue",
        "outbound_queue_bytes",
        "max_connections_per_user",
        "max_connections_per_address",
        "trusted_proxies",
        "proxy_header",
        "proxy_protocol",
        "cert_file",
        "key_file",
        # the audit trail and the operator's view
        "key",
        "rotate_bytes",
        "rotate_seconds",
        "checkpoint_every",
        "checkpoint_seconds",
        "enabled",
        # the admin API
        "keys",
        "drain_grace",
    ):
        assert f"\n{key} = " in text, key


def test_environment_overrides(tmp_path: Path) -> None:
    env = {
        "CALLGATE_AUTH_SECRET": "x" * 40,
        "CALLGATE_SERVER_PORT": "9999",
        "CALLGATE_AUTH_ALGORITHMS": "HS256,HS512",
        "CALLGATE_ICE_STUN_URLS": '["stun:a:1", "stun:b:2"]',
        "CALLGATE_AUTH_ALLOW_QUERY_TOKEN": "true",
    }
    settings = load_settings(SHIPPED, environ=env)
    assert settings.server.port == 9999
    assert settings.auth.algorithms == ("HS256", "HS512")
    assert settings.ice.stun_urls == ("stun:a:1", "stun:b:2")
    assert settings.auth.allow_query_token is True
    assert settings.auth.secret is not None and settings.auth.secret.get_secret_value() == "x" * 40


@pytest.mark.parametrize(
    ("toml", "env", "named"),
    [
        ("[server]\nport = 70000\n", {}, "server.port"),
        ("[server]\nprot = 1\n", {}, "server.prot"),
        ("[auth]\nalgorithms = ['none']\n", {}, "auth.algorithms"),
        ("[auth]\nsecret = 'short'\n", {}, "auth.secret"),
        ("", {}, "auth.secret"),  # HS256 without any secret
        ("[limits]\nmessages = 'lots'\n", {}, "limits.messages"),
        ("[ice]\nturn_urls = ['turn:x']\n", {"CALLGATE_AUTH_SECRET": "y" * 40}, "ice.turn_secret"),
        ("[calls]\nring_timeout = -1\n", {}, "calls.ring_timeout"),
        ("[server\n", {}, "not valid TOML"),
        ("", {"CALLGATE_SERVER_PORT": "many"}, "server.port"),
        ("[auth]\nalgorithms = ['RS256']\n", {}, "auth.public_key_file"),
        ("[cluster]\nenabled = true\n", {"CALLGATE_AUTH_SECRET": "y" * 40}, "cluster.key"),
        ("[cluster]\nkey = 'short'\n", {"CALLGATE_AUTH_SECRET": "y" * 40}, "cluster.key"),
        (
            "[cluster]\nredis_url = 'http://x'\n",
            {"CALLGATE_AUTH_SECRET": "y" * 40},
            "cluster.redis_url",
        ),
        (
            "[cluster]\nnode_timeout = 1\n",
            {"CALLGATE_AUTH_SECRET": "y" * 40},
            "cluster.node_timeout",
        ),
        # The replicated log's settings went with it (docs/cluster.md, Configuration).
        (
            "[cluster]\nsnapshot_every = 10000\n",
            {"CALLGATE_AUTH_SECRET": "y" * 40},
            "cluster.snapshot_every",
        ),
    ],
)
def test_bad_config_names_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], named: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(path, environ=env)


def test_secret_never_in_repr() -> None:
    settings = load_settings(SHIPPED, environ={})
    assert DEVELOPMENT_SECRET not in repr(settings)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.org", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    ("env", "variable", "key"),
    [
        ({"CALLGATE_SERVER_PORT": "abc"}, "CALLGATE_SERVER_PORT", "server.port"),
        ({"CALLGATE_AUTH_SECRET": "short"}, "CALLGATE_AUTH_SECRET", "auth.secret"),
        ({"CALLGATE_AUTH_KEY_FILES": "{nope"}, "CALLGATE_AUTH_KEY_FILES", "auth.key_files"),
        ({"CALLGATE_ICE_STUN_URLS": "[nope"}, "CALLGATE_ICE_STUN_URLS", "ice.stun_urls"),
    ],
)
def test_a_bad_environment_override_names_its_variable(
    env: dict[str, str], variable: str, key: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(SHIPPED, environ=env)
    message = str(refused.value)
    assert f"{variable}: " in message and key in message
    # Not blamed on the file, which is fine.
    assert str(SHIPPED) not in message
    assert "short" not in message  # a secret's value is never echoed


def test_the_queue_holds_four_of_the_largest_messages_however_small_it_is_set() -> None:
    """`outbound_queue_bytes` bounds what waits for a client, but never below four messages of
    `max_message_bytes`: with that raised and the queue left as it was, a client reading at its
    link's pace would be closed (1008) for two large messages forwarded to it in a row."""
    assert ServerSettings().outbound_queue_chars == 1024 * 1024
    raised = ServerSettings(max_message_bytes=600_000, outbound_queue_bytes=16384)
    assert raised.outbound_queue_chars == 2_400_000
    assert ServerSettings(outbound_queue_bytes=16384).outbound_queue_chars == 4 * 65536
