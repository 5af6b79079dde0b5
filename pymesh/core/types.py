"""The vocabulary every part of the policy core shares.

The policy core decides; adapters act (STYLE.md #3). It never does I/O, never sleeps and never
reads a clock or a global random source: ``now`` (monotonic seconds) and a ``random.Random``
are passed in. Sync and async, httpx and grpc all drive the same code.

These types are the contract between the core's parts (routing, load balancing, retries,
limits, outlier detection, faults) and the adapters. Keep them small and stable.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from pymesh.model.common import Locality, SocketAddress
from pymesh.model.endpoint import HealthStatus

__all__ = [
    "Headers",
    "Host",
    "LoadBalancer",
    "Outcome",
    "PickContext",
    "RequestInfo",
    "ResetKind",
]


class Headers:
    """An ordered, case-insensitive, multi-valued header list (names stored lower-case).

    ``get`` joins repeated values with ``","`` (the single-string view of a header, as for a
    hash key). Route header *matching* is not done on that view: Envoy 1.40 matches a repeated
    header when any one of its values matches (see ``pymesh.core.routing``, checked against a
    real Envoy), so matchers use ``get_all``. Immutable: the ``with_*`` methods return a new
    object.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: tuple[tuple[str, str], ...] = tuple((k.lower(), v) for k, v in items)

    def get(self, name: str) -> str | None:
        name = name.lower()
        values = [v for k, v in self._items if k == name]
        if not values:
            return None
        return values[0] if len(values) == 1 else ",".join(values)

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self._items if k == name]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        name = name.lower()
        return any(k == name for k, _ in self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The ``(name, value)`` pairs as one tuple of strings (what a record kept for
        later holds: unlike this object, the garbage collector stops tracking it)."""
        return self._items

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and other._items == self._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"Headers({list(self._items)!r})"

    def with_set(self, name: str, value: str) -> Headers:
        """Replace every value of ``name`` with one ``value`` (appended at the end)."""
        name = name.lower()
        return Headers([*((k, v) for k, v in self._items if k != name), (name, value)])

    def with_added(self, name: str, value: str) -> Headers:
        return Headers([*self._items, (name.lower(), value)])

    def without(self, *names: str) -> Headers:
        drop = {n.lower() for n in names}
        return Headers([(k, v) for k, v in self._items if k not in drop])


_NO_HEADERS = Headers()


# Frozen dataclasses built on every call (RequestInfo, PickContext, Outcome) get their own
# ``__init__`` (``init=False``): the generated one of a frozen dataclass stores each field
# through ``object.__setattr__`` (about 1.3 us for RequestInfo's seven fields); storing
# through the slots' own descriptors costs a third of that. Everything else (frozen, eq,
# hash, repr, fields) is the dataclass's.


@dataclass(frozen=True, slots=True, init=False)
class RequestInfo:
    """What routing, hashing, faults and retries may look at in a request.

    ``path`` is Envoy's ``:path``: the path plus the query string, undecoded. For gRPC,
    ``method`` is ``POST``, ``path`` is ``/package.Service/Method`` and ``grpc`` is True;
    metadata are the headers.
    """

    method: str
    authority: str
    path: str
    headers: Headers = field(default=_NO_HEADERS)
    scheme: str = "http"
    source_ip: str | None = None
    grpc: bool = False

    def __init__(  # noqa: PLR0917 - the dataclass's field order
        self,
        method: str,
        authority: str,
        path: str,
        headers: Headers = _NO_HEADERS,
        scheme: str = "http",
        source_ip: str | None = None,
        grpc: bool = False,
    ) -> None:
        _ri_method(self, method)
        _ri_authority(self, authority)
        _ri_path(self, path)
        _ri_headers(self, headers)
        _ri_scheme(self, scheme)
        _ri_source_ip(self, source_ip)
        _ri_grpc(self, grpc)

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.path.split("?", 1)[1] if "?" in self.path else ""


class Host:
    """One upstream endpoint of a cluster, as the data plane tracks it at run time.

    Unlike the model's ``LbEndpoint`` this is mutable *runtime* state (active requests,
    ejection), and it keeps its identity across EDS updates while its address stays in the
    cluster, so counters and ejections survive an update. Counters are plain ints mutated
    under the GIL by the attempt loop; a lost increment under free-threading would only skew
    least-request choice, never correctness of limits (those live in ``ClusterLimits``).
    """

    __slots__ = (
        "active_requests",
        "address",
        "ejected_until",
        "health",
        "hostname",
        "key",
        "locality",
        "metadata",
        "priority",
        "weight",
    )

    def __init__(
        self,
        address: SocketAddress,
        *,
        weight: int = 1,
        locality: Locality | None = None,
        priority: int = 0,
        health: HealthStatus = HealthStatus.UNKNOWN,
        hostname: str = "",
        metadata: object = None,
    ) -> None:
        self.address = address
        self.key = str(address)
        self.weight = weight
        self.locality = locality or Locality()
        self.priority = priority
        self.health = health
        self.hostname = hostname
        self.metadata = metadata
        self.active_requests = 0
        self.ejected_until: float | None = None
        """Set by outlier detection: the host is skipped until this monotonic time."""

    def is_ejected(self, now: float) -> bool:
        until = self.ejected_until
        return until is not None and now < until

    def __repr__(self) -> str:
        return f"Host({self.key}, w={self.weight}, {self.health.name}, p{self.priority})"


_NOTHING: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, init=False)
class PickContext:
    """What a load balancer may use to choose a host for one attempt."""

    now: float
    hash_key: int | None = None
    """64-bit request hash from the route's hash policies (ring hash, maglev); None = random."""
    excluded: frozenset[str] = _NOTHING
    """Host keys to avoid when another host is available (the previous-hosts retry
    predicate); a balancer retries its choice up to ``host_selection_attempts`` times."""
    host_selection_attempts: int = 1

    def __init__(
        self,
        now: float,
        hash_key: int | None = None,
        excluded: frozenset[str] = _NOTHING,
        host_selection_attempts: int = 1,
    ) -> None:
        _pc_now(self, now)
        _pc_hash_key(self, hash_key)
        _pc_excluded(self, excluded)
        _pc_host_selection_attempts(self, host_selection_attempts)


class LoadBalancer(Protocol):
    """Chooses a host. Must not block and must not do I/O (grpc-go: "Pick should not block")."""

    def pick(self, ctx: PickContext) -> Host | None:
        """A host, or None when no host is usable (-> 503 ``no healthy upstream``)."""
        ...


class ResetKind(enum.Enum):
    """How an attempt failed without a response (Envoy's local-origin failures)."""

    CONNECT_FAILURE = "connect-failure"
    RESET = "reset"
    REFUSED_STREAM = "refused-stream"
    PER_TRY_TIMEOUT = "per-try-timeout"


@dataclass(frozen=True, slots=True, init=False)
class Outcome:
    """The result of one attempt, as the retry policy and outlier detection see it.

    Exactly one of ``status`` (an HTTP response arrived; for gRPC the HTTP status, 200) or
    ``reset`` is set. ``grpc_status`` is the gRPC status code when known (trailers or
    trailers-only response).
    """

    status: int | None = None
    reset: ResetKind | None = None
    grpc_status: int | None = None
    headers: Headers = field(default=_NO_HEADERS)

    def __init__(
        self,
        status: int | None = None,
        reset: ResetKind | None = None,
        grpc_status: int | None = None,
        headers: Headers = _NO_HEADERS,
    ) -> None:
        _oc_status(self, status)
        _oc_reset(self, reset)
        _oc_grpc_status(self, grpc_status)
        _oc_headers(self, headers)

    @property
    def is_5xx(self) -> bool:
        return self.status is not None and 500 <= self.status <= 599

    @property
    def is_gateway_error(self) -> bool:
        return self.status in (502, 503, 504)


def slot_setter(cls: type, name: str) -> Callable[[object, object], None]:
    """The ``__set__`` of slot ``name`` of ``cls``: how a hand-written ``__init__`` of a
    frozen slots dataclass stores a field (bypasses the frozen ``__setattr__``)."""
    setter: Callable[[object, object], None] = cls.__dict__[name].__set__
    return setter


_ri_method = slot_setter(RequestInfo, "method")
_ri_authority = slot_setter(RequestInfo, "authority")
_ri_path = slot_setter(RequestInfo, "path")
_ri_headers = slot_setter(RequestInfo, "headers")
_ri_scheme = slot_setter(RequestInfo, "scheme")
_ri_source_ip = slot_setter(RequestInfo, "source_ip")
_ri_grpc = slot_setter(RequestInfo, "grpc")
_pc_now = slot_setter(PickContext, "now")
_pc_hash_key = slot_setter(PickContext, "hash_key")
_pc_excluded = slot_setter(PickContext, "excluded")
_pc_host_selection_attempts = slot_setter(PickContext, "host_selection_attempts")
_oc_status = slot_setter(Outcome, "status")
_oc_reset = slot_setter(Outcome, "reset")
_oc_grpc_status = slot_setter(Outcome, "grpc_status")
_oc_headers = slot_setter(Outcome, "headers")
