"""Loopback fixtures for the ASGI server side: the embedded control plane over a temp
config dir, certificates from an embedded CA written where the bootstrap's ``file_watcher``
provider reads them, and ``pymesh.asgi.MeshServer`` (uvicorn) serving a small app.
Everything a fixture starts, it stops."""

from __future__ import annotations

import datetime
import json
import ssl
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import pymesh.asgi
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
from pymesh.controlplane import ControlPlane
from pymesh.controlplane.ca import CertificateAuthority
from pymesh.security import CertificateBundle, StaticProvider, client_ssl_context
from pymesh.xds.client import XdsClient
from tests.unit.security.pki_helpers import ca_bundle, raw_bundle, spiffe

SERVER_SA = "web"
SERVER_ID = spiffe("default", SERVER_SA)


def write_bundle(bundle: CertificateBundle, directory: Path) -> Path:
    """Istio's agent file layout (what the ``file_watcher`` provider reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in (
        ("cert-chain.pem", bundle.chain_pem),
        ("key.pem", bundle.key_pem),
        ("root-cert.pem", bundle.roots_pem),
    ):
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(directory / name)
    return directory


async def whoami(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The app: answers its path, method and the caller's identity as pymesh sees it."""
    if scope["type"] != "http":
        return
    p = pymesh.asgi.peer(scope)
    body = json.dumps(
        {
            "path": scope["path"],
            "raw_path": scope.get("raw_path", b"").decode("latin-1"),
            "method": scope["method"],
            "tls": p.tls if p else None,
            "spiffe_id": p.spiffe_id if p else None,
            "principal": p.principal if p else None,
            "namespace": p.namespace if p else None,
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def peer_authentication(mode: str, name: str = "web-mtls") -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {{name: {name}, namespace: default}}
        spec:
          selector: {{matchLabels: {{app: web}}}}
          mtls: {{mode: {mode}}}
        """
    )


class Mesh:
    """Control plane + CA + one served ASGI app (node ``app: web``, sa ``web``)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.dir = tmp / "mesh"
        self.dir.mkdir()
        self.ca = CertificateAuthority(tmp / "ca")
        self.cp: ControlPlane | None = None
        self.clients: list[XdsClient] = []
        self.servers: list[pymesh.asgi.MeshServer] = []
        self.providers: list[StaticProvider] = []
        self.cert_dir = write_bundle(ca_bundle(self.ca, "default", SERVER_SA), tmp / "web-certs")

    def write(self, name: str, text: str) -> None:
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def remove(self, name: str) -> None:
        (self.dir / name).unlink()

    def start_cp(self) -> ControlPlane:
        if self.cp is None:
            self.cp = ControlPlane(
                [self.dir],
                xds_address="127.0.0.1:0",
                admin_port=None,
                debounce=0.02,
                poll_interval=0.05,
                ca=False,
            ).start()
        return self.cp

    def xds_client(self, **bootstrap: Any) -> XdsClient:
        cp = self.start_cp()
        data = generate_bootstrap(xds_address=cp.address, namespace="default", **bootstrap)
        client = XdsClient(parse_bootstrap(json.dumps(data), source="test"))
        self.clients.append(client)
        return client

    def serve(self, app: Any = whoami, *, wait: bool = True, **kw: Any) -> pymesh.asgi.MeshServer:
        client = self.xds_client(
            labels={"app": "web"},
            service_account=SERVER_SA,
            ip="127.0.0.1",
            cert_dir=str(self.cert_dir),
        )
        server = pymesh.asgi.MeshServer(
            app, host="127.0.0.1", port=0, xds_client=client, **kw
        ).start()
        self.servers.append(server)
        if wait:
            assert server.wait_for_serving(15), server.middleware.message
        return server

    def client_context(
        self, bundle: CertificateBundle | None, expected: tuple[str, ...] = ()
    ) -> ssl.SSLContext:
        """A client TLS context presenting ``bundle`` (``None``: no certificate, our roots)."""
        from pymesh.model.matcher import StringMatcher

        if bundle is None:
            bundle = CertificateBundle.from_pem(b"", b"", self.ca.trust_bundle_pem())
        provider = StaticProvider(bundle)
        self.providers.append(provider)
        return client_ssl_context(provider, tuple(StringMatcher.exact(e) for e in expected))

    def identity(self, ns: str, sa: str) -> CertificateBundle:
        return ca_bundle(self.ca, ns, sa)

    def forged(self, uri: str, **kw: Any) -> CertificateBundle:
        """A leaf signed by our CA's root key without the CA's checks (attack material)."""
        signer = self.ca._signer
        return raw_bundle(signer.cert, signer.key, uri, trust=self.ca.trust_bundle_pem(), **kw)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        for provider in self.providers:
            provider.close()
        for client in self.clients:
            client.close()
        if self.cp is not None:
            self.cp.stop()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    m.stop()


def get(url: str, ctx: ssl.SSLContext | None = None, **kw: Any) -> httpx.Response | Exception:
    """One request on a fresh connection; the exception when the connection is refused."""
    try:
        with httpx.Client(verify=ctx if ctx is not None else False, timeout=5) as c:
            return c.get(url, **kw)
    except (httpx.TransportError, ssl.SSLError) as exc:
        return exc


def expired() -> dict[str, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return {
        "not_before": now - datetime.timedelta(hours=2),
        "not_after": now - datetime.timedelta(hours=1),
    }
