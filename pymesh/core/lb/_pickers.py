"""Endpoint pickers over one non-empty list of hosts (one Envoy "host source").

A picker is built for one host list (the healthy hosts of a priority, or of one locality in
it, or all hosts in panic) and owns the per-list state Envoy keeps per host source: the
round-robin index or EDF schedule. Pickers never return ``None``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol

from pymesh.core.lb._edf import SEQUENCE_MAX_PERIOD, EdfScheduler, edf_sequence
from pymesh.core.types import Host

__all__ = [
    "HostPicker",
    "LeastRequestPicker",
    "PickerFactory",
    "RandomPicker",
    "RoundRobinPicker",
    "WeightedLeastRequestPicker",
    "WeightedRoundRobinPicker",
    "least_request_factory",
    "random_factory",
    "round_robin_factory",
]


class HostPicker(Protocol):
    def pick(self) -> Host: ...


PickerFactory = Callable[[Sequence[Host], random.Random], HostPicker]
"""Builds the picker of one host source."""


def _equal_weights(hosts: Sequence[Host]) -> bool:
    first = hosts[0].weight
    return all(h.weight == first for h in hosts)


class RoundRobinPicker:
    """Plain rotation (Envoy's unweighted path), starting at a random offset so that many
    clients built at once do not hit the same host first."""

    __slots__ = ("_hosts", "_index", "_n")

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        self._hosts = tuple(hosts)
        self._n = len(self._hosts)
        self._index = rng.randrange(self._n)

    def pick(self) -> Host:
        i = self._index
        self._index = i + 1 if i + 1 < self._n else 0
        return self._hosts[i]


class WeightedRoundRobinPicker:
    """Smooth weighted round robin: Envoy's EDF schedule. A static period up to
    ``SEQUENCE_MAX_PERIOD`` picks is precomputed (a pick is then one index); larger
    periods run the heap. Starts at a random point of the period (Envoy seeds its
    scheduler with a random number of picks for the same reason)."""

    __slots__ = ("_edf", "_hosts", "_index", "_n", "_order")

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        self._hosts = tuple(hosts)
        weights = [h.weight for h in self._hosts]
        self._edf: EdfScheduler | None = None
        self._order: tuple[Host, ...] = ()
        if sum(weights) <= SEQUENCE_MAX_PERIOD:
            self._order = tuple(self._hosts[i] for i in edf_sequence(weights))
            self._n = len(self._order)
            self._index = rng.randrange(self._n)
        else:
            self._edf = EdfScheduler([float(w) for w in weights])
            self._n = 0
            self._index = 0
            for _ in range(rng.randrange(len(self._hosts))):
                self._edf.pick()

    def pick(self) -> Host:
        edf = self._edf
        if edf is None:
            i = self._index
            self._index = i + 1 if i + 1 < self._n else 0
            return self._order[i]
        index = edf.pick()
        assert index is not None  # weights are >= 1
        return self._hosts[index]


def round_robin_factory(hosts: Sequence[Host], rng: random.Random) -> HostPicker:
    """Envoy ``ROUND_ROBIN``: rotation when all weights are equal, else EDF."""
    if len(hosts) == 1 or _equal_weights(hosts):
        return RoundRobinPicker(hosts, rng)
    return WeightedRoundRobinPicker(hosts, rng)


class LeastRequestPicker:
    """Envoy ``LEAST_REQUEST`` with equal weights: sample ``choice_count`` hosts at random
    (with replacement) and keep the one with the fewest active requests; ties keep the
    earlier sample."""

    __slots__ = ("_choices", "_hosts", "_n", "_random")

    def __init__(self, hosts: Sequence[Host], rng: random.Random, choice_count: int) -> None:
        self._hosts = tuple(hosts)
        self._n = len(self._hosts)
        self._choices = max(1, choice_count)
        self._random = rng.random

    def pick(self) -> Host:
        hosts = self._hosts
        n = self._n
        rand = self._random
        best = hosts[int(rand() * n)]
        if self._choices == 2:  # the default: unrolled
            other = hosts[int(rand() * n)]
            return other if other.active_requests < best.active_requests else best
        for _ in range(self._choices - 1):
            other = hosts[int(rand() * n)]
            if other.active_requests < best.active_requests:
                best = other
        return best


class WeightedLeastRequestPicker:
    """Envoy ``LEAST_REQUEST`` with unequal weights: EDF where a host goes back into the
    schedule with weight ``weight / (active_requests + 1) ** active_request_bias``
    (bias 0 = plain weighted round robin)."""

    __slots__ = ("_bias", "_edf", "_hosts")

    def __init__(self, hosts: Sequence[Host], rng: random.Random, bias: float) -> None:
        self._hosts = tuple(hosts)
        self._bias = bias
        self._edf = EdfScheduler([float(h.weight) for h in self._hosts])
        for _ in range(rng.randrange(len(self._hosts))):
            self._edf.pick()

    def _weight(self, index: int) -> float:
        host = self._hosts[index]
        bias = self._bias
        if bias == 0.0:
            return float(host.weight)
        if bias == 1.0:
            return host.weight / (host.active_requests + 1)
        return float(host.weight / (host.active_requests + 1) ** bias)

    def pick(self) -> Host:
        index = self._edf.pick(self._weight)
        assert index is not None  # weights are >= 1
        return self._hosts[index]


def least_request_factory(choice_count: int, active_request_bias: float) -> PickerFactory:
    def factory(hosts: Sequence[Host], rng: random.Random) -> HostPicker:
        if len(hosts) == 1 or _equal_weights(hosts):
            return LeastRequestPicker(hosts, rng, choice_count)
        return WeightedLeastRequestPicker(hosts, rng, active_request_bias)

    return factory


class RandomPicker:
    """Envoy ``RANDOM``: a uniformly random host; like Envoy it ignores endpoint weights."""

    __slots__ = ("_hosts", "_n", "_random")

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        self._hosts = tuple(hosts)
        self._n = len(self._hosts)
        self._random = rng.random

    def pick(self) -> Host:
        return self._hosts[int(self._random() * self._n)]


def random_factory(hosts: Sequence[Host], rng: random.Random) -> HostPicker:
    return RandomPicker(hosts, rng)
