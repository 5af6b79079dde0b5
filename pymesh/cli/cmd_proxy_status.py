"""``pymesh proxy-status``: which config each connected client has, like ``istioctl``'s.

Reads the control plane's ``/debug/syncz`` (admin port 15014). Per type the status is
``SYNCED`` (the last response sent was ACKed), ``STALE`` (sent, not ACKed yet), ``NACKED``
(the client rejected the last response; see the error with ``pymesh proxy-status PROXY``)
or ``NOT SENT``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from pymesh.errors import PymeshError

__all__ = ["register", "render_table", "type_status"]

_TYPES = ("CDS", "LDS", "EDS", "RDS")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "proxy-status",
        help="show each connected xDS client's sync status (from the control plane)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "proxy", nargs="?", help="a node id (or a unique part of it): show its details"
    )
    parser.add_argument(
        "--control-plane",
        default="http://127.0.0.1:15014",
        help="the control plane's admin URL (default http://127.0.0.1:15014)",
    )
    parser.set_defaults(func=run)


def type_status(entry: dict[str, Any] | None) -> str:
    """SYNCED, STALE, NACKED or NOT SENT for one type of one stream."""
    if not entry or not entry.get("nonce"):
        return "NOT SENT"
    nack = entry.get("last_nack")
    if nack and nack.get("nonce") == entry.get("nonce"):
        return "NACKED"
    return "SYNCED" if entry.get("acked") else "STALE"


def render_table(streams: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = [("NAME", *_TYPES, "TYPE", "VERSION")]
    for s in streams:
        types = s.get("types", {})
        versions = {t.get("sent_version", "") for t in types.values() if t.get("sent_version")}
        rows.append(
            (
                str(s.get("proxy", "")),
                *(type_status(types.get(t)) for t in _TYPES),
                ("delta" if s.get("delta") else "sotw")
                + ("/grpc" if s.get("generator") == "grpc" else ""),
                ",".join(sorted(versions)) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _fetch(url: str) -> list[dict[str, Any]]:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/debug/syncz", timeout=10) as resp:
            data = json.loads(resp.read().decode())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PymeshError(f"cannot read {url}/debug/syncz: {exc}") from exc
    if not isinstance(data, list):
        raise PymeshError(f"{url}/debug/syncz: unexpected answer")
    return data


def run(args: argparse.Namespace) -> int:
    streams = _fetch(args.control_plane)
    if args.proxy:
        chosen = [s for s in streams if s.get("proxy") == args.proxy] or [
            s for s in streams if args.proxy in str(s.get("proxy", ""))
        ]
        if not chosen:
            print(f"no connected proxy matches {args.proxy!r}", file=sys.stderr)
            return 1
        print(json.dumps(chosen, indent=2, sort_keys=True))
        return 0
    print(render_table(streams))
    return 0
