"""``pymesh control-plane --ca-dir`` + ``pymesh token create``: the CLI path end to end;
``--ca-insecure-skip-token`` is loud; ``--no-ca`` serves no CA."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pymesh.security import CaClient, CaError, SpiffeId, build_csr, generate_key

ME = SpiffeId("cluster.local", "default", "reviews")


@contextmanager
def control_plane(tmp_path: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    (tmp_path / "config").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pymesh",
            "control-plane",
            "-c",
            str(tmp_path / "config"),
            "--xds-address",
            "127.0.0.1:0",
            "--admin-port",
            "-1",
            *flags,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        address = None
        lines: list[str] = []
        while address is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"xDS on (\S+?)(,|$)", line.strip())
            if m:
                address = m.group(1)
        assert address, "".join(lines)
        proc.lines = lines  # type: ignore[attr-defined]
        yield address, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stderr is not None:
            proc.stderr.close()


def _csr() -> str:
    return build_csr(generate_key(), ME).decode()


def test_cli_ca_dir_and_token(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    token = subprocess.run(
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
            "--ca-dir",
            str(ca_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    with control_plane(tmp_path, "--ca-dir", str(ca_dir)) as (address, _):
        client = CaClient(address)
        try:
            chain = client.create_certificate(_csr(), 600, token)
            assert chain[-1] == (ca_dir / "root-cert.pem").read_text()
            with pytest.raises(CaError) as err:
                client.create_certificate(_csr(), 600, None)
            assert err.value.code == "UNAUTHENTICATED"
        finally:
            client.close()


def test_cli_insecure_mode_is_loud(tmp_path: Path) -> None:
    with control_plane(tmp_path, "--ca-dir", str(tmp_path / "ca"), "--ca-insecure-skip-token") as (
        address,
        proc,
    ):
        assert "INSECURE" in "".join(proc.lines)  # type: ignore[attr-defined]
        client = CaClient(address)
        try:
            assert client.create_certificate(_csr(), 600, None)
        finally:
            client.close()


def test_cli_no_ca(tmp_path: Path) -> None:
    with control_plane(tmp_path, "--no-ca") as (address, _):
        client = CaClient(address)
        try:
            with pytest.raises(CaError) as err:
                client.create_certificate(_csr(), 600, "x")
            assert err.value.code == "UNIMPLEMENTED"
        finally:
            client.close()
