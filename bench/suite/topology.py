"""Everything the data-plane variants run against, started once per suite run.

- the HTTP upstream: uvicorn in a subprocess serving a one-line ASGI app
  (``bench/httpx_bench.py``'s ``start_upstream``: the same upstream as that script);
- the gRPC upstream: a grpcio server in a subprocess (``bench/grpc_bench.py``'s ``SERVER``);
- the mTLS upstream: the same ASGI app under ``pymesh.serve`` in a subprocess, STRICT
  PeerAuthentication, its certificate from the pymesh CA;
- the embedded control plane (in the suite's own process: not on any request's path) with
  the config of ``httpx_bench.mesh_yaml`` (routing, round robin, retries, circuit-breaker
  limits, outlier detection), the same for the mTLS service plus ``ISTIO_MUTUAL``, and
  ``grpc_bench.MESH`` for gRPC;
- three Envoys (:mod:`bench.suite.envoy`) launched by ``tests/envoy_process.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import grpc_bench, httpx_bench
from bench.suite import envoy
from bench.suite.procs import free_port

REPO = Path(__file__).resolve().parents[2]
WEB_HOST = "web.default.svc.cluster.local"
WEB_PORT = 9080
TRUST_DOMAIN = "cluster.local"

SERVE_PROGRAM = textwrap.dedent(
    """\
    import sys

    import pymesh

    sys.path.insert(0, sys.argv[2])
    from benchapp import app

    pymesh.serve(app, port=int(sys.argv[1]), host="127.0.0.1", log_level="warning")
    """
)


def web_yaml(port: int) -> str:
    """The mTLS service: the policy of ``httpx_bench.mesh_yaml`` plus ``ISTIO_MUTUAL``, and a
    STRICT PeerAuthentication for the server."""
    return textwrap.dedent(
        f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: web, namespace: default}}
        spec:
          hosts: [{WEB_HOST}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: {WEB_PORT}, name: http, protocol: HTTP}}]
          endpoints:
          - {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{version: v1}},
             serviceAccount: web}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: web, namespace: default}}
        spec:
          host: {WEB_HOST}
          trafficPolicy:
            tls: {{mode: ISTIO_MUTUAL}}
            loadBalancer: {{simple: ROUND_ROBIN}}
            connectionPool:
              tcp: {{maxConnections: 1000}}
              http: {{http1MaxPendingRequests: 1000, http2MaxRequests: 1000, maxRetries: 10}}
            outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}}
          subsets:
          - {{name: v1, labels: {{version: v1}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: web, namespace: default}}
        spec:
          hosts: [{WEB_HOST}]
          http:
          - route:
            - destination: {{host: {WEB_HOST}, subset: v1}}
              weight: 100
            retries: {{attempts: 2, retryOn: "5xx,connect-failure"}}
            timeout: 10s
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {{name: web, namespace: default}}
        spec:
          selector: {{matchLabels: {{app: web}}}}
          mtls: {{mode: STRICT}}
        """
    )


def issue_certs(ca: Any, directory: Path, service_account: str) -> envoy.Certs:
    """A workload certificate from the pymesh CA, written in Istio's file layout."""
    from pymesh.security import SpiffeId, build_csr, generate_key
    from pymesh.security._pki import key_pem

    sid = SpiffeId(TRUST_DOMAIN, "default", service_account)
    key = generate_key()
    chain = ca.sign(build_csr(key, sid).decode(), 24 * 3600.0, sid)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert-chain.pem").write_text("".join(chain[:-1]) or chain[0])
    (directory / "key.pem").write_bytes(key_pem(key))
    (directory / "root-cert.pem").write_bytes(ca.trust_bundle_pem())
    return envoy.Certs(directory, str(sid))


@dataclass
class Path_:
    """One variant: how its client is started and which processes serve its requests."""

    name: str
    kind: str  # "http" | "grpc"
    spec: dict[str, Any]
    servers: dict[str, int] = field(default_factory=dict)  # role -> pid


@dataclass
class Topology:
    tmp: Path
    variants: list[Path_]
    envoy_configs: dict[str, dict[str, Any]]
    stack: ExitStack

    def close(self) -> None:
        self.stack.close()


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_listening(port: int, proc: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


def start(tmp: Path, envoy_bin: Path) -> Topology:
    """Start every upstream, the control plane and the Envoys; the caller closes it."""
    from pymesh.bootstrap import generate_bootstrap
    from pymesh.controlplane import ControlPlane
    from pymesh.controlplane.ca import CertificateAuthority
    from tests.envoy_process import run_envoy

    stack = ExitStack()
    try:
        # upstreams
        up, http_port = httpx_bench.start_upstream(tmp)
        stack.callback(_stop, up)
        grpc_up = subprocess.Popen(
            [sys.executable, "-c", grpc_bench.SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

        def stop_grpc() -> None:
            assert grpc_up.stdin is not None
            grpc_up.stdin.close()
            try:
                grpc_up.wait(10)
            except subprocess.TimeoutExpired:
                _stop(grpc_up)

        stack.callback(stop_grpc)
        assert grpc_up.stdout is not None
        grpc_port = int(grpc_up.stdout.readline())

        # certificates
        ca = CertificateAuthority(tmp / "ca", trust_domain=TRUST_DOMAIN)
        certs = {sa: issue_certs(ca, tmp / "certs" / sa, sa) for sa in ("client", "web")}
        envoy_certs = {
            "client": issue_certs(ca, tmp / "certs" / "envoy-client", "client"),
            "server": issue_certs(ca, tmp / "certs" / "envoy-server", "bench"),
        }

        # control plane
        web_port = free_port()
        mesh = tmp / "mesh"
        mesh.mkdir()
        (mesh / "bench.yaml").write_text(httpx_bench.mesh_yaml(http_port))
        (mesh / "web.yaml").write_text(web_yaml(web_port))
        (mesh / "echo.yaml").write_text(grpc_bench.MESH.replace("BACKEND_PORT", str(grpc_port)))
        plane = ControlPlane([mesh], xds_address="127.0.0.1:0", admin_port=None, ca=ca).start()
        stack.callback(plane.stop)

        def write_bootstrap(name: str, **kw: Any) -> str:
            path = tmp / f"bootstrap-{name}.json"
            data = generate_bootstrap(xds_address=plane.address, namespace="default", **kw)
            path.write_text(json.dumps(data))
            return str(path)

        client_bs = write_bootstrap("client", service_account="client")
        mtls_bs = write_bootstrap(
            "client-mtls", service_account="client", cert_dir=str(certs["client"].directory)
        )
        web_bs = write_bootstrap(
            "web",
            service_account="web",
            labels={"app": "web"},
            ip="127.0.0.1",
            cert_dir=str(certs["web"].directory),
        )

        # the mTLS upstream: pymesh.serve
        env = dict(os.environ, GRPC_XDS_BOOTSTRAP=web_bs, PYTHONPATH=str(REPO))
        (tmp / "serve.py").write_text(SERVE_PROGRAM)
        web = subprocess.Popen(
            [sys.executable, str(tmp / "serve.py"), str(web_port), str(tmp)], env=env
        )
        stack.callback(_stop, web)

        # Envoys
        p = {k: free_port() for k in ("one_h", "one_g", "cli_h", "cli_g", "srv_h", "srv_g")}
        configs = {
            "one": envoy.bootstrap(envoy.Ports(p["one_h"], p["one_g"], http_port, grpc_port)),
            "client": envoy.bootstrap(
                envoy.Ports(p["cli_h"], p["cli_g"], p["srv_h"], p["srv_g"]),
                upstream_tls=(envoy_certs["client"], envoy_certs["server"].spiffe_id),
            ),
            "server": envoy.bootstrap(
                envoy.Ports(p["srv_h"], p["srv_g"], http_port, grpc_port),
                downstream_tls=(envoy_certs["server"], envoy_certs["client"].spiffe_id),
            ),
        }
        envoys = {}
        for name, config in configs.items():
            d = tmp / f"envoy-{name}"
            d.mkdir()
            (d / "envoy.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            envoys[name] = stack.enter_context(run_envoy(envoy_bin, json.dumps(config), d))

        # pymesh.serve accepts once bound (its worker's first request waits for the listener)
        _wait_listening(web_port, web, "pymesh.serve")

        up_pid, grpc_pid, web_pid = up.pid, grpc_up.pid, web.pid
        e1, ec, es = (envoys[n].proc.pid for n in ("one", "client", "server"))
        grpc_target = f"xds:///{grpc_bench.HOST}:{grpc_bench.PORT}"
        cxds_env = {"GRPC_XDS_BOOTSTRAP": client_bs}
        http = {"kind": "http"}
        grpc = {"kind": "grpc", "method": grpc_bench.METHOD}
        variants = [
            Path_("httpx", "http", {**http, "url": f"http://127.0.0.1:{http_port}/"},
                  {"upstream": up_pid}),
            Path_("pymesh", "http",
                  {**http, "url": f"http://{httpx_bench.HOST}:{httpx_bench.PORT}/",
                   "bootstrap": client_bs, "metrics": True}, {"upstream": up_pid}),
            Path_("pymesh mTLS", "http",
                  {**http, "url": f"http://{WEB_HOST}:{WEB_PORT}/", "bootstrap": mtls_bs,
                   "metrics": True},
                  {"upstream (pymesh.serve)": web_pid}),
            Path_("1 Envoy", "http", {**http, "url": f"http://127.0.0.1:{p['one_h']}/"},
                  {"envoy": e1, "upstream": up_pid}),
            Path_("2 Envoys mTLS", "http", {**http, "url": f"http://127.0.0.1:{p['cli_h']}/"},
                  {"envoy client": ec, "envoy server": es, "upstream": up_pid}),
            Path_("grpcio", "grpc", {**grpc, "target": f"127.0.0.1:{grpc_port}"},
                  {"upstream": grpc_pid}),
            Path_("grpcio xds:///", "grpc", {**grpc, "target": grpc_target, "env": cxds_env},
                  {"upstream": grpc_pid}),
            Path_("pymesh", "grpc", {**grpc, "target": grpc_target, "bootstrap": client_bs},
                  {"upstream": grpc_pid}),
            Path_("1 Envoy", "grpc", {**grpc, "target": f"127.0.0.1:{p['one_g']}"},
                  {"envoy": e1, "upstream": grpc_pid}),
            Path_("2 Envoys mTLS", "grpc", {**grpc, "target": f"127.0.0.1:{p['cli_g']}"},
                  {"envoy client": ec, "envoy server": es, "upstream": grpc_pid}),
        ]  # fmt: skip
        return Topology(tmp, variants, configs, stack)
    except BaseException:
        stack.close()
        raise
