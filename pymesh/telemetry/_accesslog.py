"""Access log lines: Envoy's default text format and a JSON form with the same fields.

Envoy's default format (what ``istioctl``'s ``accessLogFile`` gives with the default
encoding, minus Istio's extra trailing fields)::

    [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
    %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
    %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
    "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"

A missing value is ``-``, as Envoy writes it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["AccessRecord", "format_json", "format_text", "text_line"]


@dataclass(slots=True)
class AccessRecord:
    """Everything one access log line says about one request."""

    start: float
    """Wall-clock start (``time.time()``)."""
    method: str
    path: str
    protocol: str
    """``HTTP/1.1`` / ``HTTP/2``."""
    status: int
    flags: str
    """Response flags joined by ``,`` or ``-``."""
    bytes_received: int
    bytes_sent: int
    duration_ms: int
    authority: str
    upstream_host: str | None = None
    upstream_cluster: str | None = None
    request_id: str | None = None
    user_agent: str | None = None
    forwarded_for: str | None = None
    upstream_service_time: int | None = None
    grpc_status: int | None = None
    reporter: str = "source"
    trace_id: str | None = None


_last_second: list[Any] = [None, ""]


def _start_time(start: float) -> str:
    second = int(start)
    cached = _last_second  # one formatted second, reused: strftime is most of a line's cost
    if cached[0] != second:
        cached[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        cached[0] = second
    return f"{cached[1]}.{int(start * 1000) % 1000:03d}Z"


def _q(value: str | None) -> str:
    return f'"{value}"' if value else '"-"'


def format_text(r: AccessRecord) -> str:
    """One line in Envoy's default access log format (no trailing newline)."""
    return text_line(
        r.start,
        r.method,
        r.path,
        r.protocol,
        r.status,
        r.flags,
        r.bytes_received,
        r.bytes_sent,
        r.duration_ms,
        r.upstream_service_time,
        r.forwarded_for,
        r.user_agent,
        r.request_id,
        r.authority,
        r.upstream_host,
    )


def text_line(  # noqa: PLR0917 - one argument per field of the line, hot path
    start: float,
    method: str,
    path: str,
    protocol: str,
    status: int,
    flags: str,
    bytes_received: int,
    bytes_sent: int,
    duration_ms: int,
    upstream_service_time: int | None,
    forwarded_for: str | None,
    user_agent: str | None,
    request_id: str | None,
    authority: str | None,
    upstream_host: str | None,
) -> str:
    """:func:`format_text` from the fields themselves (the request path builds no record)."""
    ust = "-" if upstream_service_time is None else str(upstream_service_time)
    return (
        f'[{_start_time(start)}] "{method} {path} {protocol}" {status} {flags} '
        f"{bytes_received} {bytes_sent} {duration_ms} {ust} {_q(forwarded_for)} "
        f"{_q(user_agent)} {_q(request_id)} {_q(authority)} {_q(upstream_host)}"
    )


def format_json(r: AccessRecord) -> str:
    """One JSON object with Istio's JSON access log keys (``null`` for missing values)."""
    return json.dumps(
        {
            "start_time": _start_time(r.start),
            "method": r.method,
            "path": r.path,
            "protocol": r.protocol,
            "response_code": r.status,
            "grpc_status": r.grpc_status,
            "response_flags": r.flags,
            "bytes_received": r.bytes_received,
            "bytes_sent": r.bytes_sent,
            "duration": r.duration_ms,
            "upstream_service_time": r.upstream_service_time,
            "x_forwarded_for": r.forwarded_for,
            "user_agent": r.user_agent,
            "request_id": r.request_id,
            "authority": r.authority,
            "upstream_host": r.upstream_host,
            "upstream_cluster": r.upstream_cluster,
            "reporter": r.reporter,
            "trace_id": r.trace_id,
        },
        separators=(",", ":"),
    )
