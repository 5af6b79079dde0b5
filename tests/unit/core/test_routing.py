"""Route matching, cluster choice, rewrites, header operations and redirects (pure, no I/O).

The Envoy oracle for all of this is ``tests/integration/core/test_route_conformance_envoy.py``;
these tests pin the semantics in small readable cases and cover what a single route table
there does not (``most_specific_header_mutations_wins``, distributions, caching).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.core.headers_ops import compile_header_ops, format_header_value
from pymesh.core.routing import (
    ClusterChoice,
    choose_cluster,
    is_grpc_request,
    match_route,
    pick_cluster,
    redirect_location,
    request_header_ops,
    response_header_ops,
    rewrite_request,
    route_request,
    select_vhost,
    uri_template_regex,
)
from pymesh.core.types import Headers, RequestInfo
from pymesh.model.matcher import StringMatcher
from pymesh.model.route import (
    AppendAction,
    FractionalPercent,
    HeaderMatcher,
    HeaderMutations,
    HeaderToAdd,
    Int64Range,
    PathMatchKind,
    QueryParameterMatcher,
    RedirectAction,
    RegexRewrite,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
    select_virtual_host,
)


def req(path: str = "/", *headers: tuple[str, str], **kw: object) -> RequestInfo:
    return RequestInfo(
        method=str(kw.get("method", "GET")),
        authority=str(kw.get("authority", "svc")),
        path=path,
        headers=Headers(headers),
        scheme=str(kw.get("scheme", "http")),
        grpc=bool(kw.get("grpc", False)),
    )


def route(name: str, match: RouteMatch, action: object = None, **kw: object) -> Route:
    return Route(
        match=match,
        action=action if action is not None else RouteAction(cluster=name),  # type: ignore[arg-type]
        name=name,
        **kw,  # type: ignore[arg-type]
    )


def prefix(p: str, **kw: object) -> RouteMatch:
    return RouteMatch(PathMatchKind.PREFIX, p, **kw)  # type: ignore[arg-type]


def vhost(*routes: Route, **kw: object) -> VirtualHost:
    return VirtualHost("vh", ("*",), routes, **kw)  # type: ignore[arg-type]


def first(vh: VirtualHost, request: RequestInfo, rng: random.Random | None = None) -> str | None:
    r = route_request(vh, request, rng=rng or random.Random(1))
    return None if r is None else r.name


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("match", "path", "expected"),
    [
        (prefix("/api"), "/api/x", True),
        (prefix("/api"), "/ap", False),
        (prefix("/API", case_sensitive=False), "/api/x", True),
        (prefix("/api"), "/API/x", False),
        (prefix(""), "/anything", True),
        (RouteMatch(PathMatchKind.PATH, "/a"), "/a?x=1", True),
        (RouteMatch(PathMatchKind.PATH, "/a"), "/a/", False),
        (RouteMatch(PathMatchKind.PATH, "/A", case_sensitive=False), "/a", True),
        (
            RouteMatch(PathMatchKind.SAFE_REGEX, regex=StringMatcher.regex("/i/[0-9]+")),
            "/i/12",
            True,
        ),
        (
            RouteMatch(PathMatchKind.SAFE_REGEX, regex=StringMatcher.regex("/i/[0-9]+")),
            "/i/12x",
            False,
        ),
        # The query is not part of what a regex sees.
        (RouteMatch(PathMatchKind.SAFE_REGEX, regex=StringMatcher.regex("/i.*")), "/i?x", True),
        (RouteMatch(PathMatchKind.SAFE_REGEX, regex=StringMatcher.regex("/i\\?x")), "/i?x", False),
        (RouteMatch(PathMatchKind.PATH_SEPARATED_PREFIX, "/sep"), "/sep", True),
        (RouteMatch(PathMatchKind.PATH_SEPARATED_PREFIX, "/sep"), "/sep/x", True),
        (RouteMatch(PathMatchKind.PATH_SEPARATED_PREFIX, "/sep"), "/sepx", False),
        (RouteMatch(PathMatchKind.PATH_SEPARATED_PREFIX, "/sep"), "/sep?q", True),
        (RouteMatch(PathMatchKind.PATH_SEPARATED_PREFIX, "/S", case_sensitive=False), "/s/", True),
        (RouteMatch(PathMatchKind.URI_TEMPLATE, "/b/{id}/c"), "/b/12/c", True),
        (RouteMatch(PathMatchKind.URI_TEMPLATE, "/b/{id}/c"), "/b/1/2/c", False),
        (RouteMatch(PathMatchKind.URI_TEMPLATE, "/b/**"), "/b/1/2/c", True),
        (RouteMatch(PathMatchKind.URI_TEMPLATE, "/f/{n}.txt"), "/f/a.txt", True),
        (RouteMatch(PathMatchKind.URI_TEMPLATE, "/f/{n}.txt"), "/f/a.md", False),
        (RouteMatch(PathMatchKind.CONNECT), "/", False),
    ],
)
def test_path_matching(match: RouteMatch, path: str, expected: bool) -> None:
    assert (first(vhost(route("r", match)), req(path)) == "r") is expected


def test_routes_are_tried_in_order() -> None:
    vh = vhost(route("a", prefix("/x/")), route("b", prefix("/x/y")), route("c", prefix("/")))
    assert first(vh, req("/x/y")) == "a"
    assert first(vh, req("/z")) == "c"
    assert route_request(vhost(route("a", prefix("/x"))), req("/y"), rng=random.Random()) is None


def test_match_route_selects_the_virtual_host_first() -> None:
    config = RouteConfiguration(
        "rc",
        (
            VirtualHost("exact", ("api.example",), (route("e", prefix("/")),)),
            VirtualHost("other", ("*",), (route("o", prefix("/")),)),
        ),
    )
    found = match_route(config, req("/", authority="api.example"), rng=random.Random(1))
    assert found is not None and found.route.name == "e" and found.vhost.name == "exact"
    found = match_route(config, req("/", authority="elsewhere"), rng=random.Random(1))
    assert found is not None and found.route.name == "o"
    assert match_route(RouteConfiguration("rc"), req("/"), rng=random.Random(1)) is None


# --------------------------------------------------------------------------- headers


def hdr(name: str, **kw: object) -> RouteMatch:
    return prefix("/", headers=(HeaderMatcher(name, **kw),))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("match", "headers", "expected"),
    [
        (hdr("x", string_match=StringMatcher.exact("a")), [("x", "a")], True),
        (hdr("x", string_match=StringMatcher.exact("a")), [("X", "a")], True),
        (hdr("x", string_match=StringMatcher.exact("a")), [("x", "A")], False),
        (hdr("x", string_match=StringMatcher.exact("a", ignore_case=True)), [("x", "A")], True),
        (hdr("x", string_match=StringMatcher.prefix("ab")), [("x", "abc")], True),
        (hdr("x", string_match=StringMatcher.suffix("bc")), [("x", "abc")], True),
        (hdr("x", string_match=StringMatcher.contains("b")), [("x", "abc")], True),
        (hdr("x", string_match=StringMatcher.regex("a.c")), [("x", "abc")], True),
        (hdr("x", string_match=StringMatcher.regex("a.")), [("x", "abc")], False),
        # Several values: the matcher matches when any one value does (Envoy 1.40).
        (hdr("x", string_match=StringMatcher.exact("b")), [("x", "a"), ("x", "b")], True),
        (hdr("x", string_match=StringMatcher.exact("a,b")), [("x", "a"), ("x", "b")], False),
        # invert flips the result for a present header; a missing header stays unmatched.
        (hdr("x", string_match=StringMatcher.exact("a"), invert_match=True), [("x", "b")], True),
        (hdr("x", string_match=StringMatcher.exact("a"), invert_match=True), [("x", "a")], False),
        (hdr("x", string_match=StringMatcher.exact("a"), invert_match=True), [], False),
        (
            hdr("x", string_match=StringMatcher.exact("a"), invert_match=True),
            [("x", "a"), ("x", "b")],
            False,
        ),
        # present_match, with and without invert, on present and missing headers.
        (hdr("x", present_match=True), [("x", "")], True),
        (hdr("x", present_match=True), [], False),
        (hdr("x", present_match=False), [], True),
        (hdr("x", present_match=False), [("x", "1")], False),
        (hdr("x", present_match=True, invert_match=True), [], True),
        (hdr("x", present_match=True, invert_match=True), [("x", "1")], False),
        # treat_missing_header_as_empty
        (
            hdr("x", string_match=StringMatcher.exact(""), treat_missing_header_as_empty=True),
            [],
            True,
        ),
        (hdr("x", string_match=StringMatcher.exact("")), [], False),
        # range: absl SimpleAtoi (sign and surrounding whitespace, nothing else)
        (hdr("x", range_match=Int64Range(10, 20)), [("x", "10")], True),
        (hdr("x", range_match=Int64Range(10, 20)), [("x", "20")], False),
        (hdr("x", range_match=Int64Range(10, 20)), [("x", "+15")], True),
        (hdr("x", range_match=Int64Range(10, 20)), [("x", " 15 ")], True),
        (hdr("x", range_match=Int64Range(10, 20)), [("x", "1_5")], False),
        (hdr("x", range_match=Int64Range(10, 20)), [("x", "15.0")], False),
        (hdr("x", range_match=Int64Range(10, 20)), [("x", "\u0661\u0665")], False),
        (hdr("x", range_match=Int64Range(-(2**63), 2**63 - 1)), [("x", str(2**63))], False),
        (hdr("x", range_match=Int64Range(-5, 0)), [("x", "-1")], True),
        # pseudo-headers and host
        (hdr(":method", string_match=StringMatcher.exact("POST")), [], False),
        (hdr(":authority", string_match=StringMatcher.exact("svc")), [], True),
        (hdr("host", string_match=StringMatcher.exact("svc")), [], True),
        (hdr(":path", string_match=StringMatcher.prefix("/p")), [], True),
        (hdr(":scheme", string_match=StringMatcher.exact("http")), [], True),
    ],
)
def test_header_matching(match: RouteMatch, headers: list[tuple[str, str]], expected: bool) -> None:
    assert (first(vhost(route("r", match)), req("/p", *headers)) == "r") is expected


def test_all_header_matchers_must_match() -> None:
    m = prefix(
        "/",
        headers=(
            HeaderMatcher("a", string_match=StringMatcher.exact("1")),
            HeaderMatcher("b", present_match=True),
        ),
    )
    vh = vhost(route("r", m))
    assert first(vh, req("/", ("a", "1"), ("b", ""))) == "r"
    assert first(vh, req("/", ("a", "1"))) is None
    assert first(vh, req("/", ("b", "1"))) is None


# --------------------------------------------------------------------------- query, grpc


def q(*matchers: QueryParameterMatcher) -> RouteMatch:
    return prefix("/", query_parameters=matchers)


@pytest.mark.parametrize(
    ("match", "path", "expected"),
    [
        (q(QueryParameterMatcher("k", StringMatcher.exact("v"))), "/?k=v", True),
        (q(QueryParameterMatcher("k", StringMatcher.exact("v"))), "/?k=w&k=v", False),
        (q(QueryParameterMatcher("k", StringMatcher.exact("v"))), "/?a=1&k=v", True),
        (q(QueryParameterMatcher("k", StringMatcher.exact("v"))), "/?k=%76", False),
        (q(QueryParameterMatcher("k", StringMatcher.exact(""))), "/?k", True),
        (q(QueryParameterMatcher("k", present_match=True)), "/?k", True),
        (q(QueryParameterMatcher("k", present_match=True)), "/?kk=1", False),
        (q(QueryParameterMatcher("k", present_match=False)), "/?x=1", True),
        (q(QueryParameterMatcher("k", present_match=False)), "/?k=1", False),
        (
            q(QueryParameterMatcher("k", StringMatcher.prefix("A", ignore_case=True))),
            "/?k=ab",
            True,
        ),
    ],
)
def test_query_matching(match: RouteMatch, path: str, expected: bool) -> None:
    assert (first(vhost(route("r", match)), req(path)) == "r") is expected


def test_grpc_matcher() -> None:
    vh = vhost(route("g", prefix("/", grpc=True)))
    assert first(vh, req("/S/M", ("content-type", "application/grpc"))) == "g"
    assert first(vh, req("/S/M", ("content-type", "application/grpc+proto"))) == "g"
    assert first(vh, req("/S/M", ("content-type", "application/grpc-web"))) is None
    assert first(vh, req("/S/M")) is None
    assert first(vh, req("/S/M", grpc=True)) == "g"
    assert not is_grpc_request(req("/", ("content-type", "application/json")))


# --------------------------------------------------------------------------- runtime fraction


def test_runtime_fraction_uses_one_draw_per_request_like_envoy() -> None:
    """Envoy draws one random value per stream for every route: two 50 % routes do not
    split 25/25/50 - the second refuses exactly what the first refused."""
    half = FractionalPercent(50, 100)
    vh = vhost(
        route("a", prefix("/", runtime_fraction=half)),
        route("b", prefix("/", runtime_fraction=half)),
        route("c", prefix("/")),
    )
    rng = random.Random(5)
    seen = Counter(first(vh, req("/"), rng) for _ in range(4000))
    assert seen["b"] == 0
    assert abs(seen["a"] / 4000 - 0.5) < 0.04
    assert seen["a"] + seen["c"] == 4000


def test_runtime_fraction_extremes_and_no_draw_when_not_needed() -> None:
    class NoRandom(random.Random):
        def getrandbits(self, k: int) -> int:
            raise AssertionError("drew a random value")

    vh = vhost(
        route("never", prefix("/x", runtime_fraction=FractionalPercent(0, 100))),
        route("always", prefix("/", runtime_fraction=FractionalPercent(100, 100))),
    )
    assert first(vh, req("/x"), random.Random(3)) == "always"
    # A route whose path does not match never costs a draw.
    assert (
        route_request(
            vhost(route("n", prefix("/x", runtime_fraction=FractionalPercent(1)))),
            req("/y"),
            rng=NoRandom(),
        )
        is None
    )


# --------------------------------------------------------------------------- clusters


def test_weighted_clusters_follow_their_weights() -> None:
    action = RouteAction(
        weighted_clusters=(
            WeightedCluster("a", 10),
            WeightedCluster("zero", 0),
            WeightedCluster("b", 30),
            WeightedCluster("c", 60),
        )
    )
    rng = random.Random(11)
    n = 20_000
    seen = Counter(choose_cluster(action, req(), rng=rng) for _ in range(n))
    assert seen["zero"] == 0
    expected = {"a": 0.1, "b": 0.3, "c": 0.6}
    chi2 = sum((seen[k] - n * p) ** 2 / (n * p) for k, p in expected.items())
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def test_cluster_header_and_weighted_cluster_header() -> None:
    rng = random.Random(1)
    assert choose_cluster(RouteAction(cluster="c"), req(), rng=rng) == "c"
    action = RouteAction(cluster_header="x-c")
    assert choose_cluster(action, req("/", ("x-c", "one"), ("x-c", "two")), rng=rng) == "one"
    assert choose_cluster(action, req("/"), rng=rng) == ""
    wc = WeightedCluster("", 1, cluster_header="x-w")
    weighted = RouteAction(weighted_clusters=(wc,))
    choice = pick_cluster(weighted, req("/", ("x-w", "dyn")), rng=rng)
    assert choice == ClusterChoice("dyn", wc)


# --------------------------------------------------------------------------- header ops


def add(
    key: str,
    value: str,
    action: AppendAction = AppendAction.APPEND_IF_EXISTS_OR_ADD,
    keep_empty: bool = False,
) -> HeaderToAdd:
    return HeaderToAdd(key, value, action, keep_empty)


def test_header_level_removes_then_overwrites_then_appends() -> None:
    level = HeaderMutations(
        request_headers_to_add=(
            add("a", "1"),
            add("absent", "2", AppendAction.ADD_IF_ABSENT),
            add("present", "3", AppendAction.ADD_IF_ABSENT),
            add("ow", "4", AppendAction.OVERWRITE_IF_EXISTS),
            add("ow-missing", "5", AppendAction.OVERWRITE_IF_EXISTS),
            add("set", "6", AppendAction.OVERWRITE_IF_EXISTS_OR_ADD),
            add("empty", ""),
            add("keep", "", keep_empty=True),
            add("gone", "7", AppendAction.ADD_IF_ABSENT),
        ),
        request_headers_to_remove=("gone",),
    )
    ops = compile_header_ops([level], response=False)
    before = Headers(
        [("a", "0"), ("present", "x"), ("ow", "old"), ("set", "s1"), ("set", "s2"), ("gone", "g")]
    )
    after = ops.apply(before)
    assert after.get_all("a") == ["0", "1"]
    assert after.get_all("absent") == ["2"]
    assert after.get_all("present") == ["x"]
    assert after.get_all("ow") == ["4"]
    assert "ow-missing" not in after
    assert after.get_all("set") == ["6"]
    assert "empty" not in after
    assert after.get_all("keep") == [""]
    # Removed first, so ADD_IF_ABSENT adds it back.
    assert after.get_all("gone") == ["7"]


def test_header_value_formatters() -> None:
    r = RequestInfo("GET", "svc", "/p", Headers([("x-in", "v")]), source_ip="10.0.0.1")
    assert format_header_value("100%%", r) == "100%"
    assert format_header_value("%REQ(x-in)%-%REQ(:path)%", r) == "v-/p"
    assert format_header_value("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", r) == "10.0.0.1"
    assert format_header_value("%REQ(x-missing?x-in)%|%REQ(x-missing)%", r) == "v|"
    assert format_header_value("%UNKNOWN_THING%", r) == "%UNKNOWN_THING%"
    assert format_header_value("plain", None) == "plain"


def _levels() -> tuple[Route, VirtualHost, RouteConfiguration]:
    def level(v: str) -> HeaderMutations:
        return HeaderMutations(
            request_headers_to_add=(add("x-level", v, AppendAction.OVERWRITE_IF_EXISTS_OR_ADD),),
            response_headers_to_add=(add("x-level", v, AppendAction.OVERWRITE_IF_EXISTS_OR_ADD),),
        )

    r = route("r", prefix("/"), headers=level("route"))
    vh = VirtualHost("vh", ("*",), (r,), headers=level("vhost"))
    return r, vh, RouteConfiguration("rc", (vh,), headers=level("config"))


def test_least_specific_level_wins_by_default() -> None:
    r, vh, config = _levels()
    assert request_header_ops(r, vh, config).apply(Headers()).get("x-level") == "config"
    assert response_header_ops(r, vh, config).apply(Headers()).get("x-level") == "config"


def test_most_specific_header_mutations_wins() -> None:
    r, vh, config = _levels()
    config = RouteConfiguration(
        "rc", (vh,), headers=config.headers, most_specific_header_mutations_wins=True
    )
    assert request_header_ops(r, vh, config).apply(Headers()).get("x-level") == "route"
    assert response_header_ops(r, vh, config).apply(Headers()).get("x-level") == "route"


def test_header_ops_are_compiled_once() -> None:
    r, vh, config = _levels()
    assert request_header_ops(r, vh, config) is request_header_ops(r, vh, config)
    assert request_header_ops(r, vh, config) is not response_header_ops(r, vh, config)


# --------------------------------------------------------------------------- rewrites


def _rewrite(
    match: RouteMatch, action: RouteAction, path: str, *headers: tuple[str, str]
) -> RequestInfo:
    r = route("r", match, action)
    vh = vhost(r)
    return rewrite_request(r, action, vh, RouteConfiguration("rc", (vh,)), req(path, *headers))


def test_prefix_rewrite_replaces_the_matched_prefix_and_keeps_the_query() -> None:
    out = _rewrite(prefix("/api/"), RouteAction(cluster="c", prefix_rewrite="/"), "/api/x?q=1")
    assert out.path == "/x?q=1"
    assert out.headers.get("x-envoy-original-path") == "/api/x?q=1"
    # Case-insensitive prefix: the matched characters are replaced whatever their case.
    ci = prefix("/API", case_sensitive=False)
    assert _rewrite(ci, RouteAction(cluster="c", prefix_rewrite="/v2"), "/api/x").path == "/v2/x"
    exact = RouteMatch(PathMatchKind.PATH, "/old")
    assert (
        _rewrite(exact, RouteAction(cluster="c", prefix_rewrite="/new"), "/old?a").path == "/new?a"
    )


def test_regex_and_template_rewrites() -> None:
    rx = RegexRewrite(StringMatcher.regex("^/a/([^/]+)/(.*)$"), "/\\2/\\1")
    m = RouteMatch(PathMatchKind.SAFE_REGEX, regex=StringMatcher.regex("/a/.*"))
    assert _rewrite(m, RouteAction(cluster="c", regex_rewrite=rx), "/a/b/c?x").path == "/c/b?x"
    tpl = RouteMatch(PathMatchKind.URI_TEMPLATE, "/t/{x}/{y=**}")
    action = RouteAction(cluster="c", path_template_rewrite="/{y}/in/{x}")
    assert _rewrite(tpl, action, "/t/1/a/b?q").path == "/a/b/in/1?q"


def test_no_rewrite_returns_the_same_request() -> None:
    request = req("/x")
    r = route("r", prefix("/"))
    vh = vhost(r)
    assert rewrite_request(r, RouteAction(cluster="c"), vh, None, request, "c") is request


def test_host_rewrites() -> None:
    literal = RouteAction(cluster="c", host_rewrite_literal="new.host")
    assert _rewrite(prefix("/"), literal, "/").authority == "new.host"
    header = RouteAction(cluster="c", host_rewrite_header="x-host")
    assert _rewrite(prefix("/"), header, "/", ("x-host", "h1"), ("x-host", "h2")).authority == "h1"
    assert _rewrite(prefix("/"), header, "/").authority == "svc"


def test_weighted_cluster_mutations_apply_first() -> None:
    wc = WeightedCluster(
        "c",
        1,
        headers=HeaderMutations(request_headers_to_add=(add("x-wc", "1"),)),
        host_rewrite_literal="wc.host",
    )
    action = RouteAction(weighted_clusters=(wc,))
    r = route(
        "r",
        prefix("/"),
        action,
        headers=HeaderMutations(
            request_headers_to_add=(add("x-wc", "2", AppendAction.ADD_IF_ABSENT),)
        ),
    )
    vh = vhost(r)
    choice = pick_cluster(action, req(), rng=random.Random(1))
    out = rewrite_request(r, action, vh, None, req(), choice)
    assert out.authority == "wc.host"
    assert out.headers.get_all("x-wc") == ["1"]


# --------------------------------------------------------------------------- redirects


@pytest.mark.parametrize(
    ("action", "path", "authority", "scheme", "expected"),
    [
        (RedirectAction(scheme_redirect="https"), "/a?b", "svc", "http", "https://svc/a?b"),
        (RedirectAction(scheme_redirect="https"), "/a", "svc:80", "http", "https://svc/a"),
        (RedirectAction(scheme_redirect="https"), "/a", "svc:8080", "http", "https://svc:8080/a"),
        (RedirectAction(scheme_redirect="http"), "/a", "svc:443", "https", "http://svc/a"),
        (RedirectAction(host_redirect="h"), "/a", "svc:9", "http", "http://h/a"),
        (RedirectAction(port_redirect=81), "/a", "svc:9", "http", "http://svc:81/a"),
        (RedirectAction(port_redirect=81), "/a", "[::1]:9", "http", "http://[::1]:81/a"),
        (RedirectAction(path_redirect="/n"), "/a?q", "svc", "http", "http://svc/n?q"),
        (RedirectAction(path_redirect="/n?z"), "/a?q", "svc", "http", "http://svc/n?z"),
        (
            RedirectAction(path_redirect="/n?z", strip_query=True),
            "/a?q",
            "svc",
            "http",
            "http://svc/n?z",
        ),
        (
            RedirectAction(path_redirect="/n", strip_query=True),
            "/a?q",
            "svc",
            "http",
            "http://svc/n",
        ),
        (RedirectAction(strip_query=True), "/a?q", "svc", "http", "http://svc/a"),
        (
            RedirectAction(regex_rewrite=RegexRewrite(StringMatcher.regex("/(a)"), "/x/\\1")),
            "/a?q",
            "svc",
            "http",
            "http://svc/x/a?q",
        ),
    ],
)
def test_redirect_location(
    action: RedirectAction, path: str, authority: str, scheme: str, expected: str
) -> None:
    request = req(path, authority=authority, scheme=scheme)
    assert redirect_location(action, request) == expected


def test_redirect_prefix_rewrite_replaces_the_matched_prefix() -> None:
    action = RedirectAction(prefix_rewrite="/new/")
    r = route("r", prefix("/old/"), action)
    assert redirect_location(action, req("/old/x?y"), route=r) == "http://svc/new/x?y"


# --------------------------------------------------------------------------- URI templates


@pytest.mark.parametrize(
    ("template", "matches", "misses"),
    [
        ("/a/*", ["/a/b", "/a/b.c~d"], ["/a/", "/a/b/c", "/a/b=c"]),
        ("/a/**", ["/a/", "/a/b/c"], ["/a", "/b/"]),
        ("/{x}/{y=p/*}/e", ["/1/p/2/e"], ["/1/q/2/e", "/1/p/e"]),
        ("/f/{n}.txt", ["/f/a.txt"], ["/f/.txt", "/f/a/b.txt"]),
        ("/a/", ["/a/"], ["/a"]),
    ],
)
def test_uri_template_regex(template: str, matches: list[str], misses: list[str]) -> None:
    rx = uri_template_regex(template)
    assert isinstance(rx, re.Pattern)
    for path in matches:
        assert rx.fullmatch(path), path
    for path in misses:
        assert not rx.fullmatch(path), path


def test_compiled_tables_follow_new_snapshots() -> None:
    """A new (immutable) virtual host is compiled afresh; the old one keeps its own."""
    old = vhost(route("old", prefix("/")))
    new = vhost(route("new", prefix("/")))
    assert first(old, req("/")) == "old"
    assert first(new, req("/")) == "new"
    assert first(old, req("/")) == "old"


# --------------------------------------------------------------------------- virtual hosts

_LABEL = st.sampled_from(["a", "b", "ab", "x-a", "a.b", "b:80", "a:80", ""])
_DOMAIN = st.one_of(
    st.just("*"),
    st.builds(lambda s: "*" + s, _LABEL),
    st.builds(lambda s: s + "*", _LABEL.filter(bool)),
    _LABEL.filter(bool),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(_DOMAIN, min_size=1, max_size=3), min_size=1, max_size=5),
    st.lists(st.builds(lambda a, b: a + b, _LABEL, _LABEL), min_size=1, max_size=5),
    st.booleans(),
)
def test_vhost_index_agrees_with_the_model(
    domains: list[list[str]], hosts: list[str], ignore_port: bool
) -> None:
    seen: set[str] = set()
    vhosts = []
    for i, ds in enumerate(domains):
        unique = tuple(d for d in dict.fromkeys(ds) if d not in seen)
        seen.update(unique)
        if unique:
            vhosts.append(VirtualHost(f"vh{i}", unique))
    config = RouteConfiguration("rc", tuple(vhosts), ignore_port_in_host_matching=ignore_port)
    for host in hosts:
        want = select_virtual_host(config.virtual_hosts, host, ignore_port=ignore_port)
        assert select_vhost(config, host) is want, host


def test_routing_doc_example_runs() -> None:
    doc = Path(__file__).resolve().parents[3] / "docs" / "routing.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {})


def test_header_match_helpers_share_the_route_semantics() -> None:
    from pymesh.core.routing import header_matches, request_header_matches

    exact_b = HeaderMatcher("x", string_match=StringMatcher.exact("b"))
    assert request_header_matches(exact_b, req("/", ("x", "a"), ("x", "b")))
    assert not request_header_matches(exact_b, req("/", ("x", "a")))
    method = HeaderMatcher(":method", string_match=StringMatcher.exact("POST"))
    assert request_header_matches(method, req("/", method="POST"))
    status = HeaderMatcher(":status", range_match=Int64Range(500, 600))
    assert header_matches(status, Headers([(":status", "503")]))
    assert not header_matches(status, Headers([(":status", "200")]))
    absent = HeaderMatcher("x-gone", present_match=False)
    assert header_matches(absent, Headers())


@pytest.mark.parametrize(
    ("pattern", "substitution", "value", "expected"),
    [
        # RE2 GlobalReplace skips an empty match where the previous match ended (re.sub
        # would give "-/-a--"); found by the random tables against Envoy.
        ("b*", "-", "/ab", "-/-a-"),
        ("x*", "-", "ab", "-a-b-"),
        ("^/(.*)$", "/w/\\1", "/a/b", "/w/a/b"),
        ("a", "\\0\\0", "/a", "/aa"),
        ("a", "\\\\", "/a", "/\\"),
        ("z", "y", "/a", "/a"),
    ],
)
def test_regex_rewrite_follows_re2_global_replace(
    pattern: str, substitution: str, value: str, expected: str
) -> None:
    action = RouteAction(
        cluster="c", regex_rewrite=RegexRewrite(StringMatcher.regex(pattern), substitution)
    )
    r = route("r", prefix("/"), action)
    assert rewrite_request(r, action, vhost(r), None, req(value)).path == expected


def test_regex_substitute_is_public_for_other_policies() -> None:
    from pymesh.core.routing import regex_substitute

    assert regex_substitute(RegexRewrite(StringMatcher.regex("b*"), "-"), "ab") == "-a-"


def test_auto_host_rewrite_uses_the_endpoint_hostname() -> None:
    from pymesh.core.routing import auto_host_rewrite

    on = RouteAction(cluster="c", auto_host_rewrite=True)
    request = req("/x")
    assert auto_host_rewrite(on, request, "ep.example").authority == "ep.example"
    assert auto_host_rewrite(on, request, "") is request
    assert auto_host_rewrite(RouteAction(cluster="c"), request, "ep.example") is request
