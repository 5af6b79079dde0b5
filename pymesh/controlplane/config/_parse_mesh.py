"""Istio's MeshConfig, as Istio keeps it: the ``mesh`` key of the ``istio`` ConfigMap.

istiod reads its mesh-wide settings from a ConfigMap named ``istio`` (``istio-<revision>``
for a revision) whose ``data.mesh`` is MeshConfig YAML. pymesh's control plane accepts the
same document unchanged and uses what concerns a proxyless data plane:
``pathNormalization.normalization`` (how inbound listeners normalize request paths before
authorization). Other MeshConfig fields are accepted and listed as unused.
"""

from __future__ import annotations

from typing import Any

import yaml

from pymesh.controlplane.config._issues import IssueSink
from pymesh.controlplane.config._reader import Reader
from pymesh.controlplane.config._types import PATH_NORMALIZATIONS, MeshSettings

__all__ = ["is_mesh_configmap", "parse_mesh_configmap"]

_USED = ("pathNormalization",)


def is_mesh_configmap(name: str, doc: dict[str, Any]) -> bool:
    """Whether a ConfigMap is Istio's mesh config (``istio`` or ``istio-<rev>`` with a
    ``data.mesh`` key; ``istio-ca-root-cert`` and the like are not)."""
    if name != "istio" and not name.startswith("istio-"):
        return False
    data = doc.get("data")
    return isinstance(data, dict) and "mesh" in data


def parse_mesh_configmap(doc: dict[str, Any], source: str, sink: IssueSink) -> MeshSettings | None:
    """The :class:`MeshSettings` in the ConfigMap's ``data.mesh`` (``None``: an error was
    recorded on ``sink``, naming the field)."""
    text = doc["data"]["mesh"]
    if not isinstance(text, str):
        sink.error("data.mesh", "expected a string of MeshConfig YAML")
        return None
    try:
        mesh = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        sink.error("data.mesh", f"malformed MeshConfig YAML{where}")
        return None
    if mesh is None:
        mesh = {}
    if not isinstance(mesh, dict):
        sink.error("data.mesh", "MeshConfig must be a mapping")
        return None
    reader = Reader(mesh, "data.mesh", sink)
    unused = sorted(str(k) for k in mesh if k not in _USED)
    if unused:
        sink.info("data.mesh", f"MeshConfig fields not used by pymesh: {', '.join(unused)}")
    normalization = "BASE"
    sub = reader.sub("pathNormalization")
    if sub is not None:
        sub.known(("normalization",))
        normalization = sub.enum("normalization", PATH_NORMALIZATIONS, "DEFAULT")
    if normalization == "DEFAULT":
        normalization = "BASE"
    return MeshSettings(path_normalization=normalization, source=source)
