"""The control plane's public surface, pinned."""

from __future__ import annotations

import inspect

import pymesh.controlplane
from pymesh.controlplane import ControlPlane


def test_exports() -> None:
    assert pymesh.controlplane.__all__ == ["ControlPlane"]


def test_constructor_defaults_follow_istio() -> None:
    params = inspect.signature(ControlPlane).parameters
    assert params["xds_address"].default == "127.0.0.1:15010"
    assert params["admin_port"].default == 15014
    assert params["debounce"].default == 0.1  # PILOT_DEBOUNCE_AFTER
    assert params["max_debounce"].default == 1.0
    assert params["registration_grace"].default == 10.0  # PILOT_WORKLOAD_ENTRY_GRACE_PERIOD
    for name in ("start", "stop", "address", "__enter__", "__exit__"):
        assert hasattr(ControlPlane, name)
