"""Route-matching hot path benchmark (a script, not a test).

    /work/venv/bin/python bench/routing_bench.py [--seconds S] [--vhosts N]

Side by side, in one process, on the same requests:

* ``compiled``: :func:`pymesh.core.routing.route_request` (per-vhost compiled predicates);
* ``naive``: a straightforward interpreter over the same models (what ``route_request`` would
  cost without precompilation: the baseline the ratio is against);
* ``full``: the whole per-request routing work of an adapter: virtual host lookup among
  ``--vhosts`` Istio-like virtual hosts, route, weighted cluster choice, request rewrite;
* vhost lookup alone: the indexed :func:`select_vhost` vs the model's linear
  :func:`select_virtual_host`.

The table has 10 routes, Istio-VirtualService-shaped (header match on ``end-user``, prefix
and exact paths, a regex, a query parameter, a catch-all). Requests hit route 1, route 5,
the catch-all (route 10) and, for a table without catch-all, nothing. Reports µs per call
(best of 7 runs) and the naive/compiled ratio. Target: a few µs for a 10-route table.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from pymesh.core.routing import pick_cluster, rewrite_request, route_request, select_vhost
from pymesh.core.types import Headers, RequestInfo
from pymesh.model.matcher import StringMatcher
from pymesh.model.route import (
    HeaderMatcher,
    PathMatchKind,
    QueryParameterMatcher,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
    select_virtual_host,
)


def _routes(catch_all: bool) -> tuple[Route, ...]:
    def r(name: str, match: RouteMatch, action: RouteAction | None = None) -> Route:
        return Route(match, action or RouteAction(cluster=f"outbound|9080|{name}|reviews"), name)

    p = PathMatchKind.PREFIX
    routes = [
        r(
            "jason",
            RouteMatch(p, "/", headers=(HeaderMatcher("end-user", StringMatcher.exact("jason")),)),
        ),
        r("api-v1", RouteMatch(p, "/api/v1/")),
        r("api-v2", RouteMatch(p, "/api/v2/", case_sensitive=False)),
        r("health", RouteMatch(PathMatchKind.PATH, "/healthz")),
        r(
            "products",
            RouteMatch(PathMatchKind.SAFE_REGEX, regex=StringMatcher.regex("/products/[0-9]+")),
            RouteAction(
                prefix_rewrite="/p/",
                weighted_clusters=(WeightedCluster("v1", 90), WeightedCluster("v2", 10)),
            ),
        ),
        r(
            "canary",
            RouteMatch(
                p, "/", query_parameters=(QueryParameterMatcher("canary", present_match=True),)
            ),
        ),
        r("static", RouteMatch(p, "/static/")),
        r("login", RouteMatch(PathMatchKind.PATH, "/login")),
        r(
            "beta",
            RouteMatch(p, "/", headers=(HeaderMatcher("x-beta", StringMatcher.prefix("yes")),)),
        ),
    ]
    routes.append(r("default", RouteMatch(p, "/") if catch_all else RouteMatch(p, "/nomatch/")))
    return tuple(routes)


def _naive(vhost: VirtualHost, request: RequestInfo) -> Route | None:
    """Interpret the models directly, no precompilation (the baseline)."""
    path = request.path.split("?", 1)[0]
    query = dict(p.partition("=")[::2] for p in request.query.split("&")) if request.query else {}
    for route in vhost.routes:
        m = route.match
        if m.path_kind is PathMatchKind.PREFIX:
            ok = (path if m.case_sensitive else path.lower()).startswith(
                m.path if m.case_sensitive else m.path.lower()
            )
        elif m.path_kind is PathMatchKind.PATH:
            ok = path == m.path
        elif m.path_kind is PathMatchKind.SAFE_REGEX:
            assert m.regex is not None
            ok = m.regex.matches(path)
        else:
            ok = False
        if not ok:
            continue
        for h in m.headers:
            value = request.headers.get(h.name)
            hit = (
                value is not None
                if h.string_match is None
                else value is not None and h.string_match.matches(value)
            )
            if hit == h.invert_match:
                ok = False
                break
        if not ok:
            continue
        for q in m.query_parameters:
            if q.name not in query or (
                q.string_match is not None and not q.string_match.matches(query[q.name])
            ):
                ok = False
                break
        if ok:
            return route
    return None


def _time(fn: Callable[[], object], seconds: float) -> float:
    """µs per call: the best of 7 runs of about ``seconds / 7`` each (the minimum is the
    least disturbed by other processes on a shared machine)."""
    n = 1
    while True:  # calibrate
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt > 0.02:
            break
        n *= 4
    per_run = max(1, int(n * (seconds / 7) / dt))
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(per_run):
            fn()
        runs.append((time.perf_counter() - t0) / per_run * 1e6)
    return min(runs)


def _config(n_vhosts: int, routes: tuple[Route, ...]) -> RouteConfiguration:
    vhosts = []
    for i in range(n_vhosts):
        host = f"svc{i}.ns{i % 7}.svc.cluster.local"
        domains = (host, f"{host}:9080", f"svc{i}", f"svc{i}:9080", f"svc{i}.ns{i % 7}")
        vhosts.append(VirtualHost(f"svc{i}:9080", domains, routes))
    vhosts.append(VirtualHost("allow_any", ("*",), routes))
    return RouteConfiguration("9080", tuple(vhosts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--vhosts", type=int, default=200)
    args = parser.parse_args()

    with_default = VirtualHost("t", ("*",), _routes(catch_all=True))
    without_default = VirtualHost("t", ("*",), _routes(catch_all=False))
    rng = random.Random(1)
    cases = {
        "route 1 (header)": (
            with_default,
            RequestInfo("GET", "reviews:9080", "/x", Headers([("end-user", "jason")])),
        ),
        "route 5 (regex)": (with_default, RequestInfo("GET", "reviews:9080", "/products/42")),
        "route 10 (catch-all)": (
            with_default,
            RequestInfo("GET", "reviews:9080", "/other?a=b", Headers([("x-beta", "no")])),
        ),
        "no route": (without_default, RequestInfo("GET", "reviews:9080", "/other")),
    }
    print(f"{'case':24} {'compiled µs':>12} {'naive µs':>10} {'naive/compiled':>15}")
    for label, (vh, request) in cases.items():
        assert route_request(vh, request, rng=rng) is _naive(vh, request), label
        compiled = _time(
            lambda vh=vh, request=request: route_request(vh, request, rng=rng), args.seconds
        )
        naive = _time(lambda vh=vh, request=request: _naive(vh, request), args.seconds)
        print(f"{label:24} {compiled:12.2f} {naive:10.2f} {naive / compiled:14.2f}x")

    config = _config(args.vhosts, _routes(catch_all=True))
    # The last vhost's short name: the linear scan's worst case among hits.
    authority = f"svc{args.vhosts - 1}:9080"
    assert select_vhost(config, authority) is select_virtual_host(config.virtual_hosts, authority)
    indexed = _time(lambda: select_vhost(config, authority), args.seconds)
    linear = _time(lambda: select_virtual_host(config.virtual_hosts, authority), args.seconds)
    print(f"\nvhost lookup among {args.vhosts + 1} vhosts ({5 * args.vhosts + 1} domains):")
    ratio = linear / indexed
    print(f"  indexed {indexed:.2f} µs   linear (model) {linear:.2f} µs   ratio {ratio:.0f}x")

    request = RequestInfo("GET", authority, "/products/42?x=1", Headers([("accept", "*/*")]))

    def full() -> RequestInfo:
        vh = select_vhost(config, request.authority)
        assert vh is not None
        route = route_request(vh, request, rng=rng)
        assert route is not None and isinstance(route.action, RouteAction)
        choice = pick_cluster(route.action, request, rng=rng)
        return rewrite_request(route, route.action, vh, config, request, choice)

    print(
        f"\nfull routing (vhost + route 5 + weighted choice + prefix rewrite): "
        f"{_time(full, args.seconds):.2f} µs"
    )


if __name__ == "__main__":
    main()
