"""docs/cli.md stays the reference of every command, and its sample tables use the real
columns; docs/admin.md lists every admin endpoint."""

from __future__ import annotations

import re
from pathlib import Path

from pymesh.admin import ENDPOINTS
from pymesh.cli.cmd_proxy_config import HEADERS
from pymesh.cli.main import build_parser

DOCS = Path(__file__).resolve().parents[3] / "docs"


def _commands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)  # type: ignore[arg-type]


def test_every_command_documented() -> None:
    text = (DOCS / "cli.md").read_text()
    commands = _commands()
    assert {"proxy-status", "proxy-config", "analyze", "bootstrap", "control-plane"} <= set(
        commands
    )
    for name in commands:
        assert re.search(rf"^## `pymesh {re.escape(name)}", text, re.M), name
    for kind, header in HEADERS.items():
        assert f"### {kind}" in text
        assert re.search(" {2,}".join(map(re.escape, header)), text), kind


def test_every_admin_endpoint_documented() -> None:
    text = (DOCS / "admin.md").read_text()
    for path in ENDPOINTS:
        assert f"| `{path}` |" in text, path
