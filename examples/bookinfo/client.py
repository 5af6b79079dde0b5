"""A user of the product page, for tests and scripts: log in (``POST /login``, the session
cookie), load ``/productpage`` and read what it shows (stars and their colour, the error
strings), timing each load.

```python
with User(bookinfo.productpage_url) as jason:
    jason.login("jason")
    page = jason.page()
    assert page.star_colors == {"black"}
```
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass
from types import TracebackType

import httpx

__all__ = [
    "DETAILS_ERROR",
    "RATINGS_UNAVAILABLE",
    "REVIEWS_ERROR",
    "Page",
    "User",
    "parse_page",
]

DETAILS_ERROR = "Sorry, product details are currently unavailable for this book."
REVIEWS_ERROR = "Sorry, product reviews are currently unavailable for this book."
RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"

_TITLE = re.compile(r"<title>(.*?)</title>", re.S)
_FONT = re.compile(r'<font color="([^"]*)">(.*?)</font>', re.S)
_RATING_ERROR = re.compile(r"<p><i>(.*?)</i></p>", re.S)
_SERVED_BY = re.compile(r"<dt>Reviews served by:</dt>\s*<u>(.*?)</u>", re.S)
_USER = re.compile(r'<span style="padding-left: 5px;">(.*?) \( <a href="logout">', re.S)


@dataclass(frozen=True)
class Page:
    """What one product page load showed."""

    status: int
    text: str
    elapsed: float
    title: str
    user: str
    details_ok: bool
    reviews_ok: bool
    stars: tuple[tuple[str, int], ...]
    """(colour, full stars) of every review that shows stars."""
    rating_errors: tuple[str, ...]
    errors: tuple[str, ...]
    """The page's error paragraphs (details and reviews errors)."""
    served_by: str

    @property
    def star_colors(self) -> set[str]:
        """Colours of the stars on the page: ``set()`` (none: v1 or no ratings),
        ``{"black"}`` (v2), ``{"red"}`` (v3)."""
        return {color for color, _ in self.stars}

    @property
    def reviews_error(self) -> bool:
        return REVIEWS_ERROR in self.errors

    @property
    def details_error(self) -> bool:
        return DETAILS_ERROR in self.errors


def parse_page(status: int, text: str, elapsed: float = 0.0) -> Page:
    """Read a product page's HTML."""
    title = _TITLE.search(text)
    user = _USER.search(text)
    served = _SERVED_BY.search(text)
    stars = tuple((m.group(1), m.group(2).count('glyphicon-star"')) for m in _FONT.finditer(text))
    errors = tuple(
        html.unescape(m.group(1))
        for m in re.finditer(
            r"Error fetching product (?:details|reviews)!</h4>\s*<p>(.*?)</p>", text
        )
    )
    return Page(
        status=status,
        text=text,
        elapsed=elapsed,
        title=html.unescape(title.group(1)) if title else "",
        user=html.unescape(user.group(1)) if user else "",
        details_ok=">Book Details</h4>" in text,
        reviews_ok=">Book Reviews</h4>" in text,
        stars=stars,
        rating_errors=tuple(html.unescape(m.group(1)) for m in _RATING_ERROR.finditer(text)),
        errors=errors,
        served_by=html.unescape(served.group(1)) if served else "",
    )


class User:
    """A browser-like client of the product page: keeps the session cookie."""

    def __init__(
        self, productpage_url: str, *, timeout: float = 30.0, client: httpx.Client | None = None
    ) -> None:
        self.base_url = productpage_url.rstrip("/")
        self.client = client or httpx.Client(base_url=self.base_url, timeout=timeout)
        self._owned: list[object] = []

    def __enter__(self) -> User:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()
        for item in self._owned:
            close = getattr(item, "close", None)
            if callable(close):
                close()
        self._owned.clear()

    def login(self, user: str, password: str = "") -> httpx.Response:
        """``POST /login`` as the page's form does; the session cookie is kept."""
        response = self.client.post(
            "/login",
            data={"username": user, "passwd": password or user},
            headers={"referer": f"{self.base_url}/productpage"},
        )
        if response.status_code != 302:
            raise AssertionError(f"login answered {response.status_code}: {response.text[:200]}")
        return response

    def logout(self) -> httpx.Response:
        return self.client.get("/logout", headers={"referer": f"{self.base_url}/productpage"})

    def page(self) -> Page:
        """Load ``/productpage`` once."""
        start = time.monotonic()
        response = self.client.get("/productpage")
        return parse_page(response.status_code, response.text, time.monotonic() - start)

    def pages(self, count: int) -> list[Page]:
        return [self.page() for _ in range(count)]
