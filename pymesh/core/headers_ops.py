"""Request/response header manipulation as Envoy's ``HeaderParser`` does it.

One :class:`HeaderMutations` level (route, virtual host, route configuration, weighted
cluster) compiles once into a :class:`HeaderOps`; applying it to a :class:`Headers` returns
a new :class:`Headers`.

Envoy's order inside one level (``HeaderParser::evaluateHeaders``):

1. every ``*_headers_to_remove`` name is removed;
2. each ``*_headers_to_add`` entry is evaluated against the headers as they are *after the
   removals and before any addition of this level*: an empty value is skipped unless
   ``keep_empty_value``; ``ADD_IF_ABSENT`` adds only when the name is absent;
   ``OVERWRITE_IF_EXISTS`` overwrites only when present; ``OVERWRITE_IF_EXISTS_OR_ADD``
   overwrites; ``APPEND_IF_EXISTS_OR_ADD`` appends;
3. all overwrites are applied, then all appends.

Values may carry Envoy's substitution formatters. We implement ``%%`` (a literal ``%``),
``%REQ(name)%`` / ``%REQ(a?b)%`` (a request header, empty when missing),
``%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%`` and ``%DOWNSTREAM_REMOTE_ADDRESS%`` (the
request's source IP, without port: the core does not know it); any other ``%...%`` command
is kept literally (Envoy would fill it in).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pymesh.core.types import Headers, RequestInfo
from pymesh.model.route import AppendAction, HeaderMutations, HeaderToAdd

__all__ = ["HeaderOps", "compile_header_ops", "format_header_value"]

_COMMAND = re.compile(r"%%|%([A-Z_0-9]+)(?:\(([^)]*)\))?%")

_ValueFn = Callable[[RequestInfo | None], str]


def format_header_value(template: str, request: RequestInfo | None) -> str:
    """Expand the substitution formatters we support in ``template`` (see the module doc)."""
    if "%" not in template:
        return template

    def repl(m: re.Match[str]) -> str:
        text = m.group(0)
        if text == "%%":
            return "%"
        cmd, arg = m.group(1), m.group(2)
        if request is None:
            return text
        if cmd == "REQ" and arg:
            # ``%REQ(X?Y)%``: header X, else Y.
            for name in arg.split("?"):
                value = _request_header(request, name.strip().lower())
                if value is not None:
                    return value
            return ""
        if cmd in ("DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", "DOWNSTREAM_REMOTE_ADDRESS"):
            return request.source_ip or ""
        return text

    return _COMMAND.sub(repl, template)


def _request_header(request: RequestInfo, name: str) -> str | None:
    if name in {":authority", "host"}:
        return request.authority
    if name == ":path":
        return request.path
    if name == ":method":
        return request.method
    if name == ":scheme":
        return request.scheme
    return request.headers.get(name)


def _value_fn(header: HeaderToAdd) -> _ValueFn | str:
    if "%" not in header.value:
        return header.value
    template = header.value
    return lambda request: format_header_value(template, request)


@dataclass(frozen=True, slots=True)
class _Add:
    key: str
    value: _ValueFn | str
    action: AppendAction
    keep_empty: bool


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """A compiled sequence of header-manipulation levels, applied in order (each level as
    Envoy's ``HeaderParser``; a later level sees the result of the earlier ones)."""

    levels: tuple[tuple[tuple[str, ...], tuple[_Add, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.levels)

    def apply(self, headers: Headers, request: RequestInfo | None = None) -> Headers:
        """Return ``headers`` with every level applied. ``request`` feeds ``%REQ(...)%``."""
        for removes, adds in self.levels:
            headers = _apply_level(headers, removes, adds, request)
        return headers


def _apply_level(
    headers: Headers,
    removes: tuple[str, ...],
    adds: tuple[_Add, ...],
    request: RequestInfo | None,
) -> Headers:
    items = list(headers)
    if removes:
        drop = set(removes)
        items = [(k, v) for k, v in items if k not in drop]
    if not adds:
        return Headers(items) if removes else headers
    present = {k for k, _ in items}
    overwrite: list[tuple[str, str]] = []
    append: list[tuple[str, str]] = []
    for add in adds:
        value = add.value if isinstance(add.value, str) else add.value(request)
        if not value and not add.keep_empty:
            continue
        action = add.action
        if action is AppendAction.APPEND_IF_EXISTS_OR_ADD:
            append.append((add.key, value))
        elif action is AppendAction.ADD_IF_ABSENT:
            if add.key not in present:
                append.append((add.key, value))
        elif action is AppendAction.OVERWRITE_IF_EXISTS:
            if add.key in present:
                overwrite.append((add.key, value))
        else:
            overwrite.append((add.key, value))
    for key, value in overwrite:
        # Envoy's setReferenceKey: remove every value, then add one at the end.
        items = [(k, v) for k, v in items if k != key]
        items.append((key, value))
    items.extend(append)
    return Headers(items)


def compile_header_ops(levels: Sequence[HeaderMutations], *, response: bool) -> HeaderOps:
    """Compile the request (``response=False``) or response side of ``levels``, applied in
    the given order. Empty levels are dropped."""
    out = []
    for level in levels:
        if response:
            removes, adds = level.response_headers_to_remove, level.response_headers_to_add
        else:
            removes, adds = level.request_headers_to_remove, level.request_headers_to_add
        if not removes and not adds:
            continue
        out.append(
            (
                tuple(removes),
                tuple(_Add(h.key, _value_fn(h), h.append_action, h.keep_empty_value) for h in adds),
            )
        )
    return HeaderOps(tuple(out))
