"""Listener resource name templates (gRFC A36 server side, gRFC A47 federation).

A template is a string in which every ``%s`` is replaced by the service authority (client:
the path of the ``xds:`` target, e.g. ``reviews.default.svc.cluster.local:9080``) or by the
listening ``IP:PORT`` (server). When the template is a new-style ``xdstp:`` name the
replacement is percent-encoded, keeping only the characters RFC 3986 section 3.3 allows in a
URI path (``pchar`` and ``/``).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import quote

__all__ = [
    "XDSTP_SCHEME",
    "apply_template",
    "format_host_port",
    "xdstp_authority",
]

XDSTP_SCHEME = "xdstp:"

# RFC 3986 section 3.3: pchar = unreserved / pct-encoded / sub-delims / ":" / "@", plus "/".
# ``quote`` always keeps unreserved characters (letters, digits, "-._~").
_PATH_SAFE = "/:@!$&'()*+,;="


def percent_encode_path(text: str) -> str:
    """Percent-encode ``text`` so it holds only characters allowed in a URI path."""
    return quote(text, safe=_PATH_SAFE)


def apply_template(template: str, replacement: str) -> str:
    """Replace every ``%s`` in ``template`` (percent-encoding it for ``xdstp:`` templates)."""
    if template.startswith(XDSTP_SCHEME):
        replacement = percent_encode_path(replacement)
    return template.replace("%s", replacement)


def xdstp_authority(name: str) -> str | None:
    """The authority of an ``xdstp://AUTHORITY/...`` name; ``None`` if ``name`` is old-style.

    A name that starts with ``xdstp:`` but has no ``//`` authority part yields ``""`` (the
    empty authority, which gRFC A47 keys as ``""`` in the ``authorities`` map).
    """
    if not name.startswith(XDSTP_SCHEME):
        return None
    rest = name[len(XDSTP_SCHEME) :]
    if not rest.startswith("//"):
        return ""
    rest = rest[2:]
    end = len(rest)
    for sep in "/?#":
        idx = rest.find(sep)
        if idx != -1:
            end = min(end, idx)
    return rest[:end]


def format_host_port(ip: str, port: int) -> str:
    """``IP:PORT`` as gRPC formats a listening address (IPv6 in brackets, no zone mangling)."""
    host = ip
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        is_v6 = isinstance(ipaddress.ip_address(host.split("%", 1)[0]), ipaddress.IPv6Address)
    except ValueError:
        is_v6 = ":" in host
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"
