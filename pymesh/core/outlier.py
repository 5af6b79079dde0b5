"""Outlier detection (passive health checking), as Envoy's ``DetectorImpl`` does it.

One :class:`OutlierDetector` per cluster. The attempt loop reports every attempt's
:class:`~pymesh.core.types.Outcome` with :meth:`OutlierDetector.record`; the runtime calls
:meth:`OutlierDetector.sweep` whenever ``now >= next_sweep`` (Envoy's interval timer, driven
by traffic here: no thread, no timer, no clock read). Ejection marks
``Host.ejected_until``; both methods return True when the set of ejected hosts changed, so the
runtime rebuilds the cluster's load balancer (ejected hosts count as unhealthy there, panic
threshold included).

Theory of operation
-------------------

Per host (``_Monitor``); ``N`` = consecutive threshold, ``E%`` = enforcing percentage::

    state    event                                  condition                   next
    -------  -------------------------------------  --------------------------  ---------------
    serving  response / reset recorded              counters stay below N       serving
    serving  consecutive 5xx / gateway / local = N  cap allows, rng < E%        ejected
    serving  sweep: success rate < mean - k*stdev   volume, min hosts, cap, E%  ejected
    serving  sweep: failure % >= threshold          volume, min hosts, cap, E%  ejected
    serving  sweep                                  backoff > 0                 serving, backoff-1
    ejected  response / reset recorded              (counted, never re-ejects)  ejected
    ejected  sweep                                  now - ejected_at >= T       serving, reset

The cap: ``100 * (ejected + 1) / hosts <= max_ejection_percent``, or no host ejected yet and
``always_eject_one_host``; otherwise the ejection is counted as an overflow. On ejection the
backoff grows by one while ``backoff * base < max + base``; the ejection lasts
``T = min(base_ejection_time * backoff, max_ejection_time) + jitter`` (jitter uniform in whole
milliseconds up to ``max_ejection_time_jitter``), and the host returns at the first sweep
tick after ``T`` (ticks every ``interval``), as in Envoy. A detection that the
enforcing percentage does not enforce still resets its consecutive counter.

What an attempt counts as (Envoy's router and ``putResult``): a response counts its status
code (a gRPC status in the response is mapped to its HTTP code first). Without
``split_external_local_origin_errors`` a connect failure or reset counts as 503 and a timeout
as 504, so both feed the 5xx and gateway-failure counters. With the split, every attempt that
got a stream first counts a local-origin success (Envoy's router reports it when the pool
hands over the stream); a response then counts its status code, while a reset or timeout
counts a local-origin failure. So only connect failures can make a *run* of local-origin
failures, as in Envoy.

Why not pybreaker
-----------------
pybreaker's breaker is a per-function wrapper: failures are exceptions raised through
``breaker.call()``, the open state raises ``CircuitBreakerError`` instead of letting a load
balancer skip the host, it reads the wall clock (``datetime.now(UTC)``) for its reset
timeout, re-closes through a half-open trial call, and has a fixed reset timeout. Envoy's
ejection is decided cluster-wide (``max_ejection_percent``, success-rate statistics across
hosts, enforcing percentages drawn from an injected RNG), lasts ``base * backoff`` with a
cap, and ends on a time basis at the interval tick, with no trial. None of that maps onto
pybreaker's states without fighting it, so the state machine is written out here; the
:class:`OutlierListener` hooks give the same telemetry pybreaker's listeners would.
"""

from __future__ import annotations

import enum
import math
import random
import threading
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pymesh.core.types import Host, Outcome, ResetKind
from pymesh.model.cluster import OutlierDetection

__all__ = [
    "EjectionType",
    "OutlierDetector",
    "OutlierListener",
    "OutlierStats",
    "grpc_to_http_status",
]

_EPS = 1e-9

_GRPC_TO_HTTP = {
    0: 200,
    1: 499,
    2: 500,
    3: 400,
    4: 504,
    5: 404,
    6: 409,
    7: 403,
    8: 429,
    9: 400,
    10: 409,
    11: 400,
    12: 501,
    13: 500,
    14: 503,
    15: 500,
    16: 401,
}


def grpc_to_http_status(grpc_status: int) -> int:
    """Envoy's ``Grpc::Utility::grpcToHttpStatus`` (unknown codes are 500)."""
    return _GRPC_TO_HTTP.get(grpc_status, 500)


class EjectionType(enum.Enum):
    """Why a host was ejected (Envoy ``OutlierEjectionType``)."""

    CONSECUTIVE_5XX = "consecutive_5xx"
    CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
    CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"
    SUCCESS_RATE = "success_rate"
    SUCCESS_RATE_LOCAL_ORIGIN = "local_origin_success_rate"
    FAILURE_PERCENTAGE = "failure_percentage"
    FAILURE_PERCENTAGE_LOCAL_ORIGIN = "local_origin_failure_percentage"


class OutlierListener(Protocol):
    """Telemetry hooks (like pybreaker's listeners). Called synchronously, under the
    detector's lock: they must not block or call back into the detector."""

    def on_eject(self, host: Host, kind: EjectionType, enforced: bool, now: float) -> None:
        """A detection fired; ``enforced`` False when the enforcing percentage skipped it."""
        ...

    def on_uneject(self, host: Host, now: float) -> None: ...


@dataclass(frozen=True, slots=True)
class OutlierStats:
    """Envoy's ``outlier_detection.*`` counters for one cluster."""

    ejections_active: int
    ejections_enforced_total: int
    ejections_overflow: int
    detected: Mapping[EjectionType, int]
    enforced: Mapping[EjectionType, int]


class _Monitor:
    """Per-host detector state (Envoy ``DetectorHostMonitorImpl``)."""

    __slots__ = (
        "backoff",
        "consecutive_5xx",
        "consecutive_gateway",
        "consecutive_local",
        "duration",
        "ejected",
        "ejected_at",
        "ext_success",
        "ext_total",
        "host",
        "local_success",
        "local_total",
        "num_ejections",
    )

    def __init__(self, host: Host) -> None:
        self.host = host
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        self.ext_total = 0
        self.ext_success = 0
        self.local_total = 0
        self.local_success = 0
        self.ejected = False
        self.ejected_at = 0.0
        self.duration = 0.0
        self.backoff = 0
        self.num_ejections = 0

    def reset_consecutive(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0


class OutlierDetector:
    """Envoy outlier detection for one cluster, on injected time and randomness.

    ``hosts`` seeds the host set (the ejection cap counts all of the cluster's hosts, so keep it
    current with :meth:`update_hosts` on every EDS change; :meth:`sweep` also syncs it). Once
    a host set is known, results of hosts outside it are dropped, as Envoy drops those of
    removed hosts.
    ``now`` starts the interval schedule; without it the first :meth:`record` or
    :meth:`sweep` starts it.
    """

    def __init__(
        self,
        config: OutlierDetection,
        *,
        rng: random.Random,
        hosts: Sequence[Host] = (),
        now: float | None = None,
        listener: OutlierListener | None = None,
    ) -> None:
        self._config = config
        self._rng = rng
        self._listener = listener
        # Calls record outcomes from many threads (sync adapters): every state change is
        # made under this lock, so counters and the ejection cap stay exact.
        self._lock = threading.Lock()
        self._monitors: dict[str, _Monitor] = {}
        self._hosts_known = False
        """Whether the host set was given (then results for other hosts are dropped);
        until then, every host that reports a result is monitored."""
        self._started = now is not None
        self.next_sweep: float = (now + config.interval) if now is not None else 0.0
        """Monotonic time of the next interval tick; call :meth:`sweep` once ``now`` reaches
        it."""
        self._overflow = 0
        self._enforced_total = 0
        self._detected: dict[EjectionType, int] = dict.fromkeys(EjectionType, 0)
        self._enforced: dict[EjectionType, int] = dict.fromkeys(EjectionType, 0)
        if hosts:
            self.update_hosts(hosts)

    @property
    def config(self) -> OutlierDetection:
        return self._config

    def update_config(self, config: OutlierDetection) -> None:
        """New thresholds from CDS; host state (ejections, counters, backoff) is kept."""
        self._config = config

    # -- host set --------------------------------------------------------------------------

    def update_hosts(self, hosts: Sequence[Host]) -> bool:
        """Track the cluster's current hosts. Returns True if an ejected host left."""
        with self._lock:
            return self._update_hosts(hosts)

    def _update_hosts(self, hosts: Sequence[Host]) -> bool:
        self._hosts_known = True
        changed = False
        keep: dict[str, _Monitor] = {}
        for host in hosts:
            monitor = self._monitors.get(host.key)
            if monitor is None:
                monitor = _Monitor(host)
            elif monitor.host is not host:
                # A new Host object for the same address: carry the ejection over.
                host.ejected_until = monitor.host.ejected_until
                monitor.host = host
            keep[host.key] = monitor
        for key, monitor in self._monitors.items():
            if key not in keep and monitor.ejected:
                changed = True
        self._monitors = keep
        return changed

    def ejected_hosts(self) -> frozenset[str]:
        """Keys of the hosts currently ejected."""
        with self._lock:
            return frozenset(k for k, m in self._monitors.items() if m.ejected)

    def ejection_length(self, host: Host) -> float | None:
        """How long the host's current ejection lasts (``min(base * backoff, max)`` plus
        jitter; it returns at the first interval tick after that), ``None`` when it is not
        ejected."""
        with self._lock:
            monitor = self._monitors.get(host.key)
            return monitor.duration if monitor is not None and monitor.ejected else None

    def num_ejections(self, host: Host) -> int:
        monitor = self._monitors.get(host.key)
        return monitor.num_ejections if monitor is not None else 0

    def stats(self) -> OutlierStats:
        with self._lock:
            return self._stats()

    def _stats(self) -> OutlierStats:
        return OutlierStats(
            ejections_active=sum(1 for m in self._monitors.values() if m.ejected),
            ejections_enforced_total=self._enforced_total,
            ejections_overflow=self._overflow,
            detected=types.MappingProxyType(dict(self._detected)),
            enforced=types.MappingProxyType(dict(self._enforced)),
        )

    # -- recording -------------------------------------------------------------------------

    def record(self, host: Host, outcome: Outcome, now: float) -> bool:
        """Count one attempt's outcome on ``host``. True if a host was ejected."""
        with self._lock:
            return self._record(host, outcome, now)

    def _record(self, host: Host, outcome: Outcome, now: float) -> bool:
        if not self._started:
            self._start(now)
        monitor = self._monitors.get(host.key)
        if monitor is None:
            if self._hosts_known:
                # The host left the cluster while its request was in flight: Envoy drops
                # the result (the detector no longer monitors it).
                return False
            monitor = self._monitors[host.key] = _Monitor(host)
        config = self._config
        split = config.split_external_local_origin_errors
        reset = outcome.reset
        if reset is not None:
            if not split:
                code = 504 if reset is ResetKind.PER_TRY_TIMEOUT else 503
                return self._http_code(monitor, code, now)
            if reset is not ResetKind.CONNECT_FAILURE:
                # The attempt got a stream before it failed: Envoy's router reports the
                # connection's success first (restarting the local-origin run).
                self._local_origin_success(monitor)
            return self._local_origin_failure(monitor, now)
        if outcome.status is None:
            return False
        if split:
            self._local_origin_success(monitor)
        code = outcome.status
        if outcome.grpc_status is not None:
            code = grpc_to_http_status(outcome.grpc_status)
        return self._http_code(monitor, code, now)

    @staticmethod
    def _local_origin_success(monitor: _Monitor) -> None:
        monitor.local_total += 1
        monitor.local_success += 1
        monitor.consecutive_local = 0

    def _http_code(self, monitor: _Monitor, code: int, now: float) -> bool:
        config = self._config
        monitor.ext_total += 1
        if not 500 <= code <= 599:
            monitor.ext_success += 1
            monitor.consecutive_5xx = 0
            monitor.consecutive_gateway = 0
            return False
        changed = False
        if code in (502, 503, 504):
            monitor.consecutive_gateway += 1
            if monitor.consecutive_gateway == config.consecutive_gateway_failure:
                changed |= self._consecutive(monitor, EjectionType.CONSECUTIVE_GATEWAY_FAILURE, now)
        else:
            monitor.consecutive_gateway = 0
        monitor.consecutive_5xx += 1
        if monitor.consecutive_5xx == config.consecutive_5xx:
            changed |= self._consecutive(monitor, EjectionType.CONSECUTIVE_5XX, now)
        return changed

    def _local_origin_failure(self, monitor: _Monitor, now: float) -> bool:
        monitor.local_total += 1
        monitor.consecutive_local += 1
        if monitor.consecutive_local == self._config.consecutive_local_origin_failure:
            return self._consecutive(monitor, EjectionType.CONSECUTIVE_LOCAL_ORIGIN_FAILURE, now)
        return False

    def _consecutive(self, monitor: _Monitor, kind: EjectionType, now: float) -> bool:
        if monitor.ejected:
            return False
        self._detected[kind] += 1
        if kind is EjectionType.CONSECUTIVE_5XX:
            monitor.consecutive_5xx = 0
        elif kind is EjectionType.CONSECUTIVE_GATEWAY_FAILURE:
            monitor.consecutive_gateway = 0
        else:
            monitor.consecutive_local = 0
        return self._eject(monitor, kind, now)

    # -- ejection --------------------------------------------------------------------------

    def _enforcing(self, kind: EjectionType) -> int:
        c = self._config
        return {
            EjectionType.CONSECUTIVE_5XX: c.enforcing_consecutive_5xx,
            EjectionType.CONSECUTIVE_GATEWAY_FAILURE: c.enforcing_consecutive_gateway_failure,
            EjectionType.CONSECUTIVE_LOCAL_ORIGIN_FAILURE: (
                c.enforcing_consecutive_local_origin_failure
            ),
            EjectionType.SUCCESS_RATE: c.enforcing_success_rate,
            EjectionType.SUCCESS_RATE_LOCAL_ORIGIN: c.enforcing_local_origin_success_rate,
            EjectionType.FAILURE_PERCENTAGE: c.enforcing_failure_percentage,
            EjectionType.FAILURE_PERCENTAGE_LOCAL_ORIGIN: (
                c.enforcing_failure_percentage_local_origin
            ),
        }[kind]

    def _eject(self, monitor: _Monitor, kind: EjectionType, now: float) -> bool:
        config = self._config
        active = sum(1 for m in self._monitors.values() if m.ejected)
        total = len(self._monitors)
        max_percent = min(100, config.max_ejection_percent)
        allowed = 100.0 * (active + 1) / total <= max_percent or (
            config.always_eject_one_host and active == 0
        )
        if not allowed:
            self._overflow += 1
            return False
        enforced = self._rng.randrange(100) < self._enforcing(kind)
        if self._listener is not None:
            self._listener.on_eject(monitor.host, kind, enforced, now)
        if not enforced:
            return False
        self._enforced_total += 1
        self._enforced[kind] += 1
        base, cap = config.base_ejection_time, config.max_ejection_time
        if monitor.backoff * base < cap + base:
            monitor.backoff += 1
        jitter_ms = round(config.max_ejection_time_jitter * 1000)
        jitter = self._rng.randrange(jitter_ms + 1) / 1000.0 if jitter_ms > 0 else 0.0
        monitor.ejected = True
        monitor.num_ejections += 1
        monitor.ejected_at = now
        monitor.duration = min(base * monitor.backoff, cap) + jitter
        monitor.host.ejected_until = self._return_tick(now + monitor.duration, now)
        return True

    def _return_tick(self, due: float, now: float) -> float:
        """The first interval tick after ``now`` at or after ``due`` (when the sweep that
        un-ejects the host runs, if sweeps keep to their schedule)."""
        interval = self._config.interval
        tick = self.next_sweep
        if tick <= now:
            tick = (
                now if interval <= 0 else tick + interval * math.floor((now - tick) / interval + 1)
            )
        if tick + _EPS >= due or interval <= 0:
            return max(tick, due)
        return tick + interval * math.ceil((due - tick) / interval - _EPS)

    # -- interval --------------------------------------------------------------------------

    def _start(self, now: float) -> None:
        self._started = True
        self.next_sweep = now + self._config.interval

    def sweep(self, hosts: Sequence[Host], now: float) -> bool:
        """Envoy's interval work, due when ``now >= next_sweep``: un-eject hosts whose time
        is up, decay the backoff of healthy ones, then success-rate and failure-percentage
        ejections over the requests since the last tick. Returns True if ejections changed.
        Called early, it only syncs the host set."""
        with self._lock:
            return self._sweep(hosts, now)

    def _sweep(self, hosts: Sequence[Host], now: float) -> bool:
        changed = self._update_hosts(hosts)
        if not self._started:
            self._start(now)
            return changed
        if now + _EPS < self.next_sweep:
            return changed
        interval = self._config.interval
        ticks = 1 if interval <= 0 else 1 + math.floor((now - self.next_sweep) / interval)
        self.next_sweep = now + interval if interval <= 0 else self.next_sweep + ticks * interval
        for monitor in self._monitors.values():
            if not monitor.ejected:
                monitor.backoff = max(0, monitor.backoff - ticks)
            elif now - monitor.ejected_at + _EPS >= monitor.duration:
                monitor.ejected = False
                monitor.host.ejected_until = None
                monitor.reset_consecutive()
                changed = True
                if self._listener is not None:
                    self._listener.on_uneject(monitor.host, now)
        changed |= self._success_rate_ejections(local=False, now=now)
        changed |= self._success_rate_ejections(local=True, now=now)
        for monitor in self._monitors.values():
            monitor.ext_total = monitor.ext_success = 0
            monitor.local_total = monitor.local_success = 0
        return changed

    def _success_rate_ejections(self, *, local: bool, now: float) -> bool:
        config = self._config
        n_hosts = len(self._monitors)
        if (
            n_hosts < config.success_rate_minimum_hosts
            and n_hosts < config.failure_percentage_minimum_hosts
        ):
            return False
        sr_hosts: list[tuple[_Monitor, float]] = []
        fp_hosts: list[tuple[_Monitor, float]] = []
        for monitor in self._monitors.values():
            if monitor.ejected:
                continue
            total = monitor.local_total if local else monitor.ext_total
            if total == 0:
                continue
            success = monitor.local_success if local else monitor.ext_success
            rate = success * 100.0 / total
            if total >= config.success_rate_request_volume:
                sr_hosts.append((monitor, rate))
            if total >= config.failure_percentage_request_volume:
                fp_hosts.append((monitor, rate))
        changed = False
        if sr_hosts and len(sr_hosts) >= config.success_rate_minimum_hosts:
            mean = sum(rate for _, rate in sr_hosts) / len(sr_hosts)
            variance = sum((rate - mean) ** 2 for _, rate in sr_hosts) / len(sr_hosts)
            threshold = mean - config.success_rate_stdev_factor / 1000.0 * math.sqrt(variance)
            kind = EjectionType.SUCCESS_RATE_LOCAL_ORIGIN if local else EjectionType.SUCCESS_RATE
            for monitor, rate in sr_hosts:
                if rate < threshold and not monitor.ejected:
                    self._detected[kind] += 1
                    changed |= self._eject(monitor, kind, now)
        if fp_hosts and len(fp_hosts) >= config.failure_percentage_minimum_hosts:
            kind = (
                EjectionType.FAILURE_PERCENTAGE_LOCAL_ORIGIN
                if local
                else EjectionType.FAILURE_PERCENTAGE
            )
            for monitor, rate in fp_hosts:
                if 100.0 - rate >= config.failure_percentage_threshold and not monitor.ejected:
                    self._detected[kind] += 1
                    changed |= self._eject(monitor, kind, now)
        return changed
