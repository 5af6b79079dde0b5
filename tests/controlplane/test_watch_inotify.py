"""``Inotify``: which directory events wake the config check (the kernel queues an event
before the write or rename returns, so no waiting is needed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pymesh.controlplane.server._watch import Inotify


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[tuple[Path, Inotify]]:
    config = tmp_path / "mesh.yaml"
    config.write_text("a: 1\n")
    watcher = Inotify.create([config])
    assert watcher is not None
    yield config, watcher
    watcher.close()


def test_a_file_is_watched_through_its_directory(watch: tuple[Path, Inotify]) -> None:
    config, watcher = watch
    assert not watcher.drain()  # nothing happened yet
    tmp = config.with_suffix(".tmp")
    tmp.write_text("a: 2\n")
    assert not watcher.drain()  # a neighbour being written is not the config
    tmp.replace(config)
    assert watcher.drain()  # renamed into place: the config changed
    (config.parent / "other.yaml").write_text("b: 1\n")
    assert not watcher.drain()  # another YAML file, not one of the config paths
    config.write_text("a: 3\n")
    assert watcher.drain()  # written in place
    config.unlink()
    assert watcher.drain()


def test_a_directory_is_watched_with_new_subdirectories(tmp_path: Path) -> None:
    watcher = Inotify.create([tmp_path])
    assert watcher is not None
    try:
        (tmp_path / "notes.txt").write_text("x")
        (tmp_path / ".hidden.yaml").write_text("x")
        assert not watcher.drain()  # not config files
        sub = tmp_path / "team"
        sub.mkdir()
        assert watcher.drain() and watcher.stale
        watcher.rewatch()
        assert not watcher.stale
        (sub / "mesh.yml").write_text("a: 1\n")
        assert watcher.drain()  # seen through the new subdirectory's watch
    finally:
        watcher.close()
    assert watcher.fd == -1
