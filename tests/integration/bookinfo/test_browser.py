"""Bookinfo in a real browser: Debian's Chromium, driven by Playwright, loads the product page,
logs in as jason through the page's own form and sees black stars (reviews-test-v2), as
Istio's request-routing task shows it.

Chromium runs headless with a fresh profile and without its background services
(component updates, sync, field trials...): on this closed network those would only try to
reach Google. Screenshots go to the test's tmp dir and, when ``PYMESH_BOOKINFO_SCREENSHOTS``
names a directory, there too (that is how ``docs/img/bookinfo-*.png`` are made)::

    PYMESH_BOOKINFO_SCREENSHOTS=docs/img python -m pytest tests/integration/bookinfo/test_browser.py
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, sync_playwright

from examples.bookinfo.mesh import Bookinfo

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
    "--metrics-recording-only",
    "--no-default-browser-check",
)
"""Headless, no sandbox (containers), and none of the background traffic Chromium starts on
its own (without these it floods a closed network with connection attempts)."""


def chromium_path() -> Path:
    path = Path(os.environ.get("PYMESH_CHROMIUM", "/usr/bin/chromium"))
    assert path.exists(), f"Chromium not found at {path} (set PYMESH_CHROMIUM)"
    return path


@contextmanager
def chromium(user_data_dir: Path) -> Iterator[BrowserContext]:
    """A headless Chromium with a fresh profile in ``user_data_dir``; closed on exit."""
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(user_data_dir),
            executable_path=str(chromium_path()),
            headless=True,
            args=list(CHROMIUM_ARGS),
            viewport={"width": 1100, "height": 640},
            timeout=60_000,
        )
        try:
            context.set_default_timeout(30_000)
            yield context
        finally:
            context.close()


def save_screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    """``name``.png in the test's tmp dir, and in ``$PYMESH_BOOKINFO_SCREENSHOTS`` if set."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000, f"empty screenshot {path}"
    target = os.environ.get("PYMESH_BOOKINFO_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / path.name)
    return path


def star_colours(page: Page) -> list[str]:
    """The colour of every star glyph in the reviews section (empty: no ratings shown)."""
    colours: list[str] = page.eval_on_selector_all(
        ".glyphicon-star, .glyphicon-star-empty",
        "els => els.map(e => getComputedStyle(e).color)",
    )
    return colours


def test_jason_logs_in_through_the_form_and_sees_black_stars(
    bookinfo: Bookinfo, tmp_path: Path
) -> None:
    bookinfo.apply("reviews-test-v2")
    with chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        url = bookinfo.page_url

        response = page.goto(url)
        assert response is not None and response.status == 200
        assert page.title() == "Simple Bookstore App"
        assert page.get_by_text("Book Details").count() >= 1
        assert page.get_by_text("Book Reviews").count() >= 1
        assert star_colours(page) == [], "anonymous users get reviews v1: no stars"
        save_screenshot(page, tmp_path, "bookinfo-anonymous")

        # The page's own "Sign in" form (POST /login), as a user would.
        sign_in = page.get_by_role("button", name="Sign in")
        if sign_in.count() and sign_in.first.is_visible():
            sign_in.first.click()
        page.locator("input[name=username]").fill("jason")
        page.locator("input[name=passwd]").fill("jason")
        with page.expect_navigation():
            page.locator("form[action*=login] [type=submit]").click()

        assert page.get_by_text("jason").count() >= 1, "the page greets the signed-in user"
        colours = star_colours(page)
        assert colours, "jason gets reviews v2: stars"
        assert set(colours) == {"rgb(0, 0, 0)"}, f"v2 stars are black, got {set(colours)}"
        save_screenshot(page, tmp_path, "bookinfo-jason-black-stars")


@pytest.mark.slow
def test_walkthrough_screenshots(bookinfo: Bookinfo, tmp_path: Path) -> None:
    """The pictures of docs/bookinfo.md, each after the step it illustrates, checked on the
    rendered page (the fault-injection delay alone takes about 6 s)."""
    from tests.integration.bookinfo.test_security import (
        ALLOW_NOTHING,
        DETAILS_VIEWER,
        PRODUCTPAGE_VIEWER,
        REVIEWS_VIEWER,
    )

    with chromium(tmp_path / "profile") as browser:
        page = browser.new_page()

        def load(name: str) -> str:
            response = page.goto(bookinfo.page_url)
            assert response is not None
            save_screenshot(page, tmp_path, name)
            return page.inner_text("body")

        # traffic shifting, last step: every load red
        bookinfo.apply("reviews-v3")
        load("bookinfo-red-stars")
        assert set(star_colours(page)) == {"rgb(255, 0, 0)"}

        # fault injection, as jason: delay (productpage gives up after 3 s + one retry)...
        page.goto(bookinfo.page_url)
        page.get_by_role("button", name="Sign in").first.click()
        page.locator("input[name=username]").fill("jason")
        with page.expect_navigation():
            page.locator("form[action*=login] [type=submit]").click()
        bookinfo.apply("all-v1", "reviews-test-v2", "ratings-test-delay")
        started = time.monotonic()
        text = load("bookinfo-fault-delay")
        assert 5.5 < time.monotonic() - started < 9, "3 s timeout, one retry: about 6 s"
        assert "Sorry, product reviews are currently unavailable for this book." in text
        # ...and abort: reviews v2 answers without its ratings
        bookinfo.apply("ratings-test-abort")
        text = load("bookinfo-fault-abort")
        assert "Ratings service is currently unavailable" in text
        bookinfo.reset()
        page.goto(bookinfo.productpage_url + "/logout")

        # authorization, anonymous: nothing allowed, then productpage, then details and reviews
        bookinfo.apply("reviews-v2")
        bookinfo.apply_yaml(ALLOW_NOTHING, name="allow-nothing")
        assert "RBAC: access denied" in load("bookinfo-authz-allow-nothing")
        bookinfo.apply_yaml(PRODUCTPAGE_VIEWER, name="productpage-viewer")
        text = load("bookinfo-authz-productpage-viewer")
        assert "Error fetching product details!" in text
        assert "Error fetching product reviews!" in text
        bookinfo.apply_yaml(DETAILS_VIEWER + "---\n" + REVIEWS_VIEWER, name="details-reviews")
        text = load("bookinfo-authz-details-reviews-viewer")
        assert "Ratings service is currently unavailable" in text
        assert "Error fetching" not in text


def test_docs_pictures_are_the_screenshots_taken_here() -> None:
    """Every picture docs/bookinfo.md shows exists, is a PNG, and is one this file saves."""
    docs = Path(__file__).resolve().parents[3] / "docs"
    names = re.findall(r"\]\(img/(bookinfo-[a-z0-9-]+)\.png\)", (docs / "bookinfo.md").read_text())
    assert len(names) >= 8
    source = Path(__file__).read_text()
    for name in names:
        assert (docs / "img" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f'"{name}"' in source, f"{name}.png is not made by {Path(__file__).name}"
