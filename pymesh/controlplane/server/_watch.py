"""Config file watching by polling: a cheap fingerprint of the config files' stat data.

No inotify: a poll stats every config file (bounded by ``MAX_FILES``) and compares
``(path, mtime_ns, size)`` tuples. A change of any (or a file appearing or disappearing)
is one config event; the debouncer merges bursts, so an editor's several writes cause one
reload.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MAX_FILES", "config_files", "fingerprint"]

MAX_FILES = 10_000
_SUFFIXES = (".yaml", ".yml", ".json")

Fingerprint = tuple[tuple[str, int, int], ...]


def config_files(paths: Sequence[Path]) -> list[Path]:
    """The files ``paths`` name: files as given, directories walked for YAML/JSON files."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.endswith(_SUFFIXES) and not name.startswith("."):
                        out.append(Path(root) / name)
                        if len(out) >= MAX_FILES:
                            return out
        else:
            out.append(path)
    return out


def fingerprint(paths: Sequence[Path]) -> Fingerprint:
    """Stat data of every config file; a missing file appears with mtime and size -1."""
    items: list[tuple[str, int, int]] = []
    for path in config_files(paths):
        try:
            st = path.stat()
        except OSError:
            items.append((str(path), -1, -1))
            continue
        items.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(items)
