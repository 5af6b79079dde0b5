"""ratings: ``GET/POST /ratings/<id>`` (Bookinfo's Node.js ratings service, in-memory version)
and the same data over gRPC (``bookinfo.ratings.v1.Ratings``, see ``ratings.proto``)."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import grpc

from examples.bookinfo.services import ratings_pb
from examples.bookinfo.services._common import (
    Receive,
    Request,
    Scope,
    Send,
    Stats,
    json_response,
)

__all__ = ["RatingsStore", "grpc_handlers", "make_app"]

_RATINGS_PATH = re.compile(r"^/ratings/[0-9]*")


class RatingsStore:
    """``getLocalReviews`` / ``putLocalReviews`` of the original: defaults, plus what was
    POSTed (kept in memory)."""

    def __init__(self) -> None:
        self._added: dict[int, dict[str, object]] = {}
        self._lock = threading.Lock()

    def get(self, product_id: int) -> dict[str, object]:
        with self._lock:
            if product_id in self._added:
                return self._added[product_id]
        return {"id": product_id, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}

    def put(self, product_id: int, ratings: object) -> dict[str, object]:
        with self._lock:
            self._added[product_id] = {"id": product_id, "ratings": ratings}
        return self.get(product_id)


def _product_id(path: str) -> int | None:
    # parseInt(req.url.split('/').pop()) of the original
    match = re.match(r"\d+", path.rsplit("/", maxsplit=1)[-1])
    return int(match.group()) if match else None


def make_app(store: RatingsStore) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        request = await Request.read(scope, receive)
        path = request.path
        if path == "/health" and request.method == "GET":
            await json_response(send, 200, {"status": "Ratings is healthy"})
            return
        if not _RATINGS_PATH.match(path) or request.method not in ("GET", "POST"):
            await json_response(send, 404, {"error": "Not Found"})
            return
        product_id = _product_id(path)
        if product_id is None:
            await json_response(send, 400, {"error": "please provide numeric product ID"})
            return
        if request.method == "POST":
            try:
                ratings = json.loads(request.body)
            except ValueError:
                await json_response(send, 400, {"error": "please provide valid ratings JSON"})
                return
            await json_response(send, 200, store.put(product_id, ratings))
        else:
            await json_response(send, 200, store.get(product_id))

    return app


def _to_message(value: dict[str, object]) -> Any:
    ratings = value.get("ratings")
    items = ratings.items() if isinstance(ratings, dict) else ()
    return ratings_pb.ProductRatings(
        id=int(value["id"]),  # type: ignore[call-overload]
        ratings={str(k): int(v) for k, v in items if isinstance(v, int | float)},
    )


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    return {str(k): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def grpc_handlers(
    store: RatingsStore, stats: Stats | None = None
) -> grpc.GenericRpcHandler[Any, Any]:
    """The gRPC ``Ratings`` service over the same store (asyncio handlers); calls are counted
    in ``stats`` under their method path (``/bookinfo.ratings.v1.Ratings/GetRatings``)."""

    async def get_ratings(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if stats is not None:
            stats.count(ratings_pb.GET_RATINGS, 200, _metadata(context))
        return _to_message(store.get(request.product_id))

    async def put_ratings(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if stats is not None:
            stats.count(ratings_pb.PUT_RATINGS, 200, _metadata(context))
        return _to_message(store.put(request.product_id, dict(request.ratings)))

    return grpc.method_handlers_generic_handler(
        ratings_pb.SERVICE,
        {
            "GetRatings": grpc.unary_unary_rpc_method_handler(
                get_ratings,
                request_deserializer=ratings_pb.GetRatingsRequest.FromString,
                response_serializer=ratings_pb.ProductRatings.SerializeToString,
            ),
            "PutRatings": grpc.unary_unary_rpc_method_handler(
                put_ratings,
                request_deserializer=ratings_pb.PutRatingsRequest.FromString,
                response_serializer=ratings_pb.ProductRatings.SerializeToString,
            ),
        },
    )
