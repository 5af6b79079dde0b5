"""Decode ``envoy.config.endpoint.v3.ClusterLoadAssignment`` (EDS) into
:class:`pymesh.model.endpoint.ClusterLoadAssignment`.

Validation follows gRPC's xDS client (gRFC A27, A61) and Envoy's proto constraints:

* every endpoint is an ``endpoint`` (not a named/LEDS endpoint) with a TCP
  ``socket_address`` holding an IP (a host name only for ``LOGICAL_DNS`` clusters) and a
  numeric port in 1..65535; the same for each of its ``additional_addresses`` (A61);
* an address (primary or additional) appears at most once in the whole assignment;
* an endpoint's ``load_balancing_weight`` is >= 1 (unset = 1); a locality whose weight is
  explicitly 0 is ignored (as gRPC does); weight sums per locality and per priority fit in a
  uint32;
* a locality appears at most once per priority; priorities are contiguous from 0;
* ``overprovisioning_factor`` > 0, ``drop_overloads`` have a category and a valid fraction,
  ``endpoint_stale_after`` > 0.

The decoder is on the hot path of large updates (10,000 endpoints must decode well under
100 ms): the per-endpoint loop builds no field-path strings, shares identical metadata and
locality objects and builds the frozen models through their slot setters; when the fast
checks fail it re-runs the slow, path-building validation to produce the error. The
registered EDS decoder also reuses every locality whose content did not change since a
value still held (see "the registered EDS decoder" below): an update that moves a few
endpoints decodes only their localities.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import socket
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf.message import DecodeError

from pymesh.model.common import Locality, SocketAddress
from pymesh.model.endpoint import (
    ClusterLoadAssignment,
    DropOverload,
    HealthStatus,
    LbEndpoint,
    LocalityLbEndpoints,
)
from pymesh.xds.codec._common import (
    Ctx,
    decode_fractional_percent,
    decode_socket_address,
    duration,
    index,
    join,
    metadata_to_mapping,
    parse_message,
)
from pymesh.xds.codec._registry import Decoded, register
from pymesh.xds.pacing import checkpoint
from pymesh.xds.resource_types import ResourceType

__all__ = ["decode_cluster_load_assignment", "decode_load_assignment"]

_UINT32_MAX = 2**32 - 1
_HEALTH = tuple(HealthStatus)  # index = proto number (0..5)
_EMPTY_METADATA: Mapping[str, Mapping[str, Any]] = metadata_to_mapping(
    endpoint_components_pb2.LbEndpoint().metadata
)


def _slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Callable[[Any, Any], None], ...]:
    """The slot setters of a frozen dataclass's fields, in ``names`` order.

    The per-endpoint loop builds ``SocketAddress`` and ``LbEndpoint`` objects through them
    (``object.__new__`` then one setter per field): a third of the cost of the generated
    frozen ``__init__`` (one ``object.__setattr__`` per field). Checked against the class
    at import: a field added to the model without this list fails here, not silently.
    """
    fields = tuple(f.name for f in dataclasses.fields(cls))
    if fields != names:
        raise RuntimeError(f"{cls.__name__} fields are {fields}, the EDS decoder sets {names}")
    return tuple(getattr(cls, name).__set__ for name in names)


_SOCKET_ADDRESS_SETTERS = _slot_setters(SocketAddress, ("host", "port"))
_LB_ENDPOINT_SETTERS = _slot_setters(
    LbEndpoint,
    (
        "address",
        "additional_addresses",
        "health_status",
        "load_balancing_weight",
        "hostname",
        "metadata",
    ),
)


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):  # ValueError: embedded NUL
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except (OSError, ValueError):  # ValueError: embedded NUL
            return False
    return True


def _slow_address(
    addr: address_pb2.Address, ctx: Ctx, path: str, *, allow_hostname: bool
) -> SocketAddress:
    """Full validation with field paths (used only when the fast check failed)."""
    sa = decode_socket_address(addr, ctx, path)
    sa_path = join(path, "socket_address")
    if sa.port == 0:
        raise ctx.error(join(sa_path, "port_value"), "port 0 is not a valid endpoint port")
    if not allow_hostname and not _is_ip(sa.host):
        raise ctx.error(join(sa_path, "address"), f"{sa.host!r} is not an IP address")
    if addr.socket_address.resolver_name:
        raise ctx.error(join(sa_path, "resolver_name"), "custom resolvers are not supported")
    return sa


class _Assembler:
    """Cross-locality state of one decode: addresses seen, localities per priority, weight
    sums; shared decode caches (metadata, ``Locality`` objects)."""

    __slots__ = (
        "allow_hostname",
        "ctx",
        "ep_path",
        "localities",
        "locality_cache",
        "metadata_cache",
        "priority_weight",
        "seen_addresses",
        "seen_localities",
    )

    def __init__(self, ctx: Ctx, path: str, *, allow_hostname: bool) -> None:
        self.ctx = ctx
        self.allow_hostname = allow_hostname
        self.ep_path = join(path, "endpoints")
        self.seen_addresses: set[tuple[str, int]] = set()
        self.metadata_cache: dict[bytes, Mapping[str, Mapping[str, Any]]] = {b"": _EMPTY_METADATA}
        self.locality_cache: dict[tuple[str, str, str], Locality] = {}
        self.seen_localities: set[tuple[int, Locality]] = set()
        self.priority_weight: dict[int, int] = {}
        self.localities: list[LocalityLbEndpoints] = []

    def _check_locality(self, i: int, priority: int, locality: Locality) -> None:
        if (priority, locality) in self.seen_localities:
            p = join(index(self.ep_path, i), "locality")
            msg = f"duplicate locality {str(locality)!r} in priority {priority}"
            raise self.ctx.error(p, msg)
        self.seen_localities.add((priority, locality))

    def _add(self, i: int, result: LocalityLbEndpoints) -> None:
        loc_weight = result.load_balancing_weight
        if loc_weight is not None:
            priority = result.priority
            total = self.priority_weight.get(priority, 0) + loc_weight
            if total > _UINT32_MAX:
                p = join(index(self.ep_path, i), "load_balancing_weight")
                msg = f"sum of locality weights in priority {priority} exceeds 2^32-1"
                raise self.ctx.error(p, msg)
            self.priority_weight[priority] = total
        self.localities.append(result)

    def add_decoded(
        self, i: int, result: LocalityLbEndpoints, keys: frozenset[tuple[str, int]]
    ) -> None:
        """A locality decoded before from the same bytes (so valid on its own; ``keys`` are
        its addresses): only the checks across localities are made again."""
        self._check_locality(i, result.priority, result.locality)
        if not self.seen_addresses.isdisjoint(keys):
            self._duplicate_in(i, result)
        self.seen_addresses.update(keys)
        self._add(i, result)

    def _duplicate_in(self, i: int, result: LocalityLbEndpoints) -> None:
        # Rare (an invalid update): find the first address of this locality that an
        # earlier locality has, and report it with its field path.
        earlier: set[tuple[str, int]] = set()
        for r in self.localities:
            for ep in r.endpoints:
                earlier.add((ep.address.host, ep.address.port))
                earlier.update((a.host, a.port) for a in ep.additional_addresses)
        lbe_base = join(index(self.ep_path, i), "lb_endpoints")
        for j, ep in enumerate(result.endpoints):
            addrs = [(join(index(lbe_base, j), "endpoint.address"), ep.address)]
            addrs.extend(
                (join(index(join(index(lbe_base, j), "endpoint.additional_addresses"), k),
                      "address"), a)
                for k, a in enumerate(ep.additional_addresses)
            )  # fmt: skip
            for p, a in addrs:
                if (a.host, a.port) in earlier:
                    raise self.ctx.error(p, f"duplicate endpoint address {a}")
        raise self.ctx.error(self.ep_path, "duplicate endpoint address")  # not reached

    def add_proto(
        self,
        i: int,
        loc: endpoint_components_pb2.LocalityLbEndpoints,
        lb_endpoints: Iterable[endpoint_components_pb2.LbEndpoint] | None = None,
    ) -> LocalityLbEndpoints | None:
        """Validate and convert one locality; ``None`` if it is ignored (weight 0).

        ``lb_endpoints`` (default ``loc.lb_endpoints``): the endpoints of a huge locality
        parsed in pieces (see :func:`_split_runs`), ``loc`` then holding its other fields.
        """
        ctx = self.ctx
        ep_path = self.ep_path
        allow_hostname = self.allow_hostname
        if loc.HasField("leds_cluster_locality_config"):
            p = join(index(ep_path, i), "leds_cluster_locality_config")
            raise ctx.error(p, "LEDS is not supported")
        loc_weight: int | None = None
        if loc.HasField("load_balancing_weight"):
            loc_weight = loc.load_balancing_weight.value
            if loc_weight == 0:
                return None  # gRPC ignores localities of weight 0
        lm = loc.locality
        key = (lm.region, lm.zone, lm.sub_zone)
        locality = self.locality_cache.get(key)
        if locality is None:
            locality = self.locality_cache[key] = Locality(*key)
        priority = loc.priority
        self._check_locality(i, priority, locality)

        seen_addresses = self.seen_addresses
        metadata_cache = self.metadata_cache
        inet_pton = socket.inet_pton
        af_inet = socket.AF_INET
        new = object.__new__
        set_host, set_port = _SOCKET_ADDRESS_SETTERS
        set_address, set_extra, set_health, set_weight, set_hostname, set_metadata = (
            _LB_ENDPOINT_SETTERS
        )
        endpoints: list[LbEndpoint] = []
        weight_sum = 0
        for j, lbe in enumerate(loc.lb_endpoints if lb_endpoints is None else lb_endpoints):
            if not j & 31:  # ~0.1 ms of work
                checkpoint()  # a huge locality: let the application's threads run
            # Fast path: plain attribute reads, no path strings, no helper calls. An unset
            # oneof (named endpoint, pipe address, named port) reads as ""/0 and fails here.
            ep = lbe.endpoint
            sa = ep.address.socket_address
            host = sa.address
            port = sa.port_value
            ok = bool(host) and 0 < port <= 65535 and not sa.protocol and not sa.resolver_name
            if ok and not allow_hostname:
                try:
                    inet_pton(af_inet, host)
                except (OSError, ValueError):
                    ok = _is_ip(host)
            if ok:
                address = new(SocketAddress)
                set_host(address, host)
                set_port(address, port)
            else:
                lbe_path = index(join(index(ep_path, i), "lb_endpoints"), j)
                if lbe.WhichOneof("host_identifier") != "endpoint":
                    msg = "an lb_endpoint needs an endpoint (named endpoints unsupported)"
                    raise ctx.error(lbe_path, msg)
                p = join(lbe_path, "endpoint.address")
                address = _slow_address(ep.address, ctx, p, allow_hostname=allow_hostname)
            addr_key = (address.host, address.port)
            if addr_key in seen_addresses:
                p = join(index(join(index(ep_path, i), "lb_endpoints"), j), "endpoint.address")
                raise ctx.error(p, f"duplicate endpoint address {address}")
            seen_addresses.add(addr_key)
            extra: tuple[SocketAddress, ...] = ()
            if ep.additional_addresses:
                lbe_path = index(join(index(ep_path, i), "lb_endpoints"), j)
                extra = _additional(
                    ep, ctx, lbe_path, allow_hostname=allow_hostname, seen=seen_addresses
                )

            weight = lbe.load_balancing_weight.value
            if weight == 0:
                if lbe.HasField("load_balancing_weight"):
                    p = join(
                        index(join(index(ep_path, i), "lb_endpoints"), j), "load_balancing_weight"
                    )
                    raise ctx.error(p, "endpoint weight must be at least 1")
                weight = 1
            weight_sum += weight

            health = lbe.health_status
            if not 0 <= health <= 5:
                p = join(index(join(index(ep_path, i), "lb_endpoints"), j), "health_status")
                raise ctx.error(p, f"unknown health status {health}")

            # Identical metadata (Istio: per workload, not per pod) is decoded once. The
            # serialized bytes fully determine the content, so they are a sound cache key.
            md = lbe.metadata
            raw = md.SerializeToString()
            metadata = metadata_cache.get(raw)
            if metadata is None:
                metadata = metadata_cache[raw] = metadata_to_mapping(md)

            lb_endpoint = new(LbEndpoint)
            set_address(lb_endpoint, address)
            set_extra(lb_endpoint, extra)
            set_health(lb_endpoint, _HEALTH[health])
            set_weight(lb_endpoint, weight)
            set_hostname(lb_endpoint, ep.hostname)
            set_metadata(lb_endpoint, metadata)
            endpoints.append(lb_endpoint)
        if weight_sum > _UINT32_MAX:
            p = join(index(ep_path, i), "lb_endpoints")
            raise ctx.error(p, "sum of endpoint weights in the locality exceeds 2^32-1")
        result = LocalityLbEndpoints(locality, priority, loc_weight, tuple(endpoints))
        self._add(i, result)
        return result

    def finish(self, cla: endpoint_pb2.ClusterLoadAssignment, path: str) -> ClusterLoadAssignment:
        localities = self.localities
        if localities:
            present = {loc.priority for loc in localities}
            if max(present) >= len(present):  # not 0..n-1; a gap is below len(present)
                # bounded: one locality at priority 2^32-1 must not list 4e9 gaps
                missing = [p for p in range(len(present)) if p not in present][:10]
                msg = f"priorities must be contiguous from 0; missing {missing}"
                raise self.ctx.error(self.ep_path, msg)
        return _finish(cla, self.ctx, path, tuple(localities))


def decode_load_assignment(
    cla: endpoint_pb2.ClusterLoadAssignment,
    ctx: Ctx,
    path: str = "",
    *,
    allow_hostname: bool = False,
) -> ClusterLoadAssignment:
    """Validate and convert a ``ClusterLoadAssignment`` message.

    ``path`` prefixes error fields (``"load_assignment"`` when inline in a Cluster);
    ``allow_hostname`` admits DNS names as endpoint addresses (``LOGICAL_DNS`` clusters).
    """
    asm = _Assembler(ctx, path, allow_hostname=allow_hostname)
    for i, loc in enumerate(cla.endpoints):
        asm.add_proto(i, loc)
    return asm.finish(cla, path)


def _additional(
    ep: endpoint_components_pb2.Endpoint,
    ctx: Ctx,
    lbe_path: str,
    *,
    allow_hostname: bool,
    seen: set[tuple[str, int]],
) -> tuple[SocketAddress, ...]:
    out: list[SocketAddress] = []
    for k, extra in enumerate(ep.additional_addresses):
        p = join(index(join(lbe_path, "endpoint.additional_addresses"), k), "address")
        addr = _slow_address(extra.address, ctx, p, allow_hostname=allow_hostname)
        if (addr.host, addr.port) in seen:
            raise ctx.error(p, f"duplicate endpoint address {addr}")
        seen.add((addr.host, addr.port))
        out.append(addr)
    return tuple(out)


def _finish(
    cla: endpoint_pb2.ClusterLoadAssignment,
    ctx: Ctx,
    path: str,
    localities: tuple[LocalityLbEndpoints, ...],
) -> ClusterLoadAssignment:
    policy = cla.policy
    ppath = join(path, "policy")
    factor = 140
    if policy.HasField("overprovisioning_factor"):
        factor = policy.overprovisioning_factor.value
        if factor == 0:
            raise ctx.error(join(ppath, "overprovisioning_factor"), "must be greater than 0")
    drops: list[DropOverload] = []
    for k, drop in enumerate(policy.drop_overloads):
        dpath = index(join(ppath, "drop_overloads"), k)
        if not drop.category:
            raise ctx.error(join(dpath, "category"), "drop category is empty")
        pct = decode_fractional_percent(drop.drop_percentage, ctx, join(dpath, "drop_percentage"))
        drops.append(DropOverload(drop.category, pct))
    stale: float | None = None
    if policy.HasField("endpoint_stale_after"):
        spath = join(ppath, "endpoint_stale_after")
        stale = duration(policy.endpoint_stale_after, ctx, spath)
        if stale <= 0:
            raise ctx.error(spath, "must be greater than 0")
    return ClusterLoadAssignment(cla.cluster_name, localities, factor, tuple(drops), stale)


# -- the registered EDS decoder: unchanged localities are not decoded again -------------------
#
# An EDS update usually moves a few endpoints of a large assignment. The serialized
# assignment is split at the wire level into its ``endpoints`` entries (one length-delimited
# record per locality), each parsed on its own; a locality whose content has the digest of
# one decoded before (SHA-1 of its deterministic serialization: map order does not matter),
# while some snapshot still holds that result, reuses the frozen object (decoding is
# deterministic), so the cost of an update follows the localities that changed: parsing and
# hashing cost about a tenth of decoding. Only the checks that span localities (duplicate
# addresses and localities, weight sums, priorities) run again.

_CLA_ENDPOINTS_FIELD = 2  # ClusterLoadAssignment.endpoints
REUSE_MIN_BYTES = 4096
"""Smaller localities (a few dozen endpoints) are decoded again: cheaper than the digest
and the bookkeeping, and a mesh of many small services keeps no cache entries."""
# SHA-1 digest of a locality's bytes -> its decoded object, while something holds it; and
# (id of that object, the set of its addresses) for the duplicate check, dropped with it.
_LOCALITY_CACHE: weakref.WeakValueDictionary[bytes, LocalityLbEndpoints] = (
    weakref.WeakValueDictionary()
)
_LOCALITY_KEYS: dict[bytes, tuple[int, frozenset[tuple[str, int]]]] = {}


def _remember(digest: bytes, result: LocalityLbEndpoints) -> None:
    addresses: list[tuple[str, int]] = []
    for j, ep in enumerate(result.endpoints):
        if not j & 511:
            checkpoint()
        address = ep.address
        addresses.append((address.host, address.port))
        for a in ep.additional_addresses:
            addresses.append((a.host, a.port))
    unique: set[tuple[str, int]] = set()
    for start in range(0, len(addresses), 4096):  # hashing 100,000 keys takes ~10 ms
        checkpoint()
        unique.update(addresses[start : start + 4096])
    keys = frozenset(unique)  # a copy of a set reuses its hashes
    _LOCALITY_KEYS[digest] = (id(result), keys)
    _LOCALITY_CACHE[digest] = result
    weakref.finalize(result, _forget, digest, id(result)).atexit = False


def _forget(digest: bytes, ident: int) -> None:
    entry = _LOCALITY_KEYS.get(digest)
    if entry is not None and entry[0] == ident:
        del _LOCALITY_KEYS[digest]


def _cached(digest: bytes) -> tuple[LocalityLbEndpoints, frozenset[tuple[str, int]]] | None:
    found = _LOCALITY_CACHE.get(digest)
    entry = _LOCALITY_KEYS.get(digest)
    if found is None or entry is None or entry[0] != id(found):
        return None
    return found, entry[1]


def clear_locality_cache() -> None:
    """Forget every decoded locality (benchmarks of a cold decode; tests)."""
    _LOCALITY_CACHE.clear()
    _LOCALITY_KEYS.clear()


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    for _ in range(10):
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
    raise ValueError("varint too long")


def _skip(data: bytes, pos: int, wire: int) -> int:
    """The end of a record whose tag (of wire type ``wire``) ended at ``pos``; -1 for a
    group (rare enough to leave to the full parser). May pass the end of ``data``."""
    if wire == 0:
        return _varint(data, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        length, pos = _varint(data, pos)
        return pos + length
    if wire == 5:
        return pos + 4
    return -1


def _record(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the value, end) of the record at ``pos``; the end is -1 for a group
    and may pass the end of ``data``."""
    tag, pos = _varint(data, pos)
    if tag & 7 == 2:
        length, body = _varint(data, pos)
        return tag, body, body + length
    return tag, pos, _skip(data, pos, tag & 7)


RUNS_ABOVE = 262144
"""A locality larger than this (~10,000 endpoints) is parsed in runs of :data:`RUN_BYTES`:
the one-shot parse of 100,000 endpoints holds the GIL for ~20 ms; a smaller one is parsed
at once (~1 ms or less; scanning it into runs would cost more than that)."""
RUN_BYTES = 65536
"""The size of a run of endpoints (a few thousand) of a locality above :data:`RUNS_ABOVE`."""


def _split_runs(data: bytes, field: int, limit: int) -> tuple[list[bytes], bytes] | None:
    """Consecutive top-level records of ``field`` (length-delimited, ``field`` < 16) in runs
    of whole records of at most about ``limit`` bytes, tags included: each run parses as
    the message with only those entries of ``field``. And the other records' bytes, in
    order. ``None`` when the bytes are not well formed (the full parser reports why)."""
    tag_byte = field << 3 | 2
    runs: list[bytes] = []
    rest: list[bytes] = []
    n = len(data)
    pos = 0
    run = -1  # start of the current run
    try:
        for count in range(n + 1):
            if pos >= n:
                if run >= 0:
                    runs.append(data[run:pos])
                return runs, b"".join(rest)
            if not count & 255:
                checkpoint()
            start = pos
            if data[pos] == tag_byte:
                length = data[pos + 1]  # one length byte: the common case, inline
                pos = pos + 2 + length if length < 0x80 else _record(data, pos)[2]
                if pos > n:
                    return None
                if run < 0:
                    run = start
                elif pos - run > limit:
                    runs.append(data[run:start])
                    run = start
                continue
            if run >= 0:
                runs.append(data[run:start])
                run = -1
            pos = _record(data, pos)[2]
            if pos < 0 or pos > n:
                return None
            rest.append(data[start:pos])
    except (IndexError, ValueError):
        return None
    return None


def _split_field(data: bytes, field: int) -> tuple[list[memoryview], bytes] | None:
    """Top-level records of ``field`` (length-delimited) and the other records' bytes, in
    order; ``None`` when the bytes are not well formed (the full parser reports why)."""
    items: list[memoryview] = []  # views: the records are not copied
    rest: list[bytes] = []
    view = memoryview(data)
    pos = 0
    n = len(data)
    try:
        for _ in range(n + 1):
            if pos >= n:
                return items, b"".join(rest)
            start = pos
            tag, body, pos = _record(data, pos)
            if tag == field << 3 | 2 and pos <= n:
                items.append(view[body:pos])
                continue
            if pos < 0 or pos > n:
                return None
            rest.append(data[start:pos])
    except (IndexError, ValueError):
        return None
    return None


class _Runs:
    """A huge locality parsed in pieces: ``head`` has every field but the endpoints,
    ``runs`` the endpoints, in order."""

    __slots__ = ("head", "runs")

    def __init__(
        self,
        head: endpoint_components_pb2.LocalityLbEndpoints,
        runs: list[endpoint_components_pb2.LocalityLbEndpoints],
    ) -> None:
        self.head = head
        self.runs = runs


_LB_ENDPOINTS_FIELD = 2  # LocalityLbEndpoints.lb_endpoints


def _parse_runs(data: bytes) -> tuple[bytes, Any] | None:
    """(digest, cached result or :class:`_Runs`) of a huge locality, parsed, serialized for
    the digest and hashed a run at a time (each a C call under a millisecond), the thread
    pacing itself in between; ``None`` if the bytes are not well formed. The digest (of the
    head's and then each run's deterministic serialization) differs from a small
    locality's: a locality's size decides its path, so a key is only ever compared with
    keys made the same way."""
    split = _split_runs(data, _LB_ENDPOINTS_FIELD, RUN_BYTES)
    if split is None:
        return None
    parts, rest = split
    parse = endpoint_components_pb2.LocalityLbEndpoints.FromString
    head = parse(rest)
    sha = hashlib.sha1(head.SerializeToString(deterministic=True), usedforsecurity=False)
    runs = []
    for part in parts:
        checkpoint()
        run = parse(part)
        sha.update(run.SerializeToString(deterministic=True))
        runs.append(run)
    digest = sha.digest()
    found = _cached(digest)
    return digest, _Runs(head, runs) if found is None else found


def _decode_split(data: bytes) -> Decoded | None:
    split = _split_field(data, _CLA_ENDPOINTS_FIELD)
    if split is None:
        return None
    records, rest = split
    ctx = Ctx(ResourceType.CLUSTER_LOAD_ASSIGNMENT.short_name)
    try:
        shell = endpoint_pb2.ClusterLoadAssignment.FromString(rest)
        locs: list[tuple[bytes | None, Any]] = []
        for r in records:
            if len(r) > RUNS_ABOVE:
                big = _parse_runs(bytes(r))
                if big is None:
                    return None
                locs.append(big)
                continue
            proto = endpoint_components_pb2.LocalityLbEndpoints.FromString(r)
            digest = found = None
            if len(r) >= REUSE_MIN_BYTES:
                # Map entries (endpoint metadata) may come in any order from one push to the
                # next (Go marshals maps in random order): the key is the digest of the
                # deterministic serialization, where they are sorted.
                canonical = proto.SerializeToString(deterministic=True)
                digest = hashlib.sha1(canonical, usedforsecurity=False).digest()
                found = _cached(digest)
            locs.append((digest, proto if found is None else found))
    except (DecodeError, RecursionError, ValueError):
        return None
    if not shell.cluster_name:
        raise ctx.error("cluster_name", "cluster_name is empty")
    ctx = ctx.named(shell.cluster_name)
    asm = _Assembler(ctx, "", allow_hostname=False)
    for i, (digest, item) in enumerate(locs):
        if isinstance(item, tuple):
            asm.add_decoded(i, *item)
        else:
            if isinstance(item, _Runs):
                lb_endpoints = itertools.chain.from_iterable(p.lb_endpoints for p in item.runs)
                result = asm.add_proto(i, item.head, lb_endpoints)
            else:
                result = asm.add_proto(i, item)
            if result is not None and digest is not None:
                _remember(digest, result)
    return Decoded(shell.cluster_name, asm.finish(shell, ""))


@register(ResourceType.CLUSTER_LOAD_ASSIGNMENT)
def decode_cluster_load_assignment(data: bytes) -> Decoded:
    """The registered EDS decoder: serialized ``ClusterLoadAssignment`` -> model."""
    decoded = _decode_split(data)
    if decoded is not None:
        return decoded
    ctx = Ctx(ResourceType.CLUSTER_LOAD_ASSIGNMENT.short_name)
    cla = parse_message(endpoint_pb2.ClusterLoadAssignment, data, ctx)
    if not cla.cluster_name:
        raise ctx.error("cluster_name", "cluster_name is empty")
    ctx = ctx.named(cla.cluster_name)
    return Decoded(cla.cluster_name, decode_load_assignment(cla, ctx))
