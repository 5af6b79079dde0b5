"""Frozen, proto-free models of decoded xDS resources.

Everything here is immutable (``@dataclass(frozen=True, slots=True)``, tuples, frozensets,
read-only mappings) so a snapshot can be shared by every request without locks. Durations are
``float`` seconds; ``None`` means "not set" where the proto distinguishes it.
Nothing in this package imports protobuf, grpcio or any I/O library.
"""
