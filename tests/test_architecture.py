"""The core and the protocol stay pure: no I/O library is imported there."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "callgate"
FORBIDDEN = {
    "trio",
    "trio_websocket",
    "jwt",
    "limits",
    "structlog",
    "socket",
    "asyncio",
    "time",
    "random",
    "secrets",
    "os",
    "datetime",
    "callgate.transport",
    "callgate.auth",
    "callgate.ratelimit",
    "callgate.audit",
    "callgate.config",
    "callgate.log",
    "callgate.cli",
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "path",
    sorted([*(SRC / "core").glob("*.py"), *(SRC / "protocol").glob("*.py")]),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_pure_layers_import_no_io(path: Path) -> None:
    for module in imported_modules(path):
        for banned in FORBIDDEN:
            assert module != banned and not module.startswith(banned + "."), (path, module)
