"""Consistent-hash balancers: ring hash (Envoy ``RING_HASH``) and Maglev (``MAGLEV``).

Both are Envoy's "thread-aware" balancers: the request hash (``PickContext.hash_key``, or a
random 64-bit value when the route has no hash policy) first chooses the priority level
(``hash % 100`` against the priority load table), then that level's ring or table chooses the
host. A level's ring/table holds its healthy hosts (every host, draining included, when the level
is in panic, as Envoy); host weights are normalised per level (times the locality weight share when
locality-weighted LB is on), and each host is hashed by its ``envoy.lb`` ``hash_key``
metadata if set, else its address ``ip:port`` (``[ip6]:port``), exactly as Envoy, so a
client and an Envoy sidecar with the same endpoints map a hash to the same host.

As in Envoy, DEGRADED hosts are never on a ring or table: the share of load that the
priority arithmetic gives to a level's degraded hosts finds no host there (503).
"""

from __future__ import annotations

import functools
import math
import random
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import Protocol

import xxhash

from pymesh.core.lb._priority import PriorityLevel, PriorityState
from pymesh.core.types import Host, PickContext
from pymesh.model.cluster import Maglev, RingHash

__all__ = ["HashBalancer", "MaglevTable", "Ring", "host_hash_key", "normalized_weights"]

_xxh64 = xxhash.xxh64_intdigest


def host_hash_key(host: Host) -> str:
    """Envoy ``hashKey``: the ``envoy.lb`` metadata ``hash_key`` string, else the address."""
    metadata = host.metadata
    if isinstance(metadata, Mapping):
        lb = metadata.get("envoy.lb")
        if isinstance(lb, Mapping):
            key = lb.get("hash_key")
            if isinstance(key, str) and key:
                return key
    return host.key


def _normalize_hosts(hosts: Sequence[Host], share: float, out: list[tuple[Host, float]]) -> None:
    total = sum(h.weight for h in hosts)
    if total <= 0:
        return
    for h in hosts:
        out.append((h, h.weight * share / total))


def normalized_weights(level: PriorityLevel, locality_weighted: bool) -> list[tuple[Host, float]]:
    """Envoy ``normalizeWeights``: (host, share) pairs whose shares sum to at most 1."""
    in_panic = level.panic
    hosts = level.panic_hosts if in_panic else level.healthy
    per_locality = level.panic_per_locality if in_panic else level.healthy_per_locality
    out: list[tuple[Host, float]] = []
    if not locality_weighted or not level.localities:
        _normalize_hosts(hosts, 1.0, out)
        return out
    total = sum(level.locality_weights)
    if total == 0:
        return out
    for weight, members in zip(level.locality_weights, per_locality, strict=True):
        if weight and members:
            _normalize_hosts(members, weight / total, out)
    return out


class _Table(Protocol):
    def choose(self, hash_value: int, attempt: int) -> Host | None: ...


@functools.lru_cache(maxsize=16)
def _ring_layout(
    keys: tuple[str, ...], shares: tuple[float, ...], min_size: int, max_size: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(sorted point hashes, owner index of each point). Cached: an ejection that starts
    and ends, or an EDS push that changes nothing for this level, rebuilds for free."""
    min_weight = min(shares)
    if min_weight <= 0:
        return (), ()
    scale = min(math.ceil(min_weight * min_size) / min_weight, float(max_size))
    points: list[tuple[int, int]] = []
    current = 0.0
    target = 0.0
    for owner, (key, share) in enumerate(zip(keys, shares, strict=True)):
        prefix = key + "_"
        target += scale * share
        i = 0
        while current < target:
            points.append((_xxh64((prefix + str(i)).encode()), owner))
            i += 1
            current += 1
    points.sort(key=lambda p: p[0])
    return tuple(p[0] for p in points), tuple(p[1] for p in points)


@functools.lru_cache(maxsize=8)
def _maglev_layout(keys: tuple[str, ...], shares: tuple[float, ...], size: int) -> tuple[int, ...]:
    """Owner index of each of the ``size`` slots (cached like :func:`_ring_layout`)."""
    max_weight = max(shares)
    offsets: list[int] = []
    skips: list[int] = []
    for key in keys:
        data = key.encode()
        offsets.append(_xxh64(data) % size)
        skips.append(_xxh64(data, 1) % (size - 1) + 1)
    # positions[i] = offset + skip * next (mod size), advanced by adding skip
    positions = offsets
    targets = [0.0] * len(keys)
    slots = [-1] * size
    filled = 0
    iteration = 1
    count = len(keys)
    while filled < size:
        for i in range(count):
            if filled >= size:
                break
            if iteration * shares[i] < targets[i]:
                continue
            targets[i] += max_weight
            skip = skips[i]
            c = positions[i]
            while slots[c] >= 0:
                c += skip
                if c >= size:
                    c -= size
            slots[c] = i
            c += skip
            positions[i] = c - size if c >= size else c
            filled += 1
        iteration += 1
    return tuple(slots)


class Ring:
    """Envoy's hash ring: each host gets ``scale * share`` points hashed from
    ``"<hash key>_<i>"`` with xxHash64, where ``scale`` gives the least-weighted host
    ``ceil(share * min_ring_size)`` points (capped by ``max_ring_size``); a hash maps to the
    first point at or after it, wrapping around."""

    __slots__ = ("hashes", "hosts")

    def __init__(self, weights: Sequence[tuple[Host, float]], config: RingHash) -> None:
        self.hashes: tuple[int, ...] = ()
        self.hosts: list[Host] = []
        if not weights:
            return
        hashes, owners = _ring_layout(
            tuple(host_hash_key(h) for h, _ in weights),
            tuple(w for _, w in weights),
            config.min_ring_size,
            config.max_ring_size,
        )
        self.hashes = hashes
        self.hosts = [weights[i][0] for i in owners]

    def __len__(self) -> int:
        return len(self.hashes)

    def choose(self, hash_value: int, attempt: int) -> Host | None:
        n = len(self.hashes)
        if n == 0:
            return None
        index = bisect_left(self.hashes, hash_value)
        if index == n:
            index = 0
        if attempt > 0:  # Envoy: behave as if the host were not on the ring
            index = (index + attempt) % n
        return self.hosts[index]


class MaglevTable:
    """Envoy's Maglev lookup table (``table_size`` prime, default 65537): each host fills
    slots along its permutation ``(offset + skip * j) % M`` with ``offset = xxh64(key) % M``
    and ``skip = xxh64(key, seed=1) % (M - 1) + 1``, taking turns in proportion to weight
    (a host whose share is a third of the largest fills a slot every third round)."""

    __slots__ = ("size", "table")

    def __init__(self, weights: Sequence[tuple[Host, float]], config: Maglev) -> None:
        self.size = config.table_size
        self.table: list[Host] = []
        if not weights:
            return
        # Envoy fills in hash-key order, so the table does not depend on endpoint order.
        ordered = sorted(((host_hash_key(h), h, w) for h, w in weights), key=lambda t: t[0])
        owners = _maglev_layout(
            tuple(k for k, _, _ in ordered), tuple(w for _, _, w in ordered), self.size
        )
        hosts = [h for _, h, _ in ordered]
        self.table = [hosts[i] for i in owners]

    def choose(self, hash_value: int, attempt: int) -> Host | None:
        if not self.table:
            return None
        if attempt > 0:  # Envoy: flip many bits so retries spread over other hosts
            hash_value ^= (2**64 - 1) - attempt + 1
        return self.table[hash_value % self.size]


class HashBalancer:
    """Priority choice by hash, then the level's ring or Maglev table."""

    __slots__ = ("_levels", "_priorities", "_rng")

    def __init__(
        self,
        state: PriorityState,
        policy: RingHash | Maglev,
        rng: random.Random,
        *,
        locality_weighted: bool = False,
    ) -> None:
        self._priorities = tuple(p for p, _ in state.slots())
        levels: list[_Table] = []
        for level in state.levels:
            weights = normalized_weights(level, locality_weighted)
            if isinstance(policy, RingHash):
                levels.append(Ring(weights, policy))
            else:
                levels.append(MaglevTable(weights, policy))
        self._levels = tuple(levels)
        self._rng = rng

    def pick(self, ctx: PickContext) -> Host | None:
        h = ctx.hash_key
        if h is None:
            h = self._rng.getrandbits(64)
        table = self._levels[self._priorities[h % 100]]
        host = table.choose(h, 0)
        excluded = ctx.excluded
        if host is None or not excluded or host.key not in excluded:
            return host
        for attempt in range(1, ctx.host_selection_attempts + 1):
            host = table.choose(h, attempt)
            if host is None or host.key not in excluded:
                return host
        return host
