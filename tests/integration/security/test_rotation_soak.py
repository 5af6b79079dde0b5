"""Rotation under load: 1-minute certificates from the control plane's CA, renewed by both
workloads while a client sends a steady stream for ~3 minutes. Zero failed requests; every
certificate either side received is seen in use by the other side."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from pymesh.controlplane import ControlPlane
from pymesh.controlplane.ca import CertificateAuthority
from pymesh.model.matcher import StringMatcher
from pymesh.security import (
    CaClientProvider,
    CertificateBundle,
    SpiffeId,
    client_ssl_context,
    server_ssl_context,
)
from tests.integration.security.tls_servers import HttpsServer, serial_of

DURATION = 180.0
TTL = 60.0
SERVER = SpiffeId("cluster.local", "default", "server")
CLIENT = SpiffeId("cluster.local", "default", "client")


def _serial(bundle: CertificateBundle) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificates(bundle.chain_pem)[0].serial_number


@pytest.mark.slow
@pytest.mark.timeout(DURATION + 120)
def test_rotation_under_steady_load(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    ca = CertificateAuthority(tmp_path / "ca")
    published: dict[str, list[tuple[float, int]]] = {"server": [], "client": []}
    lock = threading.Lock()
    with ControlPlane(tmp_path / "config", xds_address="127.0.0.1:0", admin_port=None, ca=ca) as cp:
        providers = {}
        for name, ident in (("server", SERVER), ("client", CLIENT)):
            p = CaClientProvider(
                cp.address,
                ident,
                token=ca.create_token(ident.namespace, ident.service_account),
                ttl=TTL,
            )

            def record(bundle: CertificateBundle, name: str = name) -> None:
                with lock:
                    published[name].append((time.monotonic(), _serial(bundle)))

            p.subscribe(record)
            first = p.wait_ready(30)
            with lock:
                published[name].insert(0, (time.monotonic(), _serial(first)))
            providers[name] = p
        sctx = server_ssl_context(providers["server"])
        cctx = client_ssl_context(providers["client"], [StringMatcher.exact(SERVER.uri)])
        server = HttpsServer(sctx)
        failures: list[str] = []
        seen_client: set[int] = set()
        seen_server: set[int] = set()
        requests = 0
        try:
            with httpx.Client(verify=cctx, timeout=10) as client:
                url = f"https://127.0.0.1:{server.port}/"
                start = time.monotonic()
                end = start + DURATION
                while time.monotonic() < end:
                    requests += 1
                    close = requests % 10 == 0  # connections churn about twice a second
                    try:
                        r = client.get(url, headers={"connection": "close"} if close else {})
                        if r.status_code != 200 or r.text != CLIENT.uri:
                            failures.append(f"{r.status_code} {r.text}")
                        seen_client.add(int(r.headers["x-client-serial"]))
                        if not close:
                            ssl_obj = r.extensions["network_stream"].get_extra_info("ssl_object")
                            seen_server.add(serial_of(ssl_obj.getpeercert(True)) or 0)
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                    time.sleep(0.05)
                stop = time.monotonic()
        finally:
            server.close()
            for p in providers.values():
                p.close()
    print(
        f"\nsoak: {requests} requests, {len(failures)} failed, "
        f"client certs used {len(seen_client)}, server certs used {len(seen_server)}"
    )
    assert failures == []
    # every certificate a side had for at least a second was used by the other side
    for name, seen in (("client", seen_client), ("server", seen_server)):
        issued = [s for t, s in published[name] if t < stop - 1.0]
        assert len(set(issued)) >= 4, (name, issued)  # 1-minute certs over 3 minutes
        assert set(issued) <= seen, (name, set(issued) - seen)
    assert requests > DURATION * 10
