"""The seam between the ADS server and the config/translation side.

The server needs five things from the configuration side: load files, describe a node, list
WorkloadGroups (for auto-registration), derive a config with registered workloads, and
generate xDS resources. :class:`Backend` names them; :class:`IstioBackend` (the default) wires
``pymesh.controlplane.config`` and ``pymesh.controlplane.translate``. Tests may pass another
backend to exercise the server alone.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from google.protobuf.message import Message

from pymesh.controlplane.registry import (
    GroupTemplate,
    NodeInfo,
    RegisteredWorkload,
    ports_from_metadata,
)
from pymesh.model.common import Locality

__all__ = ["Backend", "IstioBackend", "LoadResult", "ResourceGenerator", "to_jsonable"]


class ResourceGenerator(Protocol):
    def generate(
        self, node: Any, type_url: str, names: Collection[str] | None
    ) -> Mapping[str, Message]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class LoadResult:
    """``config`` is ``None`` when the files have errors (the last good config keeps serving).

    ``issues`` are rendered issue lines with their level (``Error``/``Warning``/``Info``).
    """

    config: Any
    issues: tuple[tuple[str, str], ...]

    @property
    def errors(self) -> tuple[str, ...]:
        return tuple(text for level, text in self.issues if level == "Error")


class Backend(Protocol):
    def load(self, paths: Sequence[Path]) -> LoadResult: ...

    def node(self, node_proto: Any) -> Any:
        """The config side's node (``ProxyNode``) for a ``core.v3.Node``."""
        ...

    def node_info(self, node: Any) -> NodeInfo: ...

    def groups(self, config: Any) -> Sequence[GroupTemplate]: ...

    def with_workloads(self, config: Any, workloads: Sequence[RegisteredWorkload]) -> Any: ...

    def generator(self, config: Any) -> ResourceGenerator: ...

    def describe(self, config: Any) -> object:
        """A JSON-able view of ``config`` for ``/debug/configz``."""
        ...


def to_jsonable(value: object, depth: int = 0) -> object:
    """Best-effort JSON view of frozen models (dataclasses, mappings, tuples, enums)."""
    if depth > 30:
        return "..."
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_jsonable(getattr(value, f.name), depth + 1)
            for f in dataclasses.fields(value)
            if not f.name.startswith("_")
        }
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [to_jsonable(v, depth + 1) for v in items]
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _str_map(value: object) -> dict[str, str]:
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str) and value:
        # Istio's LABELS can arrive as "k=v,k2=v2" from some agents.
        out: dict[str, str] = {}
        for part in value.split(","):
            k, sep, v = part.partition("=")
            if sep and k.strip():
                out[k.strip()] = v.strip()
        return out
    return {}


def _locality(value: object) -> Locality:
    if isinstance(value, Locality):
        return value
    if isinstance(value, str):
        parts = [*value.split("/"), "", "", ""]
        return Locality(parts[0], parts[1], parts[2])
    if value is None:
        return Locality()
    return Locality(
        str(getattr(value, "region", "") or ""),
        str(getattr(value, "zone", "") or ""),
        str(getattr(value, "sub_zone", "") or ""),
    )


def node_info_from(node: Any) -> NodeInfo:
    """Registration facts from a ``ProxyNode``-like object (duck-typed: attributes)."""
    metadata: Mapping[str, object] = getattr(node, "metadata", None) or {}
    ips = getattr(node, "ips", None) or ()
    if isinstance(ips, str):
        ips = tuple(p for p in ips.split(",") if p)
    health = str(metadata.get("PYMESH_HEALTH", "HEALTHY")).upper()
    if health not in ("HEALTHY", "UNHEALTHY", "DRAINING"):
        health = "HEALTHY"
    return NodeInfo(
        id=str(getattr(node, "id", "")),
        namespace=str(getattr(node, "namespace", "") or "default"),
        labels=_str_map(getattr(node, "labels", None)),
        service_account=str(getattr(node, "service_account", "") or ""),
        ips=tuple(str(i) for i in ips),
        locality=_locality(getattr(node, "locality", None)),
        group=str(metadata.get("AUTO_REGISTER_GROUP", "") or ""),
        ports=ports_from_metadata(metadata),
        health=health,
        network=str(metadata.get("NETWORK", "") or ""),
    )


class IstioBackend:
    """The default backend: Istio YAML through ``pymesh.controlplane.config``/``translate``.

    Reloads are incremental: documents whose text did not change are not parsed again
    (``ConfigLoader``); the result is the same as a fresh ``load_config``.
    """

    def __init__(self) -> None:
        self._loader: Any = None
        self._last_generator: Any = None

    def load(self, paths: Sequence[Path]) -> LoadResult:
        from pymesh.controlplane.config._load import ConfigLoader

        if self._loader is None:
            self._loader = ConfigLoader()
        config, issues = self._loader.load(list(paths))
        rendered = tuple((str(i.level.value), str(i)) for i in issues)
        if any(i.is_error for i in issues):
            config = None
        return LoadResult(config, rendered)

    def node(self, node_proto: Any) -> Any:
        from pymesh.controlplane.config import ProxyNode

        return ProxyNode.from_node_proto(node_proto)

    def node_info(self, node: Any) -> NodeInfo:
        return node_info_from(node)

    def groups(self, config: Any) -> Sequence[GroupTemplate]:
        return [_group_template(g) for g in getattr(config, "workload_groups", ()) or ()]

    def with_workloads(self, config: Any, workloads: Sequence[RegisteredWorkload]) -> Any:
        from pymesh.controlplane.config import WorkloadEntrySpec

        entries = [_entry_spec(WorkloadEntrySpec, w) for w in workloads]
        return config.with_workloads(entries)

    def generator(self, config: Any) -> ResourceGenerator:
        from pymesh.controlplane.translate import Generator

        # Built from the previous one: what cannot have changed is reused, not regenerated.
        previous = self._last_generator
        self._last_generator = None  # never keep two generations alive through this field
        generator = Generator(config, previous)
        self._last_generator = generator
        return generator

    def describe(self, config: Any) -> object:
        return {
            name: to_jsonable(getattr(config, name))
            for name in _CONFIG_PARTS
            if hasattr(config, name)
        }


_CONFIG_PARTS = (
    "version",
    "files",
    "services",
    "virtual_services",
    "destination_rules",
    "workload_entries",
    "workload_groups",
    "peer_authentications",
    "authorization_policies",
)


def _group_template(group: Any) -> GroupTemplate:
    """From the config side's ``WorkloadGroupSpec`` (template fields live on the group)."""
    ports_raw = getattr(group, "ports", None) or {}
    ports = {str(k): int(v) for k, v in ports_raw.items()} if isinstance(ports_raw, Mapping) else {}
    return GroupTemplate(
        namespace=str(getattr(group, "namespace", "") or "default"),
        name=str(getattr(group, "name", "")),
        labels=_str_map(getattr(group, "labels", None)),
        ports=ports,
        service_account=str(getattr(group, "service_account", "") or ""),
        network=str(getattr(group, "network", "") or ""),
        locality=str(getattr(group, "locality", "") or ""),
        weight=int(getattr(group, "weight", 0) or 0),
    )


def _entry_spec(cls: Any, w: RegisteredWorkload) -> Any:
    """The config side's ``WorkloadEntrySpec`` for a registration."""
    return cls(
        name=w.name,
        namespace=w.namespace,
        address=w.address,
        ports=w.ports,
        labels=w.labels,
        locality=_locality(w.locality),
        weight=w.weight or 1,
        network=w.network,
        service_account=w.service_account or "default",
        health=w.health,
        auto_registered=True,
        group=w.group,
    )
