"""The httpx adapter's hot-path shortcuts give exactly what the long way gives."""

from __future__ import annotations

import httpcore
import httpx

from pymesh.core.flow import lowered_headers
from pymesh.core.types import Headers
from pymesh.httpx._transport import _core_request, _MeshCore


def _pair(body: bytes, extensions: dict[str, object]) -> tuple[httpcore.Request, httpcore.Request]:
    url = httpcore.URL(scheme=b"http", host=b"10.0.0.1", port=8080, target=b"/a?b=1")
    headers = [(b"host", b"svc:8080"), (b"x-a", b"1"), (b"x-a", b"2")]
    fast = _core_request(b"POST", url, list(headers), body, dict(extensions))
    slow = httpcore.Request(
        b"POST", url, headers=list(headers), content=body, extensions=dict(extensions)
    )
    return fast, slow


def test_unchecked_request_equals_httpcore_constructor() -> None:
    for body in (b"", b"payload"):
        fast, slow = _pair(body, {"timeout": {"read": 1.0}})
        # Same attributes (an httpcore upgrade adding one to Request fails here) ...
        assert sorted(vars(fast)) == sorted(vars(slow))
        # ... with the same values, and a body stream iterated the same way.
        assert fast.method == slow.method
        assert fast.url == slow.url
        assert fast.headers == slow.headers
        assert fast.extensions == slow.extensions
        assert type(fast.stream) is type(slow.stream)
        assert list(fast.stream) == list(slow.stream)  # type: ignore[arg-type]


def test_target_extension_takes_the_constructor_path() -> None:
    fast, slow = _pair(b"", {"target": b"/override"})
    assert fast.url.target == b"/override"
    assert fast.url == slow.url


def test_request_info_memo_gives_the_same_view_as_a_fresh_conversion() -> None:
    core = object.__new__(_MeshCore)
    core._seen_headers = {}
    with httpx.Client() as client:
        first = client.build_request("GET", "http://svc:8080/p?q=1", headers={"X-Tok": "a"})
        again = client.build_request("GET", "http://svc:8080/p?q=1", headers={"X-Tok": "a"})
        other = client.build_request("GET", "http://svc:8080/p", headers={"X-Tok": "b"})
    info1, origin1 = core.request_info(first)
    info2, origin2 = core.request_info(again)
    info3, _ = core.request_info(other)
    assert info1 == info2 and origin2 is origin1  # the second one came from the memo
    assert info1.headers.get("x-tok") == "a" and info3.headers.get("x-tok") == "b"
    assert info1.authority == "svc:8080" and info1.path == "/p?q=1"
    assert "host" not in info1.headers
    expected = Headers((k.decode(), v.decode()) for k, v in first.headers.raw if k != b"Host")
    assert info1.headers == expected


def test_lowered_headers_is_a_plain_headers_value() -> None:
    items = (("content-type", "text/plain"), ("x-a", "1"), ("x-a", "2"))
    fast = lowered_headers(items)
    slow = Headers(items)
    assert fast == slow and hash(fast) == hash(slow)
    assert fast.get("X-A") == "1,2" and fast.get_all("x-a") == ["1", "2"]
    assert fast.with_added("x-b", "3") == slow.with_added("x-b", "3")
