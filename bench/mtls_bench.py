"""Benchmark: what mTLS costs the pymesh adapters, side by side with plaintext.

Run: ``PYTHONPATH=. /work/venv/bin/python bench/mtls_bench.py [--rounds 5] [--requests 500]
[--http-only]``

One embedded control plane (with the embedded CA's certificates in ``file_watcher`` files)
configures servers in a subprocess (their CPU is not the client's) and clients here:

- HTTP: ``pymesh.httpx.Client`` -> uvicorn behind ``pymesh.asgi`` (``MeshServer``), one
  service with PeerAuthentication DISABLE + DestinationRule DISABLE (``plain``) and one with
  STRICT + ISTIO_MUTUAL (``mtls``: the client verifies the server's SPIFFE SAN), and the same
  app under plain uvicorn (``uvicorn``: no mesh server, the reference); the steady state also
  gives the server process's CPU per request (``/proc``: all its threads);
- gRPC: ``pymesh.grpc`` channel -> ``pymesh.grpc`` server, DISABLE (``plain``) vs STRICT +
  ISTIO_MUTUAL with ``MeshChannelCredentials``: ``mtls`` (the default, ``native="auto"``:
  the server's certificate is pymesh-issued, so grpcio's own TLS checks the DNS name the CA
  derives from the SPIFFE ID) and ``mtls-tunnel`` (``native="off"``: grpcio -> private
  tunnel -> TLS with the URI SAN check); the server terminates TLS in grpcio; and the
  PERMISSIVE front (``add_permissive_port``): a plaintext client through the front
  (``front-plain``) and an mTLS one (``front-mtls``, native).

Steady state: sequential requests on pooled connections, rounds interleaved (plain, mtls,
..., plain, ...) so machine noise hits every arm alike; per arm the median over rounds of the
per-request latency (wall) and of the client CPU per request (``time.process_time``), and
the ratios to plaintext (target: mTLS within 15%). Handshake: a new connection per request
(HTTP: ``Connection: close``; gRPC: a new grpcio channel per call to the endpoint, or to the
tunnel for mTLS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.httpx_bench import process_cpu  # run with PYTHONPATH=. (the repository root)

SERVERS = textwrap.dedent(
    """
    import json, sys
    from concurrent import futures
    import grpc
    import pymesh.asgi, pymesh.grpc
    from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
    from pymesh.grpc._server import mesh_server_credentials
    from pymesh.xds.client import XdsClient

    xds, certs, dns_certs = sys.argv[1], sys.argv[2], sys.argv[3]
    def client(app):
        data = generate_bootstrap(xds_address=xds, namespace="default", labels={"app": app},
                                  service_account="echo", ip="127.0.0.1", cert_dir=certs)
        return XdsClient(parse_bootstrap(json.dumps(data), source=app))

    async def hello(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def who(request, context):
        return b"ok"
    handlers = [grpc.method_handlers_generic_handler(
        "echo.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)})]
    ports, servers, https = {}, [], []
    # the reference: the same app under plain uvicorn (its default protocol), no mesh
    import socket, threading, time, uvicorn
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        ports["hu"] = probe.getsockname()[1]
    plain_uvicorn = uvicorn.Server(uvicorn.Config(
        hello, host="127.0.0.1", port=ports["hu"], log_level="error", access_log=False,
        lifespan="off"))
    threading.Thread(target=plain_uvicorn.run, daemon=True).start()
    while not plain_uvicorn.started:
        time.sleep(0.02)
    for app in ("hp", "hm"):
        s = pymesh.asgi.MeshServer(hello, host="127.0.0.1", port=0, xds_client=client(app))
        https.append(s.start())
        ports[app] = s.port
    for app in ("gp", "gm", "gx"):
        xc = client(app)
        s = pymesh.grpc.server(futures.ThreadPoolExecutor(8), handlers=handlers, xds_client=xc)
        if app == "gp":
            ports[app] = s.add_insecure_port("127.0.0.1:0")
        elif app == "gm":
            ports[app] = s.add_secure_port("127.0.0.1:0", mesh_server_credentials(xds_client=xc))
        else:
            ports[app] = s.add_permissive_port(
                "127.0.0.1:0", mesh_server_credentials(xds_client=xc))
        s.start()
        servers.append(s)
    # plain grpcio servers (no mesh): plaintext, and TLS with a DNS-named certificate that
    # grpcio's own client can verify (the native-TLS reference for the tunnel)
    def read(name):
        return open(f"{dns_certs}/{name}", "rb").read()
    for app in ("np", "nt"):
        s = grpc.server(futures.ThreadPoolExecutor(8), handlers=handlers)
        if app == "np":
            ports[app] = s.add_insecure_port("127.0.0.1:0")
        else:
            creds = grpc.ssl_server_credentials(
                [(read("key.pem"), read("cert-chain.pem"))], read("root-cert.pem"), True)
            ports[app] = s.add_secure_port("127.0.0.1:0", creds)
        s.start()
        servers.append(s)
    print(json.dumps(ports), flush=True)
    for s in https:
        s.wait_for_serving(30)
    for s in servers:
        if hasattr(s, "wait_for_serving"):
            s.wait_for_serving(30)
    print("serving", flush=True)
    sys.stdin.read()
    for s in servers:
        s.stop(None)
    for s in https:
        s.stop()
    plain_uvicorn.should_exit = True
    """
)

# app label -> (service host, port name/protocol, PeerAuthentication, DestinationRule tls)
SERVICES = {
    "hu": ("hu", "http", "HTTP", "DISABLE", "DISABLE"),  # plain uvicorn: no mesh server
    "hp": ("hp", "http", "HTTP", "DISABLE", "DISABLE"),
    "hm": ("hm", "http", "HTTP", "STRICT", "ISTIO_MUTUAL"),
    "gp": ("gp", "grpc", "GRPC", "DISABLE", "DISABLE"),
    "gm": ("gm", "grpc", "GRPC", "STRICT", "ISTIO_MUTUAL"),
    "gx": ("gx", "grpc", "GRPC", "PERMISSIVE", "DISABLE"),
    "gy": ("gx", "grpc", "GRPC", "PERMISSIVE", "ISTIO_MUTUAL"),  # the same server, via mTLS
}
SVC_PORT = 7070


def mesh_yaml(ports: dict[str, int]) -> str:
    docs = []
    for app, (server_app, pname, proto, mode, dr) in SERVICES.items():
        host = f"{app}.default.svc.cluster.local"
        docs.append(
            f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {app}, namespace: default}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {SVC_PORT}, name: {pname}, protocol: {proto}}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{{pname}: {ports[server_app]}}}, serviceAccount: echo}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {app}, namespace: default}}
spec:
  host: {host}
  trafficPolicy: {{tls: {{mode: {dr}}}}}
"""
        )
        if app == server_app:
            docs.append(
                f"""apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: {app}, namespace: default}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  mtls: {{mode: {mode}}}
"""
            )
    return "---\n".join(docs)


DNS_NAME = "echo.bench.test"


def dns_named_certs(tmp: Path, ca: Any) -> str:
    """A server certificate with a DNS SAN (and the SPIFFE URI SAN) signed by the CA's root,
    for grpcio's own TLS client (which checks DNS names only)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from pymesh.security._pki import cert_pem, generate_key, key_from_pem, key_pem

    root_key = key_from_pem((tmp / "ca" / "root-key.pem").read_bytes())
    root = ca.roots[0]
    key = generate_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(DNS_NAME),
                    x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/echo"),
                ]
            ),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    d = tmp / "dns"
    d.mkdir()
    (d / "cert-chain.pem").write_bytes(cert_pem(cert))
    (d / "key.pem").write_bytes(key_pem(key))
    (d / "root-cert.pem").write_bytes(cert_pem(root))
    return str(d)


def _round(call: Callable[[], Any], n: int, server_pid: int | None) -> tuple[float, ...]:
    """(median wall seconds per request, client CPU seconds per request[, server CPU s/req])."""
    lats = []
    srv0 = process_cpu(server_pid) if server_pid else 0.0
    cpu0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        lats.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / n
    if not server_pid:
        return statistics.median(lats), cpu
    return statistics.median(lats), cpu, (process_cpu(server_pid) - srv0) / n


def run_rounds(
    arms: dict[str, Callable[[], Any]], rounds: int, n: int, server_pid: int | None = None
) -> dict[str, tuple[float, ...]]:
    """Per arm the medians over interleaved rounds of ``_round``'s figures; with
    ``server_pid``, also the server process's CPU per request (the arms' servers share that
    process, and only one arm runs at a time)."""
    for call in arms.values():  # warm up: config, connections, caches
        for _ in range(min(50, n)):
            call()
    figures: dict[str, list[tuple[float, ...]]] = {a: [] for a in arms}
    for _ in range(rounds):
        for arm, call in arms.items():
            figures[arm].append(_round(call, n, server_pid))
    return {
        a: tuple(statistics.median(col) for col in zip(*f, strict=True)) for a, f in figures.items()
    }


async def aio_rounds(
    target: str, creds: Any, native_creds: Any, xds: Any, args: Any
) -> dict[str, tuple[float, float]]:
    """grpc.aio mesh channels, ``args.concurrency`` calls in flight: (p50 latency, wall per
    call = 1 / throughput) per arm, medians over interleaved rounds."""
    import pymesh.grpc.aio

    channels = {
        "plain": pymesh.grpc.aio.insecure_channel(target.format("gp"), xds_client=xds),
        # native="auto" keeps the tunnel on grpc.aio (it measured faster there)
        "mtls": pymesh.grpc.aio.secure_channel(target.format("gm"), creds, xds_client=xds),
        "mtls-native": pymesh.grpc.aio.secure_channel(
            target.format("gm"), native_creds, xds_client=xds
        ),
    }
    calls = {a: ch.unary_unary("/echo.Echo/Who") for a, ch in channels.items()}

    async def one_round(call: Any, n: int) -> tuple[float, float]:
        lats: list[float] = []
        per_worker = n // args.concurrency

        async def worker() -> None:
            for _ in range(per_worker):
                t0 = time.perf_counter()
                await call(b"x", timeout=10)
                lats.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return statistics.median(lats), (time.perf_counter() - t0) / len(lats)

    try:
        for call in calls.values():
            for _ in range(50):
                await call(b"x", timeout=20)
        lat: dict[str, list[float]] = {a: [] for a in calls}
        per: dict[str, list[float]] = {a: [] for a in calls}
        for _ in range(args.rounds):
            for arm, call in calls.items():
                p50, wall = await one_round(call, args.requests * 2)
                lat[arm].append(p50)
                per[arm].append(wall)
        return {a: (statistics.median(lat[a]), statistics.median(per[a])) for a in calls}
    finally:
        for ch in channels.values():
            await ch.close(None)


def report(title: str, results: dict[str, tuple[float, ...]], base: str) -> None:
    print(f"\n{title}")
    server = all(len(r) > 2 for r in results.values())
    head = f"  {'arm':<14}{'latency p50':>14}{'client CPU/req':>16}{'latency ratio':>15}"
    print(head + (f"{'server CPU/req':>16}{'client+server':>15}" if server else ""))
    b = results[base][0]
    for arm, (wall, cpu, *srv) in results.items():
        line = f"  {arm:<14}{wall * 1e6:>11.0f} us{cpu * 1e6:>13.0f} us{wall / b:>14.2f}x"
        if server:
            line += f"{srv[0] * 1e6:>13.0f} us{(cpu + srv[0]) * 1e6:>12.0f} us"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--handshakes", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--http-only", action="store_true", help="the HTTP sections only")
    args = parser.parse_args()

    import grpc
    import httpx

    import pymesh.grpc
    import pymesh.httpx
    from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
    from pymesh.controlplane import ControlPlane
    from pymesh.controlplane.ca import CertificateAuthority
    from pymesh.security import MeshChannelCredentials, SpiffeId, build_csr, split_chain
    from pymesh.security._pki import cert_pem, generate_key, key_pem
    from pymesh.xds.client import XdsClient

    tmp = Path(tempfile.mkdtemp(prefix="mtls-bench-"))
    ca = CertificateAuthority(tmp / "ca")

    def certs(sa: str) -> str:
        key = generate_key()
        csr = build_csr(key, SpiffeId("cluster.local", "default", sa)).decode()
        token = ca.create_token("default", sa)
        chain, roots = split_chain(
            ca.create_certificate(csr, 3600, {"authorization": f"Bearer {token}"})
        )
        d = tmp / sa
        d.mkdir()
        (d / "cert-chain.pem").write_bytes(cert_pem(chain))
        (d / "key.pem").write_bytes(key_pem(key))
        (d / "root-cert.pem").write_bytes(cert_pem(roots))
        return str(d)

    server_certs, client_certs = certs("echo"), certs("client")
    dns_certs = dns_named_certs(tmp, ca)
    (tmp / "mesh").mkdir()
    cp = ControlPlane(
        [tmp / "mesh"], xds_address="127.0.0.1:0", admin_port=None, ca=False, poll_interval=0.1
    ).start()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    server = subprocess.Popen(
        [sys.executable, "-c", SERVERS, cp.address, server_certs, dns_certs],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert server.stdout is not None and server.stdin is not None
    ports = json.loads(server.stdout.readline())
    (tmp / "mesh" / "mesh.yaml").write_text(mesh_yaml(ports))
    assert server.stdout.readline().strip() == "serving"
    data = generate_bootstrap(
        xds_address=cp.address, namespace="default", labels={"app": "bench"}, cert_dir=client_certs
    )
    xds = XdsClient(parse_bootstrap(json.dumps(data), source="bench"))
    creds = MeshChannelCredentials(bootstrap=xds.bootstrap)  # native where it can be
    tunnel_creds = MeshChannelCredentials(bootstrap=xds.bootstrap, native="off")
    closers: list[Callable[[], Any]] = []
    try:
        print(
            f"mTLS vs plaintext, {args.rounds} interleaved rounds x {args.requests} sequential "
            f"requests (medians); handshakes: {args.handshakes} new connections per arm"
        )
        # ---- HTTP
        http = pymesh.httpx.Client(xds_client=xds, mesh_wait=15)
        closers.append(http.close)
        url = f"http://{{}}.default.svc.cluster.local:{SVC_PORT}/"
        for app in ("hu", "hp", "hm"):
            assert http.get(url.format(app)).status_code == 200, app
        res = run_rounds(
            {
                "uvicorn": lambda: http.get(url.format("hu")),
                "plain": lambda: http.get(url.format("hp")),
                "mtls": lambda: http.get(url.format("hm")),
            },
            args.rounds,
            args.requests,
            server.pid,
        )
        report(
            "HTTP steady state: pymesh.httpx -> pymesh.serve (MeshServer: uvicorn + "
            "pymesh.asgi), plaintext (DISABLE) and mTLS (STRICT); uvicorn: the same app under "
            "plain uvicorn, no mesh server (server CPU: the server process, all threads)",
            res,
            "plain",
        )
        close = {"connection": "close"}
        res = run_rounds(
            {
                "plain": lambda: http.get(url.format("hp"), headers=close),
                "mtls": lambda: http.get(url.format("hm"), headers=close),
            },
            3,
            args.handshakes,
        )
        report("HTTP new connection per request (Connection: close)", res, "plain")
        if args.http_only:
            return

        # ---- gRPC
        target = f"xds:///{{}}.default.svc.cluster.local:{SVC_PORT}"
        channels = {
            "plain": pymesh.grpc.insecure_channel(target.format("gp"), xds_client=xds),
            "mtls": pymesh.grpc.secure_channel(target.format("gm"), creds, xds_client=xds),
            "mtls-tunnel": pymesh.grpc.secure_channel(
                target.format("gm"), tunnel_creds, xds_client=xds
            ),
            "front-plain": pymesh.grpc.insecure_channel(target.format("gx"), xds_client=xds),
            "front-mtls": pymesh.grpc.secure_channel(target.format("gy"), creds, xds_client=xds),
        }
        for ch in channels.values():
            closers.append(ch.close)
        calls = {a: ch.unary_unary("/echo.Echo/Who") for a, ch in channels.items()}
        for arm, call in calls.items():
            assert call(b"x", timeout=20) == b"ok", arm
        res = run_rounds(
            {a: (lambda c=c: c(b"x", timeout=10)) for a, c in calls.items()},
            args.rounds,
            args.requests,
        )
        report("gRPC steady state: pymesh.grpc channel -> pymesh.grpc server", res, "plain")
        print(
            f"  paths: mtls/front-mtls {dict(creds.stats)}; mtls-tunnel {dict(tunnel_creds.stats)}"
        )

        # ---- grpcio level: what the tunnel costs next to grpcio's own TLS
        from pymesh.model.matcher import StringMatcher
        from pymesh.security import FileWatcherProvider, channel_credentials

        client_provider = FileWatcherProvider(
            certificate_file=f"{client_certs}/cert-chain.pem",
            private_key_file=f"{client_certs}/key.pem",
            ca_certificate_file=f"{client_certs}/root-cert.pem",
        )
        client_provider.wait_ready(10)
        closers.append(client_provider.close)
        direct = MeshChannelCredentials(
            client_provider,
            expected_sans=[StringMatcher.exact("spiffe://cluster.local/ns/default/sa/echo")],
            native="off",
        )
        closers.append(direct.close)
        opts = [("grpc.use_local_subchannel_pool", 1)]
        raw = {
            "plain": grpc.insecure_channel(f"127.0.0.1:{ports['np']}", opts),
            "native-tls": grpc.secure_channel(
                f"127.0.0.1:{ports['nt']}",
                channel_credentials(client_provider),
                [*opts, ("grpc.ssl_target_name_override", DNS_NAME)],
            ),
            "tunnel-tls": direct.open_subchannel(f"127.0.0.1:{ports['nt']}", opts, None, None),
        }
        for ch in raw.values():
            closers.append(ch.close)
        # plain grpcio clients to the mesh servers (DISABLE / STRICT): the servers' share
        from pymesh.security._native import native_channel
        from pymesh.security._spiffe import spiffe_dns_name

        echo_dns = spiffe_dns_name("spiffe://cluster.local/ns/default/sa/echo")
        raw["srv-plain"] = grpc.insecure_channel(f"127.0.0.1:{ports['gp']}", opts)
        raw["srv-mtls"] = native_channel(
            f"127.0.0.1:{ports['gm']}", client_provider.current(), echo_dns, opts, None
        )
        closers += [raw["srv-plain"].close, raw["srv-mtls"].close]
        rcalls = {a: ch.unary_unary("/echo.Echo/Who") for a, ch in raw.items()}
        res = run_rounds(
            {a: (lambda c=c: c(b"x", timeout=10)) for a, c in rcalls.items()},
            args.rounds,
            args.requests,
        )
        report(
            "grpcio channels, no mesh client: plaintext vs grpcio's TLS (DNS-named "
            "certificate) vs the tunnel (URI SAN checked), to plain grpcio servers; srv-*: "
            "plain grpcio clients to the mesh servers (plaintext / grpcio's TLS to STRICT)",
            res,
            "plain",
        )

        endpoint_plain = f"127.0.0.1:{ports['gp']}"
        # the tunnel the mTLS-tunnel channel opened (CDS TLS settings): a new connection
        # per call; and a new grpcio TLS channel per call (the native path)
        tunnel = next(t for t in tunnel_creds.tunnels if t.endpoint[1] == ports["gm"])
        endpoint_mtls = f"127.0.0.1:{ports['gm']}"

        def fresh(target: str) -> None:
            with grpc.insecure_channel(target, [("grpc.use_local_subchannel_pool", 1)]) as ch:
                ch.unary_unary("/echo.Echo/Who")(b"x", timeout=10)

        def fresh_native() -> None:
            with native_channel(
                endpoint_mtls,
                client_provider.current(),
                echo_dns,
                [("grpc.use_local_subchannel_pool", 1)],
                None,
            ) as ch:
                ch.unary_unary("/echo.Echo/Who")(b"x", timeout=10)

        res = run_rounds(
            {
                "plain": lambda: fresh(endpoint_plain),
                "mtls-native": fresh_native,
                "mtls-tunnel": lambda: fresh(tunnel.target),
            },
            3,
            args.handshakes,
        )
        report(
            "gRPC new connection per call (grpcio channel to the endpoint, grpcio TLS / tunnel)",
            res,
            "plain",
        )
        # last: grpc.aio binds grpcio to this event loop
        loop = asyncio.new_event_loop()  # left open: grpcio's aio poller outlives the run
        native_creds = MeshChannelCredentials(bootstrap=xds.bootstrap, native="always")
        closers.append(native_creds.close)
        aio = loop.run_until_complete(aio_rounds(target, creds, native_creds, xds, args))
        print(
            f"\ngRPC aio: pymesh.grpc.aio channels, {args.concurrency} calls in flight "
            f'(mtls: the tunnel; mtls-native: native="always", {dict(native_creds.stats)})'
        )
        print(f"  {'arm':<14}{'latency p50':>14}{'calls/s':>12}{'time ratio':>12}")
        for arm, (p50, per_call) in aio.items():
            ratio = per_call / aio["plain"][1]
            print(f"  {arm:<14}{p50 * 1e6:>11.0f} us{1 / per_call:>12.0f}{ratio:>11.2f}x")

        print(
            f"\ntunnels: {len(creds.tunnels)}, connections refused: {creds.refused()}; "
            "httpx version",
            httpx.__version__,
        )
    finally:
        for close in closers:
            close()
        creds.close()
        tunnel_creds.close()
        xds.close()
        server.stdin.close()
        server.wait(20)
        cp.stop()


if __name__ == "__main__":
    main()
