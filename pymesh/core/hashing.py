"""The request hash of a route's hash policies (Envoy ``HashPolicyImpl``), for ring hash and
Maglev.

Each policy that finds its input yields ``xxHash64(value)``; results combine as Envoy does,
``hash = rotl(hash, 1) ^ new`` (so two identical policies do not cancel), and a ``terminal``
policy that produced a hash stops the list. No policy producing a hash gives ``None``: the
balancer then draws a random hash, as Envoy does.

==========================  ==================================================================
policy                      value hashed
==========================  ==================================================================
``HeaderHash``              every value of the header (not joined), each rewritten by
                            ``regex_rewrite`` if set, sorted, then chained:
                            ``xxh64(v_n, seed=...xxh64(v_1, seed=0))`` (one value: ``xxh64(v)``)
``CookieHash``              the cookie's value (first ``name=`` in the ``cookie`` headers,
                            surrounding quotes removed; empty = missing). Missing with a
                            ``ttl``: a cookie is generated as Envoy does (see below)
``ConnectionSourceIpHash``  the client IP text (``RequestInfo.source_ip``)
``QueryParameterHash``      the first value of the parameter, undecoded (``a`` alone = ``""``)
``FilterStateHash``         no filter state in a client: never produces a hash
==========================  ==================================================================

Generated cookies (Istio's ``consistentHash.httpCookie`` with a ``ttl``, sticky sessions): when
the request lacks the cookie, Envoy invents its value, ``"%016x" % xxh64(seed)`` where the
seed is the downstream connection's remote address followed by its local address
(``"10.0.0.7:51234" + "10.0.0.9:15001"``), hashes that value, and adds
``Set-Cookie: name="value"; Max-Age=ttl; Path=path; HttpOnly`` to the response, so the
client's cookie jar pins the next requests to the same endpoint (checked against Envoy). Pass a
``set_cookies`` list to :func:`request_hash` to get the same: it receives the ``Set-Cookie``
values the adapter must add to the response. In-process there is no downstream connection, so
``cookie_seed`` defaults to the request's ``source_ip`` (one cookie value per client process,
as one connection to a sidecar would get).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import xxhash

from pymesh.core.types import RequestInfo
from pymesh.model.route import (
    ConnectionSourceIpHash,
    CookieHash,
    HashPolicy,
    HeaderHash,
    QueryParameterHash,
)

__all__ = ["cookie_value", "query_parameter", "request_hash", "set_cookie_value"]

_MASK = (1 << 64) - 1
_xxh64 = xxhash.xxh64_intdigest


def cookie_value(request: RequestInfo, name: str) -> str | None:
    """The value of cookie ``name`` as Envoy's ``parseCookieValue`` reads it, or ``None``."""
    for header in request.headers.get_all("cookie"):
        if name not in header:  # cheap pre-check: most requests carry other cookies
            continue
        for part in header.split(";"):
            part = part.strip(" ")
            key, sep, value = part.partition("=")
            if not sep or key != name:
                continue
            if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                value = value[1:-1]
            return value
    return None


def query_parameter(request: RequestInfo, name: str) -> str | None:
    """The first value of query parameter ``name`` (undecoded), or ``None``."""
    query = request.query
    if not query:
        return None
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == name:
            return value
    return None


_SUBST = re.compile(r"\\(\d|\\)")


def _re2_replace_all(pattern: re.Pattern[str], substitution: str, value: str) -> str:
    """RE2 ``GlobalReplace``: ``\\0``..``\\9`` are groups (``\\0`` the whole match),
    ``\\\\`` a backslash; unlike Python templates, nothing else is special."""

    def expand(match: re.Match[str]) -> str:
        def group(ref: re.Match[str]) -> str:
            token = ref.group(1)
            if token == "\\":
                return "\\"
            index = int(token)
            if index > (pattern.groups or 0):
                return ""
            return match.group(index) or ""

        return _SUBST.sub(group, substitution)

    return pattern.sub(expand, value)


def _header_hash(policy: HeaderHash, request: RequestInfo) -> int | None:
    values = request.headers.get_all(policy.header_name)
    if not values:
        return None
    rewrite = policy.regex_rewrite
    if rewrite is not None:
        pattern = rewrite.pattern._regex
        if pattern is not None:
            values = [_re2_replace_all(pattern, rewrite.substitution, v) for v in values]
    if len(values) == 1:
        return _xxh64(values[0].encode())
    values.sort()
    h = 0
    for v in values:
        h = _xxh64(v.encode(), h)
    return h


def set_cookie_value(name: str, value: str, path: str, ttl: float) -> str:
    """Envoy ``makeSetCookieValue`` for a generated hash cookie (always ``HttpOnly``)."""
    out = f'{name}="{value}"'
    max_age = int(ttl)
    if max_age:
        out += f"; Max-Age={max_age}"
    if path:
        out += f"; Path={path}"
    return out + "; HttpOnly"


def _cookie_hash(
    policy: CookieHash,
    request: RequestInfo,
    set_cookies: list[str] | None,
    cookie_seed: str | None,
) -> int | None:
    value = cookie_value(request, policy.name)
    if value:
        return _xxh64(value.encode())
    if policy.ttl is None or set_cookies is None:
        return None
    seed = cookie_seed if cookie_seed is not None else request.source_ip or ""
    generated = f"{_xxh64(seed.encode()):016x}"
    set_cookies.append(set_cookie_value(policy.name, generated, policy.path, policy.ttl))
    return _xxh64(generated.encode())


def _one(
    policy: HashPolicy,
    request: RequestInfo,
    set_cookies: list[str] | None,
    cookie_seed: str | None,
) -> int | None:
    if isinstance(policy, HeaderHash):
        return _header_hash(policy, request)
    if isinstance(policy, CookieHash):
        return _cookie_hash(policy, request, set_cookies, cookie_seed)
    if isinstance(policy, ConnectionSourceIpHash):
        ip = request.source_ip
        return None if not ip else _xxh64(ip.encode())
    if isinstance(policy, QueryParameterHash):
        value = query_parameter(request, policy.name)
        return None if value is None else _xxh64(value.encode())
    return None  # FilterStateHash: no filter state on the client side


def request_hash(
    policies: Sequence[HashPolicy],
    request: RequestInfo,
    *,
    set_cookies: list[str] | None = None,
    cookie_seed: str | None = None,
) -> int | None:
    """The 64-bit hash of ``request`` under ``policies``, or ``None`` if none applied.

    With ``set_cookies`` (a list to fill), a cookie policy with a ``ttl`` whose cookie is
    missing generates one as Envoy does and appends its ``Set-Cookie`` header value; without
    it, such a policy yields no hash. ``cookie_seed`` seeds the generated value (Envoy:
    downstream remote + local address; default here: ``request.source_ip``).
    """
    h: int | None = None
    for policy in policies:
        new = _one(policy, request, set_cookies, cookie_seed)
        if new is not None:
            old = 0 if h is None else ((h << 1) | (h >> 63)) & _MASK
            h = old ^ new
        if policy.terminal and h is not None:
            break
    return h
