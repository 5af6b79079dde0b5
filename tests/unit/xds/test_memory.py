"""pymesh.xds._memory: when the xDS client gives a replaced huge update's heap back."""

from __future__ import annotations

import sys

from pymesh.xds import _memory
from pymesh.xds._memory import BIG_RESPONSE, TrimPolicy

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def test_a_trim_follows_a_huge_response_replaced_by_a_small_one() -> None:
    policy = TrimPolicy()
    assert not policy.on_response(EDS, 1000)  # nothing big yet
    assert not policy.on_response(EDS, 3 * BIG_RESPONSE)
    assert not policy.on_response(EDS, 2 * BIG_RESPONSE)  # still big: still in use
    assert not policy.on_response(CDS, 100)  # another type: the huge EDS is still there
    assert policy.on_response(EDS, 1000)  # replaced (under a quarter of the largest)
    assert not policy.on_response(EDS, 1000)  # once


def test_a_response_a_little_smaller_than_the_huge_one_is_no_reason() -> None:
    policy = TrimPolicy()
    assert not policy.on_response(EDS, 3 * BIG_RESPONSE)
    assert not policy.on_response(EDS, BIG_RESPONSE + 1)  # big too
    assert not policy.on_response(EDS, BIG_RESPONSE - 1)  # under 1 MiB, not under a quarter
    assert policy.on_response(EDS, BIG_RESPONSE // 2)


def test_release_memory_counts_and_trims_where_it_can() -> None:
    before = _memory.trims
    _memory.release_memory()
    assert _memory.trims == before + 1
    if sys.platform.startswith("linux"):
        assert _memory.can_trim()  # glibc here
