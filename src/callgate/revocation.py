"""The revocation list: tokens denied by `jti`, and users whose tokens issued before a time are.

Stored as a small JSON file the server reloads when it changes, and that `callgate revoke` edits:

    {"tokens": ["8d5c...", "f00b..."], "users": {"alice": 1795000000}}

`users` maps a user id to a unix time: every token of that user with an `iat` before it (or with
no `iat` at all) is revoked. Edits are written to a temporary file and renamed over the old one,
so the server never reads half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from callgate.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RevocationList:
    tokens: frozenset[str] = frozenset()
    users: dict[str, float] = field(default_factory=dict)

    def revokes(self, user: str, token_id: str | None, issued_at: float | None) -> bool:
        if token_id is not None and token_id in self.tokens:
            return True
        before = self.users.get(user)
        return before is not None and (issued_at is None or issued_at < before)


def load_revocations(path: Path) -> RevocationList:
    """A missing file is an empty list. Raises: ConfigError for a file that is not the format."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return RevocationList()
    except OSError as exc:
        raise ConfigError(f"auth.revocation_file: cannot read {path}: {exc.strerror}") from None
    try:
        document = json.loads(raw) if raw.strip() else {}
        tokens = document.get("tokens", [])
        users = document.get("users", {})
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError("tokens")
        if not isinstance(users, dict) or not all(
            isinstance(u, str) and isinstance(t, int | float) and not isinstance(t, bool)
            for u, t in users.items()
        ):
            raise ValueError("users")
    except (ValueError, AttributeError):
        raise ConfigError(
            f'auth.revocation_file: {path} must be {{"tokens": [jti, ...], "users": '
            "{user: unix_time, ...}}"
        ) from None
    return RevocationList(frozenset(tokens), {u: float(t) for u, t in users.items()})


def add_revocation(
    path: Path, *, token_id: str | None = None, user: str | None = None, before: float | None = None
) -> RevocationList:
    """Add one entry and write the file atomically. Returns the new list."""
    current = load_revocations(path)
    tokens = set(current.tokens)
    users = dict(current.users)
    if token_id is not None:
        tokens.add(token_id)
    if user is not None:
        if before is None:
            raise ValueError("revoking a user needs a time")
        users[user] = max(before, users.get(user, before))
    document = {"tokens": sorted(tokens), "users": dict(sorted(users.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(document, out, indent=2)
        out.write("\n")
    Path(temporary).replace(path)
    return RevocationList(frozenset(tokens), users)
