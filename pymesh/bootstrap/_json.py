"""Deep-frozen JSON values: what opaque bootstrap data (node metadata, plugin configs) becomes.

Objects become read-only mappings (``types.MappingProxyType``) and arrays become tuples, so a
parsed bootstrap can be shared across threads without anyone mutating it. ``thaw_json`` turns
a frozen value back into plain ``dict``/``list`` data, e.g. to build the Node proto or to
write JSON again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import TypeAlias

__all__ = ["JsonValue", "canonical_json", "freeze_json", "thaw_json"]

JsonValue: TypeAlias = (
    bool | int | float | str | tuple["JsonValue", ...] | Mapping[str, "JsonValue"] | None
)
"""A deep-frozen JSON value."""

_EMPTY: Mapping[str, JsonValue] = MappingProxyType({})


def freeze_json(value: object) -> JsonValue:
    """Return ``value`` (as produced by :func:`json.loads`) with every container frozen."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): freeze_json(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze_json(v) for v in value)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def freeze_object(value: Mapping[str, object] | None) -> Mapping[str, JsonValue]:
    """Freeze a JSON object (``None`` gives an empty read-only mapping)."""
    if not value:
        return _EMPTY
    return MappingProxyType({str(k): freeze_json(v) for k, v in value.items()})


def thaw_json(value: JsonValue) -> object:
    """Return a plain ``dict``/``list`` copy of a frozen JSON value."""
    if isinstance(value, Mapping):
        return {k: thaw_json(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw_json(v) for v in value]
    return value


def canonical_json(value: JsonValue) -> str:
    """A stable text form of a frozen value (sorted keys), usable as a hash or dedup key."""
    return json.dumps(thaw_json(value), sort_keys=True, separators=(",", ":"))
