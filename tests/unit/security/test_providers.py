"""Certificate providers: file_watcher reloads, atomic swaps, subscribers; token CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pymesh.bootstrap import parse_bootstrap
from pymesh.controlplane.ca import CertificateAuthority
from pymesh.errors import ConfigError
from pymesh.security import CertificateBundle, FileWatcherProvider, StaticProvider, verify_token
from tests.unit.security.pki_helpers import ca_bundle


def _write(d: Path, b: CertificateBundle) -> None:
    (d / "cert-chain.pem").write_bytes(b.chain_pem)
    (d / "key.pem").write_bytes(b.key_pem)
    (d / "root-cert.pem").write_bytes(b.roots_pem)


def _bump(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_file_watcher_reloads_on_change_and_skips_half_written(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    d = tmp_path / "certs"
    d.mkdir()
    first, second = ca_bundle(ca, "default", "a"), ca_bundle(ca, "default", "b")
    _write(d, first)
    p = FileWatcherProvider(
        certificate_file=str(d / "cert-chain.pem"),
        private_key_file=str(d / "key.pem"),
        ca_certificate_file=str(d / "root-cert.pem"),
        start=False,
    )
    seen: list[str | None] = []
    p.subscribe(lambda b: seen.append(b.identity))
    assert p.current().identity == "spiffe://cluster.local/ns/default/sa/a"
    assert p.poll() is False and p.reloads == 1  # unchanged: no reload (stat only)
    # half-written: the new cert is there, the key is still the old one -> keep the old
    (d / "cert-chain.pem").write_bytes(second.chain_pem)
    _bump(d / "cert-chain.pem")
    assert p.poll() is False
    assert p.current().identity == "spiffe://cluster.local/ns/default/sa/a"
    (d / "key.pem").write_bytes(second.key_pem)
    _bump(d / "key.pem")
    assert p.poll() is True
    assert p.current().identity == "spiffe://cluster.local/ns/default/sa/b"
    assert seen == ["spiffe://cluster.local/ns/default/sa/b"]
    assert p.current().version == 2


def test_file_watcher_from_bootstrap(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    _write(tmp_path, ca_bundle(ca, "default", "a"))
    boot = parse_bootstrap(
        json.dumps(
            {
                "xds_servers": [
                    {"server_uri": "127.0.0.1:15010", "channel_creds": [{"type": "insecure"}]}
                ],
                "node": {"id": "sidecar~10.0.0.1~a.default~default.svc.cluster.local"},
                "certificate_providers": {
                    "default": {
                        "plugin_name": "file_watcher",
                        "config": {
                            "certificate_file": str(tmp_path / "cert-chain.pem"),
                            "private_key_file": str(tmp_path / "key.pem"),
                            "ca_certificate_file": str(tmp_path / "root-cert.pem"),
                            "refresh_interval": "900s",
                        },
                    }
                },
            }
        ),
        source="test",
    )
    inst = boot.default_certificate_provider
    assert inst is not None and inst.file_watcher is not None
    p = FileWatcherProvider.from_config(inst.file_watcher, start=False)
    assert p.refresh_interval == 900.0
    assert p.current().identity == "spiffe://cluster.local/ns/default/sa/a"


def test_bundle_rejects_key_mismatch(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    a, b = ca_bundle(ca, "default", "a"), ca_bundle(ca, "default", "b")
    with pytest.raises(ConfigError, match="does not match"):
        CertificateBundle.from_pem(a.chain_pem, b.key_pem, a.roots_pem)
    with pytest.raises(ConfigError, match="trust bundle"):
        CertificateBundle.from_pem(a.chain_pem, a.key_pem, b"")


def test_static_provider_versions_and_unsubscribe(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    p = StaticProvider(ca_bundle(ca, "default", "a"))
    calls: list[int] = []
    unsubscribe = p.subscribe(lambda b: calls.append(b.version))
    p.update(ca_bundle(ca, "default", "b"))
    unsubscribe()
    p.update(ca_bundle(ca, "default", "c"))
    assert calls == [2] and p.current().version == 3


def test_token_cli(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pymesh",
            "token",
            "create",
            "-n",
            "default",
            "-s",
            "reviews",
            "--ttl",
            "600",
            "--ca-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = out.stdout.strip()
    ca = CertificateAuthority(tmp_path)
    ident = ca.authenticate({"authorization": f"Bearer {token}"})
    assert ident is not None and ident.uri == "spiffe://cluster.local/ns/default/sa/reviews"
    assert verify_token  # the public verifier is exported
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "pymesh",
            "token",
            "create",
            "-n",
            "Bad_NS",
            "-s",
            "x",
            "--ca-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "invalid namespace" in bad.stderr


def test_file_watcher_thread_picks_up_a_rewrite(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    _write(tmp_path, ca_bundle(ca, "default", "a"))
    p = FileWatcherProvider(
        certificate_file=str(tmp_path / "cert-chain.pem"),
        private_key_file=str(tmp_path / "key.pem"),
        ca_certificate_file=str(tmp_path / "root-cert.pem"),
        refresh_interval=0.02,
    )
    try:
        changed = threading.Event()
        p.subscribe(lambda b: changed.set())
        _write(tmp_path, ca_bundle(ca, "default", "b"))
        for f in ("cert-chain.pem", "key.pem"):
            _bump(tmp_path / f)
        assert changed.wait(10)
        assert p.current().identity == "spiffe://cluster.local/ns/default/sa/b"
    finally:
        p.close()


def test_public_surface_is_pinned() -> None:
    import pymesh.controlplane.ca as ca_mod
    import pymesh.security as sec

    assert sorted(sec.__all__) == [
        "CaClient",
        "CaClientProvider",
        "CaError",
        "CertificateBundle",
        "CertificateProvider",
        "FileWatcherProvider",
        "MeshChannelCredentials",
        "MeshSSLContext",
        "PeerVerifier",
        "SpiffeId",
        "StaticProvider",
        "TokenError",
        "TokenIdentity",
        "build_csr",
        "channel_credentials",
        "client_ssl_context",
        "generate_key",
        "issue_token",
        "mesh_channel_credentials",
        "peer_identity",
        "renewal_time",
        "retry_delay",
        "server_credentials",
        "server_ssl_context",
        "split_chain",
        "uri_sans",
        "verify_token",
    ]
    assert sorted(ca_mod.__all__) == [
        "CaRefused",
        "CertificateAuthority",
        "add_ca_service",
        "ca_handler",
        "default_ca_dir",
        "lazy_authority",
    ]
    for mod in (sec, ca_mod):
        for name in mod.__all__:
            assert getattr(mod, name).__doc__, name
