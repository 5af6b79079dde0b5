"""Run one Bookinfo service: ``python -m examples.bookinfo.services NAME [options]``.

The launcher starts one such process per workload (``productpage-v1``, ``details-v1``,
``reviews-v1``..``v3``, ``ratings-v1``) with ``GRPC_XDS_BOOTSTRAP`` set. The process gets its
certificate from the control plane's CA (its token file), writes Istio's certificate files,
then serves its app with :class:`pymesh.asgi.MeshServer` (and ratings its gRPC API with
:func:`pymesh.grpc.aio.server`) until SIGTERM/SIGINT or until the launcher is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pymesh.asgi
import pymesh.grpc
import pymesh.grpc.aio
from examples.bookinfo.services import details, productpage, ratings, reviews
from examples.bookinfo.services._common import IdentityAgent, Stats, counted, run_until_signalled
from pymesh.security import SpiffeId

log = logging.getLogger("bookinfo")


class GrpcThread:
    """The ratings gRPC server (asyncio) on its own loop thread."""

    def __init__(self, store: ratings.RatingsStore, port: int, stats: Stats) -> None:
        self.store = store
        self.stats = stats
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.server: Any = None
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="ratings-grpc", daemon=True
        )

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> None:
        self.server = pymesh.grpc.aio.server()
        self.server.add_generic_rpc_handlers((ratings.grpc_handlers(self.store, self.stats),))
        # PERMISSIVE on one port (mTLS and plaintext told apart by the first byte), as the
        # ASGI server does: the listener from PeerAuthentication decides what is admitted
        self.server.add_permissive_port(
            f"127.0.0.1:{self.port}", pymesh.grpc.mesh_server_credentials()
        )
        await self.server.start()

    def stop(self) -> None:
        async def stop() -> None:
            await self.server.stop(2)

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        except Exception:  # stopping anyway
            log.exception("gRPC server stop")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.bookinfo.services")
    parser.add_argument("name", help="workload name, e.g. reviews-v2")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--ca-address", required=True, help="the control plane's CA (xDS port)")
    parser.add_argument("--token", type=Path, required=True)
    parser.add_argument("--cert-dir", type=Path, required=True)
    parser.add_argument("--service-account", required=True)
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--stats", type=Path, default=None)
    parser.add_argument("--cert-ttl", type=float, default=3600.0)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one access line per request is ours
    app_name, _, version = args.name.rpartition("-")
    os.environ.setdefault("HOSTNAME", args.name)

    agent = IdentityAgent(
        args.ca_address,
        SpiffeId("cluster.local", args.namespace, args.service_account),
        args.token,
        args.cert_dir,
        args.cert_ttl,
    )
    agent.start()
    log.info("certificate for %s written to %s", args.service_account, args.cert_dir)

    stats = Stats(args.stats, args.name)
    grpc_server: GrpcThread | None = None
    app: Any
    if app_name == "productpage":
        app = productpage.ProductPage(productpage.session_key_from_env())
    elif app_name == "details":
        app = details.make_app()
    elif app_name == "reviews":
        app = reviews.Reviews(version)
    elif app_name == "ratings":
        store = ratings.RatingsStore()
        app = ratings.make_app(store)
        if args.grpc_port:
            grpc_server = GrpcThread(store, args.grpc_port, stats)
    else:
        parser.error(f"unknown service {args.name!r}")
    server = pymesh.asgi.MeshServer(counted(app, stats), host="127.0.0.1", port=args.port)
    server.start()
    stats.start()
    if grpc_server is not None:
        grpc_server.start()
    if not server.wait_for_serving(30):
        log.warning("inbound listener not received after 30 s (NOT_SERVING)")
    log.info(
        "serving on 127.0.0.1:%d%s", args.port, f", gRPC on {args.grpc_port}" if grpc_server else ""
    )

    def stop() -> None:
        log.info("stopping")
        if grpc_server is not None:
            grpc_server.stop()
        server.stop(5)
        stats.stop()
        agent.close()

    run_until_signalled(stop, args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
