"""The control plane's shared state: config, connections, registrations, pushes.

Theory of operation
-------------------
Everything here runs on one asyncio loop (the control plane's thread), so there are no locks:
the gRPC driver (``_ads.py``) calls :meth:`Hub.handle` for each request and writes whatever
lands in the connection's queue; :meth:`Hub.run` is the one background task that

1. checks the config files' fingerprint every ``poll_interval`` seconds and, on Linux, as
   soon as inotify reports activity in their directories (``_watch.py``),
2. expires auto-registered workloads whose grace period ran out,
3. when the debouncer says a burst of events is due, rebuilds: reload the files (in a worker
   thread; on errors keep the last good config and record the issues), merge the registered
   workloads, build a new generator, bump the version and push to every connection.

The reload starts as soon as a changed fingerprint is seen (a *preload*, one at a time), not
when the debounce fires: like istiod, config is ingested as it comes and only the push is
debounced, so the quiet time overlaps the reading and validation. The push uses the preload
when the files still have its fingerprint (checked again then), else loads them anew.

A push asks the generator, per connection and per subscribed type (CDS, EDS, LDS, RDS in that
order, as istiod pushes), for the resources of the connection's subscription; the stream
state machine sends only what changed for that client. One connection failing (its node
makes the generator raise) closes that connection alone.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from pymesh.controlplane.registry import HEALTH_STATES, WorkloadRegistry
from pymesh.controlplane.server._backend import Backend, LoadResult, ResourceGenerator
from pymesh.controlplane.server._debounce import Debouncer
from pymesh.controlplane.server._metrics import Metrics
from pymesh.controlplane.server._stream import AdsStream, Outcome, Request, Resource, Response
from pymesh.controlplane.server._watch import Fingerprint, Inotify, emptied, fingerprint
from pymesh.controlplane.server._wire import encode, pack
from pymesh.controlplane.translate._names import parse_cluster_name
from pymesh.xds._memory import release_memory
from pymesh.xds.resource_types import ResourceType

__all__ = ["HEALTH_TYPE_URL", "Close", "Connection", "Hub", "ProtocolError"]

log = logging.getLogger("pymesh.controlplane")

HEALTH_TYPE_URL = "type.googleapis.com/istio.v1.HealthInformation"
PUSH_ORDER = (
    ResourceType.CLUSTER.type_url,
    ResourceType.CLUSTER_LOAD_ASSIGNMENT.type_url,
    ResourceType.LISTENER.type_url,
    ResourceType.ROUTE_CONFIGURATION.type_url,
)
_PACK_CACHE_MAX = 200_000
MAX_PENDING_RESPONSES = 64


class ProtocolError(Exception):
    """The client broke the ADS protocol (e.g. no node on its first request)."""


@dataclass(frozen=True, slots=True)
class Close:
    """Queue item: end the stream with this status."""

    code: grpc.StatusCode
    message: str


@dataclass(slots=True)
class Connection:
    id: str
    peer: str
    delta: bool
    connected_at: float
    stream: AdsStream
    queue: asyncio.Queue[bytes | Close | None] = field(default_factory=asyncio.Queue)
    """What the stream's writer sends: encoded responses (wire bytes), or how to end."""
    node: Any = None
    node_id: str = ""
    generator_name: str = ""
    registered: str = ""
    admin: str = ""
    """The workload's admin endpoint, from its node metadata ``PYMESH_ADMIN_ADDRESS``."""
    unknown_types: set[str] = field(default_factory=set)
    closed: bool = False
    hosts: dict[str, tuple[frozenset[str], frozenset[str]]] = field(default_factory=dict)
    """Per type URL: the subscribed names last seen and the hostnames they refer to."""

    def subscribed_hosts(self, type_url: str, names: set[str]) -> frozenset[str]:
        """The hostnames that the cluster names ``names`` (of ``type_url``) refer to."""
        cached = self.hosts.get(type_url)
        if cached is not None and cached[0] == names:
            return cached[1]
        hosts = frozenset(p[2] for p in map(parse_cluster_name, names) if p is not None)
        self.hosts[type_url] = (frozenset(names), hosts)
        return hosts


class Hub:
    """Shared control-plane state; see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        paths: Sequence[Path],
        *,
        debounce: float = 0.1,
        max_debounce: float = 1.0,
        registration_grace: float = 10.0,
        poll_interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.paths = tuple(paths)
        self.clock = clock
        self.poll_interval = poll_interval
        self.debouncer = Debouncer(debounce, max(max_debounce, debounce))
        self.registry = WorkloadRegistry(grace=registration_grace)
        self.metrics = Metrics()
        self.connections: dict[str, Connection] = {}
        self.base_config: Any = None
        self.config: Any = None
        self.generator: ResourceGenerator | None = None
        self.version = 0
        self.issues: tuple[tuple[str, str], ...] = ()
        self.last_good_at: float | None = None
        self.last_reload_error: tuple[str, ...] = ()
        self.push_cpu_seconds: list[float] = []
        self.last_push: dict[str, object] = {}
        self.last_push_skipped = 0
        self._fingerprint: Fingerprint = ()
        self._held_until: float | None = None
        """Set while a config file that had content reads empty (a writer between truncating
        and writing it): the reload waits until then unless the file changes again."""
        self._files_dirty = False
        self._workloads_dirty = False
        self._ids = itertools.count(1)
        self._wake: asyncio.Event | None = None
        self._inotify: Inotify | None = None
        self._files_touched = False
        self.use_inotify = True
        self.pause_gc = True
        """Whether the cyclic garbage collector is paused during a reload and push."""
        self.trim_memory = True
        """Whether the C heap's free memory is returned to the OS after each push."""
        self.preload = True
        """Whether a changed file is read and validated at once, while the debounce waits
        (istiod ingests config as it comes and debounces the push), instead of when the
        debounce fires."""
        self._preload: tuple[Fingerprint, asyncio.Future[tuple[LoadResult, float]]] | None = None
        """The load started for a fingerprint before the debounce fired, and its future."""
        self._gc_holds = 0
        """Whether :meth:`run` watches the files with inotify (where available) on top of
        polling."""
        self._packed: dict[int, tuple[Message, bytes, str]] = {}
        self._packed_prev: dict[int, tuple[Message, bytes, str]] = {}
        self._last_push_started: float | None = None
        self._pushed_serial: int | None = None
        self._swept_groups: tuple[object, ...] | None = None
        """The generator every connection was last brought up to date with (its
        ``serial``): a push from a generator built on it may skip unchanged clients."""
        self.metrics.gauge("pilot_xds", lambda: float(len(self.connections)))
        self.metrics.gauge("pymesh_config_version", lambda: float(self.version))
        self.metrics.gauge("pymesh_ready", lambda: 1.0 if self.ready else 0.0)
        self.metrics.gauge(
            "pymesh_autoregistered_workloads", lambda: float(len(self.registry.entries()))
        )

    # -- config ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.base_config is not None

    def initial_load(self) -> None:
        """Load the files once, synchronously, before serving."""
        self._fingerprint = fingerprint(self.paths)
        self._apply_load(self._load())
        self._rebuild_generator()
        if not self.connections:  # nobody holds anything older than this generator
            self._pushed_serial = getattr(self.generator, "serial", None)
            if self.base_config is not None:  # nor was tried against other groups
                self._swept_groups = tuple(self.backend.groups(self.base_config))

    def _load(self) -> LoadResult:
        try:
            return self.backend.load(self.paths)
        except Exception as exc:  # the loader must not crash us: treat as a bad config
            log.exception("loading the config failed")
            return LoadResult(None, (("Error", f"loading the config failed: {exc}"),))

    def _apply_load(self, result: LoadResult) -> bool:
        self.issues = result.issues
        if result.config is None:
            self.last_reload_error = result.errors or ("config could not be loaded",)
            self.metrics.inc("pilot_xds_config_reloads", result="error")
            self.metrics.inc("pilot_total_config_errors")
            for line in self.last_reload_error:
                log.error("config rejected, keeping the last good config: %s", line)
            return False
        self.last_reload_error = ()
        self.base_config = result.config
        self.last_good_at = time.time()
        self.metrics.inc("pilot_xds_config_reloads", result="ok")
        for level, line in result.issues:
            log.warning("config %s: %s", level.lower(), line)
        return True

    def _rebuild_generator(self) -> None:
        if self.base_config is None:
            self.config, self.generator = None, None
        else:
            config = self.base_config
            entries = self.registry.entries()
            if entries:
                config = self.backend.with_workloads(config, entries)
            self.config = config
            self.generator = self.backend.generator(config)
        self.version += 1
        # Messages the new generator reused from the previous version keep their packed form
        # (looked up in the previous table once, then moved over); the rest is dropped.
        self._packed_prev = self._packed
        self._packed = {}

    def notify(self) -> None:
        """A config event happened now (debounced)."""
        self.debouncer.event(self.clock())
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """The background task: watch files, expire registrations, debounce and push."""
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        next_poll = self.clock() + self.poll_interval
        if self.use_inotify:
            self._start_inotify(loop)
        try:
            while True:
                try:
                    next_poll = await self._step(loop, next_poll)
                except Exception:  # never let one bad round stop reloads and expiries
                    log.exception("control plane background round failed")
                    self.metrics.inc("pilot_xds_push_errors")
                    await asyncio.sleep(self.poll_interval)
        finally:
            self._stop_inotify(loop)
            preload, self._preload = self._preload, None
            if preload is not None:  # its end releases the GC hold: let it end here
                try:
                    await preload[1]
                except BaseException:  # stopping: only the release matters
                    pass

    @property
    def watching(self) -> str:
        """How the files are watched: ``"inotify"`` (plus polling) or ``"polling"``."""
        return "inotify" if self._inotify is not None else "polling"

    def _start_inotify(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            watcher = Inotify.create(self.paths)
            if watcher is None:
                return
            loop.add_reader(watcher.fd, self._on_inotify)
        except Exception:  # any failure: polling alone still works
            log.info("inotify unavailable; polling the config files only", exc_info=True)
            return
        self._inotify = watcher

    def _stop_inotify(self, loop: asyncio.AbstractEventLoop) -> None:
        watcher, self._inotify = self._inotify, None
        if watcher is None:
            return
        try:
            loop.remove_reader(watcher.fd)
        except Exception:  # the loop may be closing
            pass
        watcher.close()

    def _on_inotify(self) -> None:
        watcher = self._inotify
        if watcher is None:
            return
        try:
            seen = watcher.drain()
        except Exception:  # a broken descriptor: polling alone still works
            log.warning("inotify failed; polling the config files only", exc_info=True)
            self._stop_inotify(asyncio.get_running_loop())
            return
        if seen:
            self._files_touched = True
            if self._wake is not None:
                self._wake.set()

    def _check_files(self) -> Fingerprint:
        """The files' fingerprint (in a worker thread), re-adding inotify watches if needed."""
        watcher = self._inotify
        if watcher is not None and watcher.stale:
            watcher.rewatch()
        return fingerprint(self.paths)

    async def _step(self, loop: asyncio.AbstractEventLoop, next_poll: float) -> float:
        """One round of :meth:`run`; returns when the next file poll is due."""
        assert self._wake is not None
        now = self.clock()
        if now >= next_poll or self._files_touched:
            self._files_touched = False
            next_poll = now + self.poll_interval
            fp = await loop.run_in_executor(None, self._check_files)
            if fp != self._fingerprint:
                empty = emptied(self._fingerprint, fp) if self._fingerprint else []
                self._held_until = now + self.debouncer.max_delay if empty else None
                if empty:
                    log.info(
                        "config file %s became empty; applying that in %.1f s unless it is "
                        "written again (write config files atomically: write, then rename)",
                        ", ".join(empty),
                        self.debouncer.max_delay,
                    )
                self._fingerprint = fp
                self._files_dirty = True
                if self._inotify is not None and not self._inotify.stale:
                    self._inotify.stale = True  # a file may have moved: re-check watches
                self.debouncer.event(now)
        if self.registry.expire(now):
            self._workloads_dirty = True
            self.debouncer.event(now)
        held = self._held_until is not None and now < self._held_until
        if self._files_dirty and not held:
            self._start_preload(loop)
        if self.debouncer.due(now) and not held:
            self._held_until = None
            merged = self.debouncer.fire()
            self.metrics.inc("pilot_debounce_merged_events", merged)
            await self._rebuild_and_push(loop)
            return next_poll
        wake_at = [next_poll]
        deadline = self.debouncer.deadline()
        if deadline is not None:
            wake_at.append(max(deadline, self._held_until or deadline))
        expiry = self.registry.next_expiry()
        if expiry is not None:
            wake_at.append(expiry)
        timeout = max(0.0, min(wake_at) - self.clock())
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass
        self._wake.clear()
        return next_poll

    async def _rebuild_and_push(self, loop: asyncio.AbstractEventLoop) -> None:
        # A reload and push allocate hundreds of thousands of short-lived objects (YAML
        # nodes, specs, protos) next to a large live heap: the cyclic collector's passes
        # over that heap cost about a quarter of the CPU of a 1,000-service push. Reference
        # counting frees them anyway; the collector is paused for this bounded burst (unless
        # someone else already disabled it) and runs again afterwards.
        paused = self._hold_gc()
        try:
            await self._rebuild_and_push_now(loop)
        finally:
            if paused:
                self._release_gc()

    def _hold_gc(self) -> bool:
        """Pause the cyclic GC (see :meth:`_rebuild_and_push`) unless someone else did;
        holds nest (a preload and a push). True when the caller must :meth:`_release_gc`."""
        if not self.pause_gc:
            return False
        if self._gc_holds == 0:
            if not gc.isenabled():
                return False
            gc.disable()
        self._gc_holds += 1
        return True

    def _release_gc(self) -> None:
        self._gc_holds -= 1
        if self._gc_holds == 0:
            gc.enable()

    def _timed_load(self) -> tuple[LoadResult, float]:
        """:meth:`_load` and its wall time (in a worker thread)."""
        t0 = time.perf_counter()
        result = self._load()
        return result, time.perf_counter() - t0

    def _start_preload(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start loading the files as they are now, unless a load of this fingerprint is
        under way or done, or another load still runs (one at a time: its end wakes the
        loop, which calls this again)."""
        if not self.preload:
            return
        current = self._preload
        if current is not None and (current[0] == self._fingerprint or not current[1].done()):
            return
        paused = self._hold_gc()
        future = loop.run_in_executor(None, self._timed_load)

        def done(_: object) -> None:
            if paused:
                self._release_gc()
            if self._wake is not None:
                self._wake.set()

        future.add_done_callback(done)
        self._preload = (self._fingerprint, future)

    async def _take_load(self, loop: asyncio.AbstractEventLoop) -> tuple[LoadResult, float]:
        """The files' load for this push: the preload when it read what the files hold
        now (same fingerprint), else a load now."""
        preload, self._preload = self._preload, None
        if preload is not None:
            fp, future = preload
            result = await future  # also: never two loads at once
            if fp == self._fingerprint and fp == await loop.run_in_executor(
                None, self._check_files
            ):
                return result
        return await loop.run_in_executor(None, self._timed_load)

    async def _rebuild_and_push_now(self, loop: asyncio.AbstractEventLoop) -> None:
        changed = self._workloads_dirty
        self._workloads_dirty = False
        t0 = time.perf_counter()
        load_seconds: float | None = None
        if self._files_dirty:
            self._files_dirty = False
            result, load_seconds = await self._take_load(loop)
            if self._apply_load(result):
                changed = True
                self._register_unregistered()
        if not changed:
            return
        t1 = time.perf_counter()
        started = time.process_time()
        config_good_at = self.last_good_at  # the config files this push carries were read then
        try:
            self._rebuild_generator()
        except Exception:
            log.exception("building the xDS generator failed; keeping the previous one")
            self.metrics.inc("pilot_xds_push_errors")
            return
        t2 = time.perf_counter()
        thread_cpu = time.thread_time()
        await self.push_all()
        t3 = time.perf_counter()
        thread_cpu = time.thread_time() - thread_cpu
        self.push_cpu_seconds.append(time.process_time() - started)
        del self.push_cpu_seconds[:-100]
        if self.trim_memory:
            # The push's large buffers are freed by now (or as their writes end): hand the C
            # heap's free pages back, in a worker thread (it releases the GIL), off the path.
            loop.run_in_executor(None, release_memory)
        self.last_push = {
            "version": self.version,
            "load_seconds": round(t1 - t0 if load_seconds is None else load_seconds, 4),
            "load_wait_seconds": round(t1 - t0, 4),
            "build_seconds": round(t2 - t1, 4),
            "push_seconds": round(t3 - t2, 4),
            "push_thread_cpu_seconds": round(thread_cpu, 4),
            "clients": len(self.connections),
            "clients_skipped": self.last_push_skipped,
            "config_loaded_at": config_good_at,
        }
        log.info(
            "pushed version %d to %d clients: load %.3fs (waited %.3fs), build %.3fs, push %.3fs",
            self.version,
            len(self.connections),
            t1 - t0 if load_seconds is None else load_seconds,
            t1 - t0,
            t2 - t1,
            t3 - t2,
        )

    # -- connections ----------------------------------------------------------------------

    def open(self, peer: str, *, delta: bool) -> Connection:
        conn_id = f"{peer}-{next(self._ids)}"
        conn = Connection(conn_id, peer, delta, time.time(), AdsStream(delta=delta))
        self.connections[conn_id] = conn
        self.metrics.inc("pilot_xds_connections_total", kind="delta" if delta else "sotw")
        return conn

    def close(self, conn: Connection) -> None:
        conn.closed = True
        self.connections.pop(conn.id, None)
        if conn.registered:
            if self.registry.disconnect(conn.id, self.clock()):
                self._workloads_dirty = True  # removed at once (no grace period)
                self.notify()
            elif self._wake is not None:
                self._wake.set()  # re-plan the loop's wake-up for the grace expiry
        log.info("ADS stream closed: %s (%s)", conn.node_id or "?", conn.peer)

    def handle(self, conn: Connection, req: Request, node_proto: Any) -> list[bytes]:
        """Process one request; return the responses to write (encoded: wire bytes)."""
        now = self.clock()
        if conn.node is None:
            if node_proto is None:
                raise ProtocolError("the first request on a stream must carry the node")
            self._attach_node(conn, node_proto, now)
        if req.type_url == HEALTH_TYPE_URL:
            health = "HEALTHY" if req.error is None else "UNHEALTHY"
            if self.registry.set_health_for_conn(conn.id, health):
                self._workloads_dirty = True
                self.notify()
            return []
        if ResourceType.from_type_url(req.type_url) is None:
            if req.type_url not in conn.unknown_types:
                log.warning(
                    "%s asked for unknown type %r: ignored", conn.node_id, req.type_url[:200]
                )
            conn.unknown_types.add(req.type_url[:200])
            self.metrics.inc("pilot_xds_requests_unknown_type")
            return []
        decision = conn.stream.on_request(req, now)
        abbrev = _abbrev(req.type_url)
        if decision.outcome is Outcome.NACK:
            self.metrics.inc("pilot_total_xds_rejects", type=abbrev)
            log.warning(
                "NACK from %s for %s (nonce %s): %s", conn.node_id, abbrev, req.nonce, req.error
            )
        elif decision.outcome is Outcome.ACK:
            self.metrics.inc("pilot_xds_acks", type=abbrev)
        if not decision.respond:
            return []
        version = str(self.version)
        resp = conn.stream.respond(
            req.type_url, self._resources(conn, req.type_url), version, force=True
        )
        if resp is None:
            return []
        out = [self._encode(conn, resp)]
        if conn.delta and req.type_url == PUSH_ORDER[0] and PUSH_ORDER[1] in conn.stream.types:
            # Clusters sent on a delta stream: their endpoints follow (see _stream.py).
            eds = conn.stream.respond(PUSH_ORDER[1], self._resources(conn, PUSH_ORDER[1]), version)
            if eds is not None:
                out.append(self._encode(conn, eds))
        return out

    def _attach_node(self, conn: Connection, node_proto: Any, now: float) -> None:
        conn.node = self.backend.node(node_proto)
        conn.node_id = str(getattr(conn.node, "id", "") or node_proto.id)
        conn.generator_name = str(getattr(conn.node, "generator", "") or "")
        admin = node_proto.metadata.fields.get("PYMESH_ADMIN_ADDRESS")
        conn.admin = admin.string_value if admin is not None else ""
        log.info("ADS stream opened: %s (%s)", conn.node_id, conn.peer)
        if self._register(conn, now):
            self.notify()

    def _register(self, conn: Connection, now: float) -> bool:
        """Auto-register ``conn``'s node if it matches a WorkloadGroup of the config."""
        if self.base_config is None or conn.node is None or conn.registered:
            return False
        info = self.backend.node_info(conn.node)
        entry = self.registry.connect(conn.id, info, self.backend.groups(self.base_config), now)
        if entry is None:
            return False
        conn.registered = f"{entry.namespace}/{entry.name}"
        log.info("auto-registered %s for %s", conn.registered, conn.node_id)
        self._workloads_dirty = True
        return True

    def _register_unregistered(self) -> None:
        """After a reload: nodes connected before their WorkloadGroup existed register now.

        Registration reads the config's WorkloadGroups alone: with the same groups as at the
        last sweep, every unregistered node has been tried against them already."""
        groups = tuple(self.backend.groups(self.base_config))
        if groups == self._swept_groups:
            return
        self._swept_groups = groups
        now = self.clock()
        for conn in list(self.connections.values()):
            if not conn.closed:
                self._register(conn, now)

    def set_health(self, node_id: str, health: str) -> bool:
        """Admin call: set a node's registered entries' health. Raises ValueError if unknown."""
        health = health.upper()
        if health not in HEALTH_STATES:
            raise ValueError(f"status must be one of {', '.join(HEALTH_STATES)}")
        if not any(e.node_id == node_id for e in self.registry.entries()):
            raise KeyError(node_id)
        if self.registry.set_health(node_id, health):
            self._workloads_dirty = True
            self.notify()
            return True
        return False

    def _resources(self, conn: Connection, type_url: str) -> list[Resource]:
        generator = self.generator
        state = conn.stream.types.get(type_url)
        if generator is None or state is None:
            return []
        sub = state.subscription()
        if not sub.wildcard and not sub.names:
            return []
        messages = generator.generate(conn.node, type_url, sub.generator_names())
        if len(self._packed) > _PACK_CACHE_MAX:
            self._packed.clear()
            self._packed_prev.clear()
        out: list[Resource] = []
        for name, msg in messages.items():
            hit = self._packed.get(id(msg))
            if hit is None or hit[0] is not msg:
                hit = self._packed_prev.get(id(msg))
                if hit is None or hit[0] is not msg:
                    packed, version = pack(msg)
                    hit = (msg, packed, version)
                self._packed[id(msg)] = hit
            out.append(Resource(name, hit[2], hit[1]))
        return out

    def _encode(self, conn: Connection, resp: Response) -> bytes:
        self.metrics.inc("pilot_xds_pushes", type=_abbrev(resp.type_url))
        return encode(resp, delta=conn.delta)

    async def push_all(self) -> None:
        """Push the current version to every connection (what changed for each)."""
        self.metrics.inc("pilot_xds_full_pushes")
        started = time.perf_counter()
        version = str(self.version)
        generator = self.generator
        # What changed since the generator every client was last brought to: a client whose
        # subscriptions hold none of it gets nothing (the answer would be what it has).
        changed: dict[str, frozenset[str] | None] = dict.fromkeys(PUSH_ORDER)
        serial = getattr(generator, "serial", None)
        if (
            generator is not None
            and self._pushed_serial is not None
            and getattr(generator, "previous_serial", None) == self._pushed_serial
        ):
            changed_hosts = getattr(generator, "changed_hosts", None)
            if changed_hosts is not None:
                changed = {t: changed_hosts(t) for t in PUSH_ORDER}
        skipped = 0
        visited = 0
        for conn in list(self.connections.values()):
            if conn.closed or conn.node is None:
                continue
            types = [t for t in PUSH_ORDER if t in conn.stream.types]
            if all(not self._may_change(conn, t, changed[t]) for t in types):
                skipped += 1
                continue
            visited += 1
            if visited % 20 == 0:
                await asyncio.sleep(0)  # let requests (ACKs) in between
            if conn.queue.qsize() > MAX_PENDING_RESPONSES:
                # A client that stopped reading must not make us hold pushes forever.
                log.warning("%s is not reading its stream; closing it", conn.node_id)
                self.metrics.inc("pilot_xds_push_errors")
                # Drop what it has not read (bounded memory) and end the stream after the
                # write in flight, if the client ever takes it.
                while not conn.queue.empty():
                    conn.queue.get_nowait()
                conn.queue.put_nowait(
                    Close(grpc.StatusCode.RESOURCE_EXHAUSTED, "client too slow to read pushes")
                )
                conn.closed = True
                continue
            try:
                sent_clusters = False
                for type_url in types:
                    # After clusters went out, their endpoints are always looked at: a delta
                    # stream's re-created clusters wait for them (see _stream.py).
                    follows = type_url == PUSH_ORDER[1] and sent_clusters
                    if not follows and not self._may_change(conn, type_url, changed[type_url]):
                        continue
                    resp = conn.stream.respond(type_url, self._resources(conn, type_url), version)
                    if resp is not None:
                        sent_clusters |= type_url == PUSH_ORDER[0]
                        conn.queue.put_nowait(self._encode(conn, resp))
            except Exception as exc:
                log.exception("push to %s failed; closing its stream", conn.node_id)
                self.metrics.inc("pilot_xds_push_errors")
                conn.queue.put_nowait(Close(grpc.StatusCode.INTERNAL, f"push failed: {exc}"))
        self._pushed_serial = serial if isinstance(serial, int) else None
        self.metrics.inc("pilot_xds_push_seconds_sum", time.perf_counter() - started)
        self.metrics.inc("pymesh_xds_push_clients_skipped", skipped)
        self.last_push_skipped = skipped

    @staticmethod
    def _may_change(conn: Connection, type_url: str, changed: frozenset[str] | None) -> bool:
        """Whether ``conn``'s resources of ``type_url`` may differ after a change of
        ``changed`` (hostnames; ``None``: anything)."""
        if changed is None:
            return True
        if not changed:
            return False
        state = conn.stream.types[type_url]
        if state.wildcard:
            return True
        return not changed.isdisjoint(conn.subscribed_hosts(type_url, state.names))

    # -- status ---------------------------------------------------------------------------

    def syncz(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for conn in sorted(self.connections.values(), key=lambda c: (c.node_id, c.id)):
            types: dict[str, object] = {}
            for url, st in sorted(conn.stream.types.items()):
                nack = st.nack
                types[_abbrev(url)] = {
                    "type_url": url,
                    "wildcard": st.wildcard,
                    "resource_names": sorted(st.names),
                    "sent_version": st.sent_version,
                    "sent_resources": len(st.sent),
                    "nonce": st.nonce,
                    "acked_version": st.acked_version,
                    "acked": bool(st.nonce) and st.acked_version == st.nonce_version,
                    "last_nack": None
                    if nack is None
                    else {"version": nack.version, "nonce": nack.nonce, "message": nack.message},
                }
            out.append(
                {
                    "proxy": conn.node_id,
                    "connection": conn.id,
                    "peer": conn.peer,
                    "generator": conn.generator_name,
                    "delta": conn.delta,
                    "connected_at": conn.connected_at,
                    "registered_as": conn.registered or None,
                    "admin": conn.admin or None,
                    "unknown_types": sorted(conn.unknown_types),
                    "types": types,
                }
            )
        return out

    def configz(self) -> dict[str, object]:
        return {
            "version": self.version,
            "ready": self.ready,
            "files": [p for p, _, _ in self._fingerprint],
            "issues": [{"level": lvl, "message": text} for lvl, text in self.issues],
            "last_reload_errors": list(self.last_reload_error),
            "last_good_at": self.last_good_at,
            "last_push": self.last_push,
            "workloads": [
                {
                    "namespace": e.namespace,
                    "name": e.name,
                    "group": e.group,
                    "address": e.address,
                    "ports": dict(e.ports),
                    "labels": dict(e.labels),
                    "health": e.health,
                    "connected": e.connected,
                    "node": e.node_id,
                }
                for e in self.registry.entries()
            ],
            "config": None if self.base_config is None else self.backend.describe(self.base_config),
        }


def _abbrev(type_url: str) -> str:
    rt = ResourceType.from_type_url(type_url)
    return rt.abbrev if rt is not None else type_url
