"""Typed, path-aware access to one YAML mapping.

A :class:`Reader` wraps a mapping and the dotted path that leads to it. Every accessor checks
the type, reports a problem to the document's :class:`IssueSink` with the full field path and
returns a safe default, so one parse run reports every problem of a document at once.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable, Mapping
from typing import Any

from pymesh.controlplane.config._issues import IssueSink

__all__ = ["Reader", "parse_duration"]

_Str = str
_Int = int
_Float = float
_Bool = bool

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """Parse a protobuf JSON / Go duration (``"1.5s"``, ``"100ms"``, ``"1h30m"``) to seconds.

    Returns ``None`` when the text is not a duration.
    """
    text = text.strip()
    if not text:
        return None
    pos = 0
    total = 0.0
    for _ in range(len(text)):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
        if pos == len(text):
            return total
    return None


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    if value is None:
        return "null"
    return type(value).__name__


class Reader:
    """Read fields of ``data`` (the value found at ``path``)."""

    def __init__(self, data: Mapping[_Str, Any], path: _Str, sink: IssueSink):
        self.data = data
        self.path = path
        self.sink = sink

    def field(self, key: _Str) -> _Str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: _Str) -> _Bool:
        return key in self.data and self.data[key] is not None

    def error(self, key: _Str, message: _Str) -> None:
        self.sink.error(self.field(key) if key else self.path, message)

    def warn(self, key: _Str, message: _Str) -> None:
        self.sink.warn(self.field(key) if key else self.path, message)

    def known(self, keys: Iterable[_Str], *, ignored: Iterable[_Str] = ()) -> None:
        """Report fields that are not in ``keys``; ``ignored`` ones get a warning instead."""
        allowed = set(keys)
        skip = set(ignored)
        for key in self.data:
            if key in skip:
                self.warn(str(key), "field is not supported by pymesh and is ignored")
            elif key not in allowed:
                self.error(str(key), "unknown field")

    def _get(self, key: _Str, types_: tuple[type, ...], expected: _Str) -> Any:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) and bool not in types_:
            self.error(key, f"expected {expected}, got {_type_name(value)}")
            return None
        if not isinstance(value, types_):
            self.error(key, f"expected {expected}, got {_type_name(value)}")
            return None
        return value

    def str(self, key: _Str, default: _Str = "", *, required: _Bool = False) -> _Str:
        value = self._get(key, (str,), "a string")
        if value is None:
            if required and key not in self.data:
                self.error(key, "required field is missing")
            return default
        if required and not value:
            self.error(key, "must not be empty")
        return str(value)

    def int(
        self,
        key: _Str,
        default: _Int | None = None,
        *,
        minimum: _Int | None = None,
        maximum: _Int | None = None,
        required: _Bool = False,
    ) -> int | None:
        value = self.data.get(key)
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            value = int(value)  # Kubernetes-style YAML often quotes numbers
        if value is None:
            if required:
                self.error(key, "required field is missing")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"expected an integer, got {_type_name(value)}")
            return default
        if minimum is not None and value < minimum:
            self.error(key, f"must be >= {minimum}, got {value}")
            return default
        if maximum is not None and value > maximum:
            self.error(key, f"must be <= {maximum}, got {value}")
            return default
        return value

    def port(self, key: _Str, *, required: _Bool = False) -> _Int | None:
        return self.int(key, minimum=1, maximum=65535, required=required)

    def float(
        self,
        key: _Str,
        default: _Float | None = None,
        *,
        minimum: _Float | None = None,
        maximum: _Float | None = None,
    ) -> float | None:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(key, f"expected a number, got {_type_name(value)}")
            return default
        out = float(value)
        if minimum is not None and out < minimum:
            self.error(key, f"must be >= {minimum:g}, got {out:g}")
            return default
        if maximum is not None and out > maximum:
            self.error(key, f"must be <= {maximum:g}, got {out:g}")
            return default
        return out

    def bool(self, key: _Str, default: _Bool | None = None) -> _Bool | None:
        value = self._get(key, (bool,), "a boolean")
        return default if value is None else bool(value)

    def duration(self, key: _Str, *, positive: _Bool = False) -> _Float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(key, f"expected a duration string such as '1.5s', got {_type_name(value)}")
            return None
        seconds = parse_duration(value)
        if seconds is None:
            self.error(key, f"invalid duration {value!r} (expected e.g. '10s', '250ms', '1m')")
            return None
        if positive and seconds <= 0:
            self.error(key, f"duration must be > 0, got {value!r}")
            return None
        if seconds < 0.001 and seconds != 0:
            self.error(key, f"duration must be >= 1ms, got {value!r}")
            return None
        return seconds

    def enum(self, key: _Str, allowed: Iterable[_Str], default: _Str) -> _Str:
        value = self.str(key, default)
        options = tuple(allowed)
        if value not in options:
            self.error(key, f"invalid value {value!r}; expected one of {', '.join(options)}")
            return default
        return value

    def strs(self, key: _Str) -> tuple[_Str, ...]:
        value = self._get(key, (list,), "a list of strings")
        if value is None:
            return ()
        out: list[_Str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.sink.error(
                    f"{self.field(key)}[{i}]", f"expected a string, got {_type_name(item)}"
                )
                continue
            out.append(item)
        return tuple(out)

    def str_map(self, key: _Str) -> Mapping[_Str, _Str]:
        value = self._get(key, (dict,), "a mapping of strings")
        if value is None:
            return types.MappingProxyType({})
        out: dict[_Str, _Str] = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                self.sink.error(f"{self.field(key)}.{k}", f"expected a string, got {_type_name(v)}")
                continue
            out[str(k)] = str(v)
        return types.MappingProxyType(out)

    def sub(self, key: _Str) -> Reader | None:
        value = self._get(key, (dict,), "a mapping")
        if value is None:
            return None
        return Reader(value, self.field(key), self.sink)

    def sub_or_empty(self, key: _Str) -> Reader:
        return self.sub(key) or Reader({}, self.field(key), self.sink)

    def items(self, key: _Str) -> list[Reader]:
        value = self._get(key, (list,), "a list")
        if value is None:
            return []
        out: list[Reader] = []
        for i, item in enumerate(value):
            path = f"{self.field(key)}[{i}]"
            if not isinstance(item, dict):
                self.sink.error(path, f"expected a mapping, got {_type_name(item)}")
                continue
            out.append(Reader(item, path, self.sink))
        return out

    def map_items(self, key: _Str) -> list[tuple[_Str, Reader]]:
        """A mapping whose values are mappings (``headers: {name: {exact: v}}``)."""
        value = self._get(key, (dict,), "a mapping")
        if value is None:
            return []
        out: list[tuple[_Str, Reader]] = []
        for k, item in value.items():
            path = f"{self.field(key)}.{k}"
            if item is None:
                item = {}
            if not isinstance(item, dict):
                self.sink.error(path, f"expected a mapping, got {_type_name(item)}")
                continue
            out.append((str(k), Reader(item, path, self.sink)))
        return out
