"""Istio's security tasks on Bookinfo: mutual TLS (STRICT refuses a plaintext client) and
authorization for HTTP traffic, step by step as Istio's "HTTP Traffic" task applies it:

1. ``allow-nothing``: every workload denies everything -> the page is 403 ``RBAC: access denied``;
2. ``productpage-viewer`` (GET on productpage, from anyone) -> the page loads, but productpage's
   calls to details and reviews are denied: both sections show their errors;
3. ``details-viewer`` and ``reviews-viewer`` (GET, only from productpage's service account)
   -> details and reviews load, reviews' calls to ratings are denied: "Ratings service is
   currently unavailable";
4. ``ratings-viewer`` (GET, only from reviews' service account) -> everything loads, with stars.

The policies are Istio's YAML (apiVersion security.istio.io/v1), unchanged. Reviews are pinned
to v2 (it calls ratings over HTTP with GET, like the original Bookinfo) so every load calls
ratings. reviews v3 calls ratings over gRPC: a gRPC call is an HTTP/2 POST, so Istio's
GET-only ``ratings-viewer`` does not admit it (as Envoy's RBAC would not) -- checked too.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from examples.bookinfo.client import (
    DETAILS_ERROR,
    RATINGS_UNAVAILABLE,
    REVIEWS_ERROR,
    Page,
    User,
)
from examples.bookinfo.mesh import Bookinfo

PEER_AUTHENTICATION_STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: default
spec:
  mtls:
    mode: STRICT
"""

ALLOW_NOTHING = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: default
spec:
  {}
"""

PRODUCTPAGE_VIEWER = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: "productpage-viewer"
  namespace: default
spec:
  selector:
    matchLabels:
      app: productpage
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
"""

DETAILS_VIEWER = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: "details-viewer"
  namespace: default
spec:
  selector:
    matchLabels:
      app: details
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]
    to:
    - operation:
        methods: ["GET"]
"""

REVIEWS_VIEWER = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: "reviews-viewer"
  namespace: default
spec:
  selector:
    matchLabels:
      app: reviews
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]
    to:
    - operation:
        methods: ["GET"]
"""

RATINGS_VIEWER = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: "ratings-viewer"
  namespace: default
spec:
  selector:
    matchLabels:
      app: ratings
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-reviews"]
    to:
    - operation:
        methods: ["GET"]
"""


def anonymous_page(bookinfo: Bookinfo) -> Page:
    """One product page load by a plaintext client (a browser), on a fresh connection."""
    with User(bookinfo.productpage_url) as user:
        return user.page()


def plaintext_get(url: str) -> httpx.Response:
    """A plain httpx client, no certificate, a new connection."""
    with httpx.Client(timeout=10) as client:
        return client.get(url)


def test_strict_mtls_refuses_a_plaintext_client(bookinfo: Bookinfo) -> None:
    details = bookinfo.services["details-v1"].url + "/details/0"
    # Istio's default (PERMISSIVE): plaintext is admitted beside mTLS on the same port
    assert plaintext_get(details).status_code == 200

    bookinfo.apply_yaml(PEER_AUTHENTICATION_STRICT, name="peer-authentication-strict")
    for url in (details, bookinfo.page_url, bookinfo.services["ratings-v1"].url + "/ratings/0"):
        try:
            response = plaintext_get(url)
        except httpx.TransportError:
            continue  # closed before any byte was answered, as a STRICT sidecar does
        raise AssertionError(f"STRICT admitted plaintext to {url}: {response.status_code}")

    # ...while the mesh itself keeps working: a client with its own identity (as Istio's
    # ingress gateway) gets the whole page over mTLS
    with bookinfo.mesh_user() as gateway:
        page = gateway.page()
    assert page.status == 200
    assert page.details_ok and page.reviews_ok, page.errors

    bookinfo.remove("peer-authentication-strict")
    assert plaintext_get(details).status_code == 200


def test_authorization_for_http_traffic(bookinfo: Bookinfo) -> None:
    bookinfo.apply("virtual-service-reviews-v2")  # every load calls ratings (HTTP GET)

    # 1. allow-nothing: the page itself is denied
    bookinfo.apply_yaml(ALLOW_NOTHING, name="allow-nothing")
    response = plaintext_get(bookinfo.page_url)
    assert response.status_code == 403
    assert response.text == "RBAC: access denied"

    # 2. productpage-viewer: the page, but productpage may not call details or reviews
    bookinfo.apply_yaml(PRODUCTPAGE_VIEWER, name="productpage-viewer")
    page = anonymous_page(bookinfo)
    assert page.status == 200 and page.title == "Simple Bookstore App"
    assert not page.details_ok and not page.reviews_ok
    assert page.details_error and page.reviews_error, page.errors
    assert DETAILS_ERROR in page.text and REVIEWS_ERROR in page.text
    assert "Error fetching product details!" in page.text
    assert "Error fetching product reviews!" in page.text
    # only GET was granted: the login form's POST is denied
    with User(bookinfo.productpage_url) as user:
        assert user.client.post("/login", data={"username": "jason"}).status_code == 403

    # 3. details-viewer, reviews-viewer: productpage's identity may; ratings still denied
    bookinfo.apply_yaml(DETAILS_VIEWER + "---\n" + REVIEWS_VIEWER, name="details-reviews-viewer")
    page = anonymous_page(bookinfo)
    assert page.details_ok and page.reviews_ok, page.errors
    assert page.served_by == "reviews-v2"
    assert page.star_colors == set()
    assert set(page.rating_errors) == {RATINGS_UNAVAILABLE}, page.rating_errors
    # the policies name principals: the same GET from another identity is denied
    with httpx.Client(timeout=10) as plain:
        assert plain.get(bookinfo.services["details-v1"].url + "/details/0").status_code == 403

    # 4. ratings-viewer: reviews' identity may GET ratings: the whole page, black stars
    bookinfo.apply_yaml(RATINGS_VIEWER, name="ratings-viewer")
    page = anonymous_page(bookinfo)
    assert page.details_ok and page.reviews_ok, page.errors
    assert page.rating_errors == ()
    assert page.star_colors == {"black"}

    # reviews v3 calls ratings over gRPC (POST): not a GET, so still denied
    bookinfo.apply("virtual-service-reviews-v3")
    page = anonymous_page(bookinfo)
    assert page.served_by == "reviews-v3"
    assert set(page.rating_errors) == {RATINGS_UNAVAILABLE}, page.rating_errors


def test_docs_show_the_tested_yaml() -> None:
    """docs/bookinfo.md shows the YAML these tests apply, byte for byte."""
    from tests.integration.bookinfo.test_circuit_breaking import CIRCUIT_BREAKER
    from tests.integration.bookinfo.test_mirroring import REVIEWS_V1_MIRROR_V2

    docs = (Path(__file__).resolve().parents[3] / "docs" / "bookinfo.md").read_text()
    blocks = set(re.findall(r"```yaml\n(.*?)```", docs, re.S))
    for text in (
        PEER_AUTHENTICATION_STRICT,
        ALLOW_NOTHING,
        PRODUCTPAGE_VIEWER,
        DETAILS_VIEWER,
        REVIEWS_VIEWER,
        RATINGS_VIEWER,
        CIRCUIT_BREAKER,
        REVIEWS_V1_MIRROR_V2,
    ):
        assert text in blocks, text
