"""HTTP filter decoders: filter-list rules (A39), fault (A33), RBAC (A41), overrides."""

from __future__ import annotations

import json
import pathlib
import subprocess
from typing import Any

import pytest
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format
from udpa.type.v1 import typed_struct_pb2  # noqa: F401

from pymesh.errors import ResourceError
from pymesh.model.http_filters import (
    AndRule,
    AnyRule,
    AuthenticatedPrincipal,
    DestinationIp,
    DestinationPort,
    DestinationPortRange,
    FaultConfig,
    HeaderRule,
    IpRule,
    IpSource,
    MetadataRule,
    NotRule,
    OrRule,
    RbacAction,
    RbacConfig,
    RbacPerRoute,
    RequestedServerName,
    RouterConfig,
    UrlPathRule,
)
from pymesh.model.route import FractionalPercent, OpaqueConfig
from pymesh.xds.codec._common import Ctx
from pymesh.xds.codec.http_filters import decode_filter_overrides, decode_http_filters

T = "type.googleapis.com/envoy.extensions.filters.http."
ROUTER = {"name": "envoy.filters.http.router", "typedConfig": {"@type": T + "router.v3.Router"}}
FAULT_X = {"name": "x", "typedConfig": {"@type": T + "fault.v3.HTTPFault"}}
CTX = Ctx("Listener", "l")


def filters(*items: dict[str, Any]) -> Any:
    msg = json_format.ParseDict({"httpFilters": list(items)}, hcm_pb2.HttpConnectionManager())
    return decode_http_filters(msg.http_filters, CTX, "http_filters")


def fault(cfg: dict[str, Any]) -> FaultConfig:
    out = filters({"name": "f", "typedConfig": {"@type": T + "fault.v3.HTTPFault", **cfg}}, ROUTER)
    assert isinstance(out[0].config, FaultConfig)
    return out[0].config


def rbac(cfg: dict[str, Any]) -> RbacConfig:
    out = filters({"name": "r", "typedConfig": {"@type": T + "rbac.v3.RBAC", **cfg}}, ROUTER)
    assert isinstance(out[0].config, RbacConfig)
    return out[0].config


def rejected(call: Any, field: str, message: str) -> None:
    with pytest.raises(ResourceError) as err:
        call()
    assert err.value.field == field
    assert err.value.resource_name == "l"
    assert message in err.value.message


# --------------------------------------------------------------------------- filter list


def test_router_only() -> None:
    (f,) = filters(ROUTER)
    assert f.is_router and f.config == RouterConfig()


def test_router_flags_and_typed_struct() -> None:
    (f,) = filters(
        {
            "name": "router",
            "typedConfig": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "typeUrl": T + "router.v3.Router",
                "value": {"suppress_envoy_headers": True, "start_child_span": True},
            },
        }
    )
    assert f.config == RouterConfig(suppress_envoy_headers=True, start_child_span=True)


def test_optional_unknown_filter_dropped_istio_filters_opaque() -> None:
    out = filters(
        {
            "name": "wasm",
            "isOptional": True,
            "typedConfig": {"@type": T + "wasm.v3.Wasm"},
        },
        {
            "name": "istio.metadata_exchange",
            "typedConfig": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "typeUrl": "type.googleapis.com/istio.envoy.config.filter.http.metadata_exchange",
                "value": {"protocol": "istio-peer-exchange"},
            },
        },
        {
            "name": "waypoint_downstream_peer_metadata",
            "typedConfig": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "typeUrl": "type.googleapis.com/io.istio.http.peer_metadata.Config",
                "value": {"downstream_discovery": [{"workload_discovery": {}}]},
            },
        },
        {
            "name": "istio.stats",
            "typedConfig": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "typeUrl": "type.googleapis.com/stats.PluginConfig",
                "value": {},
            },
        },
        ROUTER,
    )
    assert [f.name for f in out] == [
        "istio.metadata_exchange",
        "waypoint_downstream_peer_metadata",
        "istio.stats",
        "envoy.filters.http.router",
    ]
    assert isinstance(out[0].config, OpaqueConfig)
    assert out[0].config.config["protocol"] == "istio-peer-exchange"


FILTER_LIST_REJECTED: list[tuple[Any, str, str]] = [
    ((), "http_filters", "empty"),
    (
        ({"name": "x", "typedConfig": {"@type": T + "fault.v3.HTTPFault"}},),
        "http_filters[0]",
        "not a terminal",
    ),
    (
        (ROUTER, {"name": "x", "typedConfig": {"@type": T + "fault.v3.HTTPFault"}}),
        "http_filters[0]",
        "not the last",
    ),
    (({"typedConfig": {"@type": T + "router.v3.Router"}},), "http_filters[0].name", "empty"),
    ((FAULT_X, FAULT_X, ROUTER), "http_filters[1].name", "duplicate"),
    (
        ({"name": "w", "typedConfig": {"@type": T + "wasm.v3.Wasm"}}, ROUTER),
        "http_filters[0].typed_config",
        "unsupported HTTP filter type",
    ),
    (({"name": "nocfg"}, ROUTER), "http_filters[0]", "no typed_config"),
    (
        (
            {
                "name": "ts",
                "typedConfig": {
                    "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                    "value": {},
                },
            },
            ROUTER,
        ),
        "http_filters[0].typed_config.type_url",
        "TypedStruct without type_url",
    ),
]


@pytest.mark.parametrize(("items", "field", "message"), FILTER_LIST_REJECTED)
def test_filter_list_rejected(items: tuple[dict[str, Any], ...], field: str, message: str) -> None:
    rejected(lambda: filters(*items), field, message)


# --------------------------------------------------------------------------- fault


def test_fault_fixed_delay_and_http_abort() -> None:
    cfg = fault(
        {
            "delay": {
                "fixedDelay": "0.250s",
                "percentage": {"numerator": 5, "denominator": "TEN_THOUSAND"},
            },
            "abort": {"httpStatus": 503, "percentage": {"numerator": 100}},
            "maxActiveFaults": 3,
            "headers": [{"name": "x-fault", "presentMatch": True}],
            "upstreamCluster": "outbound|9080||ratings",
            "downstreamNodes": ["a"],
        }
    )
    assert cfg.delay is not None and cfg.delay.fixed_delay == 0.25
    assert cfg.delay.percentage == FractionalPercent(5, 10_000)
    assert cfg.abort is not None and cfg.abort.http_status == 503
    assert cfg.abort.percentage.fraction == 1.0
    assert cfg.max_active_faults == 3
    assert cfg.headers[0].name == "x-fault" and cfg.headers[0].present_match
    assert cfg.upstream_cluster == "outbound|9080||ratings"
    assert cfg.downstream_nodes == ("a",)


def test_fault_header_controlled_and_grpc() -> None:
    cfg = fault({"delay": {"headerDelay": {}}, "abort": {"headerAbort": {}}})
    assert cfg.delay is not None and cfg.delay.header_delay and cfg.delay.fixed_delay is None
    assert cfg.delay.percentage == FractionalPercent(0, 100)
    assert cfg.abort is not None and cfg.abort.header_abort
    assert fault({"abort": {"grpcStatus": 14}}).abort.grpc_status == 14  # type: ignore[union-attr]
    assert fault({"abort": {"grpcStatus": 99}}).abort.grpc_status == 99  # type: ignore[union-attr]
    assert fault({}) == FaultConfig()


FAULT_REJECTED: list[tuple[Any, str, str]] = [
    (
        {"delay": {"percentage": {"numerator": 1}}},
        "http_filters[0].typed_config.delay",
        "fixed_delay or header_delay",
    ),
    (
        {"delay": {"fixedDelay": "-2s"}},
        "http_filters[0].typed_config.delay.fixed_delay",
        "out of range",
    ),
    ({"abort": {}}, "http_filters[0].typed_config.abort", "http_status, grpc_status"),
    ({"abort": {"httpStatus": 600}}, "http_filters[0].typed_config.abort.http_status", "600"),
    (
        {"abort": {"httpStatus": 500, "percentage": {"numerator": 1, "denominator": 7}}},
        "http_filters[0].typed_config.abort.percentage.denominator",
        "unknown denominator",
    ),
    (
        {"headers": [{"name": "a", "safeRegexMatch": {"regex": "("}}]},
        "http_filters[0].typed_config.headers[0].safe_regex_match.regex",
        "invalid regex",
    ),
]


@pytest.mark.parametrize(("cfg", "field", "message"), FAULT_REJECTED)
def test_fault_rejected(cfg: dict[str, Any], field: str, message: str) -> None:
    rejected(lambda: fault(cfg), field, message)


# --------------------------------------------------------------------------- RBAC


def test_rbac_no_rules_allows_everything_and_shadow_ignored() -> None:
    assert rbac({}) == RbacConfig(None)
    assert rbac({"shadowRules": {"action": "DENY"}}) == RbacConfig(None)


def test_rbac_full_tree() -> None:
    cfg = rbac(
        {
            "rules": {
                "action": "DENY",
                "policies": {
                    "b": {
                        "permissions": [
                            {
                                "andRules": {
                                    "rules": [{"any": True}, {"notRule": {"destinationPort": 80}}]
                                }
                            },
                            {
                                "orRules": {
                                    "rules": [{"header": {"name": ":method", "exactMatch": "GET"}}]
                                }
                            },
                            {"urlPath": {"path": {"prefix": "/pkg.Svc/"}}},
                            {"destinationIp": {"addressPrefix": "10.0.0.1", "prefixLen": 8}},
                            {"destinationPortRange": {"start": 8000, "end": 9000}},
                            {"metadata": {"filter": "envoy.filters.http.jwt_authn"}},
                            {"requestedServerName": {"exact": ""}},
                        ],
                        "principals": [
                            {
                                "authenticated": {
                                    "principalName": {"exact": "spiffe://td/ns/a/sa/b"}
                                }
                            },
                            {"authenticated": {}},
                            {"sourceIp": {"addressPrefix": "::1", "prefixLen": 128}},
                            {"remoteIp": {"addressPrefix": "192.168.0.0", "prefixLen": 16}},
                            {
                                "orIds": {
                                    "ids": [
                                        {"notId": {"any": True}},
                                        {"urlPath": {"path": {"exact": "/x"}}},
                                    ]
                                }
                            },
                            {"metadata": {"filter": "f"}},
                        ],
                    },
                    "a": {"permissions": [{"any": True}], "principals": [{"any": True}]},
                },
            }
        }
    )
    assert cfg.rules is not None and cfg.rules.action is RbacAction.DENY
    assert list(cfg.rules.policies) == ["a", "b"]
    perms = cfg.rules.policies["b"].permissions
    assert perms[0] == AndRule((AnyRule(), NotRule(DestinationPort(80))))
    assert isinstance(perms[1], OrRule) and isinstance(perms[1].rules[0], HeaderRule)
    assert isinstance(perms[2], UrlPathRule) and perms[2].matcher.matches("/pkg.Svc/M")
    assert isinstance(perms[3], DestinationIp) and str(perms[3].cidr) == "10.0.0.0/8"
    assert perms[4] == DestinationPortRange(8000, 9000)
    assert perms[5] == MetadataRule("envoy.filters.http.jwt_authn")
    assert isinstance(perms[6], RequestedServerName)
    pr = cfg.rules.policies["b"].principals
    assert isinstance(pr[0], AuthenticatedPrincipal) and pr[0].principal_name is not None
    assert pr[1] == AuthenticatedPrincipal(None)
    assert isinstance(pr[2], IpRule) and pr[2].source is IpSource.SOURCE_IP
    assert pr[2].cidr.contains("::1") and not pr[2].cidr.contains("127.0.0.1")
    assert isinstance(pr[3], IpRule) and pr[3].source is IpSource.REMOTE_IP
    assert isinstance(pr[4], OrRule) and pr[4].rules[0] == NotRule(AnyRule())
    assert isinstance(pr[5], MetadataRule)


def _policy(
    perm: dict[str, Any] | None = None, principal: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "rules": {
            "policies": {
                "p": {
                    "permissions": [{"any": True} if perm is None else perm],
                    "principals": [{"any": True} if principal is None else principal],
                }
            }
        }
    }


P = "http_filters[0].typed_config.rules.policies[p]"


RBAC_REJECTED: list[tuple[Any, str, str]] = [
    (
        _policy({"header": {"name": "grpc-timeout", "presentMatch": True}}),
        f"{P}.permissions[0].header.name",
        "cannot match",
    ),
    (
        _policy(principal={"header": {"name": ":scheme", "exactMatch": "https"}}),
        f"{P}.principals[0].header.name",
        "cannot match",
    ),
    (_policy({"any": False}), f"{P}.permissions[0].any", "must be true"),
    (_policy({}), f"{P}.permissions[0]", "no rule"),
    (
        _policy({"destinationIp": {"addressPrefix": "nope"}}),
        f"{P}.permissions[0].destination_ip.address_prefix",
        "invalid IP",
    ),
    (_policy({"urlPath": {}}), f"{P}.permissions[0].url_path.path", "needs a path"),
    (
        _policy(
            {
                "uriTemplate": {
                    "name": "x",
                    "typedConfig": {
                        "@type": "type.googleapis.com/google.protobuf.Struct",
                        "value": {},
                    },
                }
            }
        ),
        f"{P}.permissions[0].uri_template",
        "unsupported RBAC permission",
    ),
    (
        _policy(principal={"authenticated": {"principalName": {"safeRegex": {"regex": "a(b"}}}}),
        f"{P}.principals[0].authenticated.principal_name.safe_regex.regex",
        "invalid regex",
    ),
    (
        {
            "rules": {
                "policies": {
                    "p": {
                        "permissions": [{"any": True}],
                        "principals": [{"any": True}],
                        "condition": {"constExpr": {"boolValue": True}},
                    }
                }
            }
        },
        f"{P}.condition",
        "CEL",
    ),
    (
        {"rules": {"policies": {"p": {"principals": [{"any": True}]}}}},
        f"{P}.permissions",
        "at least one",
    ),
    (
        {"rules": {"policies": {"p": {"permissions": [{"any": True}]}}}},
        f"{P}.principals",
        "at least one",
    ),
    ({"matcher": {}}, "http_filters[0].typed_config.matcher", "not supported"),
    (
        _policy({"destinationPortRange": {"start": 9, "end": 9}}),
        f"{P}.permissions[0].destination_port_range",
        "empty port range",
    ),
]


@pytest.mark.parametrize(("cfg", "field", "message"), RBAC_REJECTED)
def test_rbac_rejected(cfg: dict[str, Any], field: str, message: str) -> None:
    rejected(lambda: rbac(cfg), field, message)


def test_rbac_cidr_prefix_len_clamped() -> None:
    cfg = rbac(_policy({"destinationIp": {"addressPrefix": "10.0.0.7", "prefixLen": 33}}))
    assert cfg.rules is not None
    perm = cfg.rules.policies["p"].permissions[0]
    assert isinstance(perm, DestinationIp) and str(perm.cidr) == "10.0.0.7/32"


def test_rbac_deep_nesting_is_bounded() -> None:
    node: dict[str, Any] = {"any": True}
    for _ in range(40):
        node = {"notRule": node}
    cfg = rbac(_policy(node))
    assert cfg.rules is not None


# --------------------------------------------------------------------------- overrides


def overrides(d: dict[str, Any]) -> Any:
    msg = json_format.ParseDict({"typedPerFilterConfig": d}, route_components_pb2.Route())
    return decode_filter_overrides(msg.typed_per_filter_config, CTX, "typed_per_filter_config")


def test_overrides_rbac_per_route_and_fault() -> None:
    out = overrides(
        {
            "rbac": {"@type": T + "rbac.v3.RBACPerRoute", "rbac": _policy()},
            "rbac-off": {"@type": T + "rbac.v3.RBACPerRoute"},
            "fault": {"@type": T + "fault.v3.HTTPFault", "abort": {"httpStatus": 418}},
            "cors": {"@type": T + "cors.v3.CorsPolicy"},
        }
    )
    assert isinstance(out["rbac"].config, RbacPerRoute) and out["rbac"].config.rbac is not None
    assert out["rbac-off"].config == RbacPerRoute(None)
    assert out["fault"].config.abort.http_status == 418
    assert isinstance(out["cors"].config, OpaqueConfig)


def test_overrides_rejected() -> None:
    rejected(
        lambda: overrides({"x": {"@type": T + "router.v3.Router"}}),
        "typed_per_filter_config[x]",
        "unsupported filter override",
    )
    rejected(
        lambda: overrides(
            {"x": {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig"}}
        ),
        "typed_per_filter_config[x].config",
        "without config",
    )
    rejected(
        lambda: overrides(
            {
                "x": {
                    "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                    "config": {"@type": T + "router.v3.Router"},
                }
            }
        ),
        "typed_per_filter_config[x].config",
        "unsupported filter override",
    )


# --------------------------------------------------------------------------- Envoy oracle

# Rejections that follow gRPC where Envoy is more lenient (gRFC A39/A41), plus the RBAC
# ``matcher`` API we do not implement (ignoring it would widen access).
GRPC_STRICTER = {
    "http_filters",  # empty filter list
    "http_filters[1].name",  # duplicate filter names
    f"{P}.permissions[0].header.name",  # grpc-* header
    f"{P}.principals[0].header.name",  # :scheme
    f"{P}.condition",  # CEL
    "http_filters[0].typed_config.matcher",
}
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."


def _envoy_accepts(envoy_bin: pathlib.Path, tmp: pathlib.Path, http_filters: list[Any]) -> bool:
    hcm = {
        "@type": _HCM + "HttpConnectionManager",
        "stat_prefix": "x",
        "route_config": {
            "name": "r",
            "virtual_hosts": [
                {
                    "name": "v",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
                }
            ],
        },
        "http_filters": http_filters,
    }
    listener = {
        "name": "l",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
        "filter_chains": [{"filters": [{"name": "hcm", "typed_config": hcm}]}],
    }
    path = tmp / "envoy.json"
    path.write_text(json.dumps({"static_resources": {"listeners": [listener]}}))
    proc = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(path), "-l", "critical"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return proc.returncode == 0


@pytest.mark.envoy
def test_envoy_oracle_rejects_what_we_reject(
    envoy_bin: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    cases: list[tuple[str, list[Any]]] = [(f, list(items)) for items, f, _ in FILTER_LIST_REJECTED]
    for cfg, f, _ in FAULT_REJECTED:
        cases.append(
            (f, [{"name": "f", "typedConfig": {"@type": T + "fault.v3.HTTPFault", **cfg}}, ROUTER])
        )
    for cfg, f, _ in RBAC_REJECTED:
        cases.append(
            (f, [{"name": "r", "typedConfig": {"@type": T + "rbac.v3.RBAC", **cfg}}, ROUTER])
        )
    accepted_by_envoy = [
        f
        for f, filters in cases
        if f not in GRPC_STRICTER and _envoy_accepts(envoy_bin, tmp_path, filters)
    ]
    assert accepted_by_envoy == []
    assert _envoy_accepts(envoy_bin, tmp_path, [ROUTER])  # the harness itself works
