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
from pymesh.controlplane.config._parse_mesh import is_mesh_configmap, parse_mesh_configmap
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
    ROOT_NAMESPACE,
    AuthorizationPolicySpec,
    DestinationRuleSpec,
    MeshSettings,
    PeerAuthenticationSpec,
    ServiceSpec,
    VirtualServiceSpec,
    WorkloadEntrySpec,
    WorkloadGroupSpec,
)
from pymesh.controlplane.config._yaml_fast import load_plain

__all__ = ["ConfigLoader", "load_config", "load_documents"]

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

_BASE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_RESOLVE_CACHE_MAX = 50_000
_resolve_cache: dict[tuple[str, bool], str] = {}
_BUILDING = object()


class _Fallback(Exception):
    """The document uses something the fast constructor leaves to PyYAML's own."""


def _construct(loader: Any, node: yaml.Node, memo: dict[int, Any]) -> Any:
    """PyYAML's safe construction for plain documents (str keys, default tags), without its
    per-node bookkeeping; anything else (merge keys, explicit tags, recursion) falls back."""
    key = id(node)
    value = memo.get(key)
    if value is not None:
        if value is _BUILDING:
            raise _Fallback
        return value
    cls = node.__class__
    if cls is yaml.ScalarNode:
        if node.tag == _STR_TAG:
            return node.value
        ctor = loader.yaml_constructors.get(node.tag)
        if ctor is None:
            raise _Fallback
        value = ctor(loader, node)
    elif cls is yaml.MappingNode:
        if node.tag != _MAP_TAG:
            raise _Fallback
        memo[key] = _BUILDING
        value = {}
        for key_node, value_node in node.value:
            if key_node.__class__ is not yaml.ScalarNode or key_node.tag != _STR_TAG:
                raise _Fallback  # merge keys, '=' keys, non-string keys: PyYAML decides
            value[key_node.value] = _construct(loader, value_node, memo)
    elif cls is yaml.SequenceNode:
        if node.tag != _SEQ_TAG:
            raise _Fallback
        memo[key] = _BUILDING
        value = [_construct(loader, item, memo) for item in node.value]
    else:
        raise _Fallback
    memo[key] = value
    return value


class _FastLoader(_BASE_LOADER):  # type: ignore[misc]
    """The C-parser safe loader with a memoised implicit-tag resolver and a lean constructor
    (same documents as ``yaml.CSafeLoader``, about a third less CPU)."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0]:
            ck = (value, bool(implicit[1]))
            tag = _resolve_cache.get(ck)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if len(_resolve_cache) < _RESOLVE_CACHE_MAX:
                    _resolve_cache[ck] = tag
            return tag
        return super().resolve(kind, value, implicit)

    def construct_document(self, node: Any) -> Any:
        try:
            return _construct(self, node, {})
        except _Fallback:
            return super().construct_document(node)


_LOADER: Any = _FastLoader
PLAIN_READER = True
"""Whether documents in the plain subset are read by ``_yaml_fast.load_plain`` (same
values, about a third of the CPU) instead of PyYAML; a switch for benchmarks."""

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
        except UnicodeDecodeError:
            issues.append(
                ConfigIssue(IssueLevel.ERROR, str(f), -1, "", "", "", "file is not UTF-8 text")
            )
            continue
        loaded = _load_file(f, text, issues)
        for i, doc in enumerate(loaded):
            if len(docs) >= _MAX_DOCS:
                break
            docs.append((str(f), i, doc))
    return docs


def _load_file(f: Path, text: str, issues: list[ConfigIssue]) -> list[Any]:
    """Every YAML document of one file's text (``[]`` and an issue when malformed)."""
    try:
        return list(yaml.load_all(text, Loader=_LOADER))
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
        return []


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
    if kind == "ConfigMap" and api == "v1" and is_mesh_configmap(name, doc):
        settings = parse_mesh_configmap(doc, f"{file}:{index}", sink)
        return [] if settings is None else [_Doc(sink, kind, namespace, name, settings)]
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


# A line that starts a YAML document ("---" then a space, a line end or the end of text).
_DOC_START = re.compile(r"^---(?=[ \t\r\n]|$)", re.MULTILINE)
# Directives and document-end markers make documents depend on each other: no splitting.
_NO_SPLIT = re.compile(r"^(?:%|\.\.\.(?:[ \t\r\n]|$))", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What the documents of one chunk of a file (one ``---`` section) parsed to: their count,
    the parse results (document index, kind, namespace, name, sink kind, sink name, value)
    and the issues parsing reported. Values are frozen specs, shared between loads."""

    count: int
    docs: tuple[tuple[int, str, str, str, str, str, Any], ...]
    issues: tuple[ConfigIssue, ...]


_ChunkKey = tuple[str, int, str]


def _chunks(text: str) -> list[str] | None:
    """``text`` cut before every document start marker (``None``: do not cut this file)."""
    if _NO_SPLIT.search(text) is not None:
        return None
    starts = [m.start() for m in _DOC_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def _parse_chunk(file: str, first: int, chunk: str) -> _Parsed | None:
    """Parse one chunk's documents (``None`` when its YAML is malformed: the caller parses
    the whole file, which reports the error with the file's own positions)."""
    loaded = load_plain(chunk) if PLAIN_READER else None
    if loaded is None:
        try:
            loaded = list(yaml.load_all(chunk, Loader=_LOADER))
        except yaml.YAMLError:
            return None
    issues: list[ConfigIssue] = []
    out: list[tuple[int, str, str, str, str, str, Any]] = []
    for i, doc in enumerate(loaded):
        for d in _parse_doc(file, first + i, doc, issues):
            out.append((first + i, d.kind, d.namespace, d.name, d.sink.kind, d.sink.name, d.value))
    return _Parsed(len(loaded), tuple(out), tuple(issues))


class ConfigLoader:
    """``load_config`` that remembers, between loads, what each document parsed to.

    A document (a ``---`` section of a file) whose text, file and position did not change
    since the previous load is neither re-read as YAML nor re-validated field by field: its
    parsed specs and issues are reused. The cross-document checks and the indexes always run
    on the whole set, so the result equals ``load_config``'s. Not thread-safe: one load at a
    time.
    """

    def __init__(self) -> None:
        self._cache: dict[_ChunkKey, _Parsed] = {}

    def load(self, paths: Sequence[Path]) -> tuple[MeshConfig | None, list[ConfigIssue]]:
        """Like :func:`load_config`."""
        used: dict[_ChunkKey, _Parsed] = {}
        result = _load(paths, self._cache, used)
        self._cache = used  # bounded by the current files' documents
        return result


def _read_cached(  # noqa: PLR0917
    files: list[Path],
    file_issues: list[ConfigIssue],
    issues: list[ConfigIssue],
    digest: Any,
    cache: dict[_ChunkKey, _Parsed],
    used: dict[_ChunkKey, _Parsed],
) -> tuple[list[str], list[_Doc]]:
    """Read and parse ``files`` chunk by chunk, reusing ``cache``; fills ``used``. Returns
    the files that have documents and the parsed documents (as ``load_documents`` then
    ``_parse_doc`` would). File-level problems go to ``file_issues``, document ones to
    ``issues`` (the order ``load_config`` reports them in: the former first)."""
    names: list[str] = []
    docs: list[_Doc] = []
    count = 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as exc:
            file_issues.append(
                ConfigIssue(
                    IssueLevel.ERROR, str(f), -1, "", "", "", f"cannot read: {exc.strerror or exc}"
                )
            )
            continue
        file = str(f)
        digest.update(file.encode() + b"\0" + data + b"\0")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            file_issues.append(
                ConfigIssue(IssueLevel.ERROR, file, -1, "", "", "", "file is not UTF-8 text")
            )
            continue
        chunks = _chunks(text)
        parsed: list[tuple[int, _Parsed]] | None = [] if chunks is not None else None
        first = 0
        for chunk in chunks or ():
            key = (file, first, chunk)
            hit = cache.get(key) or used.get(key)
            if hit is None:
                hit = _parse_chunk(file, first, chunk)
                if hit is None:
                    parsed = None
                    break
            assert parsed is not None
            parsed.append((first, hit))
            used[key] = hit
            first += hit.count
        if parsed is None:
            # Not splittable, or malformed: the whole file the plain way (exact positions).
            raw = _load_file(f, text, file_issues)
            kept = raw[: max(0, _MAX_DOCS - count)]
            count += len(kept)
            if kept:
                names.append(file)
            for index, doc in enumerate(kept):
                docs.extend(_parse_doc(file, index, doc, issues))
            continue
        for first, p in parsed:
            n = min(p.count, max(0, _MAX_DOCS - count))
            if n == 0:
                continue
            count += n
            if not names or names[-1] != file:
                names.append(file)
            issues.extend(i for i in p.issues if i.doc < first + n)
            for index, kind, ns, name, sink_kind, sink_name, value in p.docs:
                if index >= first + n:
                    break
                sink = IssueSink(issues, file, index, sink_kind, sink_name)
                docs.append(_Doc(sink, kind, ns, name, value))
    return names, docs


def load_config(paths: Sequence[Path]) -> tuple[MeshConfig | None, list[ConfigIssue]]:
    """Load and validate every YAML document under ``paths`` (files or directories).

    Returns the config and every issue found; the config is ``None`` when any issue is an
    error (then the caller keeps serving its last good config).
    """
    return _load(paths, {}, {})


def _load(
    paths: Sequence[Path], cache: dict[_ChunkKey, _Parsed], used: dict[_ChunkKey, _Parsed]
) -> tuple[MeshConfig | None, list[ConfigIssue]]:
    issues: list[ConfigIssue] = []
    file_issues: list[ConfigIssue] = []
    digest = hashlib.sha256()
    found = _files([Path(p) for p in paths], file_issues)
    names, docs = _read_cached(found, file_issues, issues, digest, cache, used)
    issues[:0] = file_issues  # the same list object: the documents' sinks append to it
    files = sorted(set(names))
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
    # istiod reads one mesh config (``istio``, or its revision's ``istio-<rev>``): prefer
    # ``istio-system/istio``, else the first found; the others are reported as unused.
    meshes = sorted(
        (d for d in live if d.kind == "ConfigMap"),
        key=lambda d: (d.name != "istio", d.namespace != ROOT_NAMESPACE),
    )
    for extra in meshes[1:]:
        extra.sink.warn(
            "data.mesh",
            f"ignored: pymesh uses one mesh config, {meshes[0].namespace}/{meshes[0].name} "
            f"({meshes[0].sink.file})",
        )
    if any(i.is_error for i in issues):
        return None, issues
    return (
        MeshConfig(
            mesh_settings=meshes[0].value if meshes else MeshSettings(),
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
