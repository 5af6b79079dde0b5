"""The xDS client's view as plain Python data (for ``pymesh proxy-status`` / ``proxy-config``).

``config_dump(client)`` lists every resource the client has subscribed to with its status
(REQUESTED / ACKED / NACKED / DOES_NOT_EXIST), version, last update time, last NACK error and
the resource itself as Envoy JSON; everything in it is JSON-serializable. ``decoded(client)``
gives the same resources as pymesh models. The CSDS gRPC service
(:mod:`pymesh.xds.transport.csds`) reports the same data on the wire.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pymesh.errors import ResourceError
from pymesh.xds.codec import decode_resource
from pymesh.xds.codec.csds import ResourceStatusLike, resource_to_json

__all__ = ["DecodedStatus", "config_dump", "decoded"]


class _StatusClient(Protocol):
    def resource_statuses(self) -> Sequence[ResourceStatusLike]: ...


def _iso(seconds: float) -> str | None:
    if not seconds:
        return None
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).isoformat()


def config_dump(client: _StatusClient, *, include_config: bool = True) -> list[dict[str, Any]]:
    """One JSON-able dict per subscribed resource, sorted by (type, name).

    Keys: ``type`` (LDS/RDS/CDS/EDS), ``type_url``, ``name``, ``status``, ``version``,
    ``last_updated`` (ISO 8601 UTC or ``None``), ``error`` and ``failed_version`` (while the
    resource's latest update stands NACKed, else ``None``) and, with ``include_config``,
    ``config``: the last accepted resource as Envoy JSON (``None`` if none was accepted).
    """
    rows: list[dict[str, Any]] = []
    for status in sorted(client.resource_statuses(), key=lambda s: (s.rtype.type_url, s.name)):
        nacked = status.status == "NACKED"
        row: dict[str, Any] = {
            "type": status.rtype.abbrev,
            "type_url": status.rtype.type_url,
            "name": status.name,
            "status": status.status,
            "version": status.version,
            "last_updated": _iso(status.last_updated),
            "error": status.error if nacked else None,
            "failed_version": status.failed_version if nacked else None,
        }
        if include_config:
            row["config"] = (
                resource_to_json(status.rtype.type_url, status.raw)
                if status.raw is not None
                else None
            )
        rows.append(row)
    return rows


@dataclass(frozen=True, slots=True)
class DecodedStatus:
    """One resource's status with its decoded model (``None`` if none was accepted)."""

    status: ResourceStatusLike
    value: object | None


def decoded(client: _StatusClient) -> list[DecodedStatus]:
    """Every subscribed resource with its last accepted value decoded into a pymesh model."""
    result: list[DecodedStatus] = []
    for status in sorted(client.resource_statuses(), key=lambda s: (s.rtype.type_url, s.name)):
        value: object | None = getattr(status, "value", None)  # the client keeps it decoded
        if value is None and status.raw is not None:
            try:
                value = decode_resource(status.rtype.type_url, status.raw).value
            except ResourceError:
                value = None
        result.append(DecodedStatus(status, value))
    return result
