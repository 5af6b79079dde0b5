"""Path-normalization tricks against path-based AuthorizationPolicy, pymesh vs Envoy+Istio.

The same policy (DENY ``paths: ["/admin*"]``, which istiod and pymesh's control plane both
translate to an RBAC ``url_path`` prefix ``/admin``) is enforced by real Envoy, configured as
istiod configures a sidecar's inbound HCM for each ``meshConfig.pathNormalization`` mode
(one listener per mode, in front of an echo upstream), and by a ``pymesh.asgi.MeshServer``
whose control plane reads the mode from Istio's ``istio`` ConfigMap. Each attack path is
sent byte for byte.

An attack *passes* when the request is let through and the application sees a path that
resolves (dot segments removed, percent-decoding as uvicorn does) into ``/admin``. Under
``DECODE_AND_MERGE_SLASHES`` (Istio's recommendation for path-based policies) zero may
pass. Under every mode pymesh answers what Envoy answers and forwards the same path bytes:
the tricks that pass Envoy under ``BASE`` (Istio's default; escaped and repeated slashes,
CVE-2021-31920) pass pymesh too, as Istio documents.

A second test holds pymesh's normalizer against Envoy for the HCM options istiod never sets
(``REJECT_REQUEST`` and ``UNESCAPE_AND_REDIRECT`` escaped-slash actions).
"""

from __future__ import annotations

import json
import posixpath
import socket
import socketserver
import ssl
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pymesh.core.path_normalization import normalize
from pymesh.model.listener import EscapedSlashesAction, PathNormalization
from tests.envoy_process import EnvoyProcess, admin_get, run_envoy
from tests.integration.asgi.conftest import SERVER_ID, Mesh

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
    "/%2fadmin",
    "/%5Cadmin",
    "/public%2F..%2Fadmin",
    "/public/..%5cadmin",
    "///admin",
    "/public//../admin",
    "/%c0%2e%c0%2e/admin",
    "/%c0%2fadmin",
    "/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc",
    "/app/\\/\\/\\admin",
    "/xyz%30..//abc",
]

# istiod's mapping of meshConfig.pathNormalization onto a sidecar's inbound HCM
# (pilot/pkg/networking/core: KEEP_UNCHANGED unless DECODE_AND_MERGE_SLASHES).
MODES: dict[str, tuple[bool, bool, str]] = {
    "NONE": (False, False, "KEEP_UNCHANGED"),
    "BASE": (True, False, "KEEP_UNCHANGED"),
    "MERGE_SLASHES": (True, True, "KEEP_UNCHANGED"),
    "DECODE_AND_MERGE_SLASHES": (True, True, "UNESCAPE_AND_FORWARD"),
}
# Envoy-only escaped-slash actions (no Istio mode sets them), checked on the normalizer.
ACTIONS: dict[str, tuple[bool, bool, str]] = {
    "REJECT_REQUEST": (True, False, "REJECT_REQUEST"),
    "UNESCAPE_AND_REDIRECT": (True, True, "UNESCAPE_AND_REDIRECT"),
}
# What tells a pymesh server's mode apart (so the test knows a ConfigMap change landed).
PROBES = {
    "NONE": ("/public/../admin", 200),
    "BASE": ("//admin", 200),
    "MERGE_SLASHES": ("/%2Fadmin", 200),
    "DECODE_AND_MERGE_SLASHES": ("/%2Fadmin", 403),
}


def mesh_configmap(mode: str) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: v1
        kind: ConfigMap
        metadata: {{name: istio, namespace: istio-system}}
        data:
          mesh: |-
            accessLogFile: /dev/stdout
            pathNormalization:
              normalization: {mode}
        """
    )


def effective(app_path: str) -> str:
    """What a path-resolving application would serve for ``app_path`` (already decoded)."""
    resolved = posixpath.normpath(app_path.replace("\\", "/")) if app_path else "/"
    return "/" + resolved.lstrip("/")


def is_bypass(status: int, app_path: str | None) -> bool:
    return status == 200 and app_path is not None and effective(app_path).startswith("/admin")


class _Echo(socketserver.StreamRequestHandler):
    """Answers the raw request-target it was given (http.server would rewrite a leading
    ``//``), as JSON."""

    def handle(self) -> None:
        for _ in range(1000):
            line = self.rfile.readline(65537)
            if not line:
                return
            target = line.split(b" ")[1].decode("latin-1") if line.count(b" ") >= 2 else ""
            for _ in range(200):  # the headers, until the blank line
                if self.rfile.readline(65537) in (b"\r\n", b"\n", b""):
                    break
            body = json.dumps({"path": target, "raw_path": target.split("?")[0]}).encode()
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )


@pytest.fixture
def echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _listener(
    name: str, normalize: bool, merge: bool, action: str, with_rbac: bool
) -> dict[str, Any]:
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
        "stat_prefix": name.lower(),
        "normalize_path": normalize,
        "merge_slashes": merge,
        "path_with_escaped_slashes_action": action,
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
            *([{"name": "envoy.filters.http.rbac", "typed_config": rbac}] if with_rbac else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def envoy_bootstrap(
    echo_port: int, settings: dict[str, tuple[bool, bool, str]], *, with_rbac: bool = True
) -> str:
    """One listener per entry of ``settings`` (name -> normalize_path, merge_slashes,
    escaped-slash action), each an inbound HCM (with the DENY /admin* RBAC filter)."""
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": echo_port}}}
    return json.dumps(
        {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [_listener(n, *v, with_rbac) for n, v in settings.items()],
                "clusters": [
                    {
                        "name": "echo",
                        "type": "STATIC",
                        "connect_timeout": "1s",
                        "load_assignment": {
                            "cluster_name": "echo",
                            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
                        },
                    }
                ],
            },
        }
    )


def listener_ports(envoy: EnvoyProcess) -> dict[str, int]:
    statuses = json.loads(admin_get(envoy.admin, "/listeners?format=json"))["listener_statuses"]
    return {s["name"]: int(s["local_address"]["socket_address"]["port_value"]) for s in statuses}


def exchange(port: int, ctx: ssl.SSLContext | None, path: str) -> tuple[int, str, str | None]:
    """``GET path`` written byte for byte: (status, ``location`` header, the raw path the
    application was given or ``None`` when it was not reached)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock: socket.socket = ctx.wrap_socket(raw) if ctx is not None else raw
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n".encode())
        data = b""
        for _ in range(1000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    location = ""
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "location":
            location = value.strip()
        if key.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
            size, _, rest = body.partition(b"\r\n")
            body = rest[: int(size, 16)]
    app = str(json.loads(body)["raw_path"]) if status == 200 else None
    return status, location, app


def _verdict(status: int, location: str, app: str | None) -> tuple[int, str | None]:
    """What a request came to: the status and the path the app saw (or was sent to)."""
    return status, (location.split("?", maxsplit=1)[0] if status == 307 else app)


@pytest.fixture
def asgi_mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    m.stop()


@pytest.mark.envoy
@pytest.mark.timeout(180)
def test_path_tricks_against_path_authz(
    envoy_bin: Path, echo: int, asgi_mesh: Mesh, tmp_path: Path, record: Any
) -> None:
    mesh = asgi_mesh
    mesh.write("authz.yaml", DENY_ADMIN)
    server = mesh.serve()
    ctx = mesh.client_context(mesh.identity("default", "client"), (SERVER_ID,))
    workdir = tmp_path / "envoy"
    workdir.mkdir()
    rows: dict[str, list[tuple[str, int, str | None, int, str | None]]] = {}
    with run_envoy(envoy_bin, envoy_bootstrap(echo, MODES), workdir) as envoy:
        ports = listener_ports(envoy)
        for mode in ("BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES", "NONE"):
            mesh.write("mesh.yaml", mesh_configmap(mode))
            probe, expected = PROBES[mode]
            deadline = time.monotonic() + 15
            while not (
                exchange(server.port, ctx, probe)[0] == expected
                and exchange(server.port, ctx, "/admin")[0] == 403
            ):
                assert time.monotonic() < deadline, f"pymesh never served {mode}"
                time.sleep(0.05)
            rows[mode] = []
            for path in ATTACKS:
                e_status, e_app = _verdict(*exchange(ports[mode], None, path))
                p_status, p_app = _verdict(*exchange(server.port, ctx, path))
                rows[mode].append((path, e_status, e_app, p_status, p_app))

    def bypass(status: int, app: str | None) -> bool:
        return app is not None and is_bypass(status, urllib.parse.unquote(app))

    report = "\n".join(
        f"{mode:25} {r[0]!r:44} envoy {r[1]} {r[2]!r:34} pymesh {r[3]} {r[4]!r}"
        for mode, table in rows.items()
        for r in table
    )
    hardened = rows["DECODE_AND_MERGE_SLASHES"]
    for path, e_status, _, p_status, p_app in hardened:
        record(
            f"path trick {path!r} vs DENY /admin* (pathNormalization DECODE_AND_MERGE_SLASHES)",
            cases=1,
            requests=2,
            failed=int(bypass(p_status, p_app)),
            note=f"Envoy {e_status}, pymesh {p_status}" + (f", app saw {p_app!r}" if p_app else ""),
        )
    for mode, table in rows.items():
        differ = [r for r in table if (r[1], r[2]) != (r[3], r[4])]
        both = [r[0] for r in table if bypass(r[3], r[4])]
        record(
            f"path tricks under pathNormalization {mode}: pymesh answers as Envoy does",
            cases=len(table),
            requests=2 * len(table),
            failed=len(differ),
            note=f"{len(table) - len(differ)}/{len(table)} identical (status and forwarded path)"
            + (
                f"; passing both Envoy and pymesh (Istio's caveat for {mode}): {both}"
                if both
                else ""
            ),
        )
    # every mode: pymesh and Envoy agree byte for byte on status and forwarded path
    differences = [(m, r) for m, t in rows.items() for r in t if (r[1], r[2]) != (r[3], r[4])]
    assert differences == [], report
    # the hardened mode lets no trick through
    assert [r[0] for r in hardened if bypass(r[3], r[4])] == [], report
    # Istio's documented caveats for its default, as Envoy has them (CVE-2021-31920)
    base = {r[0] for r in rows["BASE"] if bypass(r[3], r[4])}
    assert {"//admin", "/%2Fadmin", "/public/..%2Fadmin"} <= base, report
    merged = {r[0] for r in rows["MERGE_SLASHES"] if bypass(r[3], r[4])}
    assert "//admin" not in merged and "/%2Fadmin" in merged, report


@pytest.mark.envoy
@pytest.mark.timeout(60)
def test_normalizer_agrees_with_envoy_on_every_action(
    envoy_bin: Path, echo: int, tmp_path: Path
) -> None:
    """pymesh.core.path_normalization.normalize against Envoy for all four Istio modes and
    the REJECT_REQUEST / UNESCAPE_AND_REDIRECT actions (no RBAC: only the path)."""
    settings = {**MODES, **ACTIONS}
    bootstrap = envoy_bootstrap(echo, settings, with_rbac=False)
    mismatches = []
    cases = 0
    with run_envoy(envoy_bin, bootstrap, tmp_path) as envoy:
        ports = listener_ports(envoy)
        for name, (normalize_path, merge, action) in settings.items():
            policy = PathNormalization(normalize_path, merge, EscapedSlashesAction[action])
            for path in [*ATTACKS, "/public/x?q=%2F", "/a%2Fb/..?x=1"]:
                theirs = _verdict(*exchange(ports[name], None, path))
                ours = normalize(path.partition("?")[0].encode("latin-1"), policy)
                if isinstance(ours, int):
                    mine: tuple[int, str | None] = (400, None)
                else:
                    mine = (307 if ours[1] else 200, ours[0].decode("latin-1"))
                cases += 1
                if mine != theirs:
                    mismatches.append((name, path, theirs, mine))
    assert cases == 6 * (len(ATTACKS) + 2)
    assert mismatches == [], "\n".join(map(repr, mismatches))
