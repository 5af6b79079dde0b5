"""A deterministic in-memory double of the XdsClient *watch API* (for unit tests only).

It implements exactly what the snapshot layer uses (``bootstrap``, ``watch``,
``run_in_serializer``) with the real client's contract: callbacks run "on the serializer",
which here is a queue the test drains explicitly with :meth:`FakeXdsClient.drain` (on one
worker thread, while the test waits); a new
watcher of a cached resource gets the cached value (or does-not-exist) posted to it. The test
plays the control plane with :meth:`set`, :meth:`delete` and :meth:`error`.

The integration tests run the same code against the real client and ``tests/xdsserver.py``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pymesh.bootstrap import Bootstrap, parse_bootstrap
from pymesh.xds.resource_types import ResourceType

_DOES_NOT_EXIST = object()
# The "work serializer" thread shared by every fake client of the test session.
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-xds-work")

BOOTSTRAP_JSON = """
{
  "xds_servers": [{"server_uri": "127.0.0.1:1", "channel_creds": [{"type": "insecure"}]}],
  "node": {"id": "sidecar~10.0.0.1~app.default~default.svc.cluster.local"},
  "server_listener_resource_name_template": "xds.istio.io/grpc/lds/inbound/%s",
  "authorities": {"other.example": {
      "client_listener_resource_name_template": "xdstp://other.example/envoy.config.listener.v3.Listener/%s"}}
}
"""


class FakeXdsClient:
    def __init__(self, bootstrap: Bootstrap | None = None) -> None:
        self.bootstrap = bootstrap or parse_bootstrap(BOOTSTRAP_JSON, source="test")
        self._queue: deque[Callable[[], None]] = deque()
        self._resources: dict[tuple[ResourceType, str], object] = {}
        self._watchers: dict[tuple[ResourceType, str], list[Any]] = {}
        self.log: list[tuple[str, ResourceType, str]] = []

    # -- the watch API --------------------------------------------------------------------

    def watch(self, rtype: ResourceType, name: str, watcher: Any) -> Callable[[], None]:
        key = (rtype, name)
        self._watchers.setdefault(key, []).append(watcher)
        self.log.append(("watch", rtype, name))
        if key in self._resources:
            self._post(watcher, key, self._resources[key])

        def cancel() -> None:
            watchers = self._watchers.get(key, [])
            if watcher in watchers:
                watchers.remove(watcher)
                self.log.append(("cancel", rtype, name))
            if not watchers:
                self._watchers.pop(key, None)

        return cancel

    def run_in_serializer(self, fn: Callable[[], None]) -> None:
        self._queue.append(fn)

    # -- test controls --------------------------------------------------------------------

    def drain(self, limit: int = 10_000) -> int:
        """Run queued serializer work until none is left; returns how many ran.

        The work runs on one separate thread (as the real client's callbacks do) while the
        caller waits, so the order stays deterministic.
        """

        def run() -> int:
            ran = 0
            while self._queue:
                assert ran < limit, "serializer work did not settle"
                self._queue.popleft()()
                ran += 1
            return ran

        return _WORKER.submit(run).result()

    def set(self, rtype: ResourceType, name: str, value: object) -> None:
        self._resources[(rtype, name)] = value
        for watcher in list(self._watchers.get((rtype, name), [])):
            self._post(watcher, (rtype, name), value)

    def delete(self, rtype: ResourceType, name: str) -> None:
        self.set(rtype, name, _DOES_NOT_EXIST)

    def error(self, rtype: ResourceType, name: str, message: str) -> None:
        for watcher in list(self._watchers.get((rtype, name), [])):
            self._post_error(watcher, rtype, name, message)

    def _post_error(self, watcher: Any, rtype: ResourceType, name: str, message: str) -> None:
        self._queue.append(lambda: watcher.on_ambient_error(rtype, name, message))

    @property
    def subscribed(self) -> frozenset[tuple[ResourceType, str]]:
        return frozenset(key for key, watchers in self._watchers.items() if watchers)

    def names(self, rtype: ResourceType) -> frozenset[str]:
        return frozenset(name for (t, name) in self.subscribed if t is rtype)

    def _post(self, watcher: Any, key: tuple[ResourceType, str], value: object) -> None:
        rtype, name = key
        if value is _DOES_NOT_EXIST:
            self._queue.append(lambda: watcher.on_resource_does_not_exist(rtype, name))
        else:
            self._queue.append(lambda: watcher.on_resource_changed(rtype, name, value))
