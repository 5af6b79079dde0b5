"""Istio's request-timeouts task on Bookinfo: reviews routed to v2, ratings delayed 2 s (the
page takes about 2 s, with stars), then a 0.5 s timeout on reviews: the page comes after
about 1 s (productpage tries reviews twice) with the reviews error. The task's YAML is in
examples/bookinfo/mesh/scenarios/."""

from __future__ import annotations

from collections.abc import Callable

from examples.bookinfo.client import REVIEWS_ERROR, User
from examples.bookinfo.mesh import Bookinfo


def test_reviews_timeout(bookinfo: Bookinfo, user: Callable[[str | None], User]) -> None:
    bookinfo.apply("all-v1")
    bookinfo.apply("reviews-v2", "ratings-delay-2s")
    anonymous = user(None)
    slow = anonymous.page()
    assert slow.reviews_ok and slow.star_colors == {"black"}
    assert 1.9 <= slow.elapsed <= 3.0, slow.elapsed

    bookinfo.apply("reviews-v2-timeout")
    for page in anonymous.pages(2):
        assert page.status == 200
        assert page.errors == (REVIEWS_ERROR,)
        assert page.details_ok
        assert 0.9 <= page.elapsed <= 2.0, page.elapsed  # 2 tries x 0.5 s
