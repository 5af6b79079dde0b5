"""The server side of one ADS stream, as a state machine with no I/O.

Theory of operation
-------------------
One :class:`AdsStream` per gRPC stream, either State-of-the-World (SotW) or Delta. The driver
(``_ads.py``) turns each ``DiscoveryRequest`` into a proto-free :class:`Request`, feeds it to
:meth:`AdsStream.on_request`, and when told to answer (or when a config push happens) asks the
generator for the resources of the type's current :class:`Subscription` and hands them to
:meth:`AdsStream.respond`, which decides what goes on the wire (a :class:`Response`, or
nothing when the client already has exactly that).

Per stream and per type URL, a :class:`TypeState` records the subscription and what was sent,
acknowledged and rejected.

SotW (``StreamAggregatedResources``), per type:

===============================  ===============================================  ==========
request                          condition                                        outcome
===============================  ===============================================  ==========
first for the type               nonce empty                                      RESPOND
any                              nonce set but not the last nonce sent            STALE
error_detail set                 nonce is the last sent                           NACK
names differ from subscription   nonce is the last sent                           ACK+RESPOND
``always_respond`` flagged       nonce is the last sent (Envoy warming, below)    ACK+RESPOND
otherwise                        nonce is the last sent                           ACK
===============================  ===============================================  ==========

An empty name list means *wildcard* for LDS and CDS (legacy SotW rule) and nothing for RDS and
EDS; ``*`` is an explicit wildcard. After CDS is sent the next EDS request is always answered,
and after LDS the next RDS request, because Envoy keeps a re-created cluster (listener) warming
until it gets an EDS (RDS) response even when the names did not change (istiod's
``AlwaysRespond``), unless that EDS (RDS) response already went out after it.

Delta (``DeltaAggregatedResources``): subscribe/unsubscribe are applied from every request
(they are incremental, so even a request acknowledging an old nonce carries them); the
ACK/NACK part only counts when the nonce is the last sent. The stream remembers the version of
every resource the client holds (seeded by ``initial_resource_versions``) and a response
carries only the changed resources plus ``removed_resources`` for ones the client holds that
disappeared. Subscribing to a name again re-sends that resource. When clusters are sent,
their EDS resources count as not held any more, so the next EDS response (the driver sends
EDS right after CDS) carries them: Envoy re-creates an updated cluster and keeps it warming
until its endpoints arrive, without asking again.

Versions: a resource's version is a content hash (computed by the driver); a SotW response's
``version_info`` is the control plane's config version. Nonces count up per stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "AdsStream",
    "Nack",
    "Outcome",
    "Request",
    "Resource",
    "Response",
    "Subscription",
    "TypeState",
]

WILDCARD = "*"


@dataclass(frozen=True, slots=True)
class Request:
    """A ``DiscoveryRequest`` or ``DeltaDiscoveryRequest``, without protos."""

    type_url: str
    nonce: str = ""
    version_info: str = ""
    names: tuple[str, ...] = ()
    error: str | None = None
    subscribe: tuple[str, ...] = ()
    unsubscribe: tuple[str, ...] = ()
    initial_versions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Resource:
    """One resource ready to send: ``payload`` is the driver's (the packed ``Any`` as wire
    bytes, see ``_wire.pack``)."""

    name: str
    version: str
    payload: object


@dataclass(frozen=True, slots=True)
class Response:
    type_url: str
    version: str
    nonce: str
    resources: tuple[Resource, ...]
    removed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Subscription:
    """What a client asked for: everything visible (``wildcard``) and/or these names."""

    wildcard: bool
    names: frozenset[str]

    def generator_names(self) -> frozenset[str] | None:
        """``None`` (everything) for wildcard, else the names."""
        return None if self.wildcard else self.names


@dataclass(frozen=True, slots=True)
class Nack:
    version: str
    nonce: str
    message: str
    at: float


class Outcome(Enum):
    RESPOND = "respond"  # first request for the type, or subscription changed
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"  # acknowledges a response that was superseded: ignored


@dataclass(slots=True)
class TypeState:
    """Everything the stream knows about one type URL."""

    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    sent: dict[str, str] = field(default_factory=dict)  # name -> version the client holds
    sent_version: str = ""
    nonce: str = ""
    nonce_version: str = ""
    acked_version: str = ""
    acked_at: float | None = None
    nack: Nack | None = None
    always_respond: bool = False
    responded: bool = False
    requests: int = 0

    def subscription(self) -> Subscription:
        return Subscription(self.wildcard, frozenset(self.names))


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    respond: bool


_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
_ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
_CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
_ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

WILDCARD_TYPES = frozenset({_LISTENER, _CLUSTER})
# After sending the key type, the next request for the value type is always answered.
_WARMING_FOLLOWER = {_CLUSTER: _ENDPOINT, _LISTENER: _ROUTE}


class AdsStream:
    """State of one ADS stream (SotW when ``delta`` is false)."""

    def __init__(self, *, delta: bool) -> None:
        self.delta = delta
        self.types: dict[str, TypeState] = {}
        self._nonce = 0

    # -- requests -------------------------------------------------------------------------

    def on_request(self, req: Request, now: float) -> Decision:
        """Record one request; say whether the driver must answer it now."""
        if self.delta:
            return self._on_delta(req, now)
        return self._on_sotw(req, now)

    def _on_sotw(self, req: Request, now: float) -> Decision:
        state = self.types.get(req.type_url)
        if state is None:
            state = self.types[req.type_url] = TypeState()
        state.requests += 1
        if req.nonce and req.nonce != state.nonce:
            return Decision(Outcome.STALE, False)
        names = set(req.names)
        wildcard = WILDCARD in names or (not names and req.type_url in WILDCARD_TYPES)
        names.discard(WILDCARD)
        changed = wildcard != state.wildcard or names != state.names
        state.wildcard, state.names = wildcard, names
        if not req.nonce:
            # First request of the type on this stream (or a reconnecting client telling us
            # the version it has: answer anyway, it may be stale).
            return Decision(Outcome.RESPOND, True)
        if req.error is not None:
            state.nack = Nack(state.nonce_version, req.nonce, req.error, now)
            return Decision(Outcome.NACK, changed)
        state.acked_version = req.version_info or state.nonce_version
        state.acked_at = now
        if state.always_respond:
            state.always_respond = False
            return Decision(Outcome.ACK, True)
        return Decision(Outcome.ACK, changed)

    def _on_delta(self, req: Request, now: float) -> Decision:
        state = self.types.get(req.type_url)
        first = state is None
        if state is None:
            state = self.types[req.type_url] = TypeState()
            state.wildcard = req.type_url in WILDCARD_TYPES and not req.subscribe
            state.sent.update(req.initial_versions)
        state.requests += 1
        changed = first
        for name in req.subscribe:
            if name == WILDCARD:
                changed |= not state.wildcard
                state.wildcard = True
            else:
                # A (re-)subscription is answered with the resource even if the client had
                # it: Envoy re-subscribes a re-created cluster's EDS and waits for it.
                state.names.add(name)
                if not first:
                    state.sent.pop(name, None)
                changed = True
        for name in req.unsubscribe:
            if name == WILDCARD:
                state.wildcard = False
            else:
                state.names.discard(name)
                state.sent.pop(name, None)
        if not req.nonce:
            return Decision(Outcome.RESPOND, True)
        if req.nonce != state.nonce:
            return Decision(Outcome.STALE, changed)
        if req.error is not None:
            state.nack = Nack(state.nonce_version, req.nonce, req.error, now)
            return Decision(Outcome.NACK, changed)
        state.acked_version = state.nonce_version
        state.acked_at = now
        return Decision(Outcome.ACK, changed)

    # -- responses ------------------------------------------------------------------------

    def subscriptions(self) -> dict[str, Subscription]:
        """Current subscription of every type this stream asked for."""
        return {url: s.subscription() for url, s in self.types.items()}

    def respond(
        self,
        type_url: str,
        resources: Iterable[Resource],
        version: str,
        *,
        force: bool = False,
    ) -> Response | None:
        """Build the response that brings the client to ``resources`` (or ``None``).

        ``resources`` are what the generator returned for the current subscription. Without
        ``force`` a response is only built when something changed for the client.
        """
        state = self.types.get(type_url)
        if state is None:
            return None
        target = {r.name: r for r in resources}
        if self.delta:
            changed = tuple(r for r in target.values() if state.sent.get(r.name) != r.version)
            removed = tuple(sorted(n for n in state.sent if n not in target))
            if not changed and not removed and state.responded and not force:
                return None
            if not changed and not removed and state.responded:
                return None  # delta never needs an empty answer once the client is served
            for name in removed:
                del state.sent[name]
            for r in changed:
                state.sent[r.name] = r.version
            return self._emit(state, type_url, version, changed, removed)
        new_sent = {name: r.version for name, r in target.items()}
        if not force and state.responded and new_sent == state.sent:
            return None
        state.sent = new_sent
        return self._emit(state, type_url, version, tuple(target.values()), ())

    def _emit(
        self,
        state: TypeState,
        type_url: str,
        version: str,
        resources: tuple[Resource, ...],
        removed: tuple[str, ...],
    ) -> Response:
        self._nonce += 1
        nonce = str(self._nonce)
        state.nonce = nonce
        state.nonce_version = version
        state.sent_version = version
        state.responded = True
        state.always_respond = False  # this response is the one a warming client waits for
        follower = _WARMING_FOLLOWER.get(type_url)
        follower_state = self.types.get(follower) if follower is not None else None
        if follower_state is not None and not self.delta:
            follower_state.always_respond = True
        if follower_state is not None and self.delta and type_url == _CLUSTER:
            # Delta: Envoy does not re-request the EDS of a re-created cluster (the names are
            # already subscribed); it waits for the server to send it again.
            for r in resources:
                follower_state.sent.pop(r.name, None)
        return Response(type_url, version, nonce, resources, removed)
