"""Small value types shared by several resource models and the bootstrap."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Locality", "SocketAddress"]


@dataclass(frozen=True, slots=True)
class Locality:
    """Where a node or endpoint runs (Envoy ``core.v3.Locality``). Empty strings mean unset."""

    region: str = ""
    zone: str = ""
    sub_zone: str = ""

    def __str__(self) -> str:
        return "/".join((self.region, self.zone, self.sub_zone)).rstrip("/")


@dataclass(frozen=True, slots=True)
class SocketAddress:
    """An IP (v4 or v6, without brackets) or host name, and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
