"""Istio's mirroring task on Bookinfo's reviews service.

Istio's task routes all of httpbin's traffic to v1, then adds ``mirror: v2`` with
``mirrorPercentage: 100``: v2's access log shows a copy of every request, the answers still
come from v1. Here: productpage's calls to reviews (one per page load) go to v1 and are
mirrored to v2 by productpage's own mesh client (fire and forget, as Envoy's shadow); the
page never shows stars (v1) and v2's request counter grows by one per load.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from examples.bookinfo.client import User
from examples.bookinfo.mesh import Bookinfo

REVIEWS_V1 = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 100
"""

REVIEWS_V1_MIRROR_V2 = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 100
    mirror:
      host: reviews
      subset: v2
    mirrorPercentage:
      value: 100.0
"""

LOADS = 20


_ACCESS_ID = re.compile(r'bookinfo\.access: "GET /reviews/0" 200 .*x-request-id=(\S+)')


def request_ids(log: Path, last: int) -> list[str]:
    """x-request-id of the last ``last`` reviews requests in a workload's access log."""
    return _ACCESS_ID.findall(log.read_text())[-last:]


def counts(bookinfo: Bookinfo) -> dict[str, int]:
    return {v: bookinfo.services[f"reviews-{v}"].requests() for v in ("v1", "v2", "v3")}


def settled(bookinfo: Bookinfo, expect: dict[str, int], timeout: float = 5.0) -> dict[str, int]:
    """The reviews counters once they reach ``expect`` (each process writes its counters every
    0.5 s; mirrors are sent in the background), or as they are at the timeout."""
    deadline = time.monotonic() + timeout
    now = counts(bookinfo)
    while any(now[v] < n for v, n in expect.items()) and time.monotonic() < deadline:
        time.sleep(0.1)
        now = counts(bookinfo)
    time.sleep(0.6)  # one more write period: nothing beyond what is expected arrives
    return counts(bookinfo)


def test_reviews_v1_mirrored_to_v2(bookinfo: Bookinfo) -> None:
    # step 1: all traffic to v1; v2 gets nothing
    bookinfo.apply_yaml(REVIEWS_V1, name="reviews-v1")
    with User(bookinfo.productpage_url) as user:
        before = settled(bookinfo, {})
        pages = user.pages(LOADS)
        after = settled(bookinfo, {"v1": before["v1"] + LOADS})
    assert {p.served_by for p in pages} == {"reviews-v1"}
    assert after == {"v1": before["v1"] + LOADS, "v2": before["v2"], "v3": before["v3"]}

    # step 2: mirror 100 % to v2; answers still from v1, v2 receives a copy of each request
    bookinfo.apply_yaml(REVIEWS_V1_MIRROR_V2, name="reviews-v1")
    with User(bookinfo.productpage_url) as user:
        before = settled(bookinfo, {})
        pages = user.pages(LOADS)
        after = settled(bookinfo, {"v1": before["v1"] + LOADS, "v2": before["v2"] + LOADS})
    assert {p.served_by for p in pages} == {"reviews-v1"}
    assert all(p.star_colors == set() and p.reviews_ok for p in pages)
    assert after == {
        "v1": before["v1"] + LOADS,
        "v2": before["v2"] + LOADS,
        "v3": before["v3"],
    }
    # each copy is the request v1 served, x-request-id included (Istio's task reads v2's
    # access log for the same)
    v1_ids = request_ids(bookinfo.services["reviews-v1"].log_path, LOADS)
    v2_ids = request_ids(bookinfo.services["reviews-v2"].log_path, LOADS)
    assert len(set(v1_ids)) == LOADS
    assert set(v2_ids) == set(v1_ids)
