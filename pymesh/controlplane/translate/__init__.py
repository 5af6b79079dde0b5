"""Istio config to xDS, the way istiod serves it (protos; the control plane may import them).

``Generator(config).generate(node, type_url, names)`` returns ``{name: message}`` for one
:class:`~pymesh.controlplane.config.ProxyNode`; ``names=None`` is a wildcard subscription.
"""

from __future__ import annotations

from pymesh.controlplane.config import ProxyNode
from pymesh.controlplane.translate._generator import Generator
from pymesh.controlplane.translate._names import (
    INBOUND_PREFIX,
    cluster_name,
    parse_cluster_name,
)

__all__ = ["INBOUND_PREFIX", "Generator", "ProxyNode", "cluster_name", "parse_cluster_name"]
