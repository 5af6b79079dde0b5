"""details: ``GET /details/<id>`` with the book's details (Bookinfo's Ruby details service)."""

from __future__ import annotations

from typing import Any

from examples.bookinfo.services._common import Receive, Request, Scope, Send, json_response

__all__ = ["book_details", "make_app"]


def book_details(product_id: int) -> dict[str, object]:
    """The original's ``get_book_details`` (the external books API is not used)."""
    return {
        "id": product_id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


def make_app() -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        request = await Request.read(scope, receive)
        path = request.path
        if path == "/health":
            await json_response(send, 200, {"status": "Details is healthy"})
        elif path.startswith("/details"):
            try:
                product_id = int(path.rstrip("/").split("/")[-1])
            except ValueError:
                await json_response(send, 400, {"error": "please provide numeric product id"})
                return
            await json_response(send, 200, book_details(product_id))
        else:
            await json_response(send, 404, {"error": "Not Found"})

    return app
