"""Shared helpers for the control-plane translate tests."""

from __future__ import annotations

from pathlib import Path

from pymesh.controlplane.config import MeshConfig, load_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parents[3]
BOOKINFO = REPO.parent / "shared" / "istio-bookinfo"


def load_ok(*paths: Path) -> MeshConfig:
    config, issues = load_config(list(paths))
    errors = [str(i) for i in issues if i.is_error]
    assert errors == [], errors
    assert config is not None
    return config
