"""reviews: ``GET /reviews/<id>`` (Bookinfo's Java reviews service, versions v1-v3).

v1 shows no ratings; v2 asks ratings and shows black stars, v3 red stars. As the original,
the call to ratings has a 10 s timeout in v2 and 2.5 s in v3, and a failed call shows
"Ratings service is currently unavailable" instead of the stars. v2 calls ratings over HTTP
(``http://ratings:9080/ratings/<id>``, :mod:`pymesh.httpx`), v3 over gRPC
(``xds:///ratings.default.svc.cluster.local:9090``, :mod:`pymesh.grpc.aio`): both data-plane
adapters run in the example.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grpc
import httpx

import pymesh.grpc.aio
import pymesh.httpx
from examples.bookinfo.services import ratings_pb
from examples.bookinfo.services._common import (
    FORWARD_HEADERS,
    Receive,
    Request,
    Scope,
    Send,
    forward_headers,
    json_response,
)
from pymesh.security import mesh_channel_credentials

__all__ = ["RATINGS_GRPC_TARGET", "RATINGS_URL", "Reviews", "reviews_json"]

log = logging.getLogger("bookinfo.reviews")

RATINGS_URL = "http://ratings:9080/ratings"
RATINGS_GRPC_TARGET = "xds:///ratings.default.svc.cluster.local:9090"
UNAVAILABLE = "Ratings service is currently unavailable"
TEXT1 = "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"
TEXT2 = (
    "Absolutely fun and entertaining. The play lacks thematic depth when compared to other "
    "plays by Shakespeare."
)
# gRPC metadata cannot carry these (binary without -bin handling, or reserved by grpcio)
_NOT_GRPC_METADATA = {"grpc-trace-bin", "user-agent"}


def reviews_json(
    product_id: str,
    *,
    podname: str,
    clustername: str,
    ratings_enabled: bool,
    color: str,
    stars: tuple[int, int],
) -> dict[str, object]:
    """The original's ``getJsonResponse`` (``-1`` stars: ratings unavailable)."""
    reviews: list[dict[str, object]] = []
    for reviewer, text, count in (("Reviewer1", TEXT1, stars[0]), ("Reviewer2", TEXT2, stars[1])):
        review: dict[str, object] = {"reviewer": reviewer, "text": text}
        if ratings_enabled:
            if count != -1:
                review["rating"] = {"stars": count, "color": color}
            else:
                review["rating"] = {"error": UNAVAILABLE}
        reviews.append(review)
    return {"id": product_id, "podname": podname, "clustername": clustername, "reviews": reviews}


class Reviews:
    """One reviews version as an ASGI app."""

    def __init__(self, version: str, ratings_protocol: str | None = None) -> None:
        self.version = version
        self.ratings_enabled = version != "v1"
        self.color = "black" if version == "v2" else "red"
        self.timeout = 10.0 if self.color == "black" else 2.5
        self.protocol = ratings_protocol or ("grpc" if version == "v3" else "http")
        self.podname = os.environ.get("HOSTNAME") or f"reviews-{version}"
        self.clustername = os.environ.get("CLUSTER_NAME") or "null"
        self._http: httpx.AsyncClient | None = None
        self._channel: Any = None
        self._credentials: Any = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._channel is not None:
            await self._channel.close()
            self._credentials.close()

    async def ratings(self, product_id: int, headers: dict[str, str]) -> dict[str, Any] | None:
        """The ratings of ``product_id``, or ``None`` when the call failed (any reason)."""
        forwarded = forward_headers(headers, FORWARD_HEADERS)
        if self.protocol == "grpc":
            return await self._ratings_grpc(product_id, forwarded)
        if self._http is None:
            self._http = pymesh.httpx.AsyncClient(timeout=self.timeout)
        try:
            response = await self._http.get(f"{RATINGS_URL}/{product_id}", headers=forwarded)
        except httpx.HTTPError as exc:
            log.warning("Error: unable to contact %s got exception %r", RATINGS_URL, exc)
            return None
        if response.status_code != 200:
            log.warning(
                "Error: unable to contact %s got status of %d", RATINGS_URL, response.status_code
            )
            return None
        try:
            value = response.json()
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    async def _ratings_grpc(
        self, product_id: int, headers: dict[str, str]
    ) -> dict[str, Any] | None:
        if self._channel is None:
            # per endpoint, the cluster's TLS (DestinationRule ISTIO_MUTUAL) decides: mTLS
            # with the server's SPIFFE identity checked, or plaintext
            self._credentials = mesh_channel_credentials()
            self._channel = pymesh.grpc.aio.secure_channel(RATINGS_GRPC_TARGET, self._credentials)
        call = self._channel.unary_unary(
            ratings_pb.GET_RATINGS,
            request_serializer=ratings_pb.GetRatingsRequest.SerializeToString,
            response_deserializer=ratings_pb.ProductRatings.FromString,
        )
        metadata = tuple((k, v) for k, v in headers.items() if k not in _NOT_GRPC_METADATA)
        try:
            reply = await call(
                ratings_pb.GetRatingsRequest(product_id=product_id),
                timeout=self.timeout,
                metadata=metadata,
            )
        except grpc.RpcError as exc:
            log.warning("Error: unable to contact %s got status %s", RATINGS_GRPC_TARGET, exc)
            return None
        return {"id": reply.id, "ratings": dict(reply.ratings)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await Request.read(scope, receive)
        path = request.path
        if path == "/health":
            await json_response(send, 200, {"status": "Reviews is healthy"})
            return
        if not path.startswith("/reviews/"):
            await json_response(send, 404, {"error": "Not Found"})
            return
        try:
            product_id = int(path.split("/")[2])
        except ValueError:
            await json_response(send, 404, {"error": "Not Found"})
            return
        stars = [-1, -1]
        if self.ratings_enabled:
            answer = await self.ratings(product_id, request.headers)
            ratings = answer.get("ratings") if answer else None
            if isinstance(ratings, dict):
                for i, name in enumerate(("Reviewer1", "Reviewer2")):
                    if isinstance(ratings.get(name), int):
                        stars[i] = ratings[name]
        body = reviews_json(
            str(product_id),
            podname=self.podname,
            clustername=self.clustername,
            ratings_enabled=self.ratings_enabled,
            color=self.color,
            stars=(stars[0], stars[1]),
        )
        await json_response(send, 200, body)
