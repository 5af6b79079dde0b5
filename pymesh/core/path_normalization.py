"""Inbound request-path normalization, as Envoy's HTTP connection manager does it.

An inbound HCM rewrites the path before its filters (RBAC) and the application see it, so a
path-based policy and the application agree on what was asked for. Envoy's order, kept here:

1. ``path_with_escaped_slashes_action``: unless it keeps them, ``%2F``/``%2f`` become ``/``
   and ``%5C``/``%5c`` become ``\\``; a path that had one is then rejected (400), redirected
   (307 to the rewritten path) or carried on, per the action.
2. ``normalize_path`` (RFC 3986 plus Envoy's extras): percent-encoded unreserved characters
   decoded once (``%61`` -> ``a``, ``%2e`` -> ``.``: no double decoding), other escapes
   kept as written, backslashes made slashes, dot segments removed; an escaped NUL rejects
   the request.
3. ``merge_slashes``: runs of slashes become one.

Istio's ``meshConfig.pathNormalization`` picks these (``NONE``, ``BASE`` — the default —,
``MERGE_SLASHES``, ``DECODE_AND_MERGE_SLASHES``); pymesh's control plane sets them as istiod
does. Checked against Envoy in tests/resilience/test_path_normalization.py.
"""

from __future__ import annotations

import re

from pymesh.model.listener import EscapedSlashesAction, PathNormalization

__all__ = ["REJECT", "normalize"]

REJECT = 0
""":func:`normalize`'s verdict for a path the HCM refuses: answer 400."""

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPED_SLASH = re.compile(rb"%(?:2[fF]|5[cC])")
_SLASHES = re.compile(rb"//+")
_KEEP = (EscapedSlashesAction.IMPLEMENTATION_SPECIFIC_DEFAULT, EscapedSlashesAction.KEEP_UNCHANGED)


def _unescape_slash(m: re.Match[bytes]) -> bytes:
    return b"/" if m.group(0)[1] == 0x32 else b"\\"


def _canonical(raw: bytes) -> bytes | None:
    if b"\\" in raw:  # a backslash is a slash (as Envoy's URL canonicalizer treats it)
        raw = raw.replace(b"\\", b"/")
    if b"%" in raw:
        out = bytearray()
        i, n = 0, len(raw)
        while i < n:
            c = raw[i]
            if c == 0x25 and i + 2 < n and raw[i + 1] in _HEX and raw[i + 2] in _HEX:
                value = int(raw[i + 1 : i + 3], 16)
                if value == 0:
                    return None
                if value in _UNRESERVED:
                    out.append(value)
                else:
                    out += raw[i : i + 3]
                i += 3
            else:
                out.append(c)
                i += 1
        raw = bytes(out)
    if b"/." not in raw:
        return raw
    segments = raw.split(b"/")
    kept: list[bytes] = []
    last = len(segments) - 1
    for index, seg in enumerate(segments[1:], start=1):
        if seg == b"..":
            if kept:
                kept.pop()
        elif seg != b".":
            kept.append(seg)
            continue
        if index == last:  # "/a/.." and "/a/." end with a slash
            kept.append(b"")
    return b"/" + b"/".join(kept)


def normalize(raw: bytes, policy: PathNormalization) -> int | tuple[bytes, bool]:
    """``raw`` (the request path without its query) normalized per ``policy``.

    Returns :data:`REJECT` (answer 400), or ``(path, redirect)``: serve ``path``, or when
    ``redirect`` is true answer 307 with ``location`` set to ``path`` (Envoy's
    ``UNESCAPE_AND_REDIRECT``)."""
    redirect = False
    action = policy.escaped_slashes
    if action not in _KEEP and b"%" in raw:
        unescaped = _ESCAPED_SLASH.sub(_unescape_slash, raw)
        if unescaped != raw:
            if action is EscapedSlashesAction.REJECT_REQUEST:
                return REJECT
            redirect = action is EscapedSlashesAction.UNESCAPE_AND_REDIRECT
            raw = unescaped
    if policy.normalize:
        canonical = _canonical(raw)
        if canonical is None:
            return REJECT
        raw = canonical
    if policy.merge_slashes and b"//" in raw:
        raw = _SLASHES.sub(b"/", raw)
    return raw, redirect
