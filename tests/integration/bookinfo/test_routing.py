"""Istio's request-routing task on Bookinfo: all-v1 (nobody sees stars), then
reviews-test-v2 (jason sees black stars, everyone else none), with Istio's YAML unchanged and
a real login (POST /login, session cookie, ``end-user`` header)."""

from __future__ import annotations

from collections.abc import Callable

from examples.bookinfo.client import User
from examples.bookinfo.mesh import Bookinfo


def test_all_v1_never_shows_stars(bookinfo: Bookinfo, user: Callable[[str | None], User]) -> None:
    bookinfo.apply("all-v1")
    anonymous, jason = user(None), user("jason")
    pages = anonymous.pages(12) + jason.pages(12)
    assert all(p.status == 200 and p.details_ok and p.reviews_ok for p in pages)
    assert [p for p in pages if p.stars] == []
    assert {p.served_by for p in pages} == {"reviews-v1"}
    assert {p.user for p in pages} == {"", "jason"}


def test_reviews_test_v2_jason_black_stars_others_none(
    bookinfo: Bookinfo, user: Callable[[str | None], User]
) -> None:
    bookinfo.apply("all-v1", "reviews-test-v2")
    jason, anonymous, other = user("jason"), user(None), user("kate")
    for page in jason.pages(10):
        assert page.title == "Simple Bookstore App"
        assert page.user == "jason"
        assert page.star_colors == {"black"}, page.text
        assert [n for _, n in page.stars] == [5, 4]  # Reviewer1 5 stars, Reviewer2 4
    for page in anonymous.pages(10) + other.pages(10):
        assert page.reviews_ok and page.stars == ()
        assert page.served_by == "reviews-v1"
    # logging out makes jason anonymous again
    jason.logout()
    assert jason.page().stars == ()
