"""``pymesh proxy-config clusters|endpoints|routes|listeners|secrets WORKLOAD``: one
workload's own view of its config, like ``istioctl proxy-config``.

WORKLOAD is the ``HOST:PORT`` (or URL) of the workload's admin endpoint (``pymesh.admin``,
15000 by convention), or the workload's name (its node id, or a unique part of it such as
the pod name): its admin address is then looked up in the control plane's
``/debug/syncz``, where each workload reports it (``--control-plane``). Tables by default
(coloured on a terminal, ``--no-color`` to turn off), ``-o json|yaml`` for the full data: the
Envoy JSON of each resource (clusters, routes, listeners), the runtime view of every
endpoint (endpoints) or the certificates (secrets).

Exit codes: 0 ok, 1 error (workload or control plane unreachable, bad answer, no such
workload or no admin address reported), 2 usage (a name matching several workloads).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from pymesh.cli._output import (
    EXIT_OK,
    EXIT_USAGE,
    add_output_arguments,
    colour_enabled,
    dump,
    fetch_json,
    render_table,
)
from pymesh.errors import PymeshError

__all__ = [
    "HEADERS",
    "admin_address",
    "cluster_rows",
    "endpoint_rows",
    "listener_rows",
    "register",
    "route_rows",
    "secret_rows",
]

HEADERS: dict[str, tuple[str, ...]] = {
    "clusters": ("SERVICE FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE", "DESTINATION RULE"),
    "endpoints": ("ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER"),
    "routes": ("NAME", "VHOST NAME", "DOMAINS", "MATCH", "VIRTUAL SERVICE"),
    "listeners": ("ADDRESS/NAME", "PORT", "TYPE", "DESTINATION"),
    "secrets": (
        "RESOURCE NAME",
        "TYPE",
        "STATUS",
        "VALID CERT",
        "SERIAL NUMBER",
        "NOT AFTER",
        "NOT BEFORE",
    ),
}
_XDS_TYPE = {"clusters": "CDS", "routes": "RDS", "listeners": "LDS"}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "proxy-config",
        help="show one workload's clusters, endpoints, routes, listeners or secrets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=sorted(HEADERS), help="what to show")
    parser.add_argument(
        "workload",
        metavar="WORKLOAD",
        help="the workload's admin endpoint (HOST:PORT or a URL), or its name / node id",
    )
    parser.add_argument(
        "--control-plane",
        default="http://127.0.0.1:15014",
        help="where to look a WORKLOAD name up (the control plane's admin URL, "
        "default http://127.0.0.1:15014)",
    )
    parser.add_argument(
        "--fqdn", default=None, help="clusters/endpoints/routes: only those naming this host"
    )
    add_output_arguments(parser)
    parser.set_defaults(func=run)


# -- istio names -------------------------------------------------------------------------


def _istio_config(resource: dict[str, Any]) -> str:
    """``NAME.NAMESPACE`` from Istio's ``istio.config`` metadata (``/apis/.../namespaces/NS/
    KIND/NAME``), as istioctl shows it; ``-`` when absent."""
    meta = resource.get("metadata", {}).get("filter_metadata", {}).get("istio", {})
    path = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(path, str):
        return "-"
    parts = path.strip("/").split("/")
    if len(parts) >= 4 and parts[-4] == "namespaces":
        return f"{parts[-1]}.{parts[-3]}"
    return path


def split_cluster_name(name: str) -> tuple[str, str, str, str]:
    """(FQDN, PORT, SUBSET, DIRECTION) of ``DIRECTION|PORT|SUBSET|FQDN``, else (name, -, -, -)."""
    parts = name.split("|")
    if len(parts) == 4 and parts[0] in ("outbound", "inbound"):
        return parts[3] or "-", parts[1] or "-", parts[2] or "-", parts[0]
    return name, "-", "-", "-"


def _cluster_type(config: dict[str, Any]) -> str:
    if "cluster_type" in config:
        name = str(config["cluster_type"].get("name", ""))
        return "AGGREGATE" if "aggregate" in name else name or "-"
    return str(config.get("type", "EDS" if "eds_cluster_config" in config else "STATIC"))


# -- rows ----------------------------------------------------------------------------------


def _configs(dump_: dict[str, Any], abbrev: str) -> list[dict[str, Any]]:
    return [
        r["config"]
        for r in dump_.get("resources", [])
        if r.get("type") == abbrev and isinstance(r.get("config"), dict)
    ]


def cluster_rows(dump_: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for c in _configs(dump_, "CDS"):
        fqdn, port, subset, direction = split_cluster_name(str(c.get("name", "")))
        rows.append((fqdn, port, subset, direction, _cluster_type(c), _istio_config(c)))
    return sorted(rows)


def endpoint_rows(clusters: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for c in clusters:
        for h in c.get("hosts", []):
            health = str(h.get("health", "UNKNOWN"))
            # Envoy counts an EDS health of UNKNOWN as healthy, and reports it so.
            status = "HEALTHY" if health == "UNKNOWN" else health
            ejected = bool(h.get("outlier", {}).get("ejected"))
            rows.append(
                (str(h.get("address")), status, "FAILED" if ejected else "OK", str(c["name"]))
            )
    return sorted(rows, key=lambda r: (r[3], r[0]))


def _domains(domains: list[str]) -> str:
    names = sorted({d.split(":")[0] if not d.startswith("[") else d for d in domains}, key=len)
    if not names:
        return "-"
    if len(names) <= 2:
        return ", ".join(names)
    return f"{names[0]}, {names[1]} + {len(names) - 2} more..."


def _match(match: dict[str, Any]) -> str:
    if "prefix" in match:
        return "/*" if match["prefix"] in ("", "/") else f"{match['prefix']}*"
    if "path" in match:
        return str(match["path"])
    if "path_separated_prefix" in match:
        return f"{match['path_separated_prefix']}/*"
    if "safe_regex" in match:
        return f"regex:{match['safe_regex'].get('regex', '')}"
    return "/*"


def route_rows(dump_: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for rc in _configs(dump_, "RDS"):
        for vh in rc.get("virtual_hosts", []):
            for route in vh.get("routes", []) or [{}]:
                rows.append(
                    (
                        str(rc.get("name", "")),
                        str(vh.get("name", "")),
                        _domains(list(vh.get("domains", []))),
                        _match(route.get("match", {})),
                        _istio_config(route),
                    )
                )
    return rows


def _hcm_destination(hcm: dict[str, Any]) -> str:
    if "rds" in hcm:
        return f"Route: {hcm['rds'].get('route_config_name', '')}"
    if "route_config" in hcm:
        return f"Inline Route: {hcm['route_config'].get('name', '')}"
    return "-"


def listener_rows(dump_: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for lis in _configs(dump_, "LDS"):
        name = str(lis.get("name", ""))
        sock = lis.get("address", {}).get("socket_address", {})
        api = lis.get("api_listener", {}).get("api_listener")
        if isinstance(api, dict):  # a client-side (proxyless) listener: HOST:PORT
            host, _, port = name.rpartition(":")
            rows.append((host or name, port or "-", "HTTP", _hcm_destination(api)))
            continue
        address = str(sock.get("address", name))
        port = str(sock.get("port_value", "-"))
        chains = list(lis.get("filter_chains", []))
        if "default_filter_chain" in lis:
            chains.append(lis["default_filter_chain"])
        for chain in chains or [{}]:
            hcm = next(
                (
                    f.get("typed_config", {})
                    for f in chain.get("filters", [])
                    if "http_connection_manager" in str(f.get("name", ""))
                    or "HttpConnectionManager" in str(f.get("typed_config", {}).get("@type", ""))
                ),
                None,
            )
            chain_name = str(chain.get("name", "") or "")
            if hcm is not None:
                dest = _hcm_destination(hcm)
                rows.append(
                    (address, port, "HTTP", f"{dest} [{chain_name}]" if chain_name else dest)
                )
            else:
                rows.append((address, port, "TCP", chain_name or "-"))
    return rows


def secret_rows(certs: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for p in certs:
        name = str(p.get("name"))
        if not p.get("ready"):
            rows.append((name, "Cert Chain", "WARMING", "false", "-", "-", "-"))
            continue
        chain = p.get("cert_chain", [])
        if chain:
            leaf = chain[0]
            valid = bool(p.get("valid"))
            rows.append(
                (
                    name,
                    "Cert Chain",
                    "ACTIVE" if valid else "EXPIRED",
                    "true" if valid else "false",
                    str(leaf.get("serial_number")),
                    str(leaf.get("not_after")),
                    str(leaf.get("not_before")),
                )
            )
        root_name = "ROOTCA" if name == "default" else f"{name}/ROOTCA"
        for root in p.get("trust_bundle", []):
            rows.append(
                (
                    root_name,
                    "CA",
                    "ACTIVE",
                    "true",
                    str(root.get("serial_number")),
                    str(root.get("not_after")),
                    str(root.get("not_before")),
                )
            )
    return rows


# -- command -------------------------------------------------------------------------------


def _read(kind: str, workload: str) -> Any:
    what = f"the workload admin endpoint ({kind})"
    if kind == "endpoints":
        data = fetch_json(workload, "/clusters", what=what)
        ok = isinstance(data, list)
    elif kind == "secrets":
        data = fetch_json(workload, "/certs", what=what)
        ok = isinstance(data, list)
    else:
        data = fetch_json(workload, "/config_dump", what=what)
        ok = isinstance(data, dict)
    if not ok:
        raise PymeshError(f"{what} at {workload}: unexpected answer")
    return data


_ROWS: dict[str, Callable[[Any], list[tuple[str, ...]]]] = {
    "clusters": cluster_rows,
    "endpoints": endpoint_rows,
    "routes": route_rows,
    "listeners": listener_rows,
    "secrets": secret_rows,
}


def _filter(kind: str, data: Any, fqdn: str | None) -> Any:
    if not fqdn:
        return data
    if kind == "endpoints":
        return [c for c in data if fqdn in str(c.get("name", ""))]
    if kind in ("clusters", "routes"):
        abbrev = _XDS_TYPE[kind]
        return {
            **data,
            "resources": [
                r
                for r in data.get("resources", [])
                if r.get("type") != abbrev
                or fqdn in str(r.get("name", ""))
                or (kind == "routes" and fqdn in str(r.get("config", "")))
            ],
        }
    return data


def _has_port(workload: str) -> bool:
    from urllib.parse import urlsplit

    url = workload if "://" in workload else f"http://{workload}"
    try:
        return urlsplit(url).port is not None
    except ValueError:
        return False


class _Ambiguous(PymeshError):
    pass


def admin_address(streams: list[dict[str, Any]], name: str) -> str:
    """The admin address a workload reported, found by node id, else by a unique part of
    it. Raises :class:`PymeshError` (none, or none reported) / ``_Ambiguous``."""
    matches = [s for s in streams if s.get("proxy") == name]
    if not matches:
        matches = [s for s in streams if name in str(s.get("proxy", ""))]
    proxies = sorted({str(s.get("proxy")) for s in matches})
    if not proxies:
        raise PymeshError(f"no workload connected to the control plane matches {name!r}")
    if len(proxies) > 1:
        raise _Ambiguous(f"{name!r} matches several workloads: {', '.join(proxies)}")
    for s in matches:
        if s.get("admin"):
            return str(s["admin"])
    raise PymeshError(
        f"{proxies[0]} reported no admin endpoint (PYMESH_ADMIN_PORT=off, or an explicit "
        "xDS client without pymesh.admin): give its HOST:PORT"
    )


def _resolve(workload: str, control_plane: str) -> str:
    if _has_port(workload):
        return workload
    streams = fetch_json(control_plane, "/debug/syncz", what="the control plane")
    if not isinstance(streams, list):
        raise PymeshError(f"{control_plane}/debug/syncz: unexpected answer (not a list)")
    return admin_address(streams, workload)


def run(args: argparse.Namespace) -> int:
    kind: str = args.kind
    try:
        workload = _resolve(args.workload, args.control_plane)
    except _Ambiguous as exc:
        print(f"pymesh proxy-config: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    data = _filter(kind, _read(kind, workload), args.fqdn)
    if args.output != "table":
        if kind in _XDS_TYPE:
            abbrev = _XDS_TYPE[kind]
            data = [r for r in data.get("resources", []) if r.get("type") == abbrev]
        print(dump(data, args.output))
        return EXIT_OK
    rows = _ROWS[kind](data)
    print(render_table(HEADERS[kind], rows, colour=colour_enabled(sys.stdout, args.no_color)))
    return EXIT_OK
