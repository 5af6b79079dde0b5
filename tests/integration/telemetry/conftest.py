"""Telemetry test helpers: a Prometheus text parser and fixtures reused from the httpx tests
(uvicorn backends, the embedded control plane). Everything a fixture starts, it stops."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pymesh import telemetry
from tests.integration.httpx.conftest import Backend, Mesh, Upstream

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, dict[str, str], float]


def parse_prometheus(text: str) -> list[Sample]:
    """Every sample of a text exposition: (name, labels, value); fails on a bad line."""
    out: list[Sample] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m is not None, f"not a Prometheus sample line: {line!r}"
        labels = dict(_LABEL.findall(m.group(3) or ""))
        out.append((m.group(1), labels, float(m.group(4))))
    return out


def scrape(url: str) -> list[Sample]:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_prometheus(r.read().decode())


def scrape_until(url: str, name: str, at_least: float, **labels: str) -> list[Sample]:
    """Scrape until the samples of ``name`` with ``labels`` add up to ``at_least`` (or 10 s
    pass; the caller's assertions then say what is missing). A server records a request
    when its response is done, which can be just after the client has read it."""
    samples = scrape(url)
    for _ in range(100):
        if sum(s[2] for s in select(samples, name, **labels)) >= at_least:
            break
        time.sleep(0.1)
        samples = scrape(url)
    return samples


def select(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [s for s in samples if s[0] == name and all(s[1].get(k) == v for k, v in labels.items())]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = select(samples, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0][2]


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    m.stop()


@pytest.fixture
def upstreams() -> Iterator[Callable[..., tuple[Backend, Upstream]]]:
    started: list[Upstream] = []

    def make(name: str, app: object = None, **config: object) -> tuple[Backend, Upstream]:
        backend = Backend(name)
        up = Upstream(app if app is not None else backend, **config).start()
        started.append(up)
        return backend, up

    yield make
    for up in started:
        up.stop()


@pytest.fixture
def installed() -> Iterator[Callable[..., telemetry.Telemetry]]:
    """Installs a Telemetry (kwargs as the constructor's); closed and uninstalled after."""
    made: list[telemetry.Telemetry] = []

    def make(**kwargs: object) -> telemetry.Telemetry:
        tel = telemetry.Telemetry(**kwargs)  # type: ignore[arg-type]
        made.append(tel)
        return telemetry.install(tel)

    yield make
    for tel in made:
        tel.close()
