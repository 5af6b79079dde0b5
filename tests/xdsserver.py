"""A small, real ADS server (grpcio, loopback) that tests drive by hand.

Usage::

    from tests.xdsserver import XdsTestServer, CDS, EDS

    with XdsTestServer() as server:                 # started on 127.0.0.1:<free port>
        server.set_resources(CDS, {"c1": cluster_proto})     # version "1", pushed to streams
        bootstrap = server.bootstrap()              # a pymesh Bootstrap pointing at it
        ...
        ack = server.wait_for_ack(CDS, "1")         # or wait_for_request(predicate)
        nack = server.wait_for_nack(CDS)            # a request with error_detail
        server.stop(); server.start()               # restart on the same port
        server.kill_streams()                       # abort every open stream (UNAVAILABLE)

    rec = WatchRecorder()                           # a ResourceWatcher that records events
    cancel = client.watch(ResourceType.CLUSTER, "c1", rec)
    rec.wait_for(lambda e: e[0] == "changed")       # ("changed", name, value),
                                                    # ("does_not_exist", name),
                                                    # ("ambient_error", name, error)

Behaviour, kept simple and predictable:

- It serves both ``StreamAggregatedResources`` (SotW) and ``DeltaAggregatedResources``.
- Resources are held per type as ``name -> serialized bytes`` (give protos or raw bytes;
  ``set_raw`` stores garbage on purpose). Every ``set_resources``/``remove_resources``/
  ``set_raw`` bumps that type's version (``"1"``, ``"2"``, ...) and pushes to every stream
  subscribed to the type.
- SotW: a response carries the subscribed names that exist (for LDS/CDS too, so a removed
  name is simply absent, which is a deletion for LDS/CDS clients). A response is sent when a
  stream's subscription set for a type changes (including its first request) and on every
  change of the resources; ACK/NACK requests get no response. ``wildcard=True`` on the
  server makes an empty subscription of LDS/CDS mean "everything".
- Delta: subscribed names are sent when first subscribed (unless the client's
  ``initial_resource_versions`` already has the current version), changed ones on every
  change, removed ones in ``removed_resources``.
- Every request received is recorded (``requests``: ``Received(stream, request)``, the
  request as a proto) and can be waited for. ``delay`` seconds are slept before each response.
- ``wrap_in_resource=True`` sends SotW resources inside ``envoy.service.discovery.v3.Resource``
  wrappers (as some servers do).
- ``unix_path=`` serves on a ``unix:`` socket instead; ``tls=(key_pem, chain_pem)`` serves
  TLS (then pass ``channel_creds={"type": "tls", "config": {...}}`` to ``bootstrap()``).
- ``bootstrap(extra_servers=[...])`` lists fallback servers after this one;
  ``bootstrap(server_features=[...])`` sets e.g. ``ignore_resource_deletion`` or
  ``pymesh.delta``.
- ``push_raw(type_url, [(type_url, bytes)])`` sends one hand-made SotW response;
  ``auto_respond = False`` stops all automatic responses.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from pymesh.bootstrap import Bootstrap, parse_bootstrap

__all__ = ["CDS", "EDS", "LDS", "RDS", "Received", "WatchRecorder", "XdsTestServer"]

_PREFIX = "type.googleapis.com/"
LDS = _PREFIX + "envoy.config.listener.v3.Listener"
RDS = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CDS = _PREFIX + "envoy.config.cluster.v3.Cluster"
EDS = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
_FULL_STATE = {LDS, CDS}
_RESOURCE_WRAPPER = _PREFIX + "envoy.service.discovery.v3.Resource"

_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
_KILL = object()


@dataclass(frozen=True)
class Received:
    """A request the server received: the stream number (1, 2, ...) and the proto."""

    stream: int
    request: Any  # DiscoveryRequest | DeltaDiscoveryRequest
    delta: bool = False

    @property
    def type_url(self) -> str:
        return str(self.request.type_url)

    @property
    def is_nack(self) -> bool:
        return bool(self.request.HasField("error_detail"))


@dataclass
class _Stream:
    id: int
    delta: bool
    out: queue.Queue[object] = field(default_factory=queue.Queue)
    subs: dict[str, set[str]] = field(default_factory=dict)
    # delta: what this stream was last sent, per type: name -> version
    sent: dict[str, dict[str, str]] = field(default_factory=dict)
    nonce: Iterator[int] = field(default_factory=lambda: itertools.count(1))


class XdsTestServer:
    """A hand-driven ADS server on loopback (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        wildcard: bool = False,
        wrap_in_resource: bool = False,
        unix_path: str | None = None,
        tls: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.tls = tls  # (private key PEM, certificate chain PEM): serve TLS instead
        self.wildcard = wildcard
        self.wrap_in_resource = wrap_in_resource
        self.delay = 0.0
        self.auto_respond = True
        self._lock = threading.Condition()
        self._resources: dict[str, dict[str, bytes]] = {}
        self._versions: dict[str, int] = {}
        self._streams: dict[int, _Stream] = {}
        self._stream_ids = itertools.count(1)
        self.requests: list[Received] = []
        self._server: grpc.Server | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> XdsTestServer:
        """Start serving (on the same port as before after a ``stop``)."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        handler = grpc.method_handlers_generic_handler(
            _SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._sotw,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._delta,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=discovery_pb2.DeltaDiscoveryResponse.SerializeToString,
                ),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        target = f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"
        if self.tls is not None:
            creds = grpc.ssl_server_credentials([self.tls])
            bound = server.add_secure_port(target, creds)
        else:
            bound = server.add_insecure_port(target)
        if bound == 0:
            raise RuntimeError(f"cannot bind {target}")
        if not self.unix_path:
            self.port = bound
        server.start()
        self._server = server
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop serving: every open stream ends (the client sees UNAVAILABLE/CANCELLED)."""
        server, self._server = self._server, None
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.out.put(_KILL)
        if server is not None:
            server.stop(grace).wait(10)

    def kill_streams(self) -> None:
        """Abort every open stream with UNAVAILABLE; the server keeps accepting new ones."""
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.out.put(_KILL)

    def __enter__(self) -> XdsTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 hosts in brackets), or ``unix:PATH``."""
        if self.unix_path:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def active_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    # -- bootstrap -------------------------------------------------------------------------

    def bootstrap_dict(
        self,
        *,
        server_features: Iterable[str] = ("xds_v3",),
        extra_servers: Iterable[str] = (),
        channel_creds: Mapping[str, Any] | None = None,
        node_id: str = "sidecar~127.0.0.1~test.default~default.svc.cluster.local",
    ) -> dict[str, Any]:
        """A bootstrap (as JSON data) whose first server is this one, then ``extra_servers``
        (``host:port`` or ``unix:`` URIs, same creds and features) in fallback order.
        ``channel_creds`` is one ``channel_creds`` entry (default ``{"type": "insecure"}``)."""
        creds = dict(channel_creds) if channel_creds is not None else {"type": "insecure"}
        servers = [
            {
                "server_uri": uri,
                "channel_creds": [creds],
                "server_features": list(server_features),
            }
            for uri in (self.address, *extra_servers)
        ]
        return {
            "xds_servers": servers,
            "node": {
                "id": node_id,
                "cluster": "test",
                "locality": {"region": "r1", "zone": "z1"},
                "metadata": {"NAMESPACE": "default", "GENERATOR": "grpc"},
            },
        }

    def bootstrap(self, **kwargs: Any) -> Bootstrap:
        """The :meth:`bootstrap_dict` parsed into a pymesh :class:`Bootstrap`."""
        return parse_bootstrap(json.dumps(self.bootstrap_dict(**kwargs)), source="test")

    # -- resources -------------------------------------------------------------------------

    def version(self, type_url: str) -> str:
        """The current version string of ``type_url`` (``""`` before the first set)."""
        with self._lock:
            v = self._versions.get(type_url)
            return "" if v is None else str(v)

    def set_resources(self, type_url: str, resources: Mapping[str, Message | bytes]) -> str:
        """Add or replace resources (by name) and push; returns the new version."""
        with self._lock:
            table = self._resources.setdefault(type_url, {})
            for name, res in resources.items():
                table[name] = res if isinstance(res, bytes) else res.SerializeToString()
            return self._bump(type_url)

    set_raw = set_resources
    """Store bytes as they are (garbage included) under a name; same as ``set_resources``."""

    def remove_resources(self, type_url: str, names: Iterable[str]) -> str:
        """Delete resources and push; returns the new version."""
        with self._lock:
            table = self._resources.setdefault(type_url, {})
            for name in names:
                table.pop(name, None)
            return self._bump(type_url)

    def push_raw(
        self,
        type_url: str,
        resources: Iterable[tuple[str, bytes]],
        *,
        version: str = "raw",
    ) -> None:
        """Send one SotW response of ``(resource type_url, bytes)`` Anys to every SotW stream,
        bypassing the resource table (for malformed responses)."""
        with self._lock:
            streams = [s for s in self._streams.values() if not s.delta]
            for stream in streams:
                response = discovery_pb2.DiscoveryResponse(
                    type_url=type_url,
                    version_info=version,
                    nonce=str(next(stream.nonce)),
                    resources=[any_pb2.Any(type_url=t, value=v) for t, v in resources],
                )
                stream.out.put(response)

    def _bump(self, type_url: str) -> str:
        version = self._versions.get(type_url, 0) + 1
        self._versions[type_url] = version
        if self.auto_respond:
            for stream in self._streams.values():
                if type_url in stream.subs:
                    self._respond(stream, type_url, changed_only=True)
        return str(version)

    # -- requests --------------------------------------------------------------------------

    def wait_for_request(
        self, predicate: Callable[[Received], bool], *, timeout: float = 10.0, start: int = 0
    ) -> Received:
        """The first recorded request (from index ``start``) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for received in self.requests[start:]:
                    if predicate(received):
                        return received
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no matching xDS request within {timeout} s; got "
                        f"{[_brief(r) for r in self.requests[start:]]}"
                    )
                self._lock.wait(remaining)

    def wait_for_ack(self, type_url: str, version: str, **kwargs: Any) -> Received:
        """A SotW ACK of ``version`` (or a Delta ACK, which carries no version)."""
        return self.wait_for_request(
            lambda r: (
                r.type_url == type_url
                and not r.is_nack
                and (r.delta or r.request.version_info == version)
                and bool(r.request.response_nonce)
            ),
            **kwargs,
        )

    def wait_for_nack(self, type_url: str, **kwargs: Any) -> Received:
        """A NACK (a request with ``error_detail``) of ``type_url``."""
        return self.wait_for_request(lambda r: r.type_url == type_url and r.is_nack, **kwargs)

    # -- stream handlers -------------------------------------------------------------------

    def _open(self, delta: bool) -> _Stream:
        with self._lock:
            stream = _Stream(id=next(self._stream_ids), delta=delta)
            self._streams[stream.id] = stream
            return stream

    def _close(self, stream: _Stream) -> None:
        with self._lock:
            self._streams.pop(stream.id, None)

    def _serve(
        self, stream: _Stream, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        def read() -> None:
            try:
                for request in request_iterator:
                    self._on_request(stream, request)
            except Exception:
                pass
            finally:
                stream.out.put(None)

        reader = threading.Thread(target=read, daemon=True, name=f"xdsserver-read-{stream.id}")
        reader.start()
        try:
            while True:
                item = stream.out.get()
                if item is None:
                    return
                if item is _KILL:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "killed by the test")
                if self.delay:
                    time.sleep(self.delay)
                yield item
        finally:
            self._close(stream)

    def _sotw(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        stream = self._open(delta=False)
        yield from self._serve(stream, request_iterator, context)

    def _delta(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        stream = self._open(delta=True)
        yield from self._serve(stream, request_iterator, context)

    def _on_request(self, stream: _Stream, request: Any) -> None:
        with self._lock:
            self.requests.append(Received(stream.id, request, stream.delta))
            self._lock.notify_all()
            type_url = request.type_url
            if stream.delta:
                subs = stream.subs.setdefault(type_url, set())
                before = set(subs)
                subs.update(request.resource_names_subscribe)
                subs.difference_update(request.resource_names_unsubscribe)
                sent = stream.sent.setdefault(type_url, {})
                for name, version in request.initial_resource_versions.items():
                    sent[name] = version
                for name in request.resource_names_unsubscribe:
                    sent.pop(name, None)
                if self.auto_respond and subs - before:
                    self._respond(stream, type_url, changed_only=True)
                return
            names = set(request.resource_names)
            previous = stream.subs.get(type_url)
            stream.subs[type_url] = names
            if self.auto_respond and names != previous:
                self._respond(stream, type_url, changed_only=False)

    def _respond(self, stream: _Stream, type_url: str, *, changed_only: bool) -> None:
        """Queue a response for ``stream`` (lock held)."""
        table = self._resources.get(type_url, {})
        version = str(self._versions.get(type_url, 0))
        subs = stream.subs.get(type_url, set())
        if stream.delta:
            sent = stream.sent.setdefault(type_url, {})
            resources = []
            for name in sorted(subs):
                data = table.get(name)
                if data is None:
                    continue
                res_version = str(hash(data) & 0xFFFFFFFF)
                if changed_only and sent.get(name) == res_version:
                    continue
                sent[name] = res_version
                resources.append(
                    discovery_pb2.Resource(
                        name=name,
                        version=res_version,
                        resource=any_pb2.Any(type_url=type_url, value=data),
                    )
                )
            removed = sorted(n for n in subs if n not in table and n in sent)
            for name in removed:
                sent.pop(name, None)
            if not resources and not removed:
                return
            stream.out.put(
                discovery_pb2.DeltaDiscoveryResponse(
                    type_url=type_url,
                    system_version_info=version,
                    nonce=str(next(stream.nonce)),
                    resources=resources,
                    removed_resources=removed,
                )
            )
            return
        if not subs and not (self.wildcard and type_url in _FULL_STATE):
            names: list[str] = []
        elif not subs:
            names = sorted(table)
        else:
            names = sorted(n for n in subs if n in table)
        anys = []
        for name in names:
            any_msg = any_pb2.Any(type_url=type_url, value=table[name])
            if self.wrap_in_resource:
                wrapper = discovery_pb2.Resource(name=name, version=version, resource=any_msg)
                any_msg = any_pb2.Any(type_url=_RESOURCE_WRAPPER, value=wrapper.SerializeToString())
            anys.append(any_msg)
        if not anys and type_url not in _FULL_STATE:
            return  # RDS/EDS: nothing to say
        stream.out.put(
            discovery_pb2.DiscoveryResponse(
                type_url=type_url,
                version_info=version,
                nonce=str(next(stream.nonce)),
                resources=anys,
            )
        )


def _brief(r: Received) -> str:
    req = r.request
    if r.delta:
        return (
            f"#{r.stream} Δ {req.type_url.rsplit('.', 1)[-1]} +{list(req.resource_names_subscribe)}"
            f" -{list(req.resource_names_unsubscribe)} nonce={req.response_nonce!r}"
            f"{' NACK' if r.is_nack else ''}"
        )
    return (
        f"#{r.stream} {req.type_url.rsplit('.', 1)[-1]} {list(req.resource_names)} "
        f"v={req.version_info!r} nonce={req.response_nonce!r}{' NACK' if r.is_nack else ''}"
    )


class WatchRecorder:
    """A ``ResourceWatcher`` that records its callbacks as tuples and lets a test wait.

    Events: ``("changed", name, value)``, ``("does_not_exist", name)``,
    ``("ambient_error", name, error)``. ``thread_names`` records where callbacks ran.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.thread_names: set[str] = set()
        self._cv = threading.Condition()

    def _add(self, event: tuple[Any, ...]) -> None:
        with self._cv:
            self.events.append(event)
            self.thread_names.add(threading.current_thread().name)
            self._cv.notify_all()

    def on_resource_changed(self, rtype: Any, name: str, value: object) -> None:
        self._add(("changed", name, value))

    def on_resource_does_not_exist(self, rtype: Any, name: str) -> None:
        self._add(("does_not_exist", name))

    def on_ambient_error(self, rtype: Any, name: str, error: str) -> None:
        self._add(("ambient_error", name, error))

    def kinds(self) -> list[str]:
        with self._cv:
            return [e[0] for e in self.events]

    def values(self) -> list[object]:
        with self._cv:
            return [e[2] for e in self.events if e[0] == "changed"]

    def wait_for(
        self, predicate: Callable[[tuple[Any, ...]], bool], *, timeout: float = 10.0, start: int = 0
    ) -> tuple[Any, ...]:
        """The first event (from index ``start``) matching ``predicate``; AssertionError after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for event in self.events[start:]:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no matching watcher event within {timeout} s: {self.events[start:]}"
                    )
                self._cv.wait(remaining)
