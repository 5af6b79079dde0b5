"""Trace context in and out of requests: W3C ``traceparent`` and B3 (multi and single
header), as Envoy and Istio propagate them. Pure functions over header getters/setters.

Inbound precedence: ``traceparent`` (W3C), then the single ``b3`` header, then the
``x-b3-*`` headers. Outbound, every configured format is written, so a peer that reads
only one of them still joins the trace.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from opentelemetry.trace import SpanContext, TraceFlags, TraceState

__all__ = [
    "FORMATS",
    "HEADERS",
    "extract",
    "extract_ids",
    "inject",
    "inject_ids",
    "unsampled_headers",
]

FORMATS = frozenset({"tracecontext", "b3multi", "b3"})

HEADERS: dict[str, tuple[str, ...]] = {
    "tracecontext": ("traceparent",),
    "b3multi": ("x-b3-traceid", "x-b3-spanid", "x-b3-sampled"),
    "b3": ("b3",),
}
"""The header names each outbound format writes."""

_HEX = frozenset("0123456789abcdef")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_EMPTY_STATE = TraceState()


def _hex(value: str, lengths: tuple[int, ...]) -> int | None:
    value = value.strip().lower()
    if len(value) not in lengths or not set(value) <= _HEX:
        return None
    number = int(value, 16)
    return number or None


def _context(trace_id: int, span_id: int, sampled: bool) -> SpanContext:
    return SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=_SAMPLED if sampled else _NOT_SAMPLED
    )


def _traceparent(value: str) -> SpanContext | None:
    parts = value.strip().split("-")
    if len(parts) < 4 or parts[0] == "ff" or len(parts[0]) != 2:
        return None
    if parts[0] == "00" and len(parts) != 4:
        return None
    trace_id = _hex(parts[1], (32,))
    span_id = _hex(parts[2], (16,))
    flags = _hex(parts[3], (2,))
    if trace_id is None or span_id is None or len(parts[3]) != 2:
        return None
    return _context(trace_id, span_id, bool((flags or 0) & 1))


def _b3_sampled(sampled: str | None, flags: str | None) -> bool | None:
    if flags == "1":
        return True  # debug implies sampled
    if sampled is None:
        return None
    return sampled.strip().lower() in ("1", "true", "d")


def _b3_single(value: str) -> SpanContext | None:
    parts = value.strip().split("-")
    if len(parts) < 2:
        return None  # "0" / "1" / "d" alone: a sampling decision without a trace
    trace_id = _hex(parts[0], (16, 32))
    span_id = _hex(parts[1], (16,))
    if trace_id is None or span_id is None:
        return None
    sampled = _b3_sampled(parts[2] if len(parts) > 2 else None, None)
    return _context(trace_id, span_id, bool(sampled))


_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def extract_ids(get: Callable[[str], str | None]) -> tuple[int, int, bool] | None:
    """``(trace_id, span_id, sampled)`` of an inbound request's remote parent, or ``None``
    (the server's hot path: no ``SpanContext`` is built for an unsampled request)."""
    value = get("traceparent")
    if value:
        m = _TRACEPARENT_00.fullmatch(value)  # the usual version-00 header, in one match
        if m is not None:
            trace_id, span_id = int(m[1], 16), int(m[2], 16)
            if trace_id and span_id:
                return trace_id, span_id, bool(int(m[3], 16) & 1)
        found = _traceparent(value)
        if found is not None:
            return found.trace_id, found.span_id, found.trace_flags.sampled
    value = get("b3")
    if value:
        found = _b3_single(value)
        if found is not None:
            return found.trace_id, found.span_id, found.trace_flags.sampled
    trace = get("x-b3-traceid")
    span = get("x-b3-spanid")
    if trace and span:
        trace_id_ = _hex(trace, (16, 32))
        span_id_ = _hex(span, (16,))
        if trace_id_ is not None and span_id_ is not None:
            sampled = _b3_sampled(get("x-b3-sampled"), get("x-b3-flags"))
            return trace_id_, span_id_, bool(sampled)
    return None


def extract(get: Callable[[str], str | None]) -> SpanContext | None:
    """The remote parent span of an inbound request (``get`` reads a lower-case header)."""
    ids = extract_ids(get)
    return None if ids is None else _context(*ids)


def inject(
    context: SpanContext,
    set_header: Callable[[str, str], None],
    formats: frozenset[str] = frozenset({"tracecontext", "b3"}),
) -> None:
    """Write ``context`` into an outbound request in every format of ``formats``."""
    inject_ids(context.trace_id, context.span_id, context.trace_flags.sampled, set_header, formats)


def inject_ids(
    trace_id: int,
    span_id: int,
    sampled: bool,
    set_header: Callable[[str, str], None],
    formats: frozenset[str] = frozenset({"tracecontext", "b3"}),
) -> None:
    """:func:`inject` from bare ids (the unsampled hot path makes no ``SpanContext``)."""
    trace = f"{trace_id:032x}"
    span = f"{span_id:016x}"
    if "tracecontext" in formats:
        set_header("traceparent", f"00-{trace}-{span}-{'01' if sampled else '00'}")
    if "b3multi" in formats:
        set_header("x-b3-traceid", trace)
        set_header("x-b3-spanid", span)
        set_header("x-b3-sampled", "1" if sampled else "0")
    if "b3" in formats:
        set_header("b3", f"{trace}-{span}-{'1' if sampled else '0'}")


def unsampled_headers(
    ids: str, formats: tuple[bool, bool, bool]
) -> tuple[tuple[bytes, bytes], ...]:
    """The headers of an unsampled trace context, as bytes for the wire: ``ids`` is the
    trace id (32 hex digits) followed by the span id (16), ``formats`` says
    ``(tracecontext, b3multi, b3)``: what :func:`inject_ids` writes with ``sampled=False``,
    from one hex string (the request path's cheapest form)."""
    w3c, b3multi, b3 = formats
    trace, span = ids[:32], ids[32:]
    if w3c and b3 and not b3multi:  # the default
        return (
            (b"traceparent", f"00-{trace}-{span}-00".encode()),
            (b"b3", f"{trace}-{span}-0".encode()),
        )
    out: list[tuple[bytes, bytes]] = []
    if w3c:
        out.append((b"traceparent", f"00-{trace}-{span}-00".encode()))
    if b3multi:
        out += ((b"x-b3-traceid", trace.encode()), (b"x-b3-spanid", span.encode()),
                (b"x-b3-sampled", b"0"))  # fmt: skip
    if b3:
        out.append((b"b3", f"{trace}-{span}-0".encode()))
    return tuple(out)
