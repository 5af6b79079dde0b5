"""productpage: the HTML page and the ``/api/v1/products`` API (Bookinfo's Flask productpage).

As the original: the page shows the book, its details (``details``) and reviews (``reviews``);
``POST /login`` (any user name) keeps the user in a session cookie and every call to details
and reviews carries it as the ``end-user`` header; calls time out after 3 s, and the reviews
call is tried twice ("bug introduced explicitly for illustration in fault injection task").
Headers are propagated as ``getForwardHeaders`` does (``x-request-id``, B3, W3C trace
context, ...), with a new span (B3 and ``traceparent``) when the request starts a trace.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import os
import secrets
import urllib.parse
from typing import Any

import httpx

import pymesh.httpx
from examples.bookinfo.services._common import (
    FORWARD_HEADERS,
    Receive,
    Request,
    Scope,
    Send,
    forward_headers,
    json_response,
    respond,
)

__all__ = ["DETAILS_URL", "REVIEWS_URL", "ProductPage", "get_products", "render_page"]

log = logging.getLogger("bookinfo.productpage")

DETAILS_URL = "http://details:9080/details"
REVIEWS_URL = "http://reviews:9080/reviews"
RATINGS_URL = "http://ratings:9080/ratings"
TIMEOUT = 3.0
DETAILS_ERROR = "Sorry, product details are currently unavailable for this book."
REVIEWS_ERROR = "Sorry, product reviews are currently unavailable for this book."
RATINGS_ERROR = "Sorry, product ratings are currently unavailable for this book."
COOKIE = "session"


def get_products() -> list[dict[str, object]]:
    return [
        {
            "id": 0,
            "title": "The Comedy of Errors",
            "descriptionHtml": '<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">'
            "Wikipedia Summary</a>: The Comedy of Errors is one of <b>William Shakespeare's</b>"
            " early plays. It is his shortest and one of his most farcical comedies, with a "
            "major part of the humour coming from slapstick and mistaken identity, in addition "
            "to puns and word play.",
        }
    ]


def get_product(product_id: int) -> dict[str, object] | None:
    products = get_products()
    return products[product_id] if 0 <= product_id < len(products) else None


# -- the session: a signed cookie, as Flask's ------------------------------------------------


class Sessions:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def dump(self, data: dict[str, str]) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
        mac = hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{payload}.{mac}"

    def load(self, cookie_header: str | None) -> dict[str, str]:
        if not cookie_header:
            return {}
        for part in cookie_header.split(";"):
            name, _, value = part.strip().partition("=")
            if name != COOKIE or "." not in value:
                continue
            payload, mac = value.rsplit(".", 1)
            want = hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()[:32]
            if not hmac.compare_digest(mac, want):
                return {}
            try:
                data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            except ValueError:
                return {}
            return (
                {k: v for k, v in data.items() if isinstance(v, str)}
                if isinstance(data, dict)
                else {}
            )
        return {}


# -- tracing headers -------------------------------------------------------------------------


def trace_headers(incoming: dict[str, str]) -> dict[str, str]:
    """A child span of the incoming trace (or a new trace), in B3 and W3C form, as the
    original's tracer injects it."""
    trace_id = incoming.get("x-b3-traceid")
    parent = incoming.get("x-b3-spanid")
    sampled = incoming.get("x-b3-sampled", "1")
    traceparent = incoming.get("traceparent", "")
    parts = traceparent.split("-")
    if trace_id is None and len(parts) == 4 and len(parts[1]) == 32:
        trace_id, parent = parts[1], parts[2]
        sampled = "1" if parts[3].endswith("1") else "0"
    if trace_id is None:
        trace_id = secrets.token_hex(16)
    span_id = secrets.token_hex(8)
    out = {
        "x-b3-traceid": trace_id,
        "x-b3-spanid": span_id,
        "x-b3-sampled": sampled,
        "traceparent": f"00-{trace_id.rjust(32, '0')}-{span_id}-{'01' if sampled == '1' else '00'}",
    }
    if parent:
        out["x-b3-parentspanid"] = parent
    return out


# -- the page --------------------------------------------------------------------------------

_STYLE = """
body { font-family: "Helvetica Neue", Helvetica, Arial, sans-serif; margin: 0; color: #333; }
.navbar { background: #222; color: #9d9d9d; padding: 10px 20px; overflow: hidden; }
.navbar-brand { color: #9d9d9d; font-size: 18px; text-decoration: none; }
.navbar-right { float: right; margin: 0; }
.navbar a { color: #ddd; }
.container-fluid { padding: 0 30px; }
.row { display: flex; gap: 30px; }
.col-md-12 { flex: 1 1 100%; }
.col-md-6 { flex: 1 1 50%; }
.text-primary { color: #337ab7; }
.text-center { text-align: center; }
blockquote { border-left: 5px solid #eee; margin: 0 0 20px; padding: 10px 20px; }
blockquote small { display: block; color: #777; }
.glyphicon-star, .glyphicon-star-empty { font-size: 18px; }
#login-modal { display: none; position: fixed; top: 60px; right: 20px; background: #fff;
  color: #333; border: 1px solid #ccc; padding: 15px; box-shadow: 0 5px 15px rgba(0,0,0,.5); }
#login-modal.in { display: block; }
dt { font-weight: bold; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _details_html(status: int, details: dict[str, Any]) -> str:
    if status == 200:
        rows = "".join(
            f"<dt>{label}:</dt>{_e(details.get(key, ''))}"
            for label, key in (
                ("Type", "type"),
                ("Pages", "pages"),
                ("Publisher", "publisher"),
                ("Language", "language"),
                ("ISBN-10", "ISBN-10"),
                ("ISBN-13", "ISBN-13"),
            )
        )
        return f'<h4 class="text-center text-primary">Book Details</h4>\n<dl>{rows}</dl>'
    out = '<h4 class="text-center text-primary">Error fetching product details!</h4>'
    if details:
        out += f"\n<p>{_e(details.get('error', ''))}</p>"
    return out


def _stars(rating: dict[str, Any]) -> str:
    stars = rating.get("stars")
    if stars:
        count = int(stars)
        full = '<span class="glyphicon glyphicon-star">&#9733;</span>\n' * count
        empty = '<span class="glyphicon glyphicon-star-empty">&#9734;</span>\n' * (5 - count)
        return (
            f'<font color="{_e(rating.get("color", ""))}">\n'
            f"<!-- full stars: -->\n{full}<!-- empty stars: -->\n{empty}</font>"
        )
    if rating.get("error"):
        return f"<p><i>{_e(rating['error'])}</i></p>"
    return ""


def _reviews_html(status: int, reviews: dict[str, Any]) -> str:
    if status == 200:
        parts = ['<h4 class="text-center text-primary">Book Reviews</h4>']
        for review in reviews.get("reviews", ()):
            rating = review.get("rating")
            parts.append(
                "<blockquote>\n"
                f"<p>{_e(review.get('text', ''))}</p>\n"
                f"<small>{_e(review.get('reviewer', ''))}</small>\n"
                f"{_stars(rating) if isinstance(rating, dict) else ''}\n"
                "</blockquote>"
            )
        served = f"<dt>Reviews served by:</dt>\n<u>{_e(reviews.get('podname', ''))}</u>"
        if reviews.get("clustername", "null") != "null":
            served += f"\non cluster <u>{_e(reviews['clustername'])}</u>"
        parts.append(f"<dl>\n{served}\n</dl>")
        return "\n".join(parts)
    out = '<h4 class="text-center text-primary">Error fetching product reviews!</h4>'
    if reviews:
        out += f"\n<p>{_e(reviews.get('error', ''))}</p>"
    return out


def render_page(
    user: str,
    product: dict[str, object],
    *,
    details_status: int,
    details: dict[str, Any],
    reviews_status: int,
    reviews: dict[str, Any],
) -> str:
    """productpage.html of the original, without Bootstrap's static files."""
    if user:
        account = (
            '<p class="navbar-text navbar-right">\n'
            '<i class="glyphicon glyphicon-user" aria-hidden="true"></i>\n'
            f'<span style="padding-left: 5px;">{_e(user)} ( <a href="logout">sign out</a> )'
            "</span>\n</p>"
        )
    else:
        account = (
            '<button type="button" class="btn btn-default navbar-btn navbar-right" '
            "onclick=\"document.getElementById('login-modal').classList.toggle('in');"
            "document.getElementById('username').focus();\">Sign in</button>"
        )
    login = (
        '<div class="modal" id="login-modal" role="dialog">\n'
        '<h4 class="modal-title">Please sign in</h4>\n'
        '<form method="post" action="login" name="login_form">\n'
        '<p><input type="text" class="form-control" name="username" id="username" '
        'placeholder="User Name"></p>\n'
        '<p><input type="password" class="form-control" name="passwd" placeholder="Password">'
        "</p>\n<p>\n"
        '<button type="submit" class="btn btn-primary">Sign in</button>\n'
        '<button type="button" class="btn btn-default" '
        "onclick=\"document.getElementById('login-modal').classList.remove('in')\">Cancel"
        "</button>\n</p>\n</form>\n</div>"
    )
    return f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<meta http-equiv="X-UA-Compatible" content="IE=edge">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>Simple Bookstore App</title>
<style>{_STYLE}</style>
</head>
<body>
<nav class="navbar navbar-inverse navbar-static-top">
<div class="container">
<div class="navbar-header">
<a class="navbar-brand" href="#">BookInfo Sample</a>
</div>
{account}
</div>
</nav>
{"" if user else login}
<div class="container-fluid">
<div class="row">
<div class="col-md-12">
<h3 class="text-center text-primary">{_e(product["title"])}</h3>
<p>Summary: {product["descriptionHtml"]}</p>
</div>
</div>
<div class="row">
<div class="col-md-6">
{_details_html(details_status, details)}
</div>
<div class="col-md-6">
{_reviews_html(reviews_status, reviews)}
</div>
</div>
</div>
</body>
</html>
"""


def render_index() -> str:
    table = "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>"
        for k, v in (
            ("name", "http://details:9080"),
            ("endpoint", "details"),
            ("name", "http://reviews:9080"),
            ("endpoint", "reviews"),
        )
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Simple Bookstore App'
        "</title></head><body>\n<h3>Hello! This is a simple bookstore application consisting"
        " of three services as shown below</h3>\n"
        f'<table class="table table-condensed table-bordered table-hover">{table}</table>\n'
        "<p><h4>Click on one of the links below to auto generate a request to the backend as a"
        ' real user or a tester</h4></p>\n<p><a href="/productpage?u=normal">Normal user</a>'
        '</p>\n<p><a href="/productpage?u=test">Test user</a></p>\n</body></html>\n'
    )


class ProductPage:
    """The productpage ASGI app."""

    def __init__(self, session_key: bytes | None = None) -> None:
        self.sessions = Sessions(session_key)
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = pymesh.httpx.AsyncClient(timeout=TIMEOUT)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def forward(self, request: Request, user: str) -> dict[str, str]:
        headers = forward_headers(request.headers, FORWARD_HEADERS)
        headers.pop("end-user", None)
        headers.update(trace_headers(request.headers))
        if user:
            headers["end-user"] = user
        return headers

    async def _get(self, url: str, headers: dict[str, str]) -> httpx.Response | None:
        try:
            return await self.client.get(url, headers=headers)
        except httpx.HTTPError as exc:
            log.info("GET %s failed: %r", url, exc)
            return None

    async def details(self, product_id: object, headers: dict[str, str]) -> tuple[int, Any]:
        res = await self._get(f"{DETAILS_URL}/{product_id}", headers)
        if res is not None and res.status_code == 200:
            return 200, res.json()
        status = res.status_code if res is not None and res.status_code else 500
        return status, {"error": DETAILS_ERROR}

    async def reviews(self, product_id: object, headers: dict[str, str]) -> tuple[int, Any]:
        # "Do not remove. Bug introduced explicitly for illustration in fault injection task"
        res = None
        for _ in range(2):
            res = await self._get(f"{REVIEWS_URL}/{product_id}", headers)
            if res is not None and res.status_code == 200:
                return 200, res.json()
        status = res.status_code if res is not None and res.status_code else 500
        return status, {"error": REVIEWS_ERROR}

    async def ratings(self, product_id: object, headers: dict[str, str]) -> tuple[int, Any]:
        res = await self._get(f"{RATINGS_URL}/{product_id}", headers)
        if res is not None and res.status_code == 200:
            return 200, res.json()
        status = res.status_code if res is not None and res.status_code else 500
        return status, {"error": RATINGS_ERROR}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await Request.read(scope, receive)
        session = self.sessions.load(request.headers.get("cookie"))
        user = session.get("user", "")
        path, method = request.path, request.method
        if path in ("/", "/index.html") and method == "GET":
            await respond(send, 200, render_index().encode(), "text/html; charset=utf-8")
        elif path == "/health":
            await respond(send, 200, b"Product page is healthy")
        elif path == "/login" and method == "POST":
            form = urllib.parse.parse_qs(request.body.decode("utf-8", "replace"))
            name = (form.get("username") or [""])[0]
            if not name:
                name = (urllib.parse.parse_qs(request.query).get("username") or [""])[0]
            await self._redirect(send, request, {"user": name} if name else {})
        elif path == "/logout" and method == "GET":
            await self._redirect(send, request, {})
        elif path == "/productpage" and method == "GET":
            await self.page(send, request, user)
        elif path.startswith("/api/v1/products") and method == "GET":
            await self.api(send, request, user)
        else:
            await respond(send, 404, b"Not Found")

    async def _redirect(self, send: Send, request: Request, session: dict[str, str]) -> None:
        target = request.headers.get("referer") or "productpage"
        cookie = f"{COOKIE}={self.sessions.dump(session)}; Path=/; HttpOnly"
        if not session:
            cookie = f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly"
        body = f'<a href="{_e(target)}">{_e(target)}</a>'.encode()
        await respond(
            send,
            302,
            body,
            "text/html; charset=utf-8",
            [("location", target), ("set-cookie", cookie)],
        )

    async def page(self, send: Send, request: Request, user: str) -> None:
        product_id = 0
        headers = self.forward(request, user)
        product = get_product(product_id)
        assert product is not None
        details_status, details = await self.details(product_id, headers)
        reviews_status, reviews = await self.reviews(product_id, headers)
        page = render_page(
            user,
            product,
            details_status=details_status,
            details=details,
            reviews_status=reviews_status,
            reviews=reviews,
        )
        await respond(send, 200, page.encode(), "text/html; charset=utf-8")

    async def api(self, send: Send, request: Request, user: str) -> None:
        parts = request.path.rstrip("/").split("/")[4:]  # after /api/v1/products
        headers = self.forward(request, user)
        if not parts:
            await json_response(send, 200, get_products())
            return
        product_id = parts[0]
        if len(parts) == 1:
            status, value = await self.details(product_id, headers)
        elif parts[1:] == ["reviews"]:
            status, value = await self.reviews(product_id, headers)
        elif parts[1:] == ["ratings"]:
            status, value = await self.ratings(product_id, headers)
        else:
            await respond(send, 404, b"Not Found")
            return
        await json_response(send, status, value)


def session_key_from_env() -> bytes | None:
    key = os.environ.get("BOOKINFO_SESSION_KEY")
    return key.encode() if key else None
