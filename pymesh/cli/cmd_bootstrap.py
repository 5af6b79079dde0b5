"""``pymesh bootstrap``: write a gRPC xDS bootstrap for a workload.

The file is what Istio's agent writes for proxyless gRPC (node id, ``GENERATOR: grpc``
metadata, certificate provider, inbound listener template), so a user never hand-writes one.
Point ``GRPC_XDS_BOOTSTRAP`` at it; pymesh and grpcio's own xDS client both read it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from pymesh.bootstrap import (
    DEFAULT_XDS_ADDRESS,
    ENV_BOOTSTRAP,
    WorkloadPort,
    generate_bootstrap,
    load_bootstrap,
    parse_bootstrap,
)
from pymesh.errors import BootstrapError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``bootstrap`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bootstrap",
        help="write a gRPC xDS bootstrap file for a workload",
        description=(
            "Write the gRPC xDS bootstrap JSON for a workload (the file Istio's agent writes "
            "for proxyless gRPC). Use it with GRPC_XDS_BOOTSTRAP=FILE."
        ),
    )
    add = parser.add_argument
    add(
        "--xds-address",
        action="append",
        metavar="TARGET",
        help=f"xDS server as HOST:PORT or unix:PATH (default {DEFAULT_XDS_ADDRESS}); "
        "repeat for fallback servers, in order",
    )
    add("-n", "--namespace", default="default", help="workload namespace (default: default)")
    add("--service-account", default="default", help="service account (default: default)")
    add("--workload", help="workload name (default: the app[-version] label, else the SA)")
    add(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a workload label (repeatable)",
    )
    add("--ip", default="127.0.0.1", help="instance IP (default 127.0.0.1)")
    add(
        "--port",
        action="append",
        default=[],
        metavar="[NAME:]PORT",
        help="a port the workload serves on (repeatable; node metadata POD_PORTS)",
    )
    add(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra node metadata (repeatable; a VALUE starting with { or [ is JSON)",
    )
    add("--group", help="WorkloadGroup to auto-register in (AUTO_REGISTER_GROUP)")
    add("--network", help="the workload's network (NETWORK)")
    add("--cluster-id", default="Kubernetes", help="Istio cluster id (default Kubernetes)")
    add("--trust-domain", default="cluster.local", help="SPIFFE trust domain")
    add("--mesh-id", help="mesh id (default: the trust domain)")
    add("--locality", metavar="REGION/ZONE/SUBZONE", help="node locality")
    add(
        "--cert-dir",
        metavar="DIR",
        help="add the 'default' file_watcher certificate provider reading DIR/cert-chain.pem, "
        "DIR/key.pem and DIR/root-cert.pem (Istio's agent names)",
    )
    add("--tls-ca", metavar="FILE", help="use tls channel creds to the xDS server, CA file")
    add("--tls-cert", metavar="FILE", help="client certificate for tls channel creds")
    add("--tls-key", metavar="FILE", help="client key for tls channel creds")
    add("--delta", action="store_true", help="ask pymesh to use Delta xDS (pymesh.delta)")
    add(
        "--ignore-resource-deletion",
        action="store_true",
        help="add the ignore_resource_deletion server feature (gRFC A53)",
    )
    add("-o", "--output", metavar="FILE", help="write to FILE (atomically) instead of stdout")
    add(
        "--check",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="do not write: load FILE (default: what GRPC_XDS_BOOTSTRAP / "
        "GRPC_XDS_BOOTSTRAP_CONFIG name) and print a summary",
    )
    parser.set_defaults(func=run)


def _labels(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BootstrapError(f"--label {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _meta(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BootstrapError(f"--meta {item!r}: expected KEY=VALUE")
        if value.startswith(("{", "[")):
            try:
                out[key] = json.loads(value)
            except ValueError:
                raise BootstrapError(f"--meta {item!r}: VALUE is not valid JSON") from None
        else:
            out[key] = value
    return out


def _ports(items: list[str]) -> list[WorkloadPort]:
    out: list[WorkloadPort] = []
    for item in items:
        name, _, number = item.rpartition(":")
        if not number.isdigit() or not 0 < int(number) < 65536:
            raise BootstrapError(f"--port {item!r}: expected [NAME:]PORT with PORT in 1..65535")
        out.append(WorkloadPort(port=int(number), name=name))
    return out


def _abs(path: str | None) -> str | None:
    # The bootstrap is read by processes started elsewhere: relative paths would move.
    return os.path.abspath(path) if path else path


def run(args: argparse.Namespace) -> int:
    """Write (or with ``--check``, load and summarise) a bootstrap; returns the exit code."""
    if args.check is not None:
        return _check(args.check)
    data = generate_bootstrap(
        xds_address=args.xds_address or DEFAULT_XDS_ADDRESS,
        namespace=args.namespace,
        service_account=args.service_account,
        workload=args.workload,
        labels=_labels(args.label),
        ip=args.ip,
        ports=_ports(args.port),
        cluster_id=args.cluster_id,
        trust_domain=args.trust_domain,
        mesh_id=args.mesh_id,
        locality=args.locality,
        cert_dir=_abs(args.cert_dir),
        tls_ca=_abs(args.tls_ca),
        tls_cert=_abs(args.tls_cert),
        tls_key=_abs(args.tls_key),
        delta=args.delta,
        ignore_resource_deletion=args.ignore_resource_deletion,
        group=args.group,
        network=args.network,
        extra_metadata=_meta(args.meta),
    )
    text = json.dumps(data, indent=2) + "\n"
    # Never hand out a file we would not load ourselves.
    parse_bootstrap(text, source=args.output or "<generated>")
    if args.output is None or args.output == "-":
        sys.stdout.write(text)
    else:
        _atomic_write(args.output, text)
    return 0


def _atomic_write(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bootstrap-", dir=directory)
    except OSError as exc:
        raise BootstrapError(f"cannot write: {exc.strerror or exc}", source=path) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        raise BootstrapError(f"cannot write: {exc.strerror or exc}", source=path) from None


def _check(path: str) -> int:
    bootstrap = load_bootstrap({ENV_BOOTSTRAP: path} if path else None)
    node = bootstrap.node
    print(f"source:     {bootstrap.source}")
    for i, server in enumerate(bootstrap.xds_servers):
        features = ",".join(sorted(server.server_features)) or "-"
        print(
            f"xds_server[{i}]: {server.uri} creds={server.channel_credentials.type} "
            f"features={features}"
        )
    print(f"node id:    {node.id or '-'}")
    print(f"namespace:  {node.namespace or '-'}")
    print(f"identity:   {node.spiffe_id or '-'}")
    print(f"locality:   {str(node.locality) or '-'}")
    for name, provider in sorted(bootstrap.certificate_providers.items()):
        state = "" if provider.supported else " (unsupported by pymesh)"
        print(f"cert provider {name}: {provider.plugin_name}{state}")
    if bootstrap.server_listener_resource_name_template:
        print(f"server listener template: {bootstrap.server_listener_resource_name_template}")
    for name in sorted(bootstrap.authorities):
        print(f"authority:  {name}")
    return 0
