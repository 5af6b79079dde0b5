"""Workload certificates rotate under traffic: with 40-second certificates every workload's
identity agent renews (at about half the lifetime) and rewrites its files, servers and
clients pick the new ones up, and no page load fails meanwhile."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from examples.bookinfo.client import User
from examples.bookinfo.mesh import Bookinfo


def _leaf(chain_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(chain_pem).public_bytes(serialization.Encoding.DER)


@pytest.mark.slow  # about a minute: certificates must expire-and-renew under traffic
def test_certificates_rotate_without_failed_requests(tmp_path: Path) -> None:
    with Bookinfo(tmp_path, cert_ttl=40) as bookinfo:
        bookinfo.apply("reviews-v2-v3")  # both ratings hops (HTTP and gRPC) in use
        chains = {
            name: (tmp_path / "certs" / name / "cert-chain.pem") for name in bookinfo.services
        }
        first = {name: path.read_bytes() for name, path in chains.items()}
        seen: dict[str, set[bytes]] = {name: set() for name in chains}
        failures, loads = [], 0
        deadline = time.monotonic() + 50
        with User(bookinfo.productpage_url) as user:
            while time.monotonic() < deadline:
                page = user.page()
                loads += 1
                if not (page.details_ok and page.reviews_ok and page.stars):
                    failures.append((loads, page.errors, page.rating_errors))
                for name, path in chains.items():
                    seen[name].add(_leaf(path.read_bytes()))
                time.sleep(0.05)
        rotated = [name for name, path in chains.items() if path.read_bytes() != first[name]]
        assert sorted(rotated) == sorted(bookinfo.services), rotated
        assert failures == [], failures[:5]
        assert loads > 100
        # a new connection to each server is served with its current (renewed) certificate
        client = tmp_path / "certs" / "productpage-v1"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # only reading what the server presents
        ctx.load_cert_chain(client / "cert-chain.pem", client / "key.pem")
        for name, proc in bookinfo.services.items():
            with (
                socket.create_connection(("127.0.0.1", proc.port), timeout=5) as raw,
                ctx.wrap_socket(raw) as tls,
            ):
                served = tls.getpeercert(binary_form=True)
            seen[name].add(_leaf(chains[name].read_bytes()))
            # a renewed one (the server re-reads its files every 5 s: not always the newest)
            assert served in seen[name] - {_leaf(first[name])}, name
