"""``pymesh control-plane``: run the embedded control plane until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "control-plane",
        help="serve xDS from Istio config files (embedded istiod)",
        description=(
            "Serve xDS (ADS, SotW and Delta) from a directory of Istio YAML "
            "(ServiceEntry, WorkloadEntry, WorkloadGroup, VirtualService, DestinationRule, "
            "PeerAuthentication, AuthorizationPolicy). Files are watched and hot-reloaded; "
            "a bad change is reported and the last good config keeps serving."
        ),
    )
    parser.add_argument(
        "--config",
        "-c",
        action="append",
        required=True,
        metavar="PATH",
        help="config directory or file (repeatable)",
    )
    parser.add_argument(
        "--xds-address",
        default="127.0.0.1:15010",
        help="HOST:PORT or unix:PATH to serve ADS on (default 127.0.0.1:15010)",
    )
    parser.add_argument(
        "--admin-port",
        type=int,
        default=15014,
        help="admin HTTP port: /ready, /metrics, /debug/syncz, /debug/configz (default 15014; "
        "-1 disables)",
    )
    parser.add_argument("--admin-host", default="127.0.0.1", help="admin HTTP bind address")
    parser.add_argument(
        "--debounce", type=float, default=0.1, help="push debounce quiet time, seconds (0.1)"
    )
    parser.add_argument(
        "--registration-grace",
        type=float,
        default=10.0,
        help="seconds an auto-registered workload stays after its stream ends (10)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument(
        "--ca-dir",
        default=None,
        help="CA state directory (default $PYMESH_CA_DIR or ~/.local/state/pymesh/ca; "
        "Istio's cacerts files there plug in your own intermediate)",
    )
    parser.add_argument(
        "--no-ca", action="store_true", help="do not serve the CA (IstioCertificateService)"
    )
    parser.add_argument(
        "--ca-insecure-skip-token",
        action="store_true",
        help="DEV ONLY: sign certificates without checking workload tokens",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pymesh.controlplane import ControlPlane

    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        logging.getLogger("pymesh.controlplane").info("signal %d: stopping", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    plane = ControlPlane(
        [Path(p) for p in args.config],
        xds_address=args.xds_address,
        admin_port=None if args.admin_port < 0 else args.admin_port,
        admin_host=args.admin_host,
        debounce=args.debounce,
        registration_grace=args.registration_grace,
        **_ca_options(args),
    )
    try:
        plane.start()
        admin = f", admin http://{args.admin_host}:{plane.admin_port}" if plane.admin_port else ""
        print(f"pymesh control plane: xDS on {plane.address}{admin}", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        plane.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _ca_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ControlPlane`` CA arguments from the ``--ca-*`` flags."""
    if getattr(args, "no_ca", False):
        return {"ca": False}
    ca_dir = getattr(args, "ca_dir", None)
    if getattr(args, "ca_insecure_skip_token", False):
        from pymesh.controlplane.ca import default_ca_dir, lazy_authority

        logging.getLogger("pymesh.ca").warning(
            "INSECURE: --ca-insecure-skip-token: the CA will sign certificates for any "
            "identity WITHOUT checking workload tokens (development only)"
        )
        return {
            "ca": lazy_authority(
                state_dir=Path(ca_dir) if ca_dir else default_ca_dir(),
                insecure_skip_token=True,
            )
        }
    return {"ca_dir": Path(ca_dir)} if ca_dir else {}
