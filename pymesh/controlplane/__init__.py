"""The embedded control plane: Istio configuration in, standard xDS out.

``ControlPlane`` runs in-process (tests, the demo) or as ``pymesh control-plane``.
"""

from __future__ import annotations

from pymesh.controlplane._controlplane import ControlPlane

__all__ = ["ControlPlane"]
