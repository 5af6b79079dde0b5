"""Shared CLI helpers: tables (coloured on a TTY), JSON/YAML output, HTTP reads with clear
errors.

Exit codes every ``pymesh`` command keeps: ``0`` success, ``1`` error (bad config,
unreachable control plane or workload, nothing matched: one line on stderr, no traceback),
``2`` usage error (argparse).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import yaml

from pymesh.errors import PymeshError

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "add_output_arguments",
    "colour_enabled",
    "dump",
    "fetch_json",
    "fetch_text",
    "render_table",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

_RESET = "\x1b[0m"
_BOLD = "\x1b[1m"
_COLOURS = {
    "green": "\x1b[32m",
    "red": "\x1b[31m",
    "yellow": "\x1b[33m",
    "grey": "\x1b[90m",
}
# Cell values that get a colour wherever they appear.
_VALUE_COLOURS = {
    "SYNCED": "green",
    "HEALTHY": "green",
    "OK": "green",
    "ACTIVE": "green",
    "true": "green",
    "STALE": "yellow",
    "NOT SENT": "grey",
    "DEGRADED": "yellow",
    "DRAINING": "yellow",
    "UNKNOWN": "grey",
    "NACKED": "red",
    "UNHEALTHY": "red",
    "FAILED": "red",
    "EXPIRED": "red",
    "false": "red",
    "WARMING": "yellow",
}


def add_output_arguments(parser: Any, *, yaml_ok: bool = True) -> None:
    """``-o/--output table|json|yaml`` and ``--no-color``."""
    choices = ["table", "json", "yaml"] if yaml_ok else ["table", "json"]
    parser.add_argument(
        "-o",
        "--output",
        choices=choices,
        default="table",
        help="output format (default: table)",
    )
    parser.add_argument(
        "--no-color",
        action="store_true",
        help="never colour the table (also: the NO_COLOR environment variable)",
    )


def colour_enabled(stream: TextIO, no_color: bool = False) -> bool:
    """Colour only on a terminal, unless ``--no-color`` or ``NO_COLOR`` is set."""
    if no_color or os.environ.get("NO_COLOR"):
        return False
    isatty: Callable[[], bool] | None = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _paint(text: str, colour: str | None, bold: bool = False) -> str:
    prefix = (_BOLD if bold else "") + (_COLOURS[colour] if colour else "")
    return f"{prefix}{text}{_RESET}" if prefix else text


def render_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], *, colour: bool = False
) -> str:
    """Left-aligned columns two spaces apart (istioctl's layout); a bold header and
    status words coloured when ``colour``."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        parts = []
        for i, (cell, width) in enumerate(zip(row, widths, strict=True)):
            pad = "" if i == len(row) - 1 else " " * (width - len(cell) + 2)
            if colour:
                shown = (
                    _paint(cell, None, bold=True)
                    if n == 0
                    else _paint(cell, _VALUE_COLOURS.get(cell))
                )
            else:
                shown = cell
            parts.append(shown + pad)
        lines.append("".join(parts).rstrip())
    return "\n".join(lines)


def dump(value: object, fmt: str) -> str:
    """``value`` as ``json`` (indented, sorted keys) or ``yaml``."""
    if fmt == "yaml":
        return str(yaml.safe_dump(value, sort_keys=True, default_flow_style=False)).rstrip()
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _base(address: str) -> str:
    address = address.strip()
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def fetch_text(address: str, path: str, *, what: str, timeout: float = 10.0) -> str:
    """GET ``path`` from ``address`` (``HOST:PORT`` or a URL); any failure becomes one
    :class:`PymeshError` line naming ``what`` and the URL."""
    url = _base(address) + path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as exc:
        raise PymeshError(f"{what} at {url} answered HTTP {exc.code}") from exc
    except urllib.error.URLError as exc:
        raise PymeshError(f"cannot reach {what} at {url}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:
        raise PymeshError(f"cannot reach {what} at {url}: {exc}") from exc


def fetch_json(address: str, path: str, *, what: str, timeout: float = 10.0) -> Any:
    """:func:`fetch_text` parsed as JSON (a non-JSON answer is an error too)."""
    text = fetch_text(address, path, what=what, timeout=timeout)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise PymeshError(f"{what} at {_base(address)}{path}: not JSON ({exc})") from exc


def print_out(text: str) -> None:
    """Print to stdout (one place, so tests can capture)."""
    sys.stdout.write(text + ("\n" if text and not text.endswith("\n") else ""))
