"""Give the heap memory of a huge, replaced xDS update back to the operating system.

A 100,000-endpoint update costs ~100 MB while it is in use (decoded model, runtime hosts,
balancers). When a smaller update replaces it, Python frees every object (tracemalloc and
pymalloc's own count of allocated bytes return to what they were before), but the process
keeps most of that memory: glibc's malloc keeps freed chunks (the large dict and tuple
tables, the protobuf parse buffers) for reuse instead of returning them to the OS, and
pymalloc releases a 1 MiB arena only when every object in it is gone (a few objects
allocated by other threads meanwhile keep an arena). ``malloc_trim(0)`` returns glibc's free
pages (measured: 27-40 MB of the ~75 MB kept); arenas pinned by live objects stay, which
bounds what is kept to about a third of the update's peak.

:class:`TrimPolicy` (no I/O) decides when: a response of some type at least
:data:`BIG_RESPONSE` bytes, later followed by one of that type under a quarter of its
size. :func:`release_memory` makes the call (glibc only; elsewhere a no-op). The xDS client
runs it on its work thread :data:`TRIM_DELAY` seconds after such a response, once requests
in flight have let go of the old snapshot. ctypes releases the GIL during the call.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["BIG_RESPONSE", "TRIM_DELAY", "TrimPolicy", "can_trim", "release_memory"]

BIG_RESPONSE = 1 << 20
"""Responses at least this large (bytes on the wire) are worth a trim once replaced."""
TRIM_DELAY = 1.0
"""Seconds between the replacing response and the trim."""


def _load_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only when a trim is due: ctypes costs ~0.4 MB of RSS

    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc; musl has none
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_trim: Callable[[int], int] | None = None
_loaded = False
trims = 0
"""How many times :func:`release_memory` ran (tests, benchmarks)."""


def can_trim() -> bool:
    """Whether :func:`release_memory` can ask (Linux with glibc)."""
    global _trim, _loaded
    if not _loaded:
        _trim, _loaded = _load_trim(), True
    return _trim is not None


def release_memory() -> None:
    """Return the C heap's free memory to the OS (glibc's ``malloc_trim(0)``)."""
    global trims
    trims += 1
    if can_trim():
        assert _trim is not None
        _trim(0)


class TrimPolicy:
    """When to trim (see the module docstring): :meth:`on_response` per response."""

    __slots__ = ("_largest",)

    def __init__(self) -> None:
        self._largest: dict[str, int] = {}

    def on_response(self, type_url: str, size: int) -> bool:
        """A response of ``size`` bytes arrived: True when a trim is due after it."""
        largest = self._largest.get(type_url, 0)
        if size >= BIG_RESPONSE:
            self._largest[type_url] = max(largest, size)
            return False
        if largest and size * 4 < largest:
            del self._largest[type_url]
            return True
        return False
