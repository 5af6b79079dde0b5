"""Istio configuration in: Kubernetes-style YAML of Istio's kinds, validated.

``load_config(paths)`` reads files or directories (multi-document YAML) of ServiceEntry,
WorkloadEntry, WorkloadGroup, VirtualService, DestinationRule, PeerAuthentication,
AuthorizationPolicy, plus plain Kubernetes ``v1 Service`` and ``apps/v1 Deployment``, and
returns an immutable :class:`MeshConfig` with every :class:`ConfigIssue` found (file,
document, kind/namespace/name, dotted field). A config with errors is never returned.
"""

from __future__ import annotations

from pymesh.controlplane.config._issues import ConfigIssue, IssueLevel
from pymesh.controlplane.config._load import load_config
from pymesh.controlplane.config._mesh import Endpoint, MeshConfig, labels_match
from pymesh.controlplane.config._node import ProxyNode
from pymesh.controlplane.config._parse_networking import fqdn
from pymesh.controlplane.config._types import (
    AuthorizationPolicySpec,
    DestinationRuleSpec,
    PeerAuthenticationSpec,
    ServicePort,
    ServiceSpec,
    VirtualServiceSpec,
    WorkloadEntrySpec,
    WorkloadGroupSpec,
)

__all__ = [
    "AuthorizationPolicySpec",
    "ConfigIssue",
    "DestinationRuleSpec",
    "Endpoint",
    "IssueLevel",
    "MeshConfig",
    "PeerAuthenticationSpec",
    "ProxyNode",
    "ServicePort",
    "ServiceSpec",
    "VirtualServiceSpec",
    "WorkloadEntrySpec",
    "WorkloadGroupSpec",
    "fqdn",
    "labels_match",
    "load_config",
]
