"""Config file watching: inotify wake-ups (Linux) over a cheap stat fingerprint.

The truth is the fingerprint: a check stats every config file (bounded by ``MAX_FILES``) and
compares ``(path, mtime_ns, size)`` tuples. A change of any (or a file appearing or
disappearing) is one config event; the debouncer merges bursts, so an editor's several writes
cause one reload.

When to check: every ``poll_interval`` seconds, and on Linux also as soon as inotify reports
activity in a watched directory (:class:`Inotify`, through ctypes: no dependency). A file path
is watched through its parent directory (editors and ``rename`` replace the file, which a
watch on the file itself would lose); a directory path through itself and its
subdirectories (bounded by ``MAX_WATCHES``). inotify only makes the check early: a spurious
wake-up costs one fingerprint, a missed one (inotify unavailable, a watch limit reached, a
directory created later) is caught by the next poll.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MAX_FILES", "MAX_WATCHES", "Inotify", "config_files", "emptied", "fingerprint"]

MAX_FILES = 10_000
MAX_WATCHES = 1_000
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


def emptied(before: Fingerprint, after: Fingerprint) -> list[str]:
    """Files that had content in ``before`` and are empty in ``after``.

    Writing a file in place truncates it first: a check between the truncation and the write
    sees it empty, and a writer that stalls there (a loaded machine) would have the whole
    file's config withdrawn. The hub holds such a change back for up to ``max_debounce``.
    """
    sizes = {path: size for path, _, size in before}
    return [path for path, _, size in after if size == 0 and sizes.get(path, 0) > 0]


# inotify(7) event bits.
_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ISDIR = 0x40000000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_MASK = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
)
_READ_SIZE = 64 * 1024
_MAX_READS = 64


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_init1.restype = ctypes.c_int
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_add_watch.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


class Inotify:
    """A non-blocking inotify descriptor watching the directories of config paths.

    :meth:`create` returns ``None`` where inotify is unavailable (not Linux, no libc
    symbol, descriptor limit): the caller then relies on polling alone. The owner registers
    :attr:`fd` with its event loop, calls :meth:`drain` when readable (then checks the
    fingerprint) and :meth:`close` at the end.
    """

    def __init__(self, libc: ctypes.CDLL, fd: int, paths: Sequence[Path]) -> None:
        self._libc = libc
        self.fd = fd
        self._paths = tuple(paths)
        self._watched: set[str] = set()
        # Per watch descriptor: the file names that matter in that directory (``None``: any
        # config file, for a directory given as a config path).
        self._names: dict[int, frozenset[str] | None] = {}
        self.stale = False
        """Whether directories may have appeared or gone since the last :meth:`rewatch`."""
        self.rewatch()

    @classmethod
    def create(cls, paths: Sequence[Path]) -> Inotify | None:
        libc = _libc()
        if libc is None:
            return None
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return None
        return cls(libc, fd, paths)

    def _directories(self) -> dict[str, frozenset[str] | None]:
        """Directories to watch and the names that matter in each (``None``: any)."""
        dirs: dict[str, frozenset[str] | None] = {}
        for path in self._paths:
            if len(dirs) >= MAX_WATCHES:
                break
            if path.is_dir():
                for root, subdirs, _files in os.walk(path):
                    subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                    dirs[root] = None
                    if len(dirs) >= MAX_WATCHES:
                        break
            else:
                key = str(path.parent)
                if key in dirs:
                    names = dirs[key]
                    dirs[key] = None if names is None else names | {path.name}
                else:
                    dirs[key] = frozenset({path.name})
        return dirs

    def rewatch(self) -> None:
        """Add watches for directories not watched yet (new subdirectories, a parent that
        was re-created). Adding a watch twice is harmless (the kernel reuses it)."""
        self.stale = False
        for key, names in self._directories().items():
            if key in self._watched:
                continue
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(key), _MASK)
            if wd >= 0:
                self._watched.add(key)
                self._names[wd] = names

    def _relevant(self, wd: int, mask: int, name: bytes) -> bool:
        """Whether an event may concern a config file (else, e.g. a temporary file written
        next to it before the rename, it is ignored)."""
        if wd not in self._names or mask & (_IN_Q_OVERFLOW | _IN_ISDIR):
            return True
        names = self._names[wd]
        text = os.fsdecode(name.rstrip(b"\0"))
        if names is None:
            return text.endswith(_SUFFIXES) and not text.startswith(".")
        return text in names

    def drain(self) -> bool:
        """Read every queued event; ``True`` when one may concern a config file.

        A watched directory that went away (``IN_DELETE_SELF``/``IN_MOVE_SELF``) is
        forgotten, and a directory created in a watched one sets :attr:`stale`: the owner
        then calls :meth:`rewatch` (off its event loop: it walks the directories).
        """
        relevant = False
        for _ in range(_MAX_READS):
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                break
            if not data:
                break
            for i in _offsets(data):
                wd = int.from_bytes(data[i : i + 4], sys.byteorder, signed=True)
                mask = int.from_bytes(data[i + 4 : i + 8], sys.byteorder)
                size = int.from_bytes(data[i + 12 : i + 16], sys.byteorder)
                if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED):
                    self._watched.clear()
                    self._names.pop(wd, None)
                    self.stale = relevant = True
                    continue
                if mask & _IN_ISDIR:
                    self.stale = True
                relevant = relevant or self._relevant(wd, mask, data[i + 16 : i + 16 + size])
        return relevant

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


def _offsets(data: bytes) -> list[int]:
    """Start offsets of the ``struct inotify_event`` records in ``data`` (16-byte header:
    wd, mask, cookie, len; then ``len`` bytes of name)."""
    out: list[int] = []
    i = 0
    while i + 16 <= len(data):
        out.append(i)
        i += 16 + int.from_bytes(data[i + 12 : i + 16], sys.byteorder)
    return out
