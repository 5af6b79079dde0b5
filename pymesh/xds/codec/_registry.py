"""Decoders register here by type URL; ``decode_resource`` dispatches to them."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from pymesh.errors import ResourceError
from pymesh.xds.resource_types import ResourceType

__all__ = ["Decoded", "Decoder", "decode_resource", "register"]


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded resource: its name and its frozen model value."""

    name: str
    value: object


Decoder = Callable[[bytes], Decoded]
"""Parse serialized proto bytes of one resource; raise ``ResourceError`` when invalid."""

_DECODERS: dict[str, Decoder] = {}

# Modules whose import registers a decoder. Imported lazily so that importing the registry
# alone stays cheap and free of cycles.
_DECODER_MODULES = (
    "pymesh.xds.codec.listener",
    "pymesh.xds.codec.route",
    "pymesh.xds.codec.cluster",
    "pymesh.xds.codec.endpoint",
)
_loaded = False


def register(resource_type: ResourceType) -> Callable[[Decoder], Decoder]:
    """Class the decorated function as the decoder of ``resource_type``."""

    def wrap(fn: Decoder) -> Decoder:
        _DECODERS[resource_type.type_url] = fn
        return fn

    return wrap


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in _DECODER_MODULES:
            importlib.import_module(module)
        _loaded = True


def decode_resource(type_url: str, data: bytes) -> Decoded:
    """Decode one serialized resource of ``type_url``.

    Raises ``ResourceError`` if the type is unknown or the resource is invalid.
    """
    _load()
    decoder = _DECODERS.get(type_url)
    if decoder is None:
        raise ResourceError(f"unsupported resource type {type_url}", type_name=type_url)
    return decoder(data)
