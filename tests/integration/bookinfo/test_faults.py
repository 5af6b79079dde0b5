"""Istio's fault-injection task on Bookinfo (all-v1 + reviews-test-v2 first, as the task does):

- ratings delay 7 s for jason: reviews v2 waits for ratings (its timeout is 10 s), productpage
  gives up after 3 s and tries once more, so jason's page comes after about 6 s with
  "Sorry, product reviews are currently unavailable for this book.";
- ratings abort 500 for jason: the page comes at once, reviews v2 shows "Ratings service is
  currently unavailable" instead of the stars.

Other users are not affected (they get reviews v1, which never calls ratings).
"""

from __future__ import annotations

from collections.abc import Callable

from examples.bookinfo.client import RATINGS_UNAVAILABLE, REVIEWS_ERROR, User
from examples.bookinfo.mesh import Bookinfo


def test_ratings_delay_for_jason(bookinfo: Bookinfo, user: Callable[[str | None], User]) -> None:
    bookinfo.apply("all-v1", "reviews-test-v2", "ratings-test-delay")
    jason, anonymous = user("jason"), user(None)
    page = jason.page()
    assert page.status == 200
    assert 5.5 <= page.elapsed <= 8.0, page.elapsed  # 2 x productpage's 3 s timeout
    assert not page.reviews_ok
    assert page.errors == (REVIEWS_ERROR,)
    assert page.details_ok  # details is not affected
    fast = anonymous.page()
    assert fast.elapsed < 2.0 and fast.reviews_ok and fast.stars == ()


def test_ratings_abort_for_jason(bookinfo: Bookinfo, user: Callable[[str | None], User]) -> None:
    bookinfo.apply("all-v1", "reviews-test-v2", "ratings-test-abort")
    jason = user("jason")
    for page in jason.pages(3):
        assert page.status == 200 and page.reviews_ok
        assert page.elapsed < 2.0
        assert page.stars == ()
        assert page.rating_errors == (RATINGS_UNAVAILABLE, RATINGS_UNAVAILABLE)
    bookinfo.remove("ratings-test-abort")
    assert jason.page().star_colors == {"black"}


def test_ratings_faults_on_the_grpc_hop(
    bookinfo: Bookinfo, user: Callable[[str | None], User]
) -> None:
    """The same VirtualService applies to ratings' gRPC port: reviews v3 (gRPC, 2.5 s timeout)
    gives up on the 7 s delay after 2.5 s, within productpage's 3 s, so jason's page comes
    after about 2.5 s without stars; the 500 abort reaches it as a gRPC error (INTERNAL)."""
    bookinfo.apply("reviews-v3", "ratings-test-delay")
    jason = user("jason")
    page = jason.page()
    assert page.reviews_ok and page.stars == ()
    assert page.rating_errors == (RATINGS_UNAVAILABLE, RATINGS_UNAVAILABLE)
    assert 2.4 <= page.elapsed <= 4.0, page.elapsed
    assert user(None).page().star_colors == {"red"}

    bookinfo.apply("ratings-test-abort")
    page = jason.page()
    assert page.elapsed < 2.0
    assert page.rating_errors == (RATINGS_UNAVAILABLE, RATINGS_UNAVAILABLE)
