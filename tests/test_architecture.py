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


# The layers drawn in the README ("How it is built"), innermost first: a module may import its
# own layer and those before it, never one after (imports only for type checking aside).
LAYERS: list[tuple[str, ...]] = [
    ("callgate._accel", "callgate.errors", "callgate.config", "callgate.hmac_sha256"),
    ("callgate.protocol",),
    ("callgate.core",),
    (
        "callgate.auth",
        "callgate.keys",
        "callgate.revocation",
        "callgate.ratelimit",
        "callgate.audit",
        "callgate.trail",
        "callgate.metrics",
        "callgate.webhooks",
        "callgate.ice",
        "callgate.log",
    ),
    ("callgate.transport",),
    ("callgate.cluster",),
    ("callgate.transport.server",),  # the assembly: a server, with or without a cluster
    (
        "callgate.demo",
        "callgate.client",
        "callgate.cli",
        "callgate.workers",
        "callgate.audit_cli",
        "callgate.accelerate",
        "callgate.__main__",
    ),
]


def layer_of(module: str) -> int:
    """The innermost-first index of the most specific layer `module` belongs to."""
    if module == "callgate":
        return 0  # the package itself: its version, and which build runs (_accel)
    best, depth = -1, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > depth:
                best, depth = index, len(name)
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """Imported modules, leaving out those under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {name for name in names if name.startswith("callgate")}


SOURCES = sorted(path for path in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_inward_as_the_readme_draws_them(path: Path) -> None:
    here = layer_of(module_name(path))
    assert here >= 0, f"{module_name(path)} is in no layer: add it to LAYERS and the README"
    for imported in runtime_imports(path):
        assert layer_of(imported) <= here, (module_name(path), imported)


# Private names of other libraries that callgate overrides on purpose, each with the library's
# word that it is a hook (and a seam test that fails if it moves).
OVERRIDDEN_HOOKS = {
    # pyjwt added PyJWT._decode_payload as a hook for custom payload decoding (pyjwt PR #829);
    # tests/test_auth.py holds the seam.
    "_decode_payload",
}


def own_private_names(paths: list[Path] = SOURCES) -> set[str]:
    """Every `_name` these files define: functions, classes, attributes, slots, assignments."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in {"self", "cls"}
            ):
                names.add(node.attr)  # our own objects' attributes, not another library's
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            if (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets)
                and isinstance(node.value, ast.Tuple)
            ):
                names.update(
                    item.value
                    for item in node.value.elts
                    if isinstance(item, ast.Constant) and isinstance(item.value, str)
                )
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def private(name: object) -> bool:
    return isinstance(name, str) and name.startswith("_") and not name.startswith("__")


def foreign_private_uses(path: Path, own: set[str]) -> list[str]:
    """`x._name` and getattr(x, "_name") for a name callgate does not define, and `_name`
    methods on a subclass of another library's class (other than the documented hooks)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        name: object = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "setattr", "hasattr"}
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
        ):
            name = node.args[1].value
        if private(name) and name not in own:
            found.append(f"{path.name}:{getattr(node, 'lineno', 0)} {name}")
        if isinstance(node, ast.ClassDef) and any(
            isinstance(base, ast.Attribute)
            for base in node.bases  # e.g. jwt.PyJWT
        ):
            found.extend(
                f"{path.name}:{item.lineno} def {item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef)
                and private(item.name)
                and item.name not in OVERRIDDEN_HOOKS
            )
    return found


TESTS = sorted(Path(__file__).parent.glob("*.py"))


def test_no_private_attribute_of_another_library_is_touched() -> None:
    """Public APIs only (STYLE 17): an `x._name` in callgate or its tests names something
    callgate or its tests define, and a `_name` method defined on a subclass of another
    library's class is one of the few documented hooks above."""
    own = own_private_names(SOURCES + TESTS)
    foreign = [use for path in SOURCES + TESTS for use in foreign_private_uses(path, own)]
    assert not foreign, foreign


def test_the_private_attribute_check_finds_what_the_sixth_session_used(tmp_path: Path) -> None:
    """The check above, on the private uses this project once had (trio-websocket's reader,
    trio's socket, pyjwt's signing half)."""
    old = tmp_path / "old.py"
    old.write_text(
        "import jwt\n"
        "sock = getattr(stream.socket, '_sock', None)\n"
        "nursery.start_soon(connection._reader_task)\n"
        "decoder._jws = None\n"
        "class S(jwt.PyJWS):\n"
        "    def _decode_base64url_segment(self): ...\n"
    )
    uses = foreign_private_uses(old, own_private_names())
    assert sorted(use.split(" ", 1)[1] for use in uses) == [
        "_jws",
        "_reader_task",
        "_sock",
        "def _decode_base64url_segment",
    ], uses
