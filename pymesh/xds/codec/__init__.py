"""The xDS codec: the only place in the client that imports the Envoy protos.

Each resource type has one validating decoder (``listener``, ``route``, ``cluster``,
``endpoint``) that turns serialized proto bytes into a frozen :mod:`pymesh.model` object, or
raises :class:`pymesh.errors.ResourceError` naming the resource and the field. Validation
follows gRPC's xDS clients (gRFC A27 and successors): a supported field with an unsupported
value is an error (the client NACKs); fields we do not implement are ignored.

``decode_resource`` is the one entry point the ADS client uses; decoders register by type URL
(see ``_registry``).
"""

from __future__ import annotations

from pymesh.xds.codec._registry import Decoded, decode_resource, register

__all__ = ["Decoded", "decode_resource", "register"]
