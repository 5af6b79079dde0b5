"""``load_config``: files or directories of Kubernetes-style YAML in, a MeshConfig out.

All files are read and every document parsed before anything is returned; cross-document
checks (destination hosts and subsets, duplicates) run last. When any issue is an error the
result is ``None``: a bad file never half-applies, the caller keeps its last good config.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pymesh.controlplane.config._issues import ConfigIssue, IssueLevel, IssueSink
from pymesh.controlplane.config._mesh import MeshConfig, exported_to
from pymesh.controlplane.config._parse_k8s import parse_deployment, parse_k8s_service
from pymesh.controlplane.config._parse_networking import (
    parse_destination_rule,
    parse_service_entry,
    parse_virtual_service,
    parse_workload_entry,
    parse_workload_group,
)
from pymesh.controlplane.config._parse_security import (
    parse_authorization_policy,
    parse_peer_authentication,
)
from pymesh.controlplane.config._reader import Reader
from pymesh.controlplane.config._types import (
    AuthorizationPolicySpec,
    DestinationRuleSpec,
    PeerAuthenticationSpec,
    ServiceSpec,
    VirtualServiceSpec,
    WorkloadEntrySpec,
    WorkloadGroupSpec,
)

__all__ = ["load_config", "load_documents"]

_NETWORKING = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
_SECURITY = ("security.istio.io/v1", "security.istio.io/v1beta1")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_MAX_FILES = 10_000
_MAX_DOCS = 100_000

# Kinds that are valid Istio/Kubernetes config pymesh has no use for: noted, not warned.
_QUIET_KINDS = {"ServiceAccount", "Namespace", "ConfigMap", "Secret"}
_IGNORED_ISTIO_KINDS = {
    "Gateway",
    "Sidecar",
    "EnvoyFilter",
    "ProxyConfig",
    "Telemetry",
    "RequestAuthentication",
    "WasmPlugin",
}

_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Parser = Callable[[Reader, str, str], Any]
_PARSERS: dict[str, tuple[tuple[str, ...], Parser]] = {
    "ServiceEntry": (_NETWORKING, parse_service_entry),
    "WorkloadEntry": (_NETWORKING, parse_workload_entry),
    "WorkloadGroup": (_NETWORKING, parse_workload_group),
    "VirtualService": (_NETWORKING, parse_virtual_service),
    "DestinationRule": (_NETWORKING, parse_destination_rule),
    "PeerAuthentication": (_SECURITY, parse_peer_authentication),
    "AuthorizationPolicy": (_SECURITY, parse_authorization_policy),
    "Service": (("v1",), parse_k8s_service),
    "Deployment": (("apps/v1",), parse_deployment),
}


@dataclass
class _Doc:
    sink: IssueSink
    kind: str
    namespace: str
    name: str
    value: Any


def _files(paths: Sequence[Path], issues: list[ConfigIssue]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix in (".yaml", ".yml", ".json")
            )
            out.extend(found[:_MAX_FILES])
        elif p.is_file():
            out.append(p)
        else:
            issues.append(
                ConfigIssue(IssueLevel.ERROR, str(p), -1, "", "", "", "no such file or directory")
            )
    return out


def load_documents(
    paths: Sequence[Path], issues: list[ConfigIssue], digest: Any = None
) -> list[tuple[str, int, Any]]:
    """Read every YAML document of ``paths``: ``(file, index, document)``."""
    docs: list[tuple[str, int, Any]] = []
    for f in _files(paths, issues):
        try:
            data = f.read_bytes()
        except OSError as exc:
            issues.append(
                ConfigIssue(
                    IssueLevel.ERROR, str(f), -1, "", "", "", f"cannot read: {exc.strerror or exc}"
                )
            )
            continue
        if digest is not None:
            digest.update(str(f).encode() + b"\0" + data + b"\0")
        try:
            text = data.decode("utf-8")
            loaded = list(yaml.load_all(text, Loader=_LOADER))
        except UnicodeDecodeError:
            issues.append(
                ConfigIssue(IssueLevel.ERROR, str(f), -1, "", "", "", "file is not UTF-8 text")
            )
            continue
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            doc = text[: mark.index].count("\n---") if mark is not None else -1
            problem = getattr(exc, "problem", None) or str(exc)
            issues.append(
                ConfigIssue(
                    IssueLevel.ERROR, str(f), doc, "", "", "", f"malformed YAML{where}: {problem}"
                )
            )
            continue
        for i, doc in enumerate(loaded):
            if len(docs) >= _MAX_DOCS:
                break
            docs.append((str(f), i, doc))
    return docs


def _parse_doc(file: str, index: int, doc: Any, issues: list[ConfigIssue]) -> list[_Doc]:
    if doc is None:
        return []
    if not isinstance(doc, dict):
        issues.append(
            ConfigIssue(IssueLevel.ERROR, file, index, "", "", "", "document is not a mapping")
        )
        return []
    kind = doc.get("kind")
    api = doc.get("apiVersion")
    raw_meta = doc.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    raw_name, raw_ns = meta.get("name"), meta.get("namespace")
    name: str = raw_name if isinstance(raw_name, str) else ""
    namespace: str = raw_ns if isinstance(raw_ns, str) and raw_ns else "default"
    sink = IssueSink(issues, file, index, str(kind or ""), f"{namespace}/{name}")
    if not isinstance(kind, str) or not kind:
        sink.error("kind", "required field is missing")
        return []
    if kind == "List" and isinstance(doc.get("items"), list):
        out: list[_Doc] = []
        for item in doc["items"]:
            out.extend(_parse_doc(file, index, item, issues))
        return out
    if not isinstance(api, str) or not api:
        sink.error("apiVersion", "required field is missing")
        return []
    if not isinstance(doc.get("metadata"), dict):
        sink.error("metadata", "required field is missing")
        return []
    if kind in _QUIET_KINDS:
        return []
    if kind in _IGNORED_ISTIO_KINDS:
        sink.warn("", f"kind {kind} is not used by pymesh; ignored")
        return []
    entry = _PARSERS.get(kind)
    if entry is None or (api not in entry[0]):
        if entry is not None and kind not in ("Service", "Deployment"):
            sink.error("apiVersion", f"unsupported apiVersion {api!r} for {kind}")
        else:
            sink.warn("", f"unknown kind {api}/{kind}; ignored")
        return []
    if not name:
        sink.error("metadata.name", "required field is missing")
        return []
    if not _NAME.fullmatch(name) or len(name) > 253:
        sink.error("metadata.name", f"invalid name {name!r} (lower-case DNS-1123)")
    if not _NAME.fullmatch(namespace):
        sink.error("metadata.namespace", f"invalid namespace {namespace!r}")
    spec = doc.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        sink.error("spec", "expected a mapping")
        return []
    reader = Reader(spec, "spec", sink)
    value = entry[1](reader, name, namespace)
    if kind == "Deployment" and isinstance(value, WorkloadGroupSpec) and not value.labels:
        sink.warn("spec.template.metadata.labels", "no pod labels; nothing can select it")
    return [_Doc(sink, kind, namespace, name, value)]


def _cross_check(
    docs: list[_Doc],
    services: dict[str, ServiceSpec],
    rules: dict[str, list[DestinationRuleSpec]],
) -> None:
    routed: dict[tuple[str, str], str] = {}
    ruled: dict[tuple[str, str], str] = {}
    for d in docs:
        if d.kind == "VirtualService":
            vs: VirtualServiceSpec = d.value
            if "mesh" not in vs.gateways:
                d.sink.warn("spec.gateways", "not bound to the mesh gateway; pymesh ignores it")
                continue
            for i, h in enumerate(vs.hosts):
                first = routed.setdefault((vs.namespace, h), f"{vs.namespace}/{vs.name}")
                if first != f"{vs.namespace}/{vs.name}":
                    d.sink.warn(
                        f"spec.hosts[{i}]",
                        f"host {h} is already routed by VirtualService {first}; "
                        "this one is not used for it",
                    )
            for i, h in enumerate(vs.hosts):
                if "*" not in h and h not in services:
                    d.sink.warn(f"spec.hosts[{i}]", f"no service {h!r} in the configuration")
            for i, route in enumerate(vs.http):
                refs = [
                    (f"spec.http[{i}].route[{j}].destination", rd.destination)
                    for j, rd in enumerate(route.route)
                ]
                refs += [
                    (f"spec.http[{i}].mirrors[{j}].destination", m.destination)
                    for j, m in enumerate(route.mirrors)
                ]
                for path, dest in refs:
                    _check_destination(
                        d, path, dest.host, dest.subset, dest.port, vs.namespace, services, rules
                    )
        elif d.kind == "DestinationRule":
            dr: DestinationRuleSpec = d.value
            if dr.workload_selector is None:
                first = ruled.setdefault((dr.namespace, dr.host), f"{dr.namespace}/{dr.name}")
                if first != f"{dr.namespace}/{dr.name}":
                    d.sink.warn(
                        "spec.host",
                        f"host {dr.host} already has DestinationRule {first}; "
                        "this one's traffic policy is not used (its subsets still count)",
                    )
            if "*" not in dr.host and dr.host not in services:
                d.sink.warn("spec.host", f"no service {dr.host!r} in the configuration")
            svc = services.get(dr.host)
            if svc is not None:
                for j, pl in enumerate(dr.traffic_policy.port_level):
                    if svc.port(pl.port) is None:
                        d.sink.warn(
                            f"spec.trafficPolicy.portLevelSettings[{j}].port.number",
                            f"service {dr.host} has no port {pl.port}",
                        )


def _check_destination(  # noqa: PLR0917
    d: _Doc,
    path: str,
    host: str,
    subset: str,
    port: int | None,
    namespace: str,
    services: dict[str, ServiceSpec],
    rules: dict[str, list[DestinationRuleSpec]],
) -> None:
    svc = services.get(host)
    if svc is None:
        d.sink.error(f"{path}.host", f"destination host {host!r} is not a known service")
        return
    if port is not None and svc.port(port) is None:
        d.sink.error(f"{path}.port.number", f"service {host} has no port {port}")
    elif port is None and len(svc.ports) > 1:
        d.sink.info(f"{path}.port", f"service {host} has several ports; the listener's is used")
    if subset:
        defined = any(
            r.subset(subset) is not None and exported_to(r.export_to, r.namespace, namespace)
            for r in rules.get(host, ())
        )
        if not defined:
            d.sink.error(
                f"{path}.subset",
                f"subset {subset!r} of host {host} is not defined by any DestinationRule",
            )


def load_config(paths: Sequence[Path]) -> tuple[MeshConfig | None, list[ConfigIssue]]:
    """Load and validate every YAML document under ``paths`` (files or directories).

    Returns the config and every issue found; the config is ``None`` when any issue is an
    error (then the caller keeps serving its last good config).
    """
    issues: list[ConfigIssue] = []
    digest = hashlib.sha256()
    raw = load_documents([Path(p) for p in paths], issues, digest)
    files = sorted({f for f, _, _ in raw})
    docs: list[_Doc] = []
    for file, index, doc in raw:
        docs.extend(_parse_doc(file, index, doc, issues))
    seen: dict[tuple[str, str, str], _Doc] = {}
    for d in docs:
        key = (d.kind, d.namespace, d.name)
        first = seen.get(key)
        if first is not None:
            d.sink.error(
                "metadata.name",
                f"duplicate {d.kind} {d.namespace}/{d.name} "
                f"(first defined in {first.sink.file}:{first.sink.doc})",
            )
            d.value = None
        else:
            seen[key] = d
    live = [d for d in docs if d.value is not None]
    services: dict[str, ServiceSpec] = {}
    service_list: list[ServiceSpec] = []
    for d in live:
        if d.kind in ("ServiceEntry", "Service"):
            values = d.value if isinstance(d.value, list) else [d.value]
            for s in values:
                if s.hostname in services:
                    d.sink.warn(
                        "spec.hosts",
                        f"host {s.hostname} is already defined by "
                        f"{services[s.hostname].source}; this definition is ignored",
                    )
                    continue
                services[s.hostname] = s
                service_list.append(s)
    rules: list[DestinationRuleSpec] = [d.value for d in live if d.kind == "DestinationRule"]
    rules_by_host: dict[str, list[DestinationRuleSpec]] = {}
    for r in rules:
        rules_by_host.setdefault(r.host, []).append(r)
    _cross_check(live, services, rules_by_host)

    def of(kind: str) -> list[Any]:
        return [d.value for d in live if d.kind == kind]

    vss: list[VirtualServiceSpec] = [v for v in of("VirtualService") if "mesh" in v.gateways]
    entries: list[WorkloadEntrySpec] = of("WorkloadEntry")
    groups: list[WorkloadGroupSpec] = of("WorkloadGroup") + of("Deployment")
    pas: list[PeerAuthenticationSpec] = of("PeerAuthentication")
    aps: list[AuthorizationPolicySpec] = [
        a for a in of("AuthorizationPolicy") if a.action in ("ALLOW", "DENY")
    ]
    if any(i.is_error for i in issues):
        return None, issues
    return (
        MeshConfig(
            services=service_list,
            virtual_services=vss,
            destination_rules=rules,
            workload_entries=entries,
            workload_groups=groups,
            peer_authentications=pas,
            authorization_policies=aps,
            issues=issues,
            files=files,
            version=digest.hexdigest()[:16],
        ),
        issues,
    )
