"""Load balancing with Envoy's semantics: which host of a cluster gets an attempt.

* :func:`build_hosts` turns an EDS assignment into runtime :class:`~pymesh.core.types.Host`
  objects, keeping each host's identity (counters, ejection) across updates.
* :func:`build_load_balancer` builds the cluster's balancer: health classes (DRAINING
  excluded, ejected hosts unhealthy), priority load with the overprovisioning factor,
  panic threshold, locality weights, then the policy (round robin with EDF weights, least
  request P2C, random, ring hash, Maglev, pick-first).

Balancers are immutable in membership; rebuild on EDS changes and ejections. ``pick`` never
blocks, never does I/O, and draws randomness only from the ``rng`` given at build time.
"""

from pymesh.core.lb._factory import build_load_balancer
from pymesh.core.lb._hosts import build_hosts

__all__ = ["build_hosts", "build_load_balancer"]
