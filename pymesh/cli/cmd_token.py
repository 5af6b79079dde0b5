"""``pymesh token create``: a workload token for the embedded CA.

Prints a JWT (ES256, Kubernetes service-account claims) signed by the CA's token key in
``--ca-dir`` (the CA state is created there if missing). A workload sends it as
``authorization: Bearer <token>`` to ``CreateCertificate`` and gets certificates for
``spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`` only.

``pymesh token revoke`` adds a token's id (its ``jti``: give the id, or the token with
``--token-file``) to the CA's revocation list; a running CA refuses it from its next request.
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
    revoke = sub.add_parser("revoke", help="refuse a token from now on (by id or token file)")
    revoke.add_argument("token_id", nargs="?", help="the token's id (its jti claim)")
    revoke.add_argument("--token-file", help="a file holding the token to revoke")
    revoke.add_argument(
        "--ca-dir",
        default=None,
        help="the CA state directory (default $PYMESH_CA_DIR or ~/.local/state/pymesh/ca)",
    )
    revoke.set_defaults(func=run_revoke)
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


def run_revoke(args: argparse.Namespace) -> int:
    from pymesh.controlplane.ca import CertificateAuthority, default_ca_dir
    from pymesh.security._token import token_id_of

    if (args.token_id is None) == (args.token_file is None):
        print("pymesh token revoke: give a token id or --token-file", file=sys.stderr)
        return 2
    try:
        token_id = args.token_id
        if args.token_file is not None:
            token_id = token_id_of(Path(args.token_file).read_text())
            if token_id is None:
                print("pymesh token revoke: the token has no id (jti)", file=sys.stderr)
                return 1
        ca_dir = Path(args.ca_dir) if args.ca_dir else default_ca_dir()
        CertificateAuthority(ca_dir).revoke_token(token_id)
    except (PymeshError, OSError) as exc:
        print(f"pymesh token revoke: {exc}", file=sys.stderr)
        return 1
    print(f"revoked {token_id}")
    return 0
