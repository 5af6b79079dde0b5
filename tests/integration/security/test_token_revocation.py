"""Token revocation in the embedded CA: a revoked token (by id, or by token file through
``pymesh token revoke``) is refused UNAUTHENTICATED, also by a CA already running in another
object (the list is re-read when its file changes); other tokens keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pymesh.controlplane.ca import CaRefused, CertificateAuthority
from pymesh.security import SpiffeId, build_csr, generate_key
from pymesh.security._token import token_id_of


def _sign(ca: CertificateAuthority, token: str, sa: str) -> tuple[str, ...]:
    caller = ca.authenticate({"authorization": f"Bearer {token}"})
    csr = build_csr(generate_key(), SpiffeId("cluster.local", "default", sa)).decode()
    return ca.sign(csr, 600, caller)


def test_revoked_token_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    running = CertificateAuthority(tmp_path / "ca")  # e.g. the control plane's, same state
    t1 = ca.create_token("default", "reviews")
    t2 = ca.create_token("default", "reviews")
    id1 = token_id_of(t1)
    assert id1 and id1 != token_id_of(t2)
    assert _sign(running, t1, "reviews")
    ca.revoke_token(id1)
    refused = 0
    for authority in (ca, running):
        with pytest.raises(CaRefused) as err:
            _sign(authority, t1, "reviews")
        assert err.value.code == "UNAUTHENTICATED" and "revoked" in str(err.value)
        refused += 1
    assert refused == 2 and running.stats["refused_revoked_token"] == 1
    assert _sign(running, t2, "reviews")  # another token of the same identity still works


def test_cli_revokes_a_token_file(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ca = CertificateAuthority(ca_dir)
    token = ca.create_token("default", "ratings")
    (tmp_path / "token").write_text(token + "\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pymesh",
            "token",
            "revoke",
            "--ca-dir",
            str(ca_dir),
            "--token-file",
            str(tmp_path / "token"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"revoked {token_id_of(token)}"
    with pytest.raises(CaRefused):
        _sign(ca, token, "ratings")
    bad = subprocess.run(
        [sys.executable, "-m", "pymesh", "token", "revoke", "--ca-dir", str(ca_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
