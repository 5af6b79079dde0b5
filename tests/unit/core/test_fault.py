"""decide_fault: Envoy fault filter semantics on a seeded RNG."""

from __future__ import annotations

import random

import pytest

from pymesh.core.fault import NO_FAULT, ActiveFaults, FaultDecision, decide_fault
from pymesh.core.types import Headers, RequestInfo
from pymesh.model.http_filters import FaultAbort, FaultConfig, FaultDelay
from pymesh.model.matcher import StringMatcher
from pymesh.model.route import FractionalPercent, HeaderMatcher

ALWAYS = FractionalPercent(100)
HALF = FractionalPercent(50)


def req(*headers: tuple[str, str], grpc: bool = False) -> RequestInfo:
    return RequestInfo("GET", "svc", "/", Headers(headers), grpc=grpc)


def decide(
    config: FaultConfig | None, request: RequestInfo | None = None, **kw: object
) -> FaultDecision:
    args: dict[str, object] = {"rng": random.Random(5), "active_faults": 0, "cluster": "c"}
    args.update(kw)
    return decide_fault(config, request or req(), **args)  # type: ignore[arg-type]


def test_no_config_no_fault() -> None:
    assert decide(None) is NO_FAULT
    assert decide(FaultConfig()) is NO_FAULT
    assert not NO_FAULT.active


def test_fixed_delay_and_abort() -> None:
    d = decide(FaultConfig(delay=FaultDelay(ALWAYS, fixed_delay=0.5)))
    assert d == FaultDecision(delay=0.5) and d.active
    a = decide(FaultConfig(abort=FaultAbort(ALWAYS, http_status=503)))
    assert a == FaultDecision(abort_status=503)
    both = decide(
        FaultConfig(
            delay=FaultDelay(ALWAYS, fixed_delay=1.0), abort=FaultAbort(ALWAYS, http_status=418)
        )
    )
    assert both == FaultDecision(delay=1.0, abort_status=418)


def test_grpc_abort_answers_200_with_status() -> None:
    d = decide(FaultConfig(abort=FaultAbort(ALWAYS, grpc_status=14)))
    assert d == FaultDecision(abort_status=200, abort_grpc_status=14)


@pytest.mark.parametrize(
    ("percent", "expected"),
    [(FractionalPercent(25), 0.25), (FractionalPercent(1, 10_000), 0.0001 * 200), (HALF, 0.5)],
)
def test_percentages_follow_the_draws(percent: FractionalPercent, expected: float) -> None:
    rng = random.Random(11)
    n = 20_000
    config = FaultConfig(abort=FaultAbort(percent, http_status=500))
    hits = sum(
        decide_fault(config, req(), rng=rng, active_faults=0, cluster="c").active for _ in range(n)
    )
    if percent.denominator == 10_000:
        assert hits < 10  # 0.01%: about 2 in 20k
    else:
        assert abs(hits / n - expected) < 0.015


def test_draws_match_envoy_order() -> None:
    """One 64-bit draw for the delay, then one for the abort, each modulo the denominator."""
    config = FaultConfig(
        delay=FaultDelay(FractionalPercent(30), fixed_delay=0.1),
        abort=FaultAbort(FractionalPercent(60), http_status=500),
    )
    rng, ref = random.Random(2024), random.Random(2024)
    for _ in range(500):
        d = decide_fault(config, req(), rng=rng, active_faults=0, cluster="c")
        delay_hit = ref.getrandbits(64) % 100 < 30
        abort_hit = ref.getrandbits(64) % 100 < 60
        assert (d.delay is not None, d.abort_status is not None) == (delay_hit, abort_hit)


def test_header_delay_and_abort() -> None:
    config = FaultConfig(
        delay=FaultDelay(ALWAYS, header_delay=True), abort=FaultAbort(ALWAYS, header_abort=True)
    )
    assert decide(config) is NO_FAULT  # no headers: nothing
    d = decide(config, req(("x-envoy-fault-delay-request", "250")))
    assert d == FaultDecision(delay=0.25)
    assert decide(config, req(("x-envoy-fault-delay-request", "abc"))) is NO_FAULT
    assert decide(config, req(("x-envoy-fault-delay-request", "0"))) is NO_FAULT
    assert decide(config, req(("x-envoy-fault-abort-request", "429"))) == FaultDecision(
        abort_status=429
    )
    assert decide(config, req(("x-envoy-fault-abort-request", "600"))) is NO_FAULT
    assert decide(config, req(("x-envoy-fault-abort-request", "199"))) is NO_FAULT
    assert decide(config, req(("x-envoy-fault-abort-grpc-request", "8"))) == FaultDecision(
        abort_status=200, abort_grpc_status=8
    )
    # HTTP status wins over gRPC status.
    both = req(("x-envoy-fault-abort-request", "503"), ("x-envoy-fault-abort-grpc-request", "8"))
    assert decide(config, both) == FaultDecision(abort_status=503)


def test_header_percentage_is_capped_by_the_configured_one() -> None:
    config = FaultConfig(abort=FaultAbort(HALF, header_abort=True))
    rng = random.Random(3)
    n = 10_000

    def rate(*headers: tuple[str, str]) -> float:
        r = req(("x-envoy-fault-abort-request", "500"), *headers)
        return (
            sum(
                decide_fault(config, r, rng=rng, active_faults=0, cluster="c").active
                for _ in range(n)
            )
            / n
        )

    assert abs(rate(("x-envoy-fault-abort-request-percentage", "10")) - 0.10) < 0.015
    assert abs(rate(("x-envoy-fault-abort-request-percentage", "90")) - 0.50) < 0.02
    assert abs(rate() - 0.50) < 0.02
    # Percentage headers only apply to header-controlled faults.
    fixed = FaultConfig(abort=FaultAbort(HALF, http_status=500))
    r = req(("x-envoy-fault-abort-request-percentage", "0"))
    hits = sum(
        decide_fault(fixed, r, rng=rng, active_faults=0, cluster="c").active for _ in range(2000)
    )
    assert hits > 800


def test_targeting_by_cluster_node_and_headers() -> None:
    abort = FaultAbort(ALWAYS, http_status=500)
    assert decide(FaultConfig(abort=abort, upstream_cluster="other")) is NO_FAULT
    assert decide(FaultConfig(abort=abort, upstream_cluster="c")).active
    nodes = FaultConfig(abort=abort, downstream_nodes=("a", "b"))
    assert decide(nodes) is NO_FAULT
    assert decide(nodes, req(("x-envoy-downstream-service-node", "b"))).active
    assert decide(nodes, req(("x-envoy-downstream-service-node", "z"))) is NO_FAULT
    hdr = FaultConfig(
        abort=abort,
        headers=(
            HeaderMatcher("x-user", StringMatcher.exact("jason")),
            HeaderMatcher(":method", StringMatcher.exact("GET")),
        ),
    )
    assert decide(hdr, req(("x-user", "jason"))).active
    assert decide(hdr, req(("x-user", "bob"))) is NO_FAULT


def test_max_active_faults() -> None:
    config = FaultConfig(
        delay=FaultDelay(ALWAYS, fixed_delay=0.1),
        abort=FaultAbort(ALWAYS, http_status=500),
        max_active_faults=2,
    )
    assert decide(config, active_faults=1) == FaultDecision(delay=0.1, abort_status=500)
    over = decide(config, active_faults=2)
    assert over == FaultDecision(overflow=True) and not over.active
    abort_only = FaultConfig(abort=FaultAbort(ALWAYS, http_status=500), max_active_faults=0)
    assert decide(abort_only) == FaultDecision(overflow=True)


def test_active_faults_counter() -> None:
    counter = ActiveFaults()
    config = FaultConfig(abort=FaultAbort(ALWAYS, http_status=500), max_active_faults=3)
    rng = random.Random(1)
    decisions = []
    for _ in range(5):
        d = decide_fault(config, req(), rng=rng, active_faults=counter.count, cluster="c")
        if d.active:
            counter.start()
        decisions.append(d)
    assert [d.active for d in decisions] == [True, True, True, False, False]
    assert sum(d.overflow for d in decisions) == 2
    counter.end()
    assert decide_fault(config, req(), rng=rng, active_faults=counter.count, cluster="c").active
    for _ in range(5):
        counter.end()
    assert counter.count == 0


def test_docs_faults_examples_run() -> None:
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[3] / "docs" / "faults.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {})
