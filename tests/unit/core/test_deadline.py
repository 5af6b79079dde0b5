"""call_deadlines: Envoy's router timeout, per-try timeout, headers and stream duration."""

from __future__ import annotations

import pytest

from pymesh.core.deadline import Deadlines, call_deadlines, format_grpc_timeout, parse_grpc_timeout
from pymesh.core.types import Headers, RequestInfo
from pymesh.model.route import RetryPolicy, RouteAction

NOW = 1000.0


def req(*headers: tuple[str, str], grpc: bool = False) -> RequestInfo:
    return RequestInfo("POST" if grpc else "GET", "svc", "/", Headers(headers), grpc=grpc)


def dl(
    action: RouteAction | None = None,
    retry: RetryPolicy | None = None,
    request: RequestInfo | None = None,
    msd: float | None = None,
) -> Deadlines:
    return call_deadlines(action, retry, request or req(), now=NOW, max_stream_duration=msd)


def test_route_timeout_default_explicit_and_disabled() -> None:
    assert dl(RouteAction(cluster="c")).overall == NOW + 15.0
    assert dl(RouteAction(cluster="c", timeout=2.5)).overall == NOW + 2.5
    assert dl(RouteAction(cluster="c", timeout=0.0)).overall is None  # Istio's default
    assert dl(None).overall == NOW + 15.0


def test_upstream_rq_timeout_header_overrides() -> None:
    a = RouteAction(cluster="c", timeout=0.0)
    assert dl(a, request=req(("x-envoy-upstream-rq-timeout-ms", "1500"))).overall == NOW + 1.5
    b = RouteAction(cluster="c", timeout=5.0)
    assert dl(b, request=req(("x-envoy-upstream-rq-timeout-ms", "0"))).overall is None
    assert dl(b, request=req(("x-envoy-upstream-rq-timeout-ms", "-3"))).overall == NOW + 5.0


def test_per_try_timeout_and_header() -> None:
    a = RouteAction(cluster="c", timeout=10.0)
    r = RetryPolicy(retry_on=frozenset({"5xx"}), per_try_timeout=2.0)
    d = dl(a, r)
    assert d.per_try == 2.0
    assert d.attempt_deadline(NOW) == NOW + 2.0
    assert d.attempt_deadline(NOW + 9.0) == NOW + 10.0  # capped by the overall deadline
    h = dl(a, r, req(("x-envoy-upstream-rq-per-try-timeout-ms", "300")))
    assert h.per_try == 0.3
    # Without a retry policy the header still sets it.
    assert dl(a, None, req(("x-envoy-upstream-rq-per-try-timeout-ms", "300"))).per_try == 0.3
    # Not below the route timeout: ignored.
    assert dl(RouteAction(cluster="c", timeout=2.0), r).per_try is None
    # With no route timeout any per-try timeout applies.
    d0 = dl(RouteAction(cluster="c", timeout=0.0), r)
    assert d0.per_try == 2.0 and d0.overall is None
    assert d0.attempt_deadline(NOW) == NOW + 2.0


def test_per_try_idle_is_carried() -> None:
    r = RetryPolicy(per_try_idle_timeout=1.0)
    assert dl(RouteAction(cluster="c"), r).per_try_idle == 1.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("1S", 1.0),
        ("2M", 120.0),
        ("1H", 3600.0),
        ("250m", 0.25),
        ("1500u", 0.002),  # rounded up to whole ms
        ("1n", 0.001),
        ("0m", 0.0),
        ("99999999S", 99999999.0),
        ("123456789S", None),  # 9 digits
        ("10", None),
        ("S", None),
        ("-1S", None),
        ("1.5S", None),
        ("", None),
    ],
)
def test_parse_grpc_timeout(header: str, seconds: float | None) -> None:
    assert parse_grpc_timeout(header) == seconds


def test_max_grpc_timeout_istio_sidecar_routes() -> None:
    # Istio: timeout 0 and max_grpc_timeout 0 -> the grpc-timeout header, uncapped.
    a = RouteAction(cluster="c", timeout=0.0, max_grpc_timeout=0.0)
    assert dl(a, request=req(("grpc-timeout", "3S"), grpc=True)).overall == NOW + 3.0
    assert dl(a, request=req(grpc=True)).overall is None
    # Non-gRPC requests use the route timeout.
    assert dl(a, request=req(("grpc-timeout", "3S"))).overall is None
    # A cap: header above it is capped; no header means the cap.
    c = RouteAction(cluster="c", timeout=5.0, max_grpc_timeout=5.0)
    assert dl(c, request=req(("grpc-timeout", "30S"), grpc=True)).overall == NOW + 5.0
    assert dl(c, request=req(("grpc-timeout", "2S"), grpc=True)).overall == NOW + 2.0
    assert dl(c, request=req(grpc=True)).overall == NOW + 5.0
    # The offset applies only when it leaves something.
    o = RouteAction(cluster="c", max_grpc_timeout=0.0, grpc_timeout_offset=0.5)
    assert dl(o, request=req(("grpc-timeout", "2S"), grpc=True)).overall == NOW + 1.5
    assert dl(o, request=req(("grpc-timeout", "400m"), grpc=True)).overall == NOW + 0.4


def test_stream_duration_new_timeouts() -> None:
    # A max_stream_duration block: the route timeout no longer applies (Envoy's new timeouts).
    a = RouteAction(cluster="c", timeout=1.0, max_stream_duration=4.0)
    d = dl(a)
    assert d.overall == NOW + 4.0 and d.stream_duration
    assert d.timeout_body == "downstream duration timeout"
    assert d.timeout_grpc_status == 4
    assert dl(RouteAction(cluster="c", max_stream_duration=0.0)).overall is None
    # grpc_timeout_header_max caps the grpc-timeout header; 0 = uncapped.
    g = RouteAction(cluster="c", max_stream_duration=10.0, grpc_timeout_header_max=2.0)
    assert dl(g, request=req(("grpc-timeout", "5S"), grpc=True)).overall == NOW + 2.0
    assert dl(g, request=req(grpc=True)).overall == NOW + 10.0
    u = RouteAction(cluster="c", grpc_timeout_header_max=0.0, grpc_timeout_header_offset=0.1)
    assert dl(u, request=req(("grpc-timeout", "5S"), grpc=True)).overall == pytest.approx(NOW + 4.9)
    # The router header still applies with new timeouts; the earlier deadline wins.
    h = dl(a, request=req(("x-envoy-upstream-rq-timeout-ms", "500")))
    assert h.overall == NOW + 0.5 and not h.stream_duration
    assert h.timeout_body == "upstream request timeout"
    assert h.timeout_grpc_status == 14


def test_listener_max_stream_duration() -> None:
    a = RouteAction(cluster="c", timeout=30.0)
    d = dl(a, msd=3.0)
    assert d.overall == NOW + 3.0 and d.stream_duration
    assert dl(a, msd=60.0).overall == NOW + 30.0
    assert dl(RouteAction(cluster="c", max_stream_duration=0.0), msd=3.0).overall is None


def test_expired() -> None:
    d = dl(RouteAction(cluster="c", timeout=1.0))
    assert not d.expired(NOW + 0.999) and d.expired(NOW + 1.0)
    assert not Deadlines(None, None).expired(1e12)


def test_idle_timeout() -> None:
    assert dl(RouteAction(cluster="c")).idle == 300.0  # Envoy's stream_idle_timeout default
    assert dl(RouteAction(cluster="c", idle_timeout=2.0)).idle == 2.0
    assert dl(RouteAction(cluster="c", idle_timeout=0.0)).idle is None
    hcm = call_deadlines(
        RouteAction(cluster="c"),
        None,
        req(),
        now=NOW,
        max_stream_duration=None,
        stream_idle_timeout=7.0,
    )
    assert hcm.idle == 7.0
    off = call_deadlines(
        RouteAction(cluster="c"),
        None,
        req(),
        now=NOW,
        max_stream_duration=None,
        stream_idle_timeout=0.0,
    )
    assert off.idle is None


@pytest.mark.parametrize(
    ("millis", "text"),
    [
        (150, "150m"),
        (0, "0m"),
        (99_999_999, "99999999m"),
        (100_000_000, "100000S"),
        (99_999_999_999, "99999999S"),
        (100_000_000_000, "1666666M"),
        (10**14, "27777777H"),
        (10**20, "99999999H"),
    ],
)
def test_format_grpc_timeout(millis: int, text: str) -> None:
    assert format_grpc_timeout(millis) == text
    # Round trip within the unit's precision.
    parsed = parse_grpc_timeout(text)
    assert parsed is not None and parsed <= millis / 1000 + 1e-9


def test_attempt_headers_as_envoys_set_timeout_headers() -> None:
    r = RetryPolicy(retry_on=frozenset({"5xx"}), per_try_timeout=0.25)
    d = dl(RouteAction(cluster="c", timeout=1.0), r)
    assert d.attempt_headers(0.0) == (("x-envoy-expected-rq-timeout-ms", "250"),)
    # Late in the call the rest of the router timeout is the cap; past it, 1 ms.
    assert d.attempt_headers(0.9) == (("x-envoy-expected-rq-timeout-ms", "100"),)
    assert d.attempt_headers(1.5) == (("x-envoy-expected-rq-timeout-ms", "1"),)
    assert d.attempt_headers(0.0, expected_timeout_header=False) == ()
    # No per-try timeout: the router timeout; no timeout at all: nothing.
    assert dl(RouteAction(cluster="c", timeout=2.0)).attempt_headers(0.5) == (
        ("x-envoy-expected-rq-timeout-ms", "1500"),
    )
    assert dl(RouteAction(cluster="c", timeout=0.0)).attempt_headers(0.0) == ()
    # Per-try timeout without a router timeout: uncapped.
    assert dl(RouteAction(cluster="c", timeout=0.0), r).attempt_headers(9.0) == (
        ("x-envoy-expected-rq-timeout-ms", "250"),
    )
    # gRPC on a max_grpc_timeout route: grpc-timeout is rewritten too.
    g = dl(
        RouteAction(cluster="c", timeout=0.0, max_grpc_timeout=0.0),
        request=req(("grpc-timeout", "3S"), grpc=True),
    )
    assert g.rewrite_grpc_timeout
    assert g.attempt_headers(1.0) == (
        ("x-envoy-expected-rq-timeout-ms", "2000"),
        ("grpc-timeout", "2000m"),
    )
    # Not with Envoy's new timeouts (max_stream_duration).
    n = dl(
        RouteAction(cluster="c", max_grpc_timeout=0.0, max_stream_duration=5.0),
        request=req(("grpc-timeout", "3S"), grpc=True),
    )
    assert not n.rewrite_grpc_timeout and n.attempt_headers(0.0) == ()
