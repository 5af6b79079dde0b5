"""RetryState: Envoy's retry conditions, headers, limits and jittered back-off (seeded RNG)."""

from __future__ import annotations

import random

import pytest
import tenacity
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.core.limits import ClusterLimits
from pymesh.core.retry import (
    GiveUp,
    Retry,
    RetryState,
    backoff_ceiling,
    header_matches,
    strip_consumed,
)
from pymesh.core.types import Headers, Outcome, RequestInfo, ResetKind
from pymesh.model.cluster import CircuitBreakers
from pymesh.model.matcher import StringMatcher
from pymesh.model.route import HeaderMatcher, Int64Range, RetryPolicy


def req(**headers: str) -> RequestInfo:
    return RequestInfo(
        "GET", "svc:80", "/", Headers((k.replace("_", "-"), v) for k, v in headers.items())
    )


def state(
    policy: RetryPolicy | None, request: RequestInfo | None = None, **kw: object
) -> RetryState:
    return RetryState(policy, request or req(), rng=random.Random(7), **kw)  # type: ignore[arg-type]


S503 = Outcome(status=503)
S500 = Outcome(status=500)
S409 = Outcome(status=409)
S200 = Outcome(status=200)


def test_no_policy_no_headers_is_disabled() -> None:
    s = state(None)
    assert not s.enabled
    assert s.should_retry(S503, budget_ok=True) == GiveUp("no-retry-policy")


@pytest.mark.parametrize(
    ("retry_on", "outcome", "expected"),
    [
        ("5xx", S500, True),
        ("5xx", S503, True),
        ("5xx", S409, False),
        ("gateway-error", S500, False),
        ("gateway-error", Outcome(status=502), True),
        ("gateway-error", Outcome(status=504), True),
        ("retriable-4xx", S409, True),
        ("retriable-4xx", Outcome(status=404), False),
        ("5xx", Outcome(reset=ResetKind.CONNECT_FAILURE), True),
        ("5xx", Outcome(reset=ResetKind.PER_TRY_TIMEOUT), True),
        ("gateway-error", Outcome(reset=ResetKind.RESET), True),
        ("reset", Outcome(reset=ResetKind.RESET), True),
        ("reset", Outcome(reset=ResetKind.PER_TRY_TIMEOUT), True),
        ("reset", S503, False),
        ("connect-failure", Outcome(reset=ResetKind.CONNECT_FAILURE), True),
        ("connect-failure", Outcome(reset=ResetKind.RESET), False),
        ("refused-stream", Outcome(reset=ResetKind.REFUSED_STREAM), True),
        ("reset-before-request", Outcome(reset=ResetKind.CONNECT_FAILURE), True),
        ("reset-before-request", Outcome(reset=ResetKind.RESET), False),
        ("reset-before-request", Outcome(reset=ResetKind.PER_TRY_TIMEOUT), False),
        ("refused-stream", Outcome(reset=ResetKind.CONNECT_FAILURE), False),
        ("unavailable", Outcome(status=200, grpc_status=14), True),
        ("unavailable", Outcome(status=200, grpc_status=13), False),
        ("cancelled", Outcome(status=200, grpc_status=1), True),
        ("deadline-exceeded", Outcome(status=200, grpc_status=4), True),
        ("resource-exhausted", Outcome(status=200, grpc_status=8), True),
        ("internal", Outcome(status=200, grpc_status=13), True),
    ],
)
def test_retry_on_conditions(retry_on: str, outcome: Outcome, expected: bool) -> None:
    s = state(RetryPolicy(retry_on=frozenset({retry_on}), num_retries=1))
    assert s.would_retry(outcome) is expected
    decision = s.should_retry(outcome, budget_ok=True)
    assert isinstance(decision, Retry) is expected


def test_ratelimited_responses_only_retry_with_envoy_ratelimited() -> None:
    limited = Outcome(status=429, headers=Headers([("x-envoy-ratelimited", "true")]))
    assert not state(RetryPolicy(retry_on=frozenset({"5xx", "retriable-4xx"}))).would_retry(
        Outcome(status=503, headers=Headers([("x-envoy-ratelimited", "true")]))
    )
    assert state(RetryPolicy(retry_on=frozenset({"envoy-ratelimited"}))).would_retry(limited)


def test_retriable_status_codes_and_header() -> None:
    p = RetryPolicy(retry_on=frozenset({"retriable-status-codes"}), retriable_status_codes=(418,))
    assert state(p).would_retry(Outcome(status=418))
    assert not state(p).would_retry(Outcome(status=419))
    # x-envoy-retriable-status-codes adds codes.
    s = state(p, req(x_envoy_retriable_status_codes="419, 420,junk"))
    assert s.would_retry(Outcome(status=419)) and s.would_retry(Outcome(status=420))
    # Without the condition, the codes alone do nothing.
    assert not state(
        RetryPolicy(retry_on=frozenset({"5xx"}), retriable_status_codes=(418,))
    ).would_retry(Outcome(status=418))


def test_retriable_headers() -> None:
    p = RetryPolicy(
        retry_on=frozenset({"retriable-headers"}),
        retriable_headers=(HeaderMatcher("x-upstream-retry", StringMatcher.exact("yes")),),
    )
    assert state(p).would_retry(Outcome(status=200, headers=Headers([("X-Upstream-Retry", "yes")])))
    assert not state(p).would_retry(
        Outcome(status=200, headers=Headers([("x-upstream-retry", "no")]))
    )
    s = state(p, req(x_envoy_retriable_header_names="X-Other"))
    assert s.would_retry(Outcome(status=200, headers=Headers([("x-other", "")])))


def test_retriable_request_headers_restrict_retries() -> None:
    p = RetryPolicy(
        retry_on=frozenset({"5xx"}),
        retriable_request_headers=(HeaderMatcher(":method", StringMatcher.exact("GET")),),
    )
    assert state(p, RequestInfo("GET", "svc", "/")).enabled
    assert not state(p, RequestInfo("POST", "svc", "/")).enabled


def test_headers_enable_retries_and_max_retries_overrides() -> None:
    s = state(None, req(x_envoy_retry_on="5xx,bogus", x_envoy_max_retries="3"))
    assert s.enabled and s.retry_on == frozenset({"5xx"})
    decisions = [s.should_retry(S503, budget_ok=True) for _ in range(4)]
    assert [type(d) for d in decisions] == [Retry, Retry, Retry, GiveUp]
    assert decisions[-1] == GiveUp("retry-limit-exceeded")
    g = state(None, req(x_envoy_retry_grpc_on="unavailable"))
    assert g.retry_on == frozenset({"unavailable"})
    assert g.remaining == 1  # Envoy's default num_retries
    # x-envoy-max-retries alone enables nothing; bad values are ignored.
    assert not state(None, req(x_envoy_max_retries="5")).enabled
    p = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=2)
    assert state(p, req(x_envoy_max_retries="x")).remaining == 2
    assert state(p, req(x_envoy_max_retries="0")).remaining == 0


def test_limit_then_overflow_order() -> None:
    p = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=2)
    s = state(p)
    calls: list[int] = []

    def refuse() -> bool:
        calls.append(1)
        return False

    assert s.should_retry(S503, budget_ok=refuse) == GiveUp("retry-overflow")
    assert s.should_retry(S503, budget_ok=True).__class__ is Retry
    # The limit is checked before the breaker: the breaker is not consulted any more.
    assert s.should_retry(S503, budget_ok=refuse) == GiveUp("retry-limit-exceeded")
    assert len(calls) == 1
    # A non-retriable outcome never takes a retry slot either.
    assert state(p).should_retry(S200, budget_ok=refuse) == GiveUp("not-retriable")
    assert len(calls) == 1


def test_backoff_is_envoy_jittered_exponential() -> None:
    p = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=100)
    rng_seed = 1234
    s = RetryState(p, req(), rng=random.Random(rng_seed))
    delays = []
    for _ in range(8):
        d = s.should_retry(S503, budget_ok=True)
        assert isinstance(d, Retry)
        delays.append(d.delay)
    # Same draws as Envoy's: random % ceiling_ms, ceilings 25, 50, 100, 200, 250, 250...
    ref = random.Random(rng_seed)
    expected = [ref.randrange(c) / 1000 for c in (25, 50, 100, 200, 250, 250, 250, 250)]
    assert delays == expected
    for d, c in zip(delays, (25, 50, 100, 200, 250, 250, 250, 250), strict=True):
        assert 0 <= d < c / 1000 and round(d * 1000) == d * 1000


def test_backoff_distribution_bounded() -> None:
    """Over many calls the first retry's delay is uniform on [0, 25 ms): mean ~12 ms."""
    p = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=1)
    rng = random.Random(99)
    delays = []
    for _ in range(4000):
        d = RetryState(p, req(), rng=rng).should_retry(S503, budget_ok=True)
        assert isinstance(d, Retry)
        delays.append(d.delay)
    assert max(delays) <= 0.024 and min(delays) == 0.0
    assert abs(sum(delays) / len(delays) - 0.012) < 0.0005


def test_custom_backoff_intervals() -> None:
    p = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=5, base_interval=0.1, max_interval=0.3)
    assert [backoff_ceiling(0.1, 0.3, i) for i in range(4)] == [0.1, 0.2, 0.3, 0.3]
    s = state(p)
    for ceiling in (0.1, 0.2, 0.3, 0.3):
        d = s.should_retry(S503, budget_ok=True)
        assert isinstance(d, Retry) and 0 <= d.delay < ceiling


@pytest.mark.parametrize(("base", "maximum"), [(0.025, 0.25), (0.03, 0.1), (1.0, 10.0), (0.5, 0.5)])
def test_ceiling_agrees_with_tenacity_wait_exponential(base: float, maximum: float) -> None:
    wait = tenacity.wait_exponential(multiplier=base, max=maximum, exp_base=2)
    retrying = tenacity.Retrying()
    for n in range(12):
        call = tenacity.RetryCallState(retrying, None, (), {})
        call.attempt_number = n + 1
        assert backoff_ceiling(base, maximum, n) == pytest.approx(wait(call))


def test_grpc_a44_semantics() -> None:
    p = RetryPolicy(retry_on=frozenset({"5xx", "unavailable", "reset"}), num_retries=10)
    s = state(p, req(x_envoy_retry_on="5xx", x_envoy_max_retries="20"), is_grpc=True)
    assert s.retry_on == frozenset({"unavailable"})
    assert not s.would_retry(Outcome(status=503))
    # Transport failures are UNAVAILABLE to grpcio, an attempt's deadline DEADLINE_EXCEEDED.
    assert s.would_retry(Outcome(reset=ResetKind.RESET))
    assert s.would_retry(Outcome(reset=ResetKind.CONNECT_FAILURE))
    assert not s.would_retry(Outcome(reset=ResetKind.PER_TRY_TIMEOUT))
    deadline = state(RetryPolicy(retry_on=frozenset({"deadline-exceeded"})), is_grpc=True)
    assert deadline.would_retry(Outcome(reset=ResetKind.PER_TRY_TIMEOUT))
    assert not deadline.would_retry(Outcome(reset=ResetKind.RESET))
    results = [
        s.should_retry(Outcome(status=200, grpc_status=14), budget_ok=True) for _ in range(5)
    ]
    # At most 5 attempts: 4 retries.
    assert [type(r) for r in results] == [Retry, Retry, Retry, Retry, GiveUp]
    for r, ceiling in zip(results, (0.025, 0.05, 0.1, 0.2), strict=False):
        assert isinstance(r, Retry) and 0 <= r.delay <= ceiling
    only_http = RetryPolicy(retry_on=frozenset({"5xx"}))
    assert not state(only_http, is_grpc=True).enabled
    # connect-failure / reset-before-request: a connect failure only (the call never left).
    for token in ("connect-failure", "reset-before-request"):
        connect = state(RetryPolicy(retry_on=frozenset({token}), num_retries=2), is_grpc=True)
        assert connect.enabled and connect.retry_on == frozenset({token})
        assert connect.would_retry(Outcome(reset=ResetKind.CONNECT_FAILURE))
        assert not connect.would_retry(Outcome(reset=ResetKind.RESET))
        assert not connect.would_retry(Outcome(status=200, grpc_status=14))


def test_previous_hosts_predicate() -> None:
    p = RetryPolicy(
        retry_on=frozenset({"5xx"}),
        retry_host_predicates=("envoy.retry_host_predicates.previous_hosts",),
        host_selection_retry_max_attempts=3,
    )
    s = state(p)
    s.record_host("10.0.0.1:80")
    s.record_host("10.0.0.2:80")
    assert s.previous_hosts == frozenset({"10.0.0.1:80", "10.0.0.2:80"})
    assert s.host_selection_attempts == 3
    plain = state(RetryPolicy(retry_on=frozenset({"5xx"}), host_selection_retry_max_attempts=3))
    plain.record_host("10.0.0.1:80")
    assert plain.previous_hosts == frozenset() and plain.host_selection_attempts == 1


def test_header_matcher_semantics() -> None:
    h = Headers([("a", "1"), ("a", "2"), ("n", "42")])
    assert header_matches(HeaderMatcher("a", StringMatcher.exact("1,2")), h)
    assert header_matches(HeaderMatcher("n", range_match=Int64Range(40, 43)), h)
    assert not header_matches(HeaderMatcher("n", range_match=Int64Range(0, 42)), h)
    assert not header_matches(HeaderMatcher("a", range_match=Int64Range(0, 42)), h)
    assert header_matches(HeaderMatcher("missing", present_match=False), h)
    assert not header_matches(HeaderMatcher("missing", present_match=True), h)
    assert header_matches(HeaderMatcher("missing", present_match=True, invert_match=True), h)
    assert not header_matches(HeaderMatcher("missing", StringMatcher.exact("")), h)
    assert header_matches(
        HeaderMatcher("missing", StringMatcher.exact(""), treat_missing_header_as_empty=True), h
    )
    assert header_matches(HeaderMatcher("a", StringMatcher.prefix("9"), invert_match=True), h)


def test_strip_consumed_headers() -> None:
    h = Headers([("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "2"), ("keep", "1")])
    assert list(strip_consumed(h)) == [("keep", "1")]
    plain = Headers([("keep", "1")])
    assert strip_consumed(plain) is plain


def test_with_cluster_limits_budget() -> None:
    """Driving RetryState with ClusterLimits.try_start_retry: the breaker's max_retries caps
    concurrent retries across calls."""
    limits = ClusterLimits(CircuitBreakers(max_retries=2))
    p = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=5)
    calls = [state(p) for _ in range(3)]
    results = [c.should_retry(S503, budget_ok=limits.try_start_retry) for c in calls]
    assert [type(r) for r in results] == [Retry, Retry, GiveUp]
    assert limits.retries == 2 and limits.retry_overflow == 1
    limits.end_retry()
    assert isinstance(calls[2].should_retry(S503, budget_ok=limits.try_start_retry), Retry)


def test_docs_resilience_examples_run() -> None:
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[3] / "docs" / "resilience.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert len(blocks) >= 4
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {})


@settings(max_examples=150, deadline=None)
@given(
    retry_on=st.frozensets(
        st.sampled_from(
            [
                "5xx",
                "gateway-error",
                "reset",
                "connect-failure",
                "retriable-4xx",
                "unavailable",
                "bogus",
            ]
        )
    ),
    num_retries=st.integers(0, 6),
    base_ms=st.integers(1, 100),
    factor=st.integers(1, 20),
    outcomes=st.lists(
        st.sampled_from(
            [
                Outcome(status=503),
                Outcome(status=500),
                Outcome(status=409),
                Outcome(status=200),
                Outcome(status=200, grpc_status=14),
                Outcome(reset=ResetKind.RESET),
                Outcome(reset=ResetKind.CONNECT_FAILURE),
            ]
        ),
        max_size=12,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_retry_state_invariants(
    *,
    retry_on: frozenset[str],
    num_retries: int,
    base_ms: int,
    factor: int,
    outcomes: list[Outcome],
    seed: int,
) -> None:
    base = base_ms / 1000
    policy = RetryPolicy(
        retry_on=retry_on, num_retries=num_retries, base_interval=base, max_interval=base * factor
    )
    s = RetryState(policy, req(), rng=random.Random(seed))
    retries = 0
    for outcome in outcomes:
        d = s.should_retry(outcome, budget_ok=True)
        if isinstance(d, Retry):
            ceiling = backoff_ceiling(base, base * factor, retries)
            assert 0 <= d.delay < ceiling + 1e-9
            assert s.would_retry(outcome)
            retries += 1
        else:
            assert d.reason in ("not-retriable", "retry-limit-exceeded", "no-retry-policy")
            assert (d.reason == "not-retriable") == (s.enabled and not s.would_retry(outcome))
    assert retries <= num_retries
    assert s.retries_done == retries


def test_grpc_server_pushback() -> None:
    p = RetryPolicy(retry_on=frozenset({"unavailable"}), num_retries=4)
    unavailable = Outcome(status=200, grpc_status=14)

    def pushed(value: str) -> Outcome:
        return Outcome(
            status=200, grpc_status=14, headers=Headers([("grpc-retry-pushback-ms", value)])
        )

    s = state(p, is_grpc=True)
    assert s.should_retry(pushed("1500"), budget_ok=True) == Retry(1.5)
    # After a pushback the back-off starts over from the first ceiling.
    d = s.should_retry(unavailable, budget_ok=True)
    assert isinstance(d, Retry) and d.delay <= 0.025
    assert s.should_retry(pushed("-1"), budget_ok=True) == GiveUp("server-pushback")
    assert state(p, is_grpc=True).should_retry(pushed("soon"), budget_ok=True) == GiveUp(
        "server-pushback"
    )
    # A pushback on a status that is not retriable changes nothing; Envoy mode ignores it.
    assert state(p, is_grpc=True).should_retry(
        Outcome(status=200, grpc_status=13, headers=Headers([("grpc-retry-pushback-ms", "5")])),
        budget_ok=True,
    ) == GiveUp("not-retriable")
    envoy_mode = state(p).should_retry(pushed("-1"), budget_ok=True)
    assert isinstance(envoy_mode, Retry)
