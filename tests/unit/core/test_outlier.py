"""OutlierDetector: Envoy's ejection algorithms, ejection and return times on a fake clock."""

from __future__ import annotations

import dataclasses
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.core.outlier import EjectionType, OutlierDetector, grpc_to_http_status
from pymesh.core.types import Host, Outcome, ResetKind
from pymesh.model.cluster import OutlierDetection
from pymesh.model.common import SocketAddress

OK = Outcome(status=200)
E500 = Outcome(status=500)
E503 = Outcome(status=503)


def hosts(n: int) -> list[Host]:
    return [Host(SocketAddress(f"10.0.0.{i}", 80)) for i in range(n)]


def detector(n: int, **overrides: object) -> tuple[OutlierDetector, list[Host]]:
    hs = hosts(n)
    config = dataclasses.replace(OutlierDetection(), **overrides)  # type: ignore[arg-type]
    return OutlierDetector(config, rng=random.Random(1), hosts=hs, now=0.0), hs


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []

    def on_eject(self, host: Host, kind: EjectionType, enforced: bool, now: float) -> None:
        self.events.append(("eject", host.key, (kind, enforced, now)))

    def on_uneject(self, host: Host, now: float) -> None:
        self.events.append(("uneject", host.key, now))


def run_ticks(d: OutlierDetector, hs: list[Host], until: float) -> list[float]:
    """Sweep at every tick up to ``until``; returns the tick times at which ejections changed."""
    changes = []
    for _ in range(10_000):
        if d.next_sweep > until:
            break
        t = d.next_sweep
        if d.sweep(hs, t):
            changes.append(t)
    return changes


def test_consecutive_5xx_ejects_and_returns_at_the_tick_after_base_time() -> None:
    d, hs = detector(10)
    h = hs[0]
    for i in range(4):
        assert not d.record(h, E500, 1.0 + i * 0.1)
    assert d.record(h, E503, 1.5)
    assert h.is_ejected(1.5) and d.ejected_hosts() == {h.key}
    # Ticks every 10 s from t=0: due at 31.5, so back at the 40 s tick (as Envoy).
    assert h.ejected_until == 40.0
    assert run_ticks(d, hs, 35.0) == []
    assert h.is_ejected(35.0)
    assert run_ticks(d, hs, 40.0) == [40.0]
    assert not h.is_ejected(40.0) and h.ejected_until is None
    s = d.stats()
    assert s.ejections_active == 0 and s.enforced[EjectionType.CONSECUTIVE_5XX] == 1


def test_success_resets_the_consecutive_counter() -> None:
    d, hs = detector(10)
    for _ in range(4):
        d.record(hs[0], E500, 1.0)
    d.record(hs[0], OK, 1.0)
    for _ in range(4):
        assert not d.record(hs[0], E500, 1.0)
    assert d.record(hs[0], E500, 1.0)


def test_max_ejection_percent_cap_and_always_eject_one_host() -> None:
    d, hs = detector(9)  # 1/9 = 11% > 10%: Envoy ejects nobody
    for _ in range(5):
        assert not d.record(hs[0], E500, 1.0)
    assert d.stats().ejections_overflow == 1 and not hs[0].is_ejected(1.0)
    d, hs = detector(9, always_eject_one_host=True)
    for _ in range(5):
        d.record(hs[0], E500, 1.0)
    assert hs[0].is_ejected(1.0)
    for _ in range(5):
        d.record(hs[1], E500, 1.0)
    assert not hs[1].is_ejected(1.0) and d.stats().ejections_overflow == 1
    # 20 hosts allow 2 ejections at 10%.
    d, hs = detector(20)
    for h in hs[:3]:
        for _ in range(5):
            d.record(h, E500, 1.0)
    assert d.stats().ejections_active == 2 and d.stats().ejections_overflow == 1


def test_ejection_time_grows_with_backoff_capped_and_decays() -> None:
    d, hs = detector(1, max_ejection_percent=100, base_ejection_time=10.0, max_ejection_time=25.0)
    h = hs[0]

    def eject(now: float) -> float:
        for _ in range(5):
            d.record(h, E500, now)
        assert h.ejected_until is not None
        return h.ejected_until - now

    # Ejected at a tick boundary + 0 (t=0 is a tick start; next ticks 10, 20, ...).
    assert eject(0.0) == 10.0
    assert d.ejection_length(h) == 10.0
    assert run_ticks(d, [h], 10.0) == [10.0]
    assert d.ejection_length(h) is None
    assert eject(10.0) == 20.0  # second time in a row: base * 2
    assert run_ticks(d, [h], 30.0) == [30.0]
    assert eject(30.0) == 30.0  # base * 3 = 30 capped at 25, returns at the 60 s tick
    assert run_ticks(d, [h], 60.0) == [60.0]
    assert d.num_ejections(h) == 3
    # Backoff is 3 now; each healthy tick lowers it by one (70, 80 -> 1).
    run_ticks(d, [h], 80.0)
    assert eject(80.0) == 20.0  # backoff 1 -> 2: 20 s
    run_ticks(d, [h], 100.0)
    assert not h.is_ejected(100.0)
    run_ticks(d, [h], 200.0)  # long healthy stretch: back to base
    assert eject(200.0) == 10.0


def test_missed_ticks_decay_backoff_too() -> None:
    d, hs = detector(1, max_ejection_percent=100, base_ejection_time=10.0)
    h = hs[0]
    for _ in range(5):
        d.record(h, E500, 0.0)
    assert d.sweep(hs, 10.0)  # back
    for _ in range(5):
        d.record(h, E500, 10.0)
    assert h.ejected_until == 30.0
    assert d.sweep(hs, 30.0)
    # No traffic for a long time: one late sweep accounts for all the ticks missed.
    assert not d.sweep(hs, 95.0)
    assert d.next_sweep == 100.0
    for _ in range(5):
        d.record(h, E500, 96.0)
    assert h.ejected_until == 110.0  # backoff decayed to 0 -> base time again


def test_jitter_is_added_in_whole_milliseconds() -> None:
    d, hs = detector(
        1, max_ejection_percent=100, base_ejection_time=10.0, max_ejection_time_jitter=5.0
    )
    for _ in range(5):
        d.record(hs[0], E500, 0.0)
    # Duration 10 s + jitter in [0, 5 s]: return tick is 10 or 20.
    assert hs[0].ejected_until in (10.0, 20.0)
    ref = random.Random(1)
    ref.randrange(100)  # the enforcement draw
    jitter = ref.randrange(5001) / 1000
    expected_tick = 10.0 if jitter == 0 else 20.0
    assert hs[0].ejected_until == expected_tick


def test_gateway_failure_detected_but_not_enforced_by_default() -> None:
    rec = Recorder()
    hs = hosts(10)
    config = OutlierDetection(consecutive_5xx=100)
    d = OutlierDetector(config, rng=random.Random(3), hosts=hs, now=0.0, listener=rec)
    for _ in range(5):
        assert not d.record(hs[0], Outcome(status=502), 1.0)
    kind = EjectionType.CONSECUTIVE_GATEWAY_FAILURE
    assert rec.events == [("eject", hs[0].key, (kind, False, 1.0))]
    assert d.stats().detected[kind] == 1 and d.stats().enforced[kind] == 0
    assert not hs[0].is_ejected(1.0)
    # With Envoy's defaults five 502s are also five 5xx: that detection ejects.
    d1, hs1 = detector(10)
    for _ in range(4):
        assert not d1.record(hs1[0], Outcome(status=502), 1.0)
    assert d1.record(hs1[0], Outcome(status=502), 1.0)
    assert d1.stats().enforced[EjectionType.CONSECUTIVE_5XX] == 1
    d2, hs2 = detector(10, enforcing_consecutive_gateway_failure=100, consecutive_5xx=100)
    for _ in range(5):
        d2.record(hs2[0], Outcome(status=504), 1.0)
    assert hs2[0].is_ejected(1.0)
    assert d2.stats().enforced[kind] == 1


def test_five_5xx_eject_even_when_mixed_with_gateway_errors() -> None:
    d, hs = detector(10)
    for status in (502, 500, 503, 500):
        assert not d.record(hs[0], Outcome(status=status), 1.0)
    assert d.record(hs[0], Outcome(status=504), 1.0)
    # A 500 interrupts the gateway-failure run but not the 5xx run.
    assert d.stats().detected[EjectionType.CONSECUTIVE_GATEWAY_FAILURE] == 0


def test_resets_count_as_503_and_timeouts_as_504_without_split() -> None:
    d, hs = detector(10, enforcing_consecutive_gateway_failure=100, consecutive_5xx=100)
    for reset in (
        ResetKind.CONNECT_FAILURE,
        ResetKind.RESET,
        ResetKind.REFUSED_STREAM,
        ResetKind.PER_TRY_TIMEOUT,
    ):
        assert not d.record(hs[0], Outcome(reset=reset), 1.0)
    assert d.record(hs[0], Outcome(reset=ResetKind.CONNECT_FAILURE), 1.0)
    assert d.stats().enforced[EjectionType.CONSECUTIVE_GATEWAY_FAILURE] == 1


def test_split_local_origin_errors() -> None:
    d, hs = detector(
        10, split_external_local_origin_errors=True, consecutive_local_origin_failure=3
    )
    h = hs[0]
    # Connect failures make a run; they do not touch the 5xx counter.
    assert not d.record(h, Outcome(reset=ResetKind.CONNECT_FAILURE), 1.0)
    assert not d.record(h, Outcome(reset=ResetKind.CONNECT_FAILURE), 1.0)
    # A response (even a 5xx) is a local-origin success: the run restarts.
    assert not d.record(h, E503, 1.0)
    # A reset or timeout after a connection: success, then failure (Envoy) -> never a run.
    for _ in range(10):
        assert not d.record(h, Outcome(reset=ResetKind.RESET), 1.0)
        assert not d.record(h, Outcome(reset=ResetKind.PER_TRY_TIMEOUT), 1.0)
    # The last timeout left a run of one: two connect failures make three.
    assert not d.record(h, Outcome(reset=ResetKind.CONNECT_FAILURE), 1.0)
    assert d.record(h, Outcome(reset=ResetKind.CONNECT_FAILURE), 1.0)
    assert d.stats().enforced[EjectionType.CONSECUTIVE_LOCAL_ORIGIN_FAILURE] == 1
    # Without the split, resets are 5xx.
    d2, hs2 = detector(10, consecutive_local_origin_failure=3)
    for _ in range(4):
        assert not d2.record(hs2[0], Outcome(reset=ResetKind.RESET), 1.0)
    assert d2.record(hs2[0], Outcome(reset=ResetKind.RESET), 1.0)
    assert d2.stats().enforced[EjectionType.CONSECUTIVE_5XX] == 1


def test_grpc_status_counts_as_its_http_code() -> None:
    assert grpc_to_http_status(14) == 503 and grpc_to_http_status(0) == 200
    assert grpc_to_http_status(99) == 500
    d, hs = detector(10)
    for _ in range(4):
        d.record(hs[0], Outcome(status=200, grpc_status=14), 1.0)
    assert d.record(hs[0], Outcome(status=200, grpc_status=13), 1.0)
    d.sweep(hs, 10.0)


def test_success_rate_ejection_envoy_example() -> None:
    """Envoy's comment example: rates {50, 100, 100, 100, 100} -> mean 90, stdev 20,
    threshold 90 - 1.9 * 20 = 52: the 50% host is ejected."""
    d, hs = detector(5, max_ejection_percent=100)
    for i, h in enumerate(hs):
        for j in range(100):
            d.record(h, E500 if (i == 0 and j % 2 == 0) else OK, 5.0)
    assert d.sweep(hs, 10.0)
    assert d.ejected_hosts() == {hs[0].key}
    assert hs[0].ejected_until == 40.0  # 30 s base from t=10
    assert d.stats().enforced[EjectionType.SUCCESS_RATE] == 1


def test_success_rate_needs_volume_and_minimum_hosts() -> None:
    # 99 requests on one host: it does not count, 4 valid hosts < 5.
    d, hs = detector(5, max_ejection_percent=100)
    for i, h in enumerate(hs):
        for j in range(99 if i == 1 else 100):
            d.record(h, E500 if (i == 0 and j % 2 == 0) else OK, 5.0)
    assert not d.sweep(hs, 10.0)
    # The buckets are reset at each tick: the next interval starts from zero.
    for h in hs:
        for _ in range(100):
            d.record(h, OK, 15.0)
    assert not d.sweep(hs, 20.0)
    assert d.stats().detected[EjectionType.SUCCESS_RATE] == 0


def test_failure_percentage_ejection() -> None:
    d, hs = detector(
        5,
        max_ejection_percent=100,
        enforcing_failure_percentage=100,
        enforcing_success_rate=0,
        consecutive_5xx=1000,
    )
    for i, h in enumerate(hs):
        for j in range(50):
            failed = (i == 0 and j < 43) or (i == 1 and j < 42)  # 86% and 84%
            d.record(h, E500 if failed else OK, 5.0)
    assert d.sweep(hs, 10.0)
    assert d.ejected_hosts() == {hs[0].key}
    # 84% failures stay under the 85% threshold; success rates 14, 16, 100, 100, 100 are too
    # spread for the success-rate threshold (66 - 1.9 * 41.6 < 0).
    assert d.stats().enforced[EjectionType.FAILURE_PERCENTAGE] == 1
    assert d.stats().detected[EjectionType.SUCCESS_RATE] == 0


def test_local_origin_success_rate_with_split() -> None:
    d, hs = detector(
        5,
        max_ejection_percent=100,
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=1000,
    )
    for i, h in enumerate(hs):
        for j in range(100):
            fail = i == 0 and j % 2 == 0
            d.record(h, Outcome(reset=ResetKind.CONNECT_FAILURE) if fail else OK, 5.0)
    assert d.sweep(hs, 10.0)
    assert d.stats().enforced[EjectionType.SUCCESS_RATE_LOCAL_ORIGIN] == 1


def test_enforcing_percentage_is_drawn_from_the_rng() -> None:
    enforced = 0
    rng = random.Random(42)
    for _ in range(2000):
        hs = hosts(10)
        d = OutlierDetector(
            OutlierDetection(enforcing_consecutive_5xx=30), rng=rng, hosts=hs, now=0.0
        )
        for _ in range(5):
            d.record(hs[0], E500, 1.0)
        enforced += hs[0].is_ejected(1.0)
    assert abs(enforced / 2000 - 0.30) < 0.04


def test_update_hosts_and_new_host_objects() -> None:
    d, hs = detector(10)
    for _ in range(5):
        d.record(hs[0], E500, 1.0)
    # Same address, new Host object: the ejection carries over.
    replacement = Host(hs[0].address)
    assert not d.update_hosts([replacement, *hs[1:]])
    assert replacement.is_ejected(2.0)
    # The ejected host leaves: ejections changed.
    assert d.update_hosts(hs[1:])
    assert d.stats().ejections_active == 0


def test_listener_sees_eject_and_uneject() -> None:
    rec = Recorder()
    hs = hosts(10)
    d = OutlierDetector(OutlierDetection(), rng=random.Random(1), hosts=hs, now=0.0, listener=rec)
    for _ in range(5):
        d.record(hs[0], E500, 1.0)
    run_ticks(d, hs, 40.0)
    assert rec.events == [
        ("eject", hs[0].key, (EjectionType.CONSECUTIVE_5XX, True, 1.0)),
        ("uneject", hs[0].key, 40.0),
    ]


def test_schedule_starts_lazily_and_early_sweeps_do_nothing() -> None:
    hs = hosts(10)
    d = OutlierDetector(OutlierDetection(interval=5.0), rng=random.Random(1))
    assert not d.sweep(hs, 100.0)
    assert d.next_sweep == 105.0
    assert not d.sweep(hs, 104.0)
    assert d.next_sweep == 105.0
    assert not d.sweep(hs, 105.0)
    assert d.next_sweep == 110.0


def test_threads_respect_the_ejection_cap() -> None:
    """Many threads recording failures at once: the 10% cap of 20 hosts holds exactly."""
    import threading

    d, hs = detector(20)
    barrier = threading.Barrier(8)

    def worker(offset: int) -> None:
        barrier.wait()
        for i in range(400):
            d.record(hs[(i + offset) % 20], E503, 1.0)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(not t.is_alive() for t in threads)
    s = d.stats()
    assert s.ejections_active == 2
    assert sum(h.is_ejected(1.0) for h in hs) == 2
    assert s.ejections_overflow > 0


@settings(max_examples=60, deadline=None)
@given(
    n_hosts=st.integers(1, 12),
    max_percent=st.sampled_from([0, 10, 34, 50, 100]),
    always_one=st.booleans(),
    events=st.lists(
        st.tuples(
            st.integers(0, 11),
            st.sampled_from(["ok", "500", "503", "reset", "timeout"]),
            st.floats(0, 7),
        ),
        max_size=300,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_invariants_under_random_traffic(
    n_hosts: int,
    max_percent: int,
    always_one: bool,
    events: list[tuple[int, str, float]],
    seed: int,
) -> None:
    config = OutlierDetection(
        consecutive_5xx=3,
        consecutive_gateway_failure=2,
        enforcing_consecutive_gateway_failure=50,
        max_ejection_percent=max_percent,
        always_eject_one_host=always_one,
        interval=5.0,
        base_ejection_time=7.0,
        max_ejection_time=20.0,
        success_rate_minimum_hosts=2,
        success_rate_request_volume=5,
        failure_percentage_minimum_hosts=2,
        failure_percentage_request_volume=5,
        enforcing_failure_percentage=100,
    )
    hs = hosts(n_hosts)
    d = OutlierDetector(config, rng=random.Random(seed), hosts=hs, now=0.0)
    outcomes = {
        "ok": OK,
        "500": E500,
        "503": E503,
        "reset": Outcome(reset=ResetKind.RESET),
        "timeout": Outcome(reset=ResetKind.PER_TRY_TIMEOUT),
    }
    now = 0.0
    allowed = max(int(max_percent * n_hosts // 100), 1 if always_one else 0)
    for index, kind, dt in events:
        now += dt
        if now >= d.next_sweep:
            d.sweep(hs, now)
        d.record(hs[index % n_hosts], outcomes[kind], now)
        ejected = d.ejected_hosts()
        assert len(ejected) <= allowed
        for h in hs:
            if h.key in ejected:
                assert h.ejected_until is not None
                # Sweeps keep to the schedule here, so an ejected host's time is not up yet.
                assert h.is_ejected(now)
                # The return time is an interval tick (ticks at multiples of 5 s).
                assert abs(h.ejected_until / 5.0 - round(h.ejected_until / 5.0)) < 1e-6
            else:
                assert h.ejected_until is None
        assert d.stats().ejections_active == len(ejected)


def test_results_of_hosts_outside_the_set_are_dropped() -> None:
    d, _ = detector(10)
    stranger = Host(SocketAddress("10.9.9.9", 80))
    for _ in range(10):
        assert not d.record(stranger, E503, 1.0)
    assert d.stats().detected[EjectionType.CONSECUTIVE_5XX] == 0
    # Without a known host set, every reporting host is monitored.
    lazy = OutlierDetector(OutlierDetection(max_ejection_percent=100), rng=random.Random(1))
    for _ in range(4):
        assert not lazy.record(stranger, E503, 1.0)
    assert lazy.record(stranger, E503, 1.0)
