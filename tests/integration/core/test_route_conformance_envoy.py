"""Route matching conformance against a real Envoy (h11's "compare against a real peer").

ONE ``RouteConfiguration`` (built here as a proto, serialized once) goes to both sides:
pymesh decodes the bytes with ``decode_resource`` and runs ``select_virtual_host`` +
``route_request``; Envoy gets the same message as JSON in a static bootstrap. Every route
adds the response header ``x-route: <name>``, so each request sent through Envoy tells which
route Envoy chose (404 without ``x-route`` = no route). Both must agree on every case.

Beyond the choice of route, the actions are compared too: direct responses (status),
redirects (status and ``location`` against ``redirect_location``) and forwarded requests
(the path, authority and test headers the upstream echo server saw, against
``rewrite_request``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.extensions.path.rewrite.uri_template.v3 import uri_template_rewrite_pb2
from google.protobuf import json_format

from pymesh.core.routing import (
    ClusterChoice,
    auto_host_rewrite,
    pick_cluster,
    redirect_location,
    response_header_ops,
    rewrite_request,
    route_request,
    select_vhost,
)
from pymesh.core.types import Headers, RequestInfo
from pymesh.model.route import (
    DirectResponseAction,
    RedirectAction,
    RouteAction,
    RouteConfiguration,
)
from pymesh.xds.codec import decode_resource
from pymesh.xds.resource_types import ResourceType
from tests.envoy_process import EnvoyProcess as EnvoyHandle
from tests.envoy_process import run_envoy as start_envoy

pytestmark = pytest.mark.envoy

# Imported for their descriptors: json_format resolves these ``@type``s through them.
_REGISTERED = (
    router_pb2,
    http_connection_manager_pb2,
    uri_template_match_pb2,
    uri_template_rewrite_pb2,
)

HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TPL_MATCH = "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig"
TPL_REWRITE = (
    "type.googleapis.com/envoy.extensions.path.rewrite.uri_template.v3.UriTemplateRewriteConfig"
)

# --------------------------------------------------------------------------- the route table


def _ok(name: str) -> dict[str, Any]:
    return {"direct_response": {"status": 200, "body": {"inline_string": name}}}


def _fwd(**action: Any) -> dict[str, Any]:
    return {"route": {"cluster": "echo", **action}}


def _tpl(template: str) -> dict[str, Any]:
    return {
        "path_match_policy": {
            "name": "envoy.path.match.uri_template.uri_template_matcher",
            "typed_config": {"@type": TPL_MATCH, "path_template": template},
        }
    }


def _h(name: str, **spec: Any) -> dict[str, Any]:
    return {"name": name, **spec}


def _sm(**spec: Any) -> dict[str, Any]:
    return {"string_match": spec}


# (name, match, action-or-None for a 200 direct response)
NAMED_CLUSTER, NAMED_HOST = "echo-named", "ep.example"
"""A cluster whose endpoint has a hostname (for ``auto_host_rewrite``)."""

ROUTES: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
    ("exact", {"path": "/exact"}, None),
    ("exact-ci", {"path": "/CaseLess", "case_sensitive": False}, None),
    ("exactq", {"path": "/exactq"}, None),
    ("prefix-v1", {"prefix": "/api/v1/"}, None),
    ("prefix-ci", {"prefix": "/Upper/", "case_sensitive": False}, None),
    ("regex-items", {"safe_regex": {"regex": "/items/[0-9]+"}}, None),
    ("regex-json", {"safe_regex": {"regex": "/re/.*\\.json"}}, None),
    ("regex-nocase-flag", {"safe_regex": {"regex": "/RegEx"}, "case_sensitive": False}, None),
    ("psp", {"path_separated_prefix": "/sep"}, None),
    ("psp-ci", {"path_separated_prefix": "/SepCI", "case_sensitive": False}, None),
    ("tpl-id", _tpl("/tpl/{id}/detail"), None),
    ("tpl-glob", _tpl("/tplg/**"), None),
    ("tpl-var-glob", _tpl("/tplv/{rest=**}"), None),
    ("tpl-suffix", _tpl("/tpls/{file}.txt"), None),
    ("tpl-star", {**_tpl("/TplCase/*"), "case_sensitive": False}, None),
    ("tpl-multi", _tpl("/tplm/{a}/{b=x/*}/end"), None),
    ("hdr-exact", {"prefix": "/h/", "headers": [_h("x-exact", exact_match="yes")]}, None),
    ("hdr-prefix", {"prefix": "/h/", "headers": [_h("x-prefix", **_sm(prefix="abc"))]}, None),
    ("hdr-suffix", {"prefix": "/h/", "headers": [_h("x-suffix", **_sm(suffix="xyz"))]}, None),
    ("hdr-contains", {"prefix": "/h/", "headers": [_h("x-contains", **_sm(contains="mid"))]}, None),
    (
        "hdr-regex",
        {
            "prefix": "/h/",
            "headers": [_h("x-regex", safe_regex_match={"regex": "v[0-9]+\\.[0-9]+"})],
        },
        None,
    ),
    (
        "hdr-range",
        {"prefix": "/h/", "headers": [_h("x-range", range_match={"start": 10, "end": 20})]},
        None,
    ),
    ("hdr-present", {"prefix": "/h/", "headers": [_h("x-present", present_match=True)]}, None),
    (
        "hdr-invert",
        {"prefix": "/h/", "headers": [_h("x-invert", **_sm(exact="no"), invert_match=True)]},
        None,
    ),
    (
        "hdr-ignorecase",
        {"prefix": "/h/", "headers": [_h("x-ic", **_sm(exact="MiXeD", ignore_case=True))]},
        None,
    ),
    ("hdr-multi", {"prefix": "/h/", "headers": [_h("x-multi", **_sm(exact="a,b"))]}, None),
    (
        "hdr-missing-empty",
        {
            "prefix": "/h/",
            "headers": [_h("x-empty", **_sm(exact=""), treat_missing_header_as_empty=True)],
        },
        None,
    ),
    ("mv-comma-space", {"prefix": "/mv/", "headers": [_h("x-m", **_sm(exact="a, b"))]}, None),
    ("mv-first", {"prefix": "/mv/", "headers": [_h("x-m", **_sm(exact="a"))]}, None),
    ("mv-last", {"prefix": "/mv/", "headers": [_h("x-m", **_sm(exact="b"))]}, None),
    ("mv-any", {"prefix": "/mv/", "headers": [_h("x-m", **_sm(prefix="a"))]}, None),
    ("hdr-absent", {"prefix": "/hpf/", "headers": [_h("x-absent", present_match=False)]}, None),
    (
        "hdr-present-invert",
        {"prefix": "/hpi/", "headers": [_h("x-gone", present_match=True, invert_match=True)]},
        None,
    ),
    ("hdr-method", {"prefix": "/m/", "headers": [_h(":method", **_sm(exact="POST"))]}, None),
    (
        "hdr-authority",
        {"prefix": "/auth/", "headers": [_h(":authority", **_sm(suffix=".internal"))]},
        None,
    ),
    (
        "hdr-two",
        {
            "prefix": "/two/",
            "headers": [_h("x-a", **_sm(exact="1")), _h("x-b", present_match=True)],
        },
        None,
    ),
    ("hdr-host", {"prefix": "/hosthdr/", "headers": [_h("host", present_match=True)]}, None),
    (
        "hdr-range-neg",
        {"prefix": "/rng/", "headers": [_h("x-n", range_match={"start": -5, "end": 0})]},
        None,
    ),
    ("q-exact", {"prefix": "/q/", "query_parameters": [{"name": "k", **_sm(exact="v")}]}, None),
    (
        "q-present",
        {"prefix": "/q/", "query_parameters": [{"name": "flag", "present_match": True}]},
        None,
    ),
    (
        "q-regex",
        {
            "prefix": "/q/",
            "query_parameters": [{"name": "n", **_sm(safe_regex={"regex": "[0-9]+"})}],
        },
        None,
    ),
    (
        "q-prefix-ci",
        {
            "prefix": "/q/",
            "query_parameters": [{"name": "p", **_sm(prefix="ab", ignore_case=True)}],
        },
        None,
    ),
    (
        "q-absent",
        {"prefix": "/qpf/", "query_parameters": [{"name": "z", "present_match": False}]},
        None,
    ),
    ("grpc", {"prefix": "/pkg.Svc/", "grpc": {}}, None),
    ("rf-0", {"prefix": "/rf/", "runtime_fraction": {"default_value": {"numerator": 0}}}, None),
    ("rf-100", {"prefix": "/rf/", "runtime_fraction": {"default_value": {"numerator": 100}}}, None),
    ("redirect-https", {"path": "/to-https"}, {"redirect": {"https_redirect": True}}),
    (
        "redirect-full",
        {"prefix": "/old/"},
        {
            "redirect": {
                "host_redirect": "new.example.com",
                "port_redirect": 8443,
                "prefix_rewrite": "/new/",
                "response_code": "FOUND",
            }
        },
    ),
    (
        "redirect-path",
        {"path": "/moved"},
        {
            "redirect": {
                "path_redirect": "/here",
                "strip_query": True,
                "response_code": "TEMPORARY_REDIRECT",
            }
        },
    ),
    (
        "redirect-keepq",
        {"path": "/movedq"},
        {"redirect": {"path_redirect": "/there", "scheme_redirect": "https"}},
    ),
    (
        "redirect-regex",
        {"safe_regex": {"regex": "/rx/([a-z]+)/([0-9]+)"}},
        {
            "redirect": {
                "regex_rewrite": {
                    "pattern": {"regex": "^/rx/([a-z]+)/([0-9]+)$"},
                    "substitution": "/\\2/\\1",
                },
                "response_code": "PERMANENT_REDIRECT",
            }
        },
    ),
    ("direct-404", {"path": "/gone"}, {"direct_response": {"status": 404}}),
    ("fwd-prefix", {"prefix": "/fwd/pre/"}, _fwd(prefix_rewrite="/up/")),
    (
        "fwd-prefix-ci",
        {"prefix": "/fwd/PreCI", "case_sensitive": False},
        _fwd(prefix_rewrite="/ci"),
    ),
    (
        "fwd-regex",
        {"safe_regex": {"regex": "/fwd/rx/([^/]+)/(.*)"}},
        _fwd(
            regex_rewrite={
                "pattern": {"regex": "^/fwd/rx/([^/]+)/(.*)$"},
                "substitution": "/\\2/\\1",
            }
        ),
    ),
    (
        "fwd-tpl",
        _tpl("/fwd/tpl/{a}/{b}"),
        _fwd(
            path_rewrite_policy={
                "name": "envoy.path.rewrite.uri_template.uri_template_rewriter",
                "typed_config": {"@type": TPL_REWRITE, "path_template_rewrite": "/x/{b}/{a}"},
            }
        ),
    ),
    ("fwd-host", {"prefix": "/fwd/host/"}, _fwd(host_rewrite_literal="rewritten.example")),
    ("fwd-hosthdr", {"prefix": "/fwd/hh/"}, _fwd(host_rewrite_header="x-host")),
    ("fwd-plain", {"prefix": "/fwd/plain/"}, _fwd()),
    (
        "fwd-weighted",
        {"prefix": "/fwd/w/"},
        {
            "route": {
                "weighted_clusters": {
                    "clusters": [
                        {"name": "echo2", "weight": 0},
                        {
                            "name": "echo",
                            "weight": 5,
                            "request_headers_to_add": [{"header": {"key": "x-t-wc", "value": "w"}}],
                            "response_headers_to_add": [
                                {"header": {"key": "x-r-wc", "value": "w"}}
                            ],
                            "host_rewrite_literal": "weighted.example",
                        },
                    ]
                }
            }
        },
    ),
    ("fwd-clusterhdr", {"prefix": "/fwd/ch/"}, {"route": {"cluster_header": "x-cluster"}}),
    (
        "fwd-auto-host",
        {"prefix": "/fwd/auto/"},
        {"route": {"cluster": "echo-named", "auto_host_rewrite": True}},
    ),
    (
        "fwd-auto-host-empty",
        {"prefix": "/fwd/auto-empty/"},
        {"route": {"cluster": "echo", "auto_host_rewrite": True}},
    ),
    ("fwd-psp-rewrite", {"path_separated_prefix": "/fwd/psp"}, _fwd(prefix_rewrite="/p")),
    (
        "fwd-regex-prefix",
        {"safe_regex": {"regex": "/fwd/rp/[a-z]+"}},
        _fwd(prefix_rewrite="/whole"),
    ),
    ("fwd-exact-rewrite", {"path": "/fwd/exact"}, _fwd(prefix_rewrite="/e/")),
    (
        "redirect-prefix-strip",
        {"prefix": "/rps/"},
        {"redirect": {"prefix_rewrite": "/", "strip_query": True, "port_redirect": 9000}},
    ),
    (
        "redirect-regex-query",
        {"prefix": "/rq/"},
        {
            "redirect": {
                "regex_rewrite": {"pattern": {"regex": "q"}, "substitution": "Q"},
                "strip_query": False,
            }
        },
    ),
    (
        "redirect-path-query",
        {"path": "/rpq"},
        {"redirect": {"path_redirect": "/dest?a=1", "strip_query": True}},
    ),
]
"""Routes of the ``main`` virtual host, in order."""


def _r_level(level: str) -> dict[str, Any]:
    return {
        "header": {"key": "x-r-level", "value": level},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


ROUTE_HEADERS: dict[str, dict[str, Any]] = {
    # Header mutations at the route level (the config and vhost levels are below).
    "fwd-plain": {
        "request_headers_to_add": [
            {
                "header": {"key": "x-t-level", "value": "route"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            },
            {"header": {"key": "x-t-add", "value": "r1"}},
            {"header": {"key": "x-t-absent", "value": "r2"}, "append_action": "ADD_IF_ABSENT"},
            {"header": {"key": "x-t-ow", "value": "r3"}, "append_action": "OVERWRITE_IF_EXISTS"},
            {"header": {"key": "x-t-keep", "value": ""}, "keep_empty_value": True},
            {"header": {"key": "x-t-skip", "value": ""}},
            {"header": {"key": "x-t-pct", "value": "100%%"}},
            {"header": {"key": "x-t-fmt", "value": "<%REQ(x-in)%>"}},
            {"header": {"key": "x-t-fmt-alt", "value": "%REQ(x-nope?x-in)%"}},
            {"header": {"key": "x-t-fmt-missing", "value": "%REQ(x-nope)%"}},
            {"header": {"key": "x-t-fmt-path", "value": "%REQ(:path)%"}},
            {"header": {"key": "x-t-ip", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}},
        ],
        "request_headers_to_remove": ["x-t-remove"],
        "response_headers_to_add": [_r_level("route")],
    },
    "exact": {"response_headers_to_add": [_r_level("route")]},
    "fwd-weighted": {"response_headers_to_add": [_r_level("route")]},
}


def route_configuration(*, most_specific: bool = False) -> route_pb2.RouteConfiguration:
    """The table; ``most_specific`` sets ``most_specific_header_mutations_wins``."""
    routes = []
    for name, match, action in ROUTES:
        r: dict[str, Any] = {"name": name, "match": match, **(action or _ok(name))}
        extra = ROUTE_HEADERS.get(name, {})
        r.update(extra)
        r["response_headers_to_add"] = [
            {"header": {"key": "x-route", "value": name}},
            *extra.get("response_headers_to_add", []),
        ]
        routes.append(r)

    def single(vh: str, domains: list[str]) -> dict[str, Any]:
        return {
            "name": vh,
            "domains": domains,
            "routes": [
                {
                    "name": vh,
                    "match": {"prefix": "/"},
                    **_ok(vh),
                    "response_headers_to_add": [{"header": {"key": "x-route", "value": vh}}],
                }
            ],
        }

    config = {
        "name": "conformance",
        "most_specific_header_mutations_wins": most_specific,
        "response_headers_to_add": [
            _r_level("config"),
            {"header": {"key": "x-r-config", "value": "c"}},
        ],
        "request_headers_to_add": [
            {
                "header": {"key": "x-t-level", "value": "config"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
        "virtual_hosts": [
            single("vh-exact", ["exact.example.com"]),
            single("vh-port", ["porty.example.com:8080"]),
            single("vh-suffix", ["*.wild.example.com"]),
            single("vh-suffix-long", ["*-x.wild.example.com"]),
            single("vh-prefix", ["pre.*"]),
            {
                "name": "main",
                "domains": ["*"],
                "routes": routes,
                "request_headers_to_add": [
                    {
                        "header": {"key": "x-t-level", "value": "vhost"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    },
                    {"header": {"key": "x-t-vhost", "value": "v"}},
                ],
                "response_headers_to_add": [
                    _r_level("vhost"),
                    {"header": {"key": "x-r-vhost", "value": "v"}},
                ],
            },
        ],
    }
    return json_format.ParseDict(config, route_pb2.RouteConfiguration())


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    method: str = "GET"
    authority: str = "svc.local"


def _cases() -> list[Case]:
    c: list[Case] = []
    add = c.append
    for p in [
        "/exact",
        "/exact/",
        "/Exact",
        "/exact?x=1",
        "/exactly",
        "/exactq",
        "/exactq?a=b",
        "/caseless",
        "/CASELESS",
        "/CaseLess",
        "/caseless/x",
        "/api/v1/",
        "/api/v1/users",
        "/api/v1",
        "/API/v1/x",
        "/api/v1/?q=1",
        "/upper/",
        "/UPPER/x",
        "/Upper/y",
        "/uPpEr/z?k=v",
        "/upper",
        "/items/1",
        "/items/123",
        "/items/",
        "/items/12a",
        "/items/5?x=y",
        "/ITEMS/1",
        "/re/a.json",
        "/re/.json",
        "/re/a/b/c.json",
        "/re/a.jsonx",
        "/re/x.json?z=1",
        "/RegEx",
        "/regex",
        "/REGEX",
        "/sep",
        "/sep/",
        "/sep/a",
        "/sepx",
        "/sep?x",
        "/Sep/a",
        "/se",
        "/sepci",
        "/SEPCI/a",
        "/sepcix",
        "/SepCI",
        "/tpl/1/detail",
        "/tpl/abc/detail",
        "/tpl//detail",
        "/tpl/1/2/detail",
        "/tpl/1/detail/",
        "/tpl/a.b~c/detail",
        "/tpl/1/detail?x=1",
        "/tplg/",
        "/tplg",
        "/tplg/a/b/c",
        "/tplg/a",
        "/tplv/",
        "/tplv/x/y",
        "/tplv",
        "/tpls/readme.txt",
        "/tpls/readme.md",
        "/tpls/a/b.txt",
        "/tpls/.txt",
        "/tplcase/x",
        "/TplCase/x",
        "/TplCase/x/y",
        "/tplm/1/x/2/end",
        "/tplm/1/x/end",
        "/tplm/1/y/2/end",
        "/rf/",
        "/rf/x",
        "/gone",
        "/gone/",
        "/nothing",
        "/",
        "/api",
        "/pkg.Svc/Method",
        "/hpf/",
        "/hpi/",
        "/hosthdr/",
        "/two/",
        "/m/",
        "/auth/",
        "/q/",
        "/qpf/",
        "/rng/",
    ]:
        add(Case(p))
    # Header matchers under /h/ (each alone, then a few combinations and near misses).
    for hdrs in [
        (("x-exact", "yes"),),
        (("x-exact", "Yes"),),
        (("x-exact", "yess"),),
        (("x-exact", ""),),
        (("x-prefix", "abcdef"),),
        (("x-prefix", "ab"),),
        (("x-prefix", "ABCdef"),),
        (("x-suffix", "wxyz"),),
        (("x-suffix", "xyz "),),
        (("x-suffix", "XYZ"),),
        (("x-contains", "amidb"),),
        (("x-contains", "mid"),),
        (("x-contains", "mi d"),),
        (("x-regex", "v1.2"),),
        (("x-regex", "v12.34"),),
        (("x-regex", "v1.2.3"),),
        (("x-regex", "xv1.2"),),
        (("x-range", "10"),),
        (("x-range", "19"),),
        (("x-range", "20"),),
        (("x-range", "9"),),
        (("x-range", "+15"),),
        (("x-range", " 15 "),),
        (("x-range", "1_5"),),
        (("x-range", "15.0"),),
        (("x-range", "0x10"),),
        (("x-range", "-15"),),
        (("x-range", "99999999999999999999"),),
        (("x-present", ""),),
        (("x-present", "anything"),),
        (("x-invert", "no"),),
        (("x-invert", "yes"),),
        (("x-invert", ""),),
        (("x-invert", "no"), ("x-invert", "yes")),
        (("x-invert", "yes"), ("x-invert", "no")),
        (("x-invert", "no"), ("x-invert", "no")),
        (("x-range", "5"), ("x-range", "15")),
        (("x-regex", "x"), ("x-regex", "v1.0")),
        (("x-present", "a"), ("x-present", "b")),
        (("x-ic", "mixed"),),
        (("x-ic", "MIXED"),),
        (("x-ic", "mixe"),),
        (("x-empty", ""),),
        (("x-empty", "x"),),
        (("x-multi", "a"), ("x-multi", "b")),
        (("x-multi", "a,b"),),
        (("x-multi", "b"), ("x-multi", "a")),
        (("x-multi", "a"),),
        (("x-exact", "no"), ("x-prefix", "abc")),
        (("x-regex", "v1.1"), ("x-range", "12")),
        (),
    ]:
        add(Case("/h/", tuple(hdrs)))
        add(Case("/h/x?y=z", tuple(hdrs)))
    for hdrs in [
        (("x-m", "a"), ("x-m", "b")),
        (("x-m", "b"), ("x-m", "a")),
        (("x-m", "c"), ("x-m", "a")),
        (("x-m", "a, b"),),
        (("x-m", "x"), ("x-m", "y")),
        (("x-m", "x"), ("x-m", "b")),
        (("x-m", "x"), ("x-m", "abc")),
        (("x-m", "b, a"),),
    ]:
        add(Case("/mv/", hdrs))
    for hdrs in [(), (("x-absent", "1"),), (("x-absent", ""),)]:
        add(Case("/hpf/a", tuple(hdrs)))
    for hdrs in [(), (("x-gone", "1"),)]:
        add(Case("/hpi/a", tuple(hdrs)))
    for method in ["GET", "POST", "PUT", "DELETE"]:
        add(Case("/m/x", method=method))
    for authority in ["svc.internal", "a.b.internal", "svc.internal:80", "internal", "svc.local"]:
        add(Case("/auth/x", authority=authority))
    for hdrs in [
        (("x-a", "1"), ("x-b", "")),
        (("x-a", "1"),),
        (("x-b", "2"),),
        (("x-a", "2"), ("x-b", "1")),
    ]:
        add(Case("/two/x", hdrs))
    add(Case("/hosthdr/x"))
    for value in ["-5", "-1", "0", "-6", "-0"]:
        add(Case("/rng/x", (("x-n", value),)))
    for query in [
        "k=v",
        "k=vv",
        "k=V",
        "k",
        "k=",
        "flag",
        "flag=",
        "flag=1",
        "FLAG",
        "n=123",
        "n=12a",
        "n=",
        "p=abc",
        "p=ABx",
        "p=a",
        "k=x&k=v",
        "k=v&k=x",
        "a=1&k=v&b=2",
        "k%3Dv",
        "k=%76",
        "n=1&flag",
        "&&k=v",
        "x=1",
    ]:
        add(Case(f"/q/?{query}"))
    for query in ["", "z", "z=1", "y=1"]:
        add(Case(f"/qpf/?{query}" if query else "/qpf/"))
    for ct in [
        "application/grpc",
        "application/grpc+proto",
        "application/grpc-web",
        "application/json",
        None,
    ]:
        hdrs = (("content-type", ct),) if ct else ()
        add(Case("/pkg.Svc/Method", hdrs, method="POST"))
    # Virtual hosts.
    for authority in [
        "exact.example.com",
        "EXACT.example.com",
        "exact.example.com:8080",
        "porty.example.com:8080",
        "porty.example.com",
        "a.wild.example.com",
        "wild.example.com",
        ".wild.example.com",
        "a-x.wild.example.com",
        "-x.wild.example.com",
        "pre.example",
        "pre.",
        "pre",
        "other",
    ]:
        add(Case("/exact", authority=authority))
    # Actions: redirects, direct responses, forwarded requests.
    for p in ["/to-https", "/to-https?x=1"]:
        add(Case(p))
        add(Case(p, authority="svc.local:80"))
        add(Case(p, authority="svc.local:8080"))
    for p in ["/old/a", "/old/a/b?x=1", "/old/"]:
        add(Case(p))
    for p in ["/moved", "/moved?x=1"]:
        add(Case(p))
    for p in ["/movedq", "/movedq?x=1"]:
        add(Case(p, authority="svc.local:80"))
    for p in ["/rx/abc/123", "/rx/abc/123?q=1", "/rx/ABC/123"]:
        add(Case(p))
    for p in ["/fwd/pre/", "/fwd/pre/a/b", "/fwd/pre/a?x=1", "/fwd/preci", "/fwd/PRECI/z?q=1"]:
        add(Case(p))
    for p in [
        "/fwd/rx/a/b/c",
        "/fwd/rx/a/?k=v",
        "/fwd/tpl/1/2",
        "/fwd/tpl/1/2?x=y",
        "/fwd/tpl/1/2/3",
    ]:
        add(Case(p))
    add(Case("/fwd/host/x"))
    add(Case("/fwd/hh/x", (("x-host", "from.header"),)))
    add(Case("/fwd/hh/x"))
    add(Case("/fwd/hh/x", (("x-host", "first"), ("x-host", "second"))))
    add(Case("/fwd/plain/x"))
    add(Case("/fwd/plain/x", (("x-t-ow", "old"), ("x-t-remove", "1"), ("x-t-absent", "mine"))))
    add(Case("/fwd/plain/x", (("x-t-add", "mine"), ("x-t-level", "client"))))
    add(Case("/fwd/w/x"))
    add(Case("/fwd/ch/x", (("x-cluster", "echo"),)))
    add(Case("/fwd/ch/x", (("x-cluster", "echo2"),)))
    add(Case("/fwd/plain/y?q=1", (("x-in", "value"),)))
    add(Case("/fwd/auto/x"))
    add(Case("/fwd/auto-empty/x"))
    for p in ["/fwd/psp", "/fwd/psp/a?x=1", "/fwd/pspx", "/fwd/rp/abc?k=v", "/fwd/exact?z"]:
        add(Case(p))
    for p in ["/rps/a?x=1", "/rq/aqb?q=q", "/rpq", "/rpq?b=2"]:
        add(Case(p, authority="svc.local:8080"))
    add(Case("/to-https", authority="[::1]:8080"))
    add(Case("/old/z", authority="[::1]:80"))
    return c


CASES = _cases()

# --------------------------------------------------------------------------- processes


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One write per response and no Nagle: else each forwarded request waits ~40 ms for a
    # delayed ACK.
    wbufsize = -1
    disable_nagle_algorithm = True

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(
            {
                # From the request line: http.server collapses a leading "//" in self.path.
                "path": self.requestline.split(" ")[1],
                "host": self.headers.get("host"),
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _bootstrap(rc: route_pb2.RouteConfiguration, echo_port: int) -> str:
    def cluster(name: str, hostname: str = "") -> dict[str, Any]:
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": echo_port,
                                        }
                                    },
                                    "hostname": hostname,
                                }
                            }
                        ]
                    }
                ],
            },
        }

    boot = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "conformance",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "conformance",
                                        # The route table, as JSON of the very proto whose bytes
                                        # pymesh decodes.
                                        "route_config": json.loads(json_format.MessageToJson(rc)),
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": ROUTER},
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster("echo"),
                cluster("echo2"),
                cluster(NAMED_CLUSTER, NAMED_HOST),
            ],
        },
    }
    # Validate the whole bootstrap against the protos before Envoy sees it.
    json_format.ParseDict(boot, bootstrap_pb2.Bootstrap())
    return json.dumps(boot)


@pytest.fixture(params=[False, True], ids=["least-specific-wins", "most-specific-wins"])
def envoy(
    request: pytest.FixtureRequest, tmp_path: Path, envoy_bin: Path, echo_port: int
) -> Iterator[tuple[EnvoyHandle, bytes]]:
    rc = route_configuration(most_specific=request.param)
    with run_envoy(tmp_path, envoy_bin, rc, echo_port) as running:
        yield running


@contextlib.contextmanager
def run_envoy(
    tmp_path: Path, envoy_bin: Path, rc: route_pb2.RouteConfiguration, echo_port: int
) -> Iterator[tuple[EnvoyHandle, bytes]]:
    """Envoy serving ``rc`` on a loopback listener; always stopped on exit."""
    data = rc.SerializeToString()
    # Envoy gets the proto parsed back from the very bytes pymesh decodes.
    same = route_pb2.RouteConfiguration.FromString(data)
    with start_envoy(envoy_bin, _bootstrap(same, echo_port), tmp_path) as running:
        yield running, data


# --------------------------------------------------------------------------- comparing


@dataclass(frozen=True)
class Seen:
    route: str | None
    status: int
    location: str | None = None
    upstream: dict[str, Any] | None = None
    response_headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None


def _send(conn: http.client.HTTPConnection, case: Case) -> Seen:
    conn.putrequest(case.method, case.path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", case.authority)
    for k, v in case.headers:
        conn.putheader(k, v)
    if case.method in ("POST", "PUT"):
        conn.putheader("content-length", "0")
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    upstream = None
    if resp.getheader("content-type") == "application/json":
        upstream = json.loads(body)
    mutated = _mutated(resp.getheaders())
    return Seen(
        resp.getheader("x-route"),
        resp.status,
        resp.getheader("location"),
        upstream,
        mutated,
        # Envoy answers a gRPC request's local reply the gRPC way (trailers-only, no body):
        # that is the adapter's business, not routing's.
        body if upstream is None and not _is_grpc(case) else None,
    )


def _is_grpc(case: Case) -> bool:
    return any(k == "content-type" and v.startswith("application/grpc") for k, v in case.headers)


def _mutated(headers: Any) -> tuple[tuple[str, str], ...]:
    """The response headers the route configuration adds."""
    return tuple(
        sorted((k.lower(), v) for k, v in headers if k.lower().startswith(("x-r-", "x-route")))
    )


def _test_headers(headers: Any) -> list[tuple[str, str]]:
    """The headers a forwarded request carries that the route configuration controls."""
    return sorted(
        (k, v) for k, v in headers if k.startswith("x-t-") or k in ("x-envoy-original-path",)
    )


def _pymesh(config: RouteConfiguration, case: Case, rng: random.Random) -> Seen:
    request = RequestInfo(
        method=case.method,
        authority=case.authority,
        path=case.path,
        # HTTP/1 drops a value's surrounding whitespace on the wire: as Envoy sees it.
        headers=Headers((k, v.strip(" \t")) for k, v in case.headers),
        source_ip="127.0.0.1",
    )
    vhost = select_vhost(config, case.authority)
    assert vhost is config.select_virtual_host(case.authority)
    if vhost is None:
        return Seen(None, 404, body=None if _is_grpc(case) else b"")
    route = route_request(vhost, request, rng=rng)
    if route is None:
        return Seen(None, 404, body=None if _is_grpc(case) else b"")
    action = route.action
    if isinstance(action, DirectResponseAction | RedirectAction):
        mutated = _mutated(response_header_ops(route, vhost, config).apply(Headers(), request))
        if isinstance(action, DirectResponseAction):
            body = None if _is_grpc(case) else action.body or b""
            return Seen(route.name, action.status, response_headers=mutated, body=body)
        location = redirect_location(action, request, route=route)
        return Seen(route.name, action.response_code, location, response_headers=mutated, body=b"")
    assert isinstance(action, RouteAction)
    choice: ClusterChoice = pick_cluster(action, request, rng=rng)
    out = rewrite_request(route, action, vhost, config, request, choice)
    # The endpoint the attempt loop would pick: the test's clusters have one each.
    out = auto_host_rewrite(action, out, NAMED_HOST if choice.name == NAMED_CLUSTER else "")
    ops = response_header_ops(route, vhost, config, choice.weighted)
    return Seen(
        route.name,
        200,
        upstream={"path": out.path, "host": out.authority, "headers": list(out.headers)},
        response_headers=_mutated(ops.apply(Headers(), request)),
    )


def test_route_table_is_big_enough() -> None:
    rc = route_configuration()
    main = next(vh for vh in rc.virtual_hosts if vh.name == "main")
    assert len(main.routes) >= 40
    assert len(CASES) >= 200
    kinds = {r.match.WhichOneof("path_specifier") for r in main.routes}
    assert kinds >= {"prefix", "path", "safe_regex", "path_separated_prefix", "path_match_policy"}


def test_pymesh_picks_the_route_envoy_picks(envoy: tuple[EnvoyHandle, bytes]) -> None:
    handle, data = envoy
    decoded = decode_resource(ResourceType.ROUTE_CONFIGURATION.type_url, data).value
    assert isinstance(decoded, RouteConfiguration)
    rng = random.Random(7)
    conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
    mismatches = []
    chosen: set[str] = set()
    try:
        for case in CASES:
            want = _send(conn, case)
            got = _pymesh(decoded, case, rng)
            if want.route is not None:
                chosen.add(want.route)
            if want.upstream is not None and got.upstream is not None:
                same = (
                    want.route == got.route
                    and want.upstream["path"] == got.upstream["path"]
                    and want.upstream["host"] == got.upstream["host"]
                    and _test_headers(want.upstream["headers"])
                    == _test_headers(got.upstream["headers"])
                    and want.response_headers == got.response_headers
                )
                if not same:
                    mismatches.append(
                        f"{case}: envoy {want.route} {want.upstream['path']} "
                        f"{want.upstream['host']} "
                        f"{_test_headers(want.upstream['headers'])}; pymesh {got.route} "
                        f"{got.upstream['path']} {got.upstream['host']} "
                        f"{_test_headers(got.upstream['headers'])}; response headers envoy "
                        f"{want.response_headers} pymesh {got.response_headers}"
                    )
            elif want != got:
                mismatches.append(f"{case}: envoy {want}; pymesh {got}")
    finally:
        conn.close()
    assert not mismatches, f"{len(mismatches)} of {len(CASES)} differ:\n" + "\n".join(mismatches)
    # The cases exercise (almost) every route: only routes Envoy never picks may be unused.
    names = {name for name, _, _ in ROUTES}
    unused = names - chosen
    assert unused <= {"rf-0", "regex-nocase-flag"}, unused


# --------------------------------------------------------------------------- random tables
#
# Hand-written cases find what one expects to be tricky; a seeded random table over a small
# alphabet finds the rest: paths, header values and query values are drawn from the same few
# tokens as the matchers, so routes match (and nearly match) often.

_SEGMENTS = ["a", "b", "ab", "A", "1", "a.b"]
_VALUES = ["", "a", "ab", "ba", "abc", "A", "Ab", "1", "15", "-3", "a,b"]
_NAMES = ["x-a", "x-b", "x-c"]
_REGEXES = ["/a/.*", "/[ab]+", "/a/[0-9]+", "/(a|b)/b.*", ".*b", "/A.*", "/a(/b)?"]
_TEMPLATES = ["/{x}", "/a/{x}", "/{x}/**", "/*/b", "/a/{x=*/b}", "/{x}.b", "/**"]
_VALUE_REGEXES = ["a.*", "[ab]+", "[0-9]+", "b?", "A|a"]


def _random_string_match(rnd: random.Random) -> dict[str, Any]:
    kind = rnd.choice(["exact", "prefix", "suffix", "contains", "safe_regex"])
    if kind == "safe_regex":
        return {"safe_regex": {"regex": rnd.choice(_VALUE_REGEXES)}}
    value = rnd.choice([v for v in _VALUES if v or kind == "exact"])
    return {kind: value, "ignore_case": rnd.random() < 0.3}


def _random_header(rnd: random.Random) -> dict[str, Any]:
    h: dict[str, Any] = {"name": rnd.choice(_NAMES)}
    kind = rnd.choice(["string", "string", "string", "range", "present", "legacy"])
    if kind == "string":
        h["string_match"] = _random_string_match(rnd)
    elif kind == "range":
        start = rnd.randint(-5, 15)
        h["range_match"] = {"start": start, "end": start + rnd.randint(1, 20)}
    elif kind == "present":
        h["present_match"] = rnd.random() < 0.7
    else:
        h[rnd.choice(["prefix_match", "suffix_match", "contains_match"])] = rnd.choice(
            [v for v in _VALUES if v]
        )
    if rnd.random() < 0.2:
        h["invert_match"] = True
    if rnd.random() < 0.15:
        h["treat_missing_header_as_empty"] = True
    return h


def _random_path(rnd: random.Random) -> str:
    return "/" + "/".join(rnd.choice(_SEGMENTS) for _ in range(rnd.randint(1, 3)))


def _random_route(rnd: random.Random, name: str) -> dict[str, Any]:
    kind = rnd.choice(["prefix", "prefix", "path", "path_separated_prefix", "regex", "template"])
    match: dict[str, Any]
    if kind == "prefix":
        match = {"prefix": rnd.choice(["/", _random_path(rnd), _random_path(rnd) + "/"])}
    elif kind == "path":
        match = {"path": _random_path(rnd)}
    elif kind == "path_separated_prefix":
        match = {"path_separated_prefix": _random_path(rnd)}
    elif kind == "regex":
        match = {"safe_regex": {"regex": rnd.choice(_REGEXES)}}
    else:
        match = _tpl(rnd.choice(_TEMPLATES))
    if rnd.random() < 0.3:
        match["case_sensitive"] = False
    n_headers = rnd.choice([0, 0, 1, 1, 2])
    template = match.get("path_match_policy", {}).get("typed_config", {}).get("path_template")
    if match.get("prefix") == "/" or template in ("/**", "/{x}/**"):
        n_headers = max(n_headers, 1)  # keep catch-alls from swallowing the rest
    if n_headers:
        match["headers"] = [_random_header(rnd) for _ in range(n_headers)]
    if rnd.random() < 0.25:
        q: dict[str, Any] = {"name": rnd.choice(["k", "j"])}
        if rnd.random() < 0.5:
            q["string_match"] = _random_string_match(rnd)
        else:
            q["present_match"] = rnd.random() < 0.7
        match["query_parameters"] = [q]
    if rnd.random() < 0.05:
        match["grpc"] = {}
    return {
        "name": name,
        "match": match,
        **_random_action(rnd, name, template),
        "response_headers_to_add": [{"header": {"key": "x-route", "value": name}}],
    }


# (pattern, substitution): RE2 and Python must agree on these, empty matches included.
_REGEX_REWRITES = [
    ("a", "X"),
    ("^/a", "/z"),
    ("b*", "-"),
    ("([ab])/", "\\1_"),
    ("^/(.*)$", "/w/\\1"),
    ("[.]", "%2E"),
    ("/", "//"),
]


def _random_action(rnd: random.Random, name: str, template: str | None) -> dict[str, Any]:
    roll = rnd.random()
    if roll < 0.55:
        return _ok(name)
    pattern, substitution = rnd.choice(_REGEX_REWRITES)
    regex_rewrite = {"pattern": {"regex": pattern}, "substitution": substitution}
    if roll < 0.8:
        action: dict[str, Any] = {"cluster": "echo"}
        kind = rnd.choice(["prefix", "regex", "template", "host", "none"])
        if kind == "prefix" and template is None:
            action["prefix_rewrite"] = rnd.choice(["/", "/x", "/x/", "/A"])
        elif kind == "regex":
            action["regex_rewrite"] = regex_rewrite
        elif kind == "template" and template is not None and "{x" in template:
            action["path_rewrite_policy"] = {
                "name": "envoy.path.rewrite.uri_template.uri_template_rewriter",
                "typed_config": {
                    "@type": TPL_REWRITE,
                    "path_template_rewrite": rnd.choice(["/r/{x}", "/{x}/r", "/{x}{x}"]),
                },
            }
        elif kind == "host":
            action["host_rewrite_literal"] = "h.example"
        return {"route": action}
    redirect: dict[str, Any] = {}
    if rnd.random() < 0.4:
        redirect[rnd.choice(["https_redirect", "scheme_redirect"])] = (
            True if rnd.random() < 0.5 else "https"
        )
    if rnd.random() < 0.3:
        redirect["host_redirect"] = "r.example"
    if rnd.random() < 0.3:
        redirect["port_redirect"] = rnd.choice([80, 443, 8081])
    path_kind = rnd.choice(["path", "prefix", "regex", None])
    if path_kind == "path":
        redirect["path_redirect"] = rnd.choice(["/p", "/p?q=1", "p"])
    elif path_kind == "prefix" and template is None:
        redirect["prefix_rewrite"] = rnd.choice(["/", "/pr", "/pr/"])
    elif path_kind == "regex":
        redirect["regex_rewrite"] = regex_rewrite
    if rnd.random() < 0.4:
        redirect["strip_query"] = True
    redirect["response_code"] = rnd.choice(
        ["MOVED_PERMANENTLY", "FOUND", "SEE_OTHER", "TEMPORARY_REDIRECT", "PERMANENT_REDIRECT"]
    )
    if "https_redirect" in redirect and not isinstance(redirect["https_redirect"], bool):
        redirect["https_redirect"] = True
    if "scheme_redirect" in redirect and isinstance(redirect["scheme_redirect"], bool):
        redirect["scheme_redirect"] = "https"
    return {"redirect": redirect}


def _random_case(rnd: random.Random) -> Case:
    path = _random_path(rnd) + rnd.choice(["", "", "/"])
    if rnd.random() < 0.3:
        params = [
            rnd.choice(["k", "j", "z"]) + rnd.choice(["", "=", "=" + rnd.choice(_VALUES[1:])])
            for _ in range(rnd.randint(1, 2))
        ]
        path += "?" + "&".join(params)
    headers = [
        (rnd.choice(_NAMES), rnd.choice(_VALUES)) for _ in range(rnd.choice([0, 1, 1, 2, 3]))
    ]
    if rnd.random() < 0.05:
        headers.append(("content-type", "application/grpc"))
    return Case(
        path,
        tuple(headers),
        method=rnd.choice(["GET", "POST"]),
        authority=f"t{rnd.randrange(_TABLES)}",
    )


_TABLES = 8
"""Independent route tables (virtual hosts ``t0``..``t7``): a catch-all only hides the rest
of its own table."""


def random_table(
    seed: int, routes: int, cases: int
) -> tuple[route_pb2.RouteConfiguration, list[Case]]:
    """``routes`` random routes per virtual host, and ``cases`` random requests."""
    rnd = random.Random(seed)
    config = {
        "name": f"random-{seed}",
        "virtual_hosts": [
            {
                "name": f"t{t}",
                "domains": [f"t{t}"],
                "routes": [_random_route(rnd, f"t{t}-r{i}") for i in range(routes)],
            }
            for t in range(_TABLES)
        ],
    }
    rc = json_format.ParseDict(config, route_pb2.RouteConfiguration())
    return rc, [_random_case(rnd) for _ in range(cases)]


@pytest.mark.parametrize("seed", [20261121, 1, 2])
def test_random_tables_route_as_envoy(
    seed: int, tmp_path: Path, envoy_bin: Path, echo_port: int
) -> None:
    """Seeded random tables (8 x 25 routes) and 1,200 random requests: Envoy and pymesh choose
    the same route (or none) for every request."""
    rc, cases = random_table(seed=seed, routes=25, cases=1200)
    with run_envoy(tmp_path, envoy_bin, rc, echo_port) as (handle, data):
        decoded = decode_resource(ResourceType.ROUTE_CONFIGURATION.type_url, data).value
        assert isinstance(decoded, RouteConfiguration)
        rng = random.Random(3)
        conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
        mismatches = []
        chosen = Counter[str | None]()
        try:
            for case in cases:
                want = _send(conn, case)
                got = _pymesh(decoded, case, rng)
                chosen[want.route] += 1
                if want.route != got.route:
                    mismatches.append(f"{case}: envoy {want.route}; pymesh {got.route}")
                elif _is_grpc(case):
                    continue  # Envoy answers gRPC requests' local replies the gRPC way
                elif (want.status, want.location) != (got.status, got.location) or (
                    want.upstream is not None
                    and got.upstream is not None
                    and (want.upstream["path"], want.upstream["host"])
                    != (got.upstream["path"], got.upstream["host"])
                ):
                    mismatches.append(f"{case}:\n  envoy  {want}\n  pymesh {got}")
        finally:
            conn.close()
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ:\n" + "\n".join(
        mismatches[:40]
    )
    # The table is not degenerate: many routes are chosen, and some requests match nothing.
    assert len(chosen) > 60, chosen
    assert chosen[None] > 0, chosen


_LABELS = ["a", "b", "ab", "a-b", "B"]
_PORTS = ["", "", ":80", ":8080"]


def _random_host(rnd: random.Random) -> str:
    return ".".join(rnd.choice(_LABELS) for _ in range(rnd.randint(1, 3)))


def _random_domain(rnd: random.Random) -> str:
    host = _random_host(rnd).lower()
    kind = rnd.choice(["exact", "exact", "suffix-dot", "suffix", "prefix-dot", "prefix"])
    if kind == "suffix-dot":
        host = "*." + host
    elif kind == "suffix":
        host = "*" + host
    elif kind == "prefix-dot":
        host = host + ".*"
    elif kind == "prefix":
        host = host + "*"
    return host + (rnd.choice(_PORTS) if not kind.startswith("prefix") else "")


def random_vhosts(seed: int, ignore_port: bool) -> tuple[route_pb2.RouteConfiguration, list[Case]]:
    """Virtual hosts with random exact/suffix/prefix domains (one route each, named after
    the virtual host) and random authorities."""
    rnd = random.Random(seed)
    seen: set[str] = set()
    vhosts = []
    for i in range(40):
        domains = [d for d in {_random_domain(rnd) for _ in range(rnd.randint(1, 3))} - seen]
        seen.update(domains)
        if rnd.random() < 0.02 and "*" not in seen:
            domains.append("*")
            seen.add("*")
        if not domains:
            continue
        vhosts.append(
            {
                "name": f"vh{i}",
                "domains": sorted(domains),
                "routes": [
                    {
                        "name": f"vh{i}",
                        "match": {"prefix": "/"},
                        **_ok(f"vh{i}"),
                        "response_headers_to_add": [
                            {"header": {"key": "x-route", "value": f"vh{i}"}}
                        ],
                    }
                ],
            }
        )
    config = {
        "name": f"vhosts-{seed}",
        "ignore_port_in_host_matching": ignore_port,
        "virtual_hosts": vhosts,
    }
    cases = [Case("/", authority=_random_host(rnd) + rnd.choice(_PORTS)) for _ in range(800)]
    return json_format.ParseDict(config, route_pb2.RouteConfiguration()), cases


@pytest.mark.parametrize("ignore_port", [False, True], ids=["port-matters", "ignore-port"])
def test_random_virtual_hosts_as_envoy(
    ignore_port: bool, tmp_path: Path, envoy_bin: Path, echo_port: int
) -> None:
    """Random domains (exact, ``*.x``, ``*x``, ``x.*``, ``x*``, with and without ports) and
    random authorities: the virtual host chosen agrees with Envoy's."""
    rc, cases = random_vhosts(seed=7, ignore_port=ignore_port)
    with run_envoy(tmp_path, envoy_bin, rc, echo_port) as (handle, data):
        decoded = decode_resource(ResourceType.ROUTE_CONFIGURATION.type_url, data).value
        assert isinstance(decoded, RouteConfiguration)
        conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
        mismatches = []
        chosen = Counter[str | None]()
        try:
            for case in cases:
                want = _send(conn, case).route
                vhost = select_vhost(decoded, case.authority)
                got = None if vhost is None else vhost.name
                chosen[want] += 1
                if want != got:
                    mismatches.append(f"{case.authority!r}: envoy {want}; pymesh {got}")
        finally:
            conn.close()
    assert not mismatches, "\n".join(mismatches[:40])
    assert len(chosen) > 10 and chosen[None] > 0, chosen


def test_runtime_fractions_share_one_draw_like_envoy(
    tmp_path: Path, envoy_bin: Path, echo_port: int
) -> None:
    """``runtime_fraction`` routes 30 % then 60 % then a catch-all: with one random value
    per request shared by all routes (Envoy's stream id), the second route takes the draws in
    [30, 60) only: about 30/30/40, where independent draws would give 30/42/28. Envoy's
    split and pymesh's must both show it."""

    def fraction_route(name: str, numerator: int | None) -> dict[str, Any]:
        match: dict[str, Any] = {"prefix": "/"}
        if numerator is not None:
            match["runtime_fraction"] = {"default_value": {"numerator": numerator}}
        return {
            "name": name,
            "match": match,
            **_ok(name),
            "response_headers_to_add": [{"header": {"key": "x-route", "value": name}}],
        }

    config = {
        "name": "fractions",
        "virtual_hosts": [
            {
                "name": "main",
                "domains": ["*"],
                "routes": [
                    fraction_route("p30", 30),
                    fraction_route("p60", 60),
                    fraction_route("rest", None),
                ],
            }
        ],
    }
    rc = json_format.ParseDict(config, route_pb2.RouteConfiguration())
    n = 1000
    with run_envoy(tmp_path, envoy_bin, rc, echo_port) as (handle, data):
        decoded = decode_resource(ResourceType.ROUTE_CONFIGURATION.type_url, data).value
        assert isinstance(decoded, RouteConfiguration)
        conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
        try:
            envoy_split = Counter(_send(conn, Case("/")).route for _ in range(n))
        finally:
            conn.close()
    rng = random.Random(5)
    pymesh_split = Counter(_pymesh(decoded, Case("/"), rng).route for _ in range(n))
    for split in (envoy_split, pymesh_split):
        # Shares 0.3/0.3/0.4; 5 points is > 3 standard deviations at n = 1000.
        assert abs(split["p30"] / n - 0.3) < 0.05, split
        assert abs(split["p60"] / n - 0.3) < 0.05, split
        assert abs(split["rest"] / n - 0.4) < 0.05, split
