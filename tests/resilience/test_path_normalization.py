"""Path-normalization tricks against path-based AuthorizationPolicy, pymesh vs Envoy+Istio.

The same policy (DENY ``paths: ["/admin*"]``, which istiod and pymesh's control plane both
translate to an RBAC ``url_path`` prefix ``/admin``) is enforced by real Envoy configured as
istiod configures a sidecar's inbound HCM by default (``meshConfig.pathNormalization: BASE``:
``normalize_path: true``, ``merge_slashes: false``, escaped slashes kept) in front of an
echo upstream, and by a ``pymesh.asgi.MeshServer``. Each attack path is sent byte for byte.

An attack *passes* when the request is let through and the application sees a path that
resolves (dot segments removed, percent-decoding as uvicorn does) into ``/admin``. Zero may
pass; pymesh must also refuse whatever Envoy refuses.
"""

from __future__ import annotations

import http.server
import json
import posixpath
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.envoy_process import run_envoy
from tests.integration.asgi.conftest import SERVER_ID, Mesh
from tests.resilience.test_security_cases import _raw_request

DENY_ADMIN = textwrap.dedent(
    """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-admin, namespace: default}
    spec:
      selector: {matchLabels: {app: web}}
      action: DENY
      rules:
      - to: [{operation: {paths: ["/admin*"]}}]
    """
)

ATTACKS = [
    "/admin",  # the plain case: denied everywhere
    "/admin/x",
    "/public/../admin",
    "/public/./../admin/x",
    "/public/%2e%2e/admin",
    "/public/%2E%2E/admin",
    "/public/.%2e/admin",
    "/./admin",
    "/%61dmin",
    "/%2561dmin",
    "/public/..%2Fadmin",
    "/%2Fadmin",
    "//admin",
    "/ADMIN",
    "/Admin/x",
    "/admin%00",
    "/public/../../admin",
    "/public/..\\admin",
    "/admin/",
]


def effective(app_path: str) -> str:
    """What a path-resolving application would serve for ``app_path`` (already decoded)."""
    resolved = posixpath.normpath(app_path.replace("\\", "/")) if app_path else "/"
    return "/" + resolved.lstrip("/")


def is_bypass(status: int, app_path: str | None) -> bool:
    return status == 200 and app_path is not None and effective(app_path).startswith("/admin")


class _Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def envoy_bootstrap(echo_port: int) -> str:
    rbac = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {
            "action": "DENY",
            "policies": {
                "ns[default]-policy[deny-admin]-rule[0]": {
                    "permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
                    "principals": [{"any": True}],
                }
            },
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound",
        "normalize_path": True,  # istiod, pathNormalization BASE (the default)
        "merge_slashes": False,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "inbound",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}],
                }
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.rbac", "typed_config": rbac},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    return json.dumps(
        {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [
                    {
                        "name": "inbound",
                        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                        "filter_chains": [
                            {
                                "filters": [
                                    {
                                        "name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm,
                                    }
                                ]
                            }
                        ],
                    }
                ],
                "clusters": [
                    {
                        "name": "echo",
                        "type": "STATIC",
                        "connect_timeout": "1s",
                        "load_assignment": {
                            "cluster_name": "echo",
                            "endpoints": [
                                {
                                    "lb_endpoints": [
                                        {
                                            "endpoint": {
                                                "address": {
                                                    "socket_address": {
                                                        "address": "127.0.0.1",
                                                        "port_value": echo_port,
                                                    }
                                                }
                                            }
                                        }
                                    ]
                                }
                            ],
                        },
                    }
                ],
            },
        }
    )


@pytest.fixture
def asgi_mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    m.stop()


def _app_path(status: int, body: bytes, decode: bool) -> str | None:
    if status != 200:
        return None
    path = str(json.loads(body)["path"])
    return urllib.parse.unquote(path) if decode else path


@pytest.mark.envoy
@pytest.mark.timeout(120)
def test_path_tricks_against_path_authz(
    envoy_bin: Path, echo: int, asgi_mesh: Mesh, tmp_path: Path, record: Any
) -> None:
    mesh = asgi_mesh
    mesh.write("authz.yaml", DENY_ADMIN)
    server = mesh.serve()
    ctx = mesh.client_context(mesh.identity("default", "client"), (SERVER_ID,))
    deadline = time.monotonic() + 15
    while _raw_request(server.port, ctx, "/admin", [])[0] != 403:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workdir = tmp_path / "envoy"
    workdir.mkdir()
    rows = []
    with run_envoy(envoy_bin, envoy_bootstrap(echo), workdir) as envoy:
        for path in ATTACKS:
            e_status, e_body = _raw_request(envoy.port, None, path, [])
            p_status, p_body = _raw_request(server.port, ctx, path, [])
            # the app behind Envoy is a uvicorn app too: it sees Envoy's path decoded
            e_app = _app_path(e_status, e_body, decode=True)
            p_app = _app_path(p_status, p_body, decode=False)  # whoami: scope["path"]
            rows.append((path, e_status, e_app, p_status, p_app))
    table = "\n".join(f"{r[0]!r:28} envoy {r[1]} {r[2]!r:22} pymesh {r[3]} {r[4]!r}" for r in rows)
    for path, e_status, e_app, p_status, p_app in rows:
        both = is_bypass(p_status, p_app) and is_bypass(e_status, e_app)
        record(
            f"path trick {path!r} vs DENY /admin*",
            cases=1,
            requests=2,
            failed=int(is_bypass(p_status, p_app) or (e_status == 403 and p_status != 403)),
            note=f"Envoy {e_status}, pymesh {p_status}"
            + (f", app saw {p_app!r}" if p_app else "")
            + (" - passes Envoy+Istio BASE too (see the suite page)" if both else ""),
        )
    # pymesh refuses whatever Envoy+Istio refuses, and lets nothing through that Envoy
    # does not also let through (the remaining cases are Istio's documented BASE caveats:
    # escaped and repeated slashes, closed by pathNormalization MERGE_SLASHES /
    # DECODE_AND_MERGE_SLASHES in Istio, which pymesh does not offer)
    assert [r for r in rows if r[1] == 403 and r[3] != 403] == [], table
    assert [r for r in rows if r[1] == 400 and r[3] == 200] == [], table
    worse = [r for r in rows if is_bypass(r[3], r[4]) and not is_bypass(r[1], r[2])]
    assert worse == [], table
    shared = [r[0] for r in rows if is_bypass(r[3], r[4])]
    assert shared == ["/public/..%2Fadmin", "/%2Fadmin", "//admin"], table
