"""``pymesh token create``: a workload token for the embedded CA.

Prints a JWT (ES256, Kubernetes service-account claims) signed by the CA's token key in
``--ca-dir`` (the CA state is created there if missing). A workload sends it as
``authorization: Bearer <token>`` to ``CreateCertificate`` and gets certificates for
``spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`` only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pymesh.errors import PymeshError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "token",
        help="workload tokens for the embedded CA",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="token_command", metavar="COMMAND")
    create = sub.add_parser("create", help="print a token for NAMESPACE/SERVICE_ACCOUNT")
    create.add_argument("--namespace", "-n", required=True)
    create.add_argument("--service-account", "-s", required=True)
    create.add_argument(
        "--ttl", type=float, default=86400.0, help="token lifetime in seconds (default 86400)"
    )
    create.add_argument(
        "--ca-dir",
        default=None,
        help="the CA state directory (default $PYMESH_CA_DIR or ~/.local/state/pymesh/ca)",
    )
    create.add_argument(
        "--trust-domain", default="cluster.local", help="trust domain (default cluster.local)"
    )
    create.set_defaults(func=run_create)
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def run_create(args: argparse.Namespace) -> int:
    from pymesh.controlplane.ca import CertificateAuthority, default_ca_dir

    if args.ttl <= 0:
        print("pymesh token create: --ttl must be positive", file=sys.stderr)
        return 2
    ca_dir = Path(args.ca_dir) if args.ca_dir else default_ca_dir()
    try:
        ca = CertificateAuthority(ca_dir, trust_domain=args.trust_domain)
        token = ca.create_token(args.namespace, args.service_account, ttl=args.ttl)
    except PymeshError as exc:
        print(f"pymesh token create: {exc}", file=sys.stderr)
        return 1
    print(token)
    return 0
