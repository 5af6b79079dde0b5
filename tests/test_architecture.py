"""Import rules that keep the layers honest, checked on every file under ``pymesh/``.

import-linter (``nox -s imports``) checks the layer order; this test checks the two fences
exhaustively, so a new module cannot slip past a hand-kept list:

- only the xDS codec imports the protos (the control plane is a server and may too);
- only the xDS transport imports grpcio (plus the control plane, a server, and the grpc adapter).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pymesh"

PROTO_ROOTS = ("envoy", "xds", "udpa", "validate", "google")
PROTO_ALLOWED = ("xds/codec/", "controlplane/", "security/")
GRPC_ALLOWED = ("xds/transport/", "controlplane/", "grpc/", "security/")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_fences(path: Path) -> None:
    rel = path.relative_to(PACKAGE).as_posix()
    roots = {name.split(".")[0] for name in _imports(path)}
    if not rel.startswith(PROTO_ALLOWED):
        assert not roots & set(PROTO_ROOTS), f"{rel} imports protos: only the codec may"
    if not rel.startswith(GRPC_ALLOWED):
        assert "grpc" not in roots, f"{rel} imports grpcio: only the transport may"


def test_model_is_pure() -> None:
    allowed = {"pymesh", "__future__"}
    for path in (PACKAGE / "model").rglob("*.py"):
        for name in _imports(path):
            root = name.split(".")[0]
            if root in allowed:
                assert name.startswith(("pymesh.model", "pymesh.errors", "__future__")), (
                    f"{path}: the model imports {name}"
                )
            else:
                assert root in _STDLIB, f"{path}: the model imports third-party {name}"


_STDLIB = {
    "abc",
    "collections",
    "dataclasses",
    "enum",
    "functools",
    "ipaddress",
    "itertools",
    "math",
    "re",
    "types",
    "typing",
    "warnings",
    "json",
    "bisect",
    "operator",
    "string",
}
