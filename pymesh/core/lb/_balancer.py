"""The per-cluster balancers: priority/locality/panic choice, then a picker per host source.

``pick`` is on every request's hot path: everything that depends only on membership (the
100-slot priority table, the sources and their pickers) is built once per update, so a pick
is one random draw for the priority (skipped when one source takes all the load), maybe one
EDF step for the locality, then the picker's own step.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pymesh.core.lb._edf import EdfScheduler
from pymesh.core.lb._pickers import HostPicker, PickerFactory
from pymesh.core.lb._priority import PriorityLevel, PriorityState
from pymesh.core.types import Host, PickContext

__all__ = ["PickFirstBalancer", "ZoneAwareBalancer"]


class _Nothing:
    """A source without hosts (e.g. the healthy source of a level with none)."""

    __slots__ = ()

    def pick(self) -> Host | None:
        return None


_NOTHING = _Nothing()


class _LocalitySource:
    """Locality-weighted source: EDF over the localities' effective weights, then the
    chosen locality's picker (Envoy ``chooseHealthyLocality``)."""

    __slots__ = ("_edf", "_pickers")

    def __init__(self, pickers: Sequence[HostPicker | None], weights: Sequence[float]) -> None:
        self._pickers = tuple(pickers)
        self._edf = EdfScheduler(weights)

    def pick(self) -> Host | None:
        index = self._edf.pick()
        if index is None:
            return None
        picker = self._pickers[index]
        return None if picker is None else picker.pick()


Source = HostPicker | _LocalitySource | _Nothing


def _source(
    level: PriorityLevel,
    *,
    degraded: bool,
    factory: PickerFactory,
    rng: random.Random,
    locality_weighted: bool,
    factor: int,
    fail_on_panic: bool,
) -> Source:
    if level.panic:
        # Envoy: a level in panic picks among all its hosts, even draining ones (no
        # locality weighting).
        if fail_on_panic or not level.panic_hosts:
            return _NOTHING
        return factory(level.panic_hosts, rng)
    hosts = level.degraded if degraded else level.healthy
    if not hosts:
        return _NOTHING
    if locality_weighted:
        weights = level.effective_locality_weights(degraded, factor)
        if any(w > 0 for w in weights):
            per = level.degraded_per_locality if degraded else level.healthy_per_locality
            pickers = [
                factory(h, rng) if h and w > 0 else None for h, w in zip(per, weights, strict=True)
            ]
            return _LocalitySource(pickers, weights)
        # Envoy: no locality has a weight -> the level's hosts, unweighted by locality.
    return factory(hosts, rng)


class ZoneAwareBalancer:
    """Round robin, least request and random: Envoy's ``ZoneAwareLoadBalancerBase``
    (priority load, panic, locality weighting, host-selection retries) over pickers."""

    __slots__ = ("_random", "_single", "_table")

    def __init__(
        self,
        state: PriorityState,
        factory: PickerFactory,
        rng: random.Random,
        *,
        locality_weighted: bool = False,
        fail_on_panic: bool = False,
    ) -> None:
        sources: dict[tuple[int, bool], Source] = {}
        table: list[Source] = []
        for key, count in state.slot_runs():
            source = sources.get(key)
            if source is None:
                source = sources[key] = _source(
                    state.levels[key[0]],
                    degraded=key[1],
                    factory=factory,
                    rng=rng,
                    locality_weighted=locality_weighted,
                    factor=state.overprovisioning_factor,
                    fail_on_panic=fail_on_panic,
                )
            table.extend([source] * count)
        self._table = tuple(table)
        self._single: Source | None = table[0] if len(sources) == 1 else None
        self._random = rng.random

    def _pick_once(self) -> Host | None:
        single = self._single
        if single is not None:
            return single.pick()
        return self._table[int(self._random() * 100)].pick()

    def pick(self, ctx: PickContext) -> Host | None:
        """A host, avoiding ``ctx.excluded`` with up to ``ctx.host_selection_attempts``
        further picks (Envoy: ``hostSelectionRetryCount() + 1`` picks in all; the last
        pick is returned even when excluded)."""
        single = self._single  # (_pick_once inlined: one call less per pick)
        host = single.pick() if single is not None else self._pick_once()
        excluded = ctx.excluded
        if host is None or not excluded or host.key not in excluded:
            return host
        for _ in range(ctx.host_selection_attempts):
            host = self._pick_once()
            if host is None or host.key not in excluded:
                return host
        return host


class PickFirstBalancer:
    """gRFC A62 pick_first: the first usable host in priority then address order
    (healthy, else degraded, else every non-draining host when the cluster is in panic)."""

    __slots__ = ("_order",)

    def __init__(self, state: PriorityState) -> None:
        healthy = [h for level in state.levels for h in level.healthy]
        degraded = [h for level in state.levels for h in level.degraded]
        if healthy or degraded:
            order = healthy + degraded
        elif all(level.panic for level in state.levels):
            order = [h for level in state.levels for h in level.all]
        else:
            order = []
        self._order = tuple(order)

    def pick(self, ctx: PickContext) -> Host | None:
        excluded = ctx.excluded
        for host in self._order:
            if host.key not in excluded:
                return host
        return self._order[0] if self._order else None
