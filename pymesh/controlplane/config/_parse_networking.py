"""Parse ``networking.istio.io`` kinds (ServiceEntry, WorkloadEntry, WorkloadGroup,
VirtualService, DestinationRule) from YAML mappings into the frozen models.

Semantics follow Istio's API reference; each function reports problems with the dotted
field path and returns ``None`` only when nothing usable is left.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import types
from collections.abc import Mapping
from typing import Any

from pymesh.controlplane.config._reader import Reader
from pymesh.controlplane.config._types import (
    DOMAIN_SUFFIX,
    ConnectionPool,
    ConsistentHash,
    Destination,
    DestinationRuleSpec,
    DirectResponse,
    Fault,
    HeaderOps,
    HTTPMatch,
    HTTPRedirect,
    HTTPRetry,
    HTTPRewrite,
    HTTPRoute,
    LoadBalancer,
    LocalityLb,
    Mirror,
    OutlierDetection,
    PortLevelPolicy,
    Resolution,
    RouteDestination,
    ServicePort,
    ServiceSpec,
    StaticEndpoint,
    Subset,
    TLSSettings,
    TrafficPolicy,
    VirtualServiceSpec,
    WorkloadEntrySpec,
    WorkloadGroupSpec,
)
from pymesh.model.common import Locality
from pymesh.model.matcher import StringMatcher

__all__ = [
    "fqdn",
    "parse_destination_rule",
    "parse_locality",
    "parse_service_entry",
    "parse_virtual_service",
    "parse_workload_entry",
    "parse_workload_group",
]

PROTOCOLS = ("HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "UDP")
_HTTP_CODES = {301, 302, 303, 307, 308}


def fqdn(host: str, namespace: str) -> str:
    """Istio's short-name resolution: a name without dots is ``NAME.NS.svc.cluster.local``."""
    host = host.strip().lower()
    if not host or host == "*" or "." in host or host.startswith("*"):
        return host
    if _is_ip(host):
        return host
    return f"{host}.{namespace}.svc.{DOMAIN_SUFFIX}"


def parse_locality(r: Reader, key: str) -> Locality:
    text = r.str(key)
    if not text:
        return Locality()
    parts = text.split("/")
    if len(parts) > 3 or any(not p for p in parts):
        r.error(key, f"invalid locality {text!r} (expected region[/zone[/subzone]])")
        return Locality()
    parts += [""] * (3 - len(parts))
    return Locality(parts[0], parts[1], parts[2])


@functools.lru_cache(maxsize=65536)
def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def _check_address(r: Reader, key: str, value: str, *, allow_hostname: bool) -> bool:
    if value.startswith("unix://"):
        return True
    if _is_ip(value):
        return True
    if allow_hostname and re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value):
        return True
    r.error(key, f"invalid address {value!r}")
    return False


def _export_to(r: Reader) -> tuple[str, ...]:
    values = r.strs("exportTo")
    for v in values:
        if v not in {"*", "."} and not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", v):
            r.error("exportTo", f"invalid namespace {v!r}")
    return values or ("*",)


def _port_map(r: Reader, key: str) -> Mapping[str, int]:
    out: dict[str, int] = {}
    sub = r.sub(key)
    if sub is not None:
        for name in sub.data:
            value = sub.port(str(name))
            if value is not None:
                out[str(name)] = value
    return types.MappingProxyType(out)


def _workload_fields(r: Reader, *, address_required: bool) -> dict[str, object]:
    address = r.str("address", required=address_required)
    if address:
        _check_address(r, "address", address, allow_hostname=True)
    weight = r.int("weight", 1, minimum=0) or 1
    return {
        "address": address,
        "ports": _port_map(r, "ports"),
        "labels": r.str_map("labels"),
        "locality": parse_locality(r, "locality"),
        "weight": weight,
        "network": r.str("network"),
        "service_account": r.str("serviceAccount"),
    }


_WORKLOAD_KEYS = ("address", "ports", "labels", "locality", "weight", "network", "serviceAccount")
_PLAIN_KEYS = frozenset(("address", "ports", "labels"))
_FAST_ENDPOINTS = True
_NO_LABELS: Mapping[str, str] = types.MappingProxyType({})


def _plain_static_endpoint(data: Mapping[str, Any], port_names: set[str]) -> StaticEndpoint | None:
    """The common STATIC ServiceEntry endpoint (an IP address, named integer ports, string
    labels, nothing else) without the field-by-field reader: what the general path would
    build, or ``None`` when anything is unusual (the general path then validates and reports
    it)."""
    if not _PLAIN_KEYS.issuperset(data):
        return None
    address = data.get("address")
    if type(address) is not str or not address or not _is_ip(address):
        return None
    raw_ports = data.get("ports")
    ports: dict[str, int] = {}
    if raw_ports is not None:
        if type(raw_ports) is not dict:
            return None
        for k, v in raw_ports.items():
            if type(k) is not str or type(v) is not int or not 1 <= v <= 65535:
                return None
            if k not in port_names:
                return None
            ports[k] = v
    raw_labels = data.get("labels")
    labels = _NO_LABELS
    if raw_labels is not None:
        if type(raw_labels) is not dict:
            return None
        for k, v in raw_labels.items():
            if type(k) is not str or type(v) is not str:
                return None
        labels = types.MappingProxyType(dict(raw_labels))
    return StaticEndpoint(address=address, ports=types.MappingProxyType(ports), labels=labels)


def parse_service_entry(spec: Reader, name: str, namespace: str) -> list[ServiceSpec]:
    spec.known(
        (
            "hosts",
            "addresses",
            "ports",
            "location",
            "resolution",
            "endpoints",
            "workloadSelector",
            "exportTo",
            "subjectAltNames",
        )
    )
    hosts = spec.strs("hosts")
    if not hosts:
        spec.error("hosts", "at least one host is required")
    for i, h in enumerate(hosts):
        if h == "*" or not h:
            spec.sink.error(f"{spec.field('hosts')}[{i}]", "host must be a name, not '*'")
    addresses = spec.strs("addresses")
    for i, a in enumerate(addresses):
        try:
            ipaddress.ip_network(a, strict=False)
        except ValueError:
            spec.sink.error(f"{spec.field('addresses')}[{i}]", f"invalid address {a!r}")
    ports: list[ServicePort] = []
    seen_ports: set[int] = set()
    seen_names: set[str] = set()
    for p in spec.items("ports"):
        p.known(("number", "protocol", "name", "targetPort"))
        number = p.port("number", required=True)
        pname = p.str("name", required=True)
        protocol = p.str("protocol", "HTTP").upper() or "HTTP"
        if protocol not in PROTOCOLS:
            p.error("protocol", f"unknown protocol {protocol!r}")
        target = p.port("targetPort")
        if number is None:
            continue
        if number in seen_ports:
            p.error("number", f"duplicate port {number}")
        if pname in seen_names:
            p.error("name", f"duplicate port name {pname!r}")
        seen_ports.add(number)
        seen_names.add(pname)
        ports.append(ServicePort(number, pname, protocol, target))
    if not ports:
        spec.error("ports", "at least one port is required")
    location = spec.enum("location", ("MESH_EXTERNAL", "MESH_INTERNAL"), "MESH_INTERNAL")
    resolution = Resolution(
        spec.enum("resolution", [x.value for x in Resolution], Resolution.NONE.value)
    )
    endpoints: list[StaticEndpoint] = []
    fast = _FAST_ENDPOINTS and resolution is Resolution.STATIC
    for e in spec.items("endpoints"):
        if fast:
            plain = _plain_static_endpoint(e.data, seen_names)
            if plain is not None:
                endpoints.append(plain)
                continue
        e.known(_WORKLOAD_KEYS)
        f = _workload_fields(e, address_required=resolution is not Resolution.DNS)
        addr = str(f["address"])
        if not addr:
            continue
        if resolution is Resolution.STATIC and not _is_ip(addr) and not addr.startswith("unix://"):
            e.error("address", "resolution STATIC needs an IP address")
        for pn in f["ports"]:  # type: ignore[attr-defined]
            if pn not in seen_names:
                e.error(f"ports.{pn}", f"no service port named {pn!r}")
        endpoints.append(
            StaticEndpoint(
                address=addr,
                ports=f["ports"],  # type: ignore[arg-type]
                labels=f["labels"],  # type: ignore[arg-type]
                locality=f["locality"],  # type: ignore[arg-type]
                weight=int(f["weight"]),  # type: ignore[call-overload]
                network=str(f["network"]),
                service_account=str(f["service_account"]),
            )
        )
    selector: Mapping[str, str] | None = None
    ws = spec.sub("workloadSelector")
    if ws is not None:
        ws.known(("labels",))
        selector = ws.str_map("labels")
        if endpoints:
            spec.error("workloadSelector", "cannot be used together with endpoints")
    if resolution is Resolution.STATIC and not endpoints and selector is None:
        spec.warn("endpoints", "resolution STATIC without endpoints or workloadSelector")
    if resolution is Resolution.NONE and endpoints:
        spec.error("endpoints", "endpoints need resolution STATIC or DNS")
    export_to = _export_to(spec)
    return [
        ServiceSpec(
            hostname=fqdn(h, namespace),
            namespace=namespace,
            ports=tuple(ports),
            addresses=addresses,
            resolution=resolution,
            mesh_external=location == "MESH_EXTERNAL",
            endpoints=tuple(endpoints),
            selector=selector,
            export_to=export_to,
            source=f"ServiceEntry {namespace}/{name}",
        )
        for h in hosts
        if h and h != "*"
    ]


def parse_workload_entry(spec: Reader, name: str, namespace: str) -> WorkloadEntrySpec:
    spec.known(_WORKLOAD_KEYS)
    f = _workload_fields(spec, address_required=True)
    return WorkloadEntrySpec(
        name=name,
        namespace=namespace,
        address=str(f["address"]),
        ports=f["ports"],  # type: ignore[arg-type]
        labels=f["labels"],  # type: ignore[arg-type]
        locality=f["locality"],  # type: ignore[arg-type]
        weight=int(f["weight"]),  # type: ignore[call-overload]
        network=str(f["network"]),
        service_account=str(f["service_account"]) or "default",
    )


def parse_workload_group(spec: Reader, name: str, namespace: str) -> WorkloadGroupSpec:
    spec.known(("metadata", "template"), ignored=("probe",))
    labels: dict[str, str] = {}
    meta = spec.sub("metadata")
    if meta is not None:
        meta.known(("labels", "annotations"))
        labels.update(meta.str_map("labels"))
    template = spec.sub("template")
    if template is None:
        spec.error("template", "required field is missing")
        template = spec.sub_or_empty("template")
    template.known(_WORKLOAD_KEYS)
    if template.str("address"):
        template.error("address", "must be empty in a WorkloadGroup template")
    f = _workload_fields(template, address_required=False)
    labels.update(f["labels"])  # type: ignore[call-overload]
    return WorkloadGroupSpec(
        name=name,
        namespace=namespace,
        labels=types.MappingProxyType(labels),
        ports=f["ports"],  # type: ignore[arg-type]
        service_account=str(f["service_account"]) or "default",
        network=str(f["network"]),
        locality=f["locality"],  # type: ignore[arg-type]
        weight=int(f["weight"]),  # type: ignore[call-overload]
    )


# --- VirtualService ------------------------------------------------------------------------


def _string_match(r: Reader, *, ignore_case: bool = False) -> StringMatcher | None:
    """Istio ``StringMatch``: exactly one of exact/prefix/regex; ``{}`` = presence (None)."""
    r.known(("exact", "prefix", "regex"))
    kinds = [k for k in ("exact", "prefix", "regex") if r.has(k)]
    if len(kinds) > 1:
        r.error("", f"only one of exact/prefix/regex may be set, got {', '.join(kinds)}")
    if not kinds:
        return None
    kind = kinds[0]
    value = r.str(kind)
    if kind == "exact":
        return StringMatcher.exact(value, ignore_case=ignore_case)
    if kind == "prefix":
        return StringMatcher.prefix(value, ignore_case=ignore_case)
    try:
        return StringMatcher.regex(f"(?i){value}" if ignore_case else value)
    except re.error as exc:
        r.error("regex", f"invalid regular expression: {exc}")
        return None


def _named_matches(
    r: Reader, key: str, *, lower: bool
) -> tuple[tuple[str, StringMatcher | None], ...]:
    out: list[tuple[str, StringMatcher | None]] = []
    for hname, sub in r.map_items(key):
        if lower and hname != hname.lower():
            sub.error("", "header names must be lower case")
        out.append((hname.lower() if lower else hname, _string_match(sub)))
    return tuple(out)


def _match(r: Reader) -> HTTPMatch:
    r.known(
        (
            "name",
            "uri",
            "scheme",
            "method",
            "authority",
            "headers",
            "withoutHeaders",
            "queryParams",
            "sourceLabels",
            "sourceNamespace",
            "port",
            "ignoreUriCase",
            "gateways",
        ),
        ignored=("statPrefix",),
    )
    ignore_case = bool(r.bool("ignoreUriCase", False))
    uri = scheme = method = authority = None
    for key in ("uri", "scheme", "method", "authority"):
        sub = r.sub(key)
        if sub is None:
            continue
        m = _string_match(sub, ignore_case=ignore_case and key == "uri")
        if m is None:
            sub.error("", "one of exact/prefix/regex is required")
        if key == "uri":
            uri = m
        elif key == "scheme":
            scheme = m
        elif key == "method":
            method = m
        else:
            authority = m
    return HTTPMatch(
        name=r.str("name"),
        uri=uri,
        scheme=scheme,
        method=method,
        authority=authority,
        headers=_named_matches(r, "headers", lower=True),
        without_headers=_named_matches(r, "withoutHeaders", lower=True),
        query_params=_named_matches(r, "queryParams", lower=False),
        source_labels=r.str_map("sourceLabels"),
        source_namespace=r.str("sourceNamespace"),
        port=r.port("port"),
        ignore_uri_case=ignore_case,
        gateways=r.strs("gateways"),
    )


def _destination(r: Reader, namespace: str) -> Destination:
    r.known(("host", "subset", "port"))
    host = r.str("host", required=True)
    port = None
    pr = r.sub("port")
    if pr is not None:
        pr.known(("number",))
        port = pr.port("number", required=True)
    return Destination(fqdn(host, namespace), r.str("subset"), port)


def _header_ops(r: Reader | None) -> HeaderOps:
    if r is None:
        return HeaderOps()
    r.known(("request", "response"))
    parts: dict[str, object] = {}
    for side in ("request", "response"):
        sub = r.sub(side)
        if sub is None:
            continue
        sub.known(("set", "add", "remove"))
        parts[f"{side}_set"] = tuple(sub.str_map("set").items())
        parts[f"{side}_add"] = tuple(sub.str_map("add").items())
        parts[f"{side}_remove"] = sub.strs("remove")
    return HeaderOps(**parts)  # type: ignore[arg-type]


def _percentage(r: Reader, key: str = "percentage") -> float:
    sub = r.sub(key)
    if sub is None:
        return 100.0
    sub.known(("value",))
    value = sub.float("value", 0.0, minimum=0.0, maximum=100.0)
    return 0.0 if value is None else value


def _fault(r: Reader) -> Fault:
    r.known(("delay", "abort"))
    out: dict[str, object] = {}
    delay = r.sub("delay")
    if delay is not None:
        delay.known(("fixedDelay", "percentage", "percent"), ignored=("exponentialDelay",))
        fixed = delay.duration("fixedDelay")
        if fixed is None:
            delay.error("fixedDelay", "required field is missing")
        out["delay"] = fixed
        if delay.has("percent") and not delay.has("percentage"):
            pct = delay.int("percent", 100, minimum=0, maximum=100)
            out["delay_percent"] = float(pct or 0)
        else:
            out["delay_percent"] = _percentage(delay)
    abort = r.sub("abort")
    if abort is not None:
        abort.known(("httpStatus", "grpcStatus", "percentage"), ignored=("http2Error",))
        if abort.has("httpStatus") == abort.has("grpcStatus"):
            abort.error("", "exactly one of httpStatus or grpcStatus is required")
        if abort.has("httpStatus"):
            out["abort_http_status"] = abort.int("httpStatus", minimum=200, maximum=599)
        if abort.has("grpcStatus"):
            out["abort_grpc_status"] = _grpc_status(abort, "grpcStatus")
        out["abort_percent"] = _percentage(abort)
    if delay is None and abort is None:
        r.error("", "fault needs a delay or an abort")
    return Fault(**out)  # type: ignore[arg-type]


_GRPC_CODES = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
]


def _grpc_status(r: Reader, key: str) -> int | None:
    value = r.data.get(key)
    if isinstance(value, str) and not value.isdigit():
        if value.upper() not in _GRPC_CODES:
            r.error(key, f"unknown gRPC status {value!r}")
            return None
        return _GRPC_CODES.index(value.upper())
    return r.int(key, minimum=0, maximum=16)


def _retries(r: Reader) -> HTTPRetry:
    r.known(
        ("attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities"),
        ignored=("backoff", "retryIgnorePreviousHosts"),
    )
    attempts = r.int("attempts", 0, minimum=0)
    retry_on = r.str("retryOn")
    for part in filter(None, (p.strip() for p in retry_on.split(","))):
        if not (part.isdigit() or re.fullmatch(r"[a-z0-9_-]+", part)):
            r.error("retryOn", f"invalid retry condition {part!r}")
    return HTTPRetry(
        attempts=attempts or 0,
        per_try_timeout=r.duration("perTryTimeout", positive=True),
        retry_on=retry_on,
        retry_remote_localities=bool(r.bool("retryRemoteLocalities", False)),
    )


def _http_route(r: Reader, namespace: str) -> HTTPRoute:
    r.known(
        (
            "name",
            "match",
            "route",
            "redirect",
            "directResponse",
            "rewrite",
            "timeout",
            "retries",
            "fault",
            "mirror",
            "mirrors",
            "mirrorPercentage",
            "mirrorPercent",
            "mirror_percent",
            "headers",
            "corsPolicy",
            "delegate",
        )
    )
    if r.has("corsPolicy"):
        r.warn("corsPolicy", "CORS is not supported by pymesh; the policy is ignored")
    if r.has("delegate"):
        r.error("delegate", "delegate VirtualServices are not supported")
    matches = tuple(_match(m) for m in r.items("match"))
    dests: list[RouteDestination] = []
    items = r.items("route")
    for d in items:
        d.known(("destination", "weight", "headers"))
        dr = d.sub("destination")
        if dr is None:
            d.error("destination", "required field is missing")
            continue
        weight = d.int("weight", None, minimum=0)
        dests.append(
            RouteDestination(
                _destination(dr, namespace),
                100 if len(items) == 1 else (weight or 0),  # one destination: 100
                _header_ops(d.sub("headers")),
            )
        )
    if len(dests) > 1:
        total = sum(d.weight for d in dests)
        if total == 0:
            r.error("route", "weights of all destinations are 0")
        elif total != 100:
            r.error("route", f"total destination weight {total} != 100")
    actions = [k for k in ("route", "redirect", "directResponse") if r.has(k)]
    if len(actions) > 1:
        r.error("", f"only one of route/redirect/directResponse may be set, got {actions}")
    if not actions:
        r.error("route", "one of route, redirect or directResponse is required")
    redirect = None
    rd = r.sub("redirect")
    if rd is not None:
        rd.known(("uri", "authority", "port", "scheme", "redirectCode"), ignored=("derivePort",))
        code = rd.int("redirectCode", 301) or 301
        if code not in _HTTP_CODES:
            rd.error("redirectCode", f"unsupported redirect code {code}")
            code = 301
        redirect = HTTPRedirect(
            rd.str("uri"), rd.str("authority"), rd.port("port"), rd.str("scheme"), code
        )
    direct = None
    dresp = r.sub("directResponse")
    if dresp is not None:
        dresp.known(("status", "body"))
        status = dresp.int("status", minimum=200, maximum=599, required=True) or 200
        body = None
        b = dresp.sub("body")
        if b is not None:
            b.known(("string", "bytes"))
            body = b.str("string") if b.has("string") else None
            if b.has("bytes"):
                import base64
                import binascii

                try:
                    body = base64.b64decode(b.str("bytes"), validate=True).decode(
                        "utf-8", "replace"
                    )
                except (binascii.Error, ValueError):
                    b.error("bytes", "invalid base64")
        direct = DirectResponse(status, body)
    rewrite = None
    rw = r.sub("rewrite")
    if rw is not None:
        rw.known(("uri", "authority", "uriRegexRewrite"))
        rx = None
        rxr = rw.sub("uriRegexRewrite")
        if rxr is not None:
            rxr.known(("match", "rewrite"))
            pattern = rxr.str("match", required=True)
            try:
                re.compile(pattern)
            except re.error as exc:
                rxr.error("match", f"invalid regular expression: {exc}")
            rx = (pattern, rxr.str("rewrite"))
            if rw.has("uri"):
                rw.error("uri", "uri and uriRegexRewrite cannot both be set")
        rewrite = HTTPRewrite(
            rw.str("uri") if rw.has("uri") else None,
            rw.str("authority") if rw.has("authority") else None,
            rx,
        )
    mirrors: list[Mirror] = []
    legacy_pct = 100.0
    if r.has("mirrorPercentage"):
        legacy_pct = _percentage(r, "mirrorPercentage")
    elif r.has("mirrorPercent"):
        legacy_pct = float(r.int("mirrorPercent", 100, minimum=0, maximum=100) or 0)
    mr = r.sub("mirror")
    if mr is not None:
        mirrors.append(Mirror(_destination(mr, namespace), legacy_pct))
    for m in r.items("mirrors"):
        m.known(("destination", "percentage"))
        md = m.sub("destination")
        if md is None:
            m.error("destination", "required field is missing")
            continue
        mirrors.append(Mirror(_destination(md, namespace), _percentage(m)))
    if r.has("mirror") and r.has("mirrors"):
        r.error("mirrors", "mirror and mirrors cannot both be set")
    retries = None
    rr = r.sub("retries")
    if rr is not None:
        retries = _retries(rr)
    fault = None
    fr = r.sub("fault")
    if fr is not None:
        fault = _fault(fr)
    return HTTPRoute(
        name=r.str("name"),
        matches=matches,
        route=tuple(dests),
        redirect=redirect,
        direct_response=direct,
        rewrite=rewrite,
        timeout=r.duration("timeout"),
        retries=retries,
        fault=fault,
        mirrors=tuple(mirrors),
        headers=_header_ops(r.sub("headers")),
    )


def parse_virtual_service(spec: Reader, name: str, namespace: str) -> VirtualServiceSpec:
    spec.known(("hosts", "gateways", "http", "exportTo"), ignored=("tcp", "tls"))
    hosts = spec.strs("hosts")
    if not hosts:
        spec.error("hosts", "at least one host is required")
    gateways = spec.strs("gateways") or ("mesh",)
    http = tuple(_http_route(h, namespace) for h in spec.items("http"))
    return VirtualServiceSpec(
        name=name,
        namespace=namespace,
        hosts=tuple(fqdn(h, namespace) for h in hosts),
        http=http,
        gateways=gateways,
        export_to=_export_to(spec),
    )


# --- DestinationRule ------------------------------------------------------------------------

_SIMPLE_LB = ("UNSPECIFIED", "ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN", "RANDOM", "PASSTHROUGH")


def _load_balancer(r: Reader) -> LoadBalancer:
    r.known(("simple", "consistentHash", "localityLbSetting"), ignored=("warmupDurationSecs",))
    simple = ""
    if r.has("simple"):
        simple = r.enum("simple", _SIMPLE_LB, "UNSPECIFIED")
        if simple == "LEAST_CONN":
            simple = "LEAST_REQUEST"  # deprecated alias, as Istio treats it
    ch = None
    chr_ = r.sub("consistentHash")
    if chr_ is not None:
        if simple:
            r.error("consistentHash", "simple and consistentHash cannot both be set")
        chr_.known(
            (
                "httpHeaderName",
                "httpCookie",
                "useSourceIp",
                "httpQueryParameterName",
                "ringHash",
                "maglev",
                "minimumRingSize",
            )
        )
        keys = [
            k
            for k in ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
            if chr_.has(k)
        ]
        if len(keys) != 1:
            chr_.error("", "exactly one hash key (httpHeaderName, httpCookie, ...) is required")
        cookie = None
        ck = chr_.sub("httpCookie")
        if ck is not None:
            ck.known(("name", "path", "ttl"), ignored=("attributes",))
            cookie = (ck.str("name", required=True), ck.str("path"), ck.duration("ttl"))
        maglev = chr_.sub("maglev")
        ring = chr_.sub("ringHash")
        table = None
        min_ring = chr_.int("minimumRingSize", minimum=1)
        if maglev is not None:
            maglev.known(("tableSize",))
            table = maglev.int("tableSize", minimum=1)
        if ring is not None:
            ring.known(("minimumRingSize",))
            min_ring = ring.int("minimumRingSize", minimum=1) or min_ring
            if maglev is not None:
                chr_.error("maglev", "ringHash and maglev cannot both be set")
        ch = ConsistentHash(
            http_header_name=chr_.str("httpHeaderName"),
            http_cookie=cookie,
            use_source_ip=bool(chr_.bool("useSourceIp", False)),
            http_query_parameter_name=chr_.str("httpQueryParameterName"),
            maglev_table_size=table,
            use_maglev=maglev is not None,
            minimum_ring_size=min_ring,
        )
    loc = None
    lr = r.sub("localityLbSetting")
    if lr is not None:
        lr.known(("distribute", "failover", "failoverPriority", "enabled"))
        dist: list[tuple[str, tuple[tuple[str, int], ...]]] = []
        for d in lr.items("distribute"):
            d.known(("from", "to"))
            to: list[tuple[str, int]] = []
            tor = d.sub("to")
            total = 0
            if tor is not None:
                for k in tor.data:
                    w = tor.int(str(k), minimum=0, maximum=100)
                    if w is not None:
                        to.append((str(k), w))
                        total += w
            if total != 100:
                d.error("to", f"weights must sum to 100, got {total}")
            dist.append((d.str("from", required=True), tuple(to)))
        failover: list[tuple[str, str]] = []
        for f in lr.items("failover"):
            f.known(("from", "to"))
            src, dst = f.str("from", required=True), f.str("to", required=True)
            if src and src == dst:
                f.error("to", "failover 'to' must differ from 'from'")
            failover.append((src, dst))
        if dist and failover:
            lr.error("", "distribute and failover cannot both be set")
        loc = LocalityLb(
            enabled=bool(lr.bool("enabled", True)),
            distribute=tuple(dist),
            failover=tuple(failover),
            failover_priority=lr.strs("failoverPriority"),
        )
    return LoadBalancer(simple if simple != "UNSPECIFIED" else "", ch, loc)


def _connection_pool(r: Reader) -> ConnectionPool:
    r.known(("tcp", "http"))
    out: dict[str, object] = {}
    tcp = r.sub("tcp")
    if tcp is not None:
        tcp.known(
            ("maxConnections", "connectTimeout"),
            ignored=("tcpKeepalive", "maxConnectionDuration", "idleTimeout"),
        )
        out["max_connections"] = tcp.int("maxConnections", minimum=1)
        out["connect_timeout"] = tcp.duration("connectTimeout", positive=True)
    http = r.sub("http")
    if http is not None:
        http.known(
            (
                "http1MaxPendingRequests",
                "http2MaxRequests",
                "maxRequestsPerConnection",
                "maxRetries",
                "idleTimeout",
            ),
            ignored=("h2UpgradePolicy", "useClientProtocol", "maxConcurrentStreams"),
        )
        out["http1_max_pending_requests"] = http.int("http1MaxPendingRequests", minimum=1)
        out["http2_max_requests"] = http.int("http2MaxRequests", minimum=1)
        out["max_requests_per_connection"] = http.int("maxRequestsPerConnection", minimum=0)
        out["max_retries"] = http.int("maxRetries", minimum=0)
        out["idle_timeout"] = http.duration("idleTimeout", positive=True)
    return ConnectionPool(**out)  # type: ignore[arg-type]


def _outlier(r: Reader) -> OutlierDetection:
    r.known(
        (
            "consecutiveErrors",
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "consecutiveLocalOriginFailures",
            "splitExternalLocalOriginErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
        )
    )
    if r.has("consecutiveErrors"):
        r.warn("consecutiveErrors", "deprecated; use consecutiveGatewayErrors/5xxErrors")
    return OutlierDetection(
        consecutive_errors=r.int("consecutiveErrors", minimum=0),
        consecutive_5xx_errors=r.int("consecutive5xxErrors", minimum=0),
        consecutive_gateway_errors=r.int("consecutiveGatewayErrors", minimum=0),
        consecutive_local_origin_failures=r.int("consecutiveLocalOriginFailures", minimum=0),
        split_external_local_origin_errors=bool(r.bool("splitExternalLocalOriginErrors", False)),
        interval=r.duration("interval", positive=True),
        base_ejection_time=r.duration("baseEjectionTime", positive=True),
        max_ejection_percent=r.int("maxEjectionPercent", minimum=0, maximum=100),
        min_health_percent=r.int("minHealthPercent", minimum=0, maximum=100),
    )


def _tls(r: Reader) -> TLSSettings:
    r.known(
        (
            "mode",
            "clientCertificate",
            "privateKey",
            "caCertificates",
            "subjectAltNames",
            "sni",
            "insecureSkipVerify",
        ),
        ignored=("credentialName", "caCrl"),
    )
    mode = r.enum("mode", ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"), "DISABLE")
    out = TLSSettings(
        mode=mode,
        client_certificate=r.str("clientCertificate"),
        private_key=r.str("privateKey"),
        ca_certificates=r.str("caCertificates"),
        subject_alt_names=r.strs("subjectAltNames"),
        sni=r.str("sni"),
        insecure_skip_verify=bool(r.bool("insecureSkipVerify", False)),
    )
    if mode == "MUTUAL" and not (out.client_certificate and out.private_key):
        r.error("", "mode MUTUAL needs clientCertificate and privateKey")
    return out


def _policy_parts(r: Reader) -> dict[str, object]:
    out: dict[str, object] = {}
    if (s := r.sub("loadBalancer")) is not None:
        out["load_balancer"] = _load_balancer(s)
    if (s := r.sub("connectionPool")) is not None:
        out["connection_pool"] = _connection_pool(s)
    if (s := r.sub("outlierDetection")) is not None:
        out["outlier_detection"] = _outlier(s)
    if (s := r.sub("tls")) is not None:
        out["tls"] = _tls(s)
    return out


def _traffic_policy(r: Reader) -> TrafficPolicy:
    r.known(
        ("loadBalancer", "connectionPool", "outlierDetection", "tls", "portLevelSettings"),
        ignored=("tunnel", "proxyProtocol", "retryBudget"),
    )
    levels: list[PortLevelPolicy] = []
    seen: set[int] = set()
    for pl in r.items("portLevelSettings"):
        pl.known(("port", "loadBalancer", "connectionPool", "outlierDetection", "tls"))
        port = None
        pr = pl.sub("port")
        if pr is None:
            pl.error("port", "required field is missing")
        else:
            pr.known(("number",))
            port = pr.port("number", required=True)
        if port is None:
            continue
        if port in seen:
            pl.error("port.number", f"duplicate port {port}")
        seen.add(port)
        levels.append(PortLevelPolicy(port=port, **_policy_parts(pl)))  # type: ignore[arg-type]
    return TrafficPolicy(port_level=tuple(levels), **_policy_parts(r))  # type: ignore[arg-type]


def parse_destination_rule(spec: Reader, name: str, namespace: str) -> DestinationRuleSpec:
    spec.known(("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"))
    host = spec.str("host", required=True)
    tp = spec.sub("trafficPolicy")
    subsets: list[Subset] = []
    names: set[str] = set()
    for s in spec.items("subsets"):
        s.known(("name", "labels", "trafficPolicy"))
        sname = s.str("name", required=True)
        if sname in names:
            s.error("name", f"duplicate subset name {sname!r}")
        names.add(sname)
        stp = s.sub("trafficPolicy")
        subsets.append(
            Subset(sname, s.str_map("labels"), _traffic_policy(stp) if stp is not None else None)
        )
    selector = None
    ws = spec.sub("workloadSelector")
    if ws is not None:
        ws.known(("matchLabels",))
        selector = ws.str_map("matchLabels")
    return DestinationRuleSpec(
        name=name,
        namespace=namespace,
        host=fqdn(host, namespace),
        traffic_policy=_traffic_policy(tp) if tp is not None else TrafficPolicy(),
        subsets=tuple(subsets),
        export_to=_export_to(spec),
        workload_selector=selector,
    )
