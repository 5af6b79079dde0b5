"""``pymesh proxy-status``: which config each connected client has, like ``istioctl``'s.

Reads the control plane's ``/debug/syncz`` (admin port 15014). Per type the status is
``SYNCED`` (the last response sent was ACKed), ``STALE`` (sent, not ACKed yet), ``NACKED``
(the client rejected the last response; see the error with ``pymesh proxy-status PROXY``)
or ``NOT SENT``. ``-o json|yaml`` prints, per connection, every type's status with the
versions sent, ACKed and NACKed (and the NACK message), and the workload's admin endpoint
when it reported one (``pymesh proxy-config`` finds it there by the workload's name).

Exit codes: 0 ok, 1 error (control plane unreachable, no proxy matches), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pymesh.cli._output import (
    EXIT_ERROR,
    EXIT_OK,
    add_output_arguments,
    colour_enabled,
    dump,
    fetch_json,
)
from pymesh.cli._output import render_table as _table
from pymesh.errors import PymeshError

__all__ = ["register", "render_table", "summarize", "type_status"]

_TYPES = ("CDS", "LDS", "EDS", "RDS")
_HEADER = ("NAME", *_TYPES, "TYPE", "VERSION")


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
    add_output_arguments(parser)
    parser.set_defaults(func=run)


def type_status(entry: dict[str, Any] | None) -> str:
    """SYNCED, STALE, NACKED or NOT SENT for one type of one stream."""
    if not entry or not entry.get("nonce"):
        return "NOT SENT"
    nack = entry.get("last_nack")
    if nack and nack.get("nonce") == entry.get("nonce"):
        return "NACKED"
    return "SYNCED" if entry.get("acked") else "STALE"


def _kind(stream: dict[str, Any]) -> str:
    return ("delta" if stream.get("delta") else "sotw") + (
        "/grpc" if stream.get("generator") == "grpc" else ""
    )


def _rows(streams: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for s in streams:
        types = s.get("types", {})
        versions = {t.get("sent_version", "") for t in types.values() if t.get("sent_version")}
        rows.append(
            (
                str(s.get("proxy", "")),
                *(type_status(types.get(t)) for t in _TYPES),
                _kind(s),
                ",".join(sorted(versions)) or "-",
            )
        )
    return rows


def render_table(streams: list[dict[str, Any]], *, colour: bool = False) -> str:
    """The ``istioctl proxy-status``-style table of ``/debug/syncz`` streams."""
    return _table(_HEADER, _rows(streams), colour=colour)


def summarize(streams: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per connection: each type's status and the versions sent, ACKed and NACKed."""
    out = []
    for s in streams:
        types: dict[str, Any] = {}
        for abbrev, entry in sorted(s.get("types", {}).items()):
            nack = entry.get("last_nack") or {}
            types[abbrev] = {
                "status": type_status(entry),
                "sent_version": entry.get("sent_version") or None,
                "acked_version": entry.get("acked_version") or None,
                "nacked_version": nack.get("version"),
                "nack_message": nack.get("message"),
                "resources": entry.get("sent_resources", 0),
            }
        out.append(
            {
                "proxy": s.get("proxy"),
                "connection": s.get("connection"),
                "peer": s.get("peer"),
                "admin": s.get("admin"),
                "type": _kind(s),
                "types": types,
            }
        )
    return out


def _fetch(url: str) -> list[dict[str, Any]]:
    data = fetch_json(url, "/debug/syncz", what="the control plane")
    if not isinstance(data, list):
        raise PymeshError(f"{url}/debug/syncz: unexpected answer (not a list)")
    return data


def run(args: argparse.Namespace) -> int:
    streams = _fetch(args.control_plane)
    if args.proxy:
        chosen = [s for s in streams if s.get("proxy") == args.proxy] or [
            s for s in streams if args.proxy in str(s.get("proxy", ""))
        ]
        if not chosen:
            print(
                f"pymesh proxy-status: no connected proxy matches {args.proxy!r}", file=sys.stderr
            )
            return EXIT_ERROR
        print(dump(chosen, "yaml" if args.output == "yaml" else "json"))
        return EXIT_OK
    if args.output != "table":
        print(dump(summarize(streams), args.output))
        return EXIT_OK
    print(render_table(streams, colour=colour_enabled(sys.stdout, args.no_color)))
    return EXIT_OK
