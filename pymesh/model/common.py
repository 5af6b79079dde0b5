"""Small value types shared by several resource models and the bootstrap."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Locality", "SocketAddress"]


@dataclass(frozen=True, slots=True)
class Locality:
    """Where a node or endpoint runs (Envoy ``core.v3.Locality``). Empty strings mean unset."""

    region: str = ""
    zone: str = ""
    sub_zone: str = ""
    # Load balancers group every host by locality on each rebuild (10,000 hosts: 40,000
    # lookups): the hash is computed once, not per lookup as the generated one would.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.region, self.zone, self.sub_zone)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[Locality], tuple[str, str, str]]:
        # str hashes differ between processes: a copy or an unpickled object hashes anew
        return (Locality, (self.region, self.zone, self.sub_zone))

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
