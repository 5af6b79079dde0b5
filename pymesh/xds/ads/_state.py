"""The ADS stream state machine: subscriptions, versions, nonces, ACK/NACK, does-not-exist.

Theory of operation
===================

:class:`AdsState` is the protocol of one logical ADS stream (one xDS server, or one list of
fallback servers) with no I/O and no threads, in the manner of h11: the driver feeds it
events (``subscribe``, ``unsubscribe``, ``connected``, ``response``, ``disconnected``,
``tick``) with the current time, and it returns :data:`Effect` values: requests to
:class:`Send` on the stream, and notifications for the watchers of a resource
(:class:`Changed`, :class:`DoesNotExist`, :class:`AmbientError`). Subscription changes are
batched: ``subscribe``/``unsubscribe`` only mark a type dirty and ``flush`` emits one request
per dirty type, so a watcher adding a hundred clusters sends one request, not a hundred.

The stream is DISCONNECTED or CONNECTED. ``connected(now, server)`` sends, per type with
subscriptions, the full set of names with the versions we hold (SotW ``version_info``; Delta
``initial_resource_versions``) so that a restarted server need not resend what we have, but
only when the versions come from that same ``server`` (after a fallback switch they are
meaningless and are dropped; the cached *values* stay). Nonces belong to one stream and are
forgotten on ``disconnected``. A stream lost before any response is a connectivity problem:
every subscribed resource gets an :class:`AmbientError` (its last good value stays in use).

Each subscribed resource is in one of these states (``ResourceStatus.status``)::

    state           event                                       next            effect
    --------------  ------------------------------------------  --------------  -------------
    REQUESTED       valid resource received                     ACKED           Changed
    REQUESTED       invalid resource received                   NACKED          AmbientError
    REQUESTED       15 s connected since the request was sent   DOES_NOT_EXIST  DoesNotExist
    ACKED           valid, bytes differ                         ACKED           Changed
    ACKED           valid, same bytes                           ACKED           -
    ACKED, NACKED   invalid resource received                   NACKED          AmbientError
    NACKED          valid resource received                     ACKED           Changed
    DOES_NOT_EXIST  valid resource received                     ACKED           Changed
    cached (value)  absent from an LDS/CDS SotW response        DOES_NOT_EXIST  DoesNotExist
    cached (value)  ... and the server ignore_resource_deletion  unchanged       - (logged)
    any             named in a Delta removed_resources          DOES_NOT_EXIST  DoesNotExist
    any             stream lost before a response on it         unchanged       AmbientError

The does-not-exist timer runs only for a resource that was never received. It starts when
its subscription is sent on a connected stream and pauses when the stream is lost: when
the subscription is resent on the next stream it resumes with the time it had left (gRPC
restarts it in full; pausing means a flapping stream cannot postpone the verdict forever,
while time spent disconnected never counts). RDS/EDS SotW responses are not full state:
absence means nothing.

Every response of a type we asked for is answered: an ACK (SotW: the response's version and
nonce; Delta: the nonce) when every resource in it decoded, else a NACK (SotW: the
previously ACKed version, the response's nonce) whose ``error_detail`` names each bad
resource and field. The good resources of a partly bad SotW response are still accepted
(gRPC behaviour); the bad ones keep their previous good value. A decoder that raises
something other than ``ResourceError`` (garbage bytes) is a NACK too, never an exception out
of here. A response of an unknown type URL is NACKed; one of a known type never requested on
this client is ignored (answering it would be a first, empty, request of that type: a
wildcard subscription). For the same reason an empty SotW request is only ever sent to
unsubscribe the last name of a type already requested on the stream.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pymesh.errors import ResourceError
from pymesh.xds.ads._messages import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
    RawResource,
)
from pymesh.xds.codec._registry import Decoded
from pymesh.xds.resource_types import ResourceType

__all__ = [
    "DOES_NOT_EXIST_TIMEOUT",
    "AdsState",
    "AmbientError",
    "Changed",
    "DoesNotExist",
    "Effect",
    "ResourceStatus",
    "Send",
]

log = logging.getLogger(__name__)

DOES_NOT_EXIST_TIMEOUT = 15.0
"""Seconds after which a subscribed resource never received is declared absent (gRFC A27)."""

REQUESTED = "REQUESTED"
ACKED = "ACKED"
NACKED = "NACKED"
DOES_NOT_EXIST = "DOES_NOT_EXIST"

# SotW responses of these types carry the full state: a subscribed name that is absent was
# deleted (xDS protocol, "Deleting resources"). RDS and EDS responses may be partial.
_FULL_STATE = frozenset({ResourceType.LISTENER, ResourceType.CLUSTER})

ResourceDecoder = Callable[[str, bytes], Decoded]


@dataclass(frozen=True, slots=True)
class Send:
    """Send this request on the stream."""

    request: DiscoveryRequest | DeltaDiscoveryRequest


@dataclass(frozen=True, slots=True)
class Changed:
    """A new valid value for a resource."""

    rtype: ResourceType
    name: str
    value: object


@dataclass(frozen=True, slots=True)
class DoesNotExist:
    """The resource does not exist (removed, or never received within the timeout)."""

    rtype: ResourceType
    name: str


@dataclass(frozen=True, slots=True)
class AmbientError:
    """A transient problem (NACKed update, lost stream): keep using the last good value."""

    rtype: ResourceType
    name: str
    error: str


Effect = Send | Changed | DoesNotExist | AmbientError


@dataclass(frozen=True, slots=True)
class ResourceStatus:
    """The client's view of one subscribed resource (what CSDS reports)."""

    rtype: ResourceType
    name: str
    status: str
    """REQUESTED, ACKED, NACKED or DOES_NOT_EXIST."""
    version: str
    """Version of the last accepted value (SotW: the response's; Delta: the resource's)."""
    raw: bytes | None
    """Serialized last accepted resource."""
    last_updated: float
    """Wall time (``time.time()``) of the last status change."""
    error: str | None
    """Detail of the last NACK of this resource, if any."""
    failed_version: str | None
    """Version of the last rejected update, if any."""
    value: object = None
    """The decoded last accepted value (a frozen model object), if any."""


class _Resource:
    __slots__ = (
        "deletion_ignored",
        "dne_deadline",
        "dne_remaining",
        "error",
        "failed_version",
        "last_updated",
        "raw",
        "status",
        "value",
        "version",
    )

    def __init__(self, wall: float) -> None:
        self.status = REQUESTED
        self.value: object = None
        self.raw: bytes | None = None
        self.version = ""
        self.last_updated = wall
        self.error: str | None = None
        self.failed_version: str | None = None
        self.dne_deadline: float | None = None
        self.dne_remaining: float | None = None  # paused timer: what was left of it
        self.deletion_ignored = False  # logged once per deletion, not once per response

    @property
    def cached(self) -> bool:
        return self.raw is not None


class _TypeState:
    __slots__ = (
        "dirty",
        "nonce",
        "pending_sub",
        "pending_unsub",
        "requested",
        "resources",
        "version",
    )

    def __init__(self) -> None:
        self.resources: dict[str, _Resource] = {}
        self.version = ""  # SotW: last ACKed version_info
        self.nonce = ""  # last response nonce on the current stream
        self.dirty = False  # subscription set changed since the last request
        self.requested = False  # a request of this type went out on the current stream
        self.pending_sub: set[str] = set()  # Delta: names to subscribe in the next request
        self.pending_unsub: set[str] = set()  # Delta: names to unsubscribe


class AdsState:
    """The I/O-free protocol state of one ADS stream (see the module docstring)."""

    def __init__(
        self,
        *,
        decoder: ResourceDecoder,
        delta: bool = False,
        ignore_resource_deletion: bool = False,
        does_not_exist_timeout: float = DOES_NOT_EXIST_TIMEOUT,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.delta = delta
        self.ignore_resource_deletion = ignore_resource_deletion
        self._decoder = decoder
        self._timeout = does_not_exist_timeout
        self._wall = wall_clock
        self._types: dict[ResourceType, _TypeState] = {}
        self._connected = False
        self._node_sent = False
        self._saw_response = False
        self._versions_from: object = None

    # -- queries ---------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def saw_response(self) -> bool:
        """Whether a response arrived on the current (or the last) stream."""
        return self._saw_response

    def is_subscribed(self, rtype: ResourceType, name: str) -> bool:
        ts = self._types.get(rtype)
        return ts is not None and name in ts.resources

    def subscriptions(self, rtype: ResourceType) -> tuple[str, ...]:
        ts = self._types.get(rtype)
        return tuple(sorted(ts.resources)) if ts else ()

    def has_subscriptions(self) -> bool:
        return any(ts.resources for ts in self._types.values())

    def has_unanswered(self) -> bool:
        """Whether some subscribed resource was never answered for: neither received (valid
        or not) nor known not to exist. gRFC A71 falls back to another server only then."""
        return any(
            r.status == REQUESTED and not r.cached
            for ts in self._types.values()
            for r in ts.resources.values()
        )

    def status(self, rtype: ResourceType, name: str) -> ResourceStatus | None:
        ts = self._types.get(rtype)
        r = ts.resources.get(name) if ts else None
        return None if r is None else self._status(rtype, name, r)

    def statuses(self) -> list[ResourceStatus]:
        return [
            self._status(rtype, name, r)
            for rtype, ts in self._types.items()
            for name, r in sorted(ts.resources.items())
        ]

    def next_deadline(self) -> float | None:
        """The earliest pending does-not-exist deadline, if any."""
        deadlines = [
            r.dne_deadline
            for ts in self._types.values()
            for r in ts.resources.values()
            if r.dne_deadline is not None
        ]
        return min(deadlines) if deadlines else None

    @staticmethod
    def _status(rtype: ResourceType, name: str, r: _Resource) -> ResourceStatus:
        return ResourceStatus(
            rtype=rtype,
            name=name,
            status=r.status,
            version=r.version,
            raw=r.raw,
            last_updated=r.last_updated,
            error=r.error,
            failed_version=r.failed_version,
            value=r.value,
        )

    # -- subscription changes --------------------------------------------------------------

    def subscribe(self, rtype: ResourceType, name: str) -> bool:
        """Add ``name`` to the subscriptions; returns False if it was already subscribed."""
        ts = self._types.setdefault(rtype, _TypeState())
        if name in ts.resources:
            return False
        ts.resources[name] = _Resource(self._wall())
        ts.dirty = True
        ts.pending_unsub.discard(name)
        ts.pending_sub.add(name)
        return True

    def unsubscribe(self, rtype: ResourceType, name: str) -> bool:
        """Drop ``name`` (and its cached value); returns False if it was not subscribed."""
        ts = self._types.get(rtype)
        if ts is None or name not in ts.resources:
            return False
        del ts.resources[name]
        ts.dirty = True
        if name in ts.pending_sub:
            ts.pending_sub.discard(name)
        else:
            ts.pending_unsub.add(name)
        return True

    def flush(self, now: float) -> list[Effect]:
        """One request per type whose subscriptions changed (nothing while disconnected)."""
        effects: list[Effect] = []
        for rtype, ts in self._types.items():
            if not ts.dirty:
                continue
            ts.dirty = False
            if not self._connected:
                ts.pending_sub.clear()
                ts.pending_unsub.clear()
                continue
            if self.delta:
                if ts.pending_sub or ts.pending_unsub:
                    effects.append(
                        Send(
                            DeltaDiscoveryRequest(
                                type_url=rtype.type_url,
                                subscribe=tuple(sorted(ts.pending_sub)),
                                unsubscribe=tuple(sorted(ts.pending_unsub)),
                                include_node=self._take_node(),
                            )
                        )
                    )
            elif ts.resources or ts.requested:
                # (An empty first request would be a wildcard subscription: never send one.)
                effects.append(Send(self._sotw_request(rtype, ts)))
            self._start_timers(ts, ts.pending_sub, now)
            ts.pending_sub.clear()
            ts.pending_unsub.clear()
        return effects

    # -- stream events ---------------------------------------------------------------------

    def connected(self, now: float, server: object = None) -> list[Effect]:
        """A new stream to ``server`` is up: send every subscription.

        Versions are sent only if they came from this same ``server``.
        """
        self._connected = True
        self._node_sent = False
        self._saw_response = False
        if server != self._versions_from:
            self._versions_from = server
            for ts in self._types.values():
                ts.version = ""
                for r in ts.resources.values():
                    r.version = ""
        effects: list[Effect] = []
        for rtype, ts in self._types.items():
            ts.nonce = ""
            ts.requested = False
            ts.dirty = False
            ts.pending_sub.clear()
            ts.pending_unsub.clear()
            if not ts.resources:
                continue
            if self.delta:
                effects.append(
                    Send(
                        DeltaDiscoveryRequest(
                            type_url=rtype.type_url,
                            subscribe=tuple(sorted(ts.resources)),
                            initial_resource_versions=types.MappingProxyType(
                                {
                                    name: r.version
                                    for name, r in sorted(ts.resources.items())
                                    if r.cached and r.version
                                }
                            ),
                            include_node=self._take_node(),
                        )
                    )
                )
            else:
                effects.append(Send(self._sotw_request(rtype, ts)))
            self._start_timers(ts, ts.resources, now)
        return effects

    def disconnected(self, now: float, error: str) -> list[Effect]:
        """The stream ended (or never came up). Cached values stay; timers stop.

        Nonces belong to the stream and are forgotten. If no response arrived on it, this was
        a connectivity problem: every subscribed resource gets an :class:`AmbientError`.
        """
        saw_response = self._saw_response
        self._connected = False
        self._saw_response = False
        effects: list[Effect] = []
        for rtype, ts in self._types.items():
            ts.nonce = ""
            for name, r in ts.resources.items():
                if r.dne_deadline is not None:  # pause: keep what is left
                    r.dne_remaining = max(0.0, r.dne_deadline - now)
                    r.dne_deadline = None
                if not saw_response:
                    effects.append(AmbientError(rtype, name, f"xDS stream error: {error}"))
        return effects

    def tick(self, now: float) -> list[Effect]:
        """Fire the does-not-exist timers that are due."""
        effects: list[Effect] = []
        if not self._connected:
            return effects
        wall = self._wall()
        for rtype, ts in self._types.items():
            for name, r in ts.resources.items():
                if r.dne_deadline is not None and r.dne_deadline <= now:
                    r.dne_deadline = None
                    r.status = DOES_NOT_EXIST
                    r.last_updated = wall
                    effects.append(DoesNotExist(rtype, name))
        return effects

    def response(
        self, message: DiscoveryResponse | DeltaDiscoveryResponse, now: float
    ) -> list[Effect]:
        """Process one response: update resources, notify, and ACK or NACK it."""
        self._saw_response = True
        rtype = ResourceType.from_type_url(message.type_url)
        if rtype is None:
            return [self._reject_unknown_type(message)]
        ts = self._types.get(rtype)
        if ts is None:
            # A type we never asked for: answering would be a first request of that type,
            # and an empty one means "everything" (wildcard). Ignore it, as a stale answer.
            log.warning("xDS server sent unrequested %s resources; ignored", rtype.short_name)
            return []
        ts.nonce = message.nonce
        if isinstance(message, DeltaDiscoveryResponse):
            return self._delta_response(rtype, ts, message)
        return self._sotw_response(rtype, ts, message)

    # -- internals -------------------------------------------------------------------------

    def _take_node(self) -> bool:
        first = not self._node_sent
        self._node_sent = True
        return first

    def _sotw_request(
        self, rtype: ResourceType, ts: _TypeState, *, error: str | None = None
    ) -> DiscoveryRequest:
        ts.requested = True
        return DiscoveryRequest(
            type_url=rtype.type_url,
            resource_names=tuple(sorted(ts.resources)),
            version_info=ts.version,
            response_nonce=ts.nonce,
            error_detail=error,
            include_node=self._take_node(),
        )

    def _start_timers(self, ts: _TypeState, names: Iterable[str], now: float) -> None:
        for name in names:
            r = ts.resources.get(name)
            if r is not None and r.status == REQUESTED and not r.cached:
                left = r.dne_remaining
                r.dne_deadline = now + (self._timeout if left is None else left)
                r.dne_remaining = None

    def _reject_unknown_type(self, message: DiscoveryResponse | DeltaDiscoveryResponse) -> Send:
        detail = f"unexpected resource type {message.type_url!r}: not subscribed"
        if isinstance(message, DeltaDiscoveryResponse):
            return Send(
                DeltaDiscoveryRequest(
                    type_url=message.type_url,
                    response_nonce=message.nonce,
                    error_detail=detail,
                    include_node=self._take_node(),
                )
            )
        return Send(
            DiscoveryRequest(
                type_url=message.type_url,
                response_nonce=message.nonce,
                error_detail=detail,
                include_node=self._take_node(),
            )
        )

    def _decode_all(
        self, rtype: ResourceType, ts: _TypeState, resources: tuple[RawResource, ...]
    ) -> tuple[dict[str, tuple[object, bytes, str]], dict[str, str], list[str], bool, set[str]]:
        """Decode; returns (valid name -> (value, bytes, version), invalid name -> error,
        all error texts, whether some error could not be attributed to a name, names of
        body-less heartbeats)."""
        heartbeats: set[str] = set()
        # SotW servers resend every resource of a type on each change: bytes identical to a
        # value we hold are not decoded again (decoding is deterministic).
        cache = {r.raw: Decoded(name, r.value) for name, r in ts.resources.items() if r.raw}
        valid: dict[str, tuple[object, bytes, str]] = {}
        invalid: dict[str, str] = {}
        errors: list[str] = []
        unnamed = False
        for index, raw in enumerate(resources):
            name = raw.name
            if raw.data is None:
                # A body-less Resource wrapper (TTL heartbeat): the resource is still there.
                if name:
                    heartbeats.add(name)
                continue
            try:
                if raw.type_url != rtype.type_url:
                    raise ResourceError(
                        f"resource of type {raw.type_url!r} in a response of type "
                        f"{rtype.type_url!r}",
                        type_name=rtype.short_name,
                        resource_name=raw.name,
                    )
                known = cache.get(raw.data)
                decoded = known if known is not None else self._decoder(rtype.type_url, raw.data)
                name = decoded.name
                if name in valid or name in invalid:
                    raise ResourceError(
                        "duplicate resource name in one response",
                        type_name=rtype.short_name,
                        resource_name=name,
                    )
                valid[name] = (decoded.value, raw.data, raw.version)
            except ResourceError as exc:
                name = name or exc.resource_name
                text = str(exc)
                valid.pop(name, None)  # a duplicate: the name is invalid as a whole
                errors.append(text)
                if name:
                    invalid[name] = text
                else:
                    unnamed = True
            except Exception as exc:  # a decoder bug or garbage bytes: NACK, never crash
                text = f"{rtype.short_name} resources[{index}]: cannot decode: {exc!r}"
                errors.append(text)
                if name:
                    invalid[name] = text
                else:
                    unnamed = True
        return valid, invalid, errors, unnamed, heartbeats

    def _accept(
        self,
        rtype: ResourceType,
        name: str,
        r: _Resource,
        *,
        value: object,
        data: bytes,
        version: str,
        wall: float,
    ) -> Effect | None:
        changed = r.raw != data or r.status == DOES_NOT_EXIST
        r.dne_deadline = r.dne_remaining = None
        r.deletion_ignored = False
        r.version = version
        if changed or r.status != ACKED:
            r.last_updated = wall
        r.status = ACKED
        if not changed:
            return None
        r.raw = data
        r.value = value
        return Changed(rtype, name, value)

    def _reject(
        self, rtype: ResourceType, name: str, r: _Resource, *, error: str, version: str, wall: float
    ) -> Effect:
        r.dne_deadline = r.dne_remaining = None
        r.status = NACKED
        r.error = error
        r.failed_version = version
        r.last_updated = wall
        return AmbientError(rtype, name, f"NACKed: {error}")

    @staticmethod
    def _ignore_deletion(rtype: ResourceType, name: str, r: _Resource) -> None:
        if not r.deletion_ignored:
            r.deletion_ignored = True
            log.warning(
                "%s %r was deleted by the xDS server; the last value stays in use "
                "(server feature ignore_resource_deletion)",
                rtype.short_name,
                name,
            )

    def _delete(self, rtype: ResourceType, name: str, r: _Resource, wall: float) -> Effect:
        r.dne_deadline = r.dne_remaining = None
        r.status = DOES_NOT_EXIST
        r.raw = None
        r.value = None
        r.version = ""
        r.last_updated = wall
        return DoesNotExist(rtype, name)

    def _sotw_response(
        self, rtype: ResourceType, ts: _TypeState, message: DiscoveryResponse
    ) -> list[Effect]:
        wall = self._wall()
        valid, invalid, errors, unnamed, present = self._decode_all(rtype, ts, message.resources)
        effects: list[Effect] = []
        for name, (value, data, _) in valid.items():
            r = ts.resources.get(name)
            if r is not None:
                effect = self._accept(
                    rtype, name, r, value=value, data=data, version=message.version_info, wall=wall
                )
                if effect is not None:
                    effects.append(effect)
        for name, error in invalid.items():
            r = ts.resources.get(name)
            if r is not None:
                effects.append(
                    self._reject(
                        rtype, name, r, error=error, version=message.version_info, wall=wall
                    )
                )
        if rtype in _FULL_STATE and not unnamed:
            for name, r in ts.resources.items():
                if name in valid or name in invalid or name in present or not r.cached:
                    continue
                if self.ignore_resource_deletion:
                    self._ignore_deletion(rtype, name, r)
                    continue
                effects.append(self._delete(rtype, name, r, wall))
        if errors:
            effects.append(Send(self._sotw_request(rtype, ts, error=_detail(errors))))
        else:
            ts.version = message.version_info
            effects.append(Send(self._sotw_request(rtype, ts)))
        return effects

    def _delta_response(
        self, rtype: ResourceType, ts: _TypeState, message: DeltaDiscoveryResponse
    ) -> list[Effect]:
        wall = self._wall()
        valid, invalid, errors, _, _ = self._decode_all(rtype, ts, message.resources)
        effects: list[Effect] = []
        for name, (value, data, version) in valid.items():
            r = ts.resources.get(name)
            if r is not None:
                effect = self._accept(
                    rtype, name, r, value=value, data=data, version=version, wall=wall
                )
                if effect is not None:
                    effects.append(effect)
        for name, error in invalid.items():
            r = ts.resources.get(name)
            if r is not None:
                effects.append(
                    self._reject(
                        rtype,
                        name,
                        r,
                        error=error,
                        version=message.system_version_info,
                        wall=wall,
                    )
                )
        for name in message.removed_resources:
            r = ts.resources.get(name)
            if r is None or r.status == DOES_NOT_EXIST:
                continue
            if self.ignore_resource_deletion and r.cached:
                self._ignore_deletion(rtype, name, r)
                continue
            effects.append(self._delete(rtype, name, r, wall))
        effects.append(
            Send(
                DeltaDiscoveryRequest(
                    type_url=rtype.type_url,
                    response_nonce=message.nonce,
                    error_detail=_detail(errors) if errors else None,
                    include_node=self._take_node(),
                )
            )
        )
        return effects


_MAX_DETAIL = 8192
"""A NACK names every bad resource, up to this many characters (a response of thousands of
broken resources must not become a megabyte request)."""


def _detail(errors: list[str]) -> str:
    text = "; ".join(errors)
    if len(text) <= _MAX_DETAIL:
        return text
    shown: list[str] = []
    size = 0
    for error in errors:
        if size + len(error) + 2 > _MAX_DETAIL - 64:
            break
        shown.append(error)
        size += len(error) + 2
    return "; ".join(shown) + f"; ... and {len(errors) - len(shown)} more invalid resources"
