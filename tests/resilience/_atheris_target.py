"""atheris (libFuzzer) driver: ``python _atheris_target.py TARGET [libFuzzer flags] [CORPUS]``.

TARGET is one of ``TARGETS``; only the decoder's documented error (a ``PymeshError``) may
escape, anything else is a crash (libFuzzer reports it and exits non-zero). The pymesh
modules are instrumented for coverage feedback.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import atheris

with atheris.instrument_imports(include=["pymesh"]):
    import importlib
    import pkgutil

    import pymesh.xds.codec
    from pymesh.bootstrap import parse_bootstrap
    from pymesh.errors import PymeshError
    from pymesh.security import CertificateBundle, verify_token
    from pymesh.xds.codec import decode_resource
    from pymesh.xds.codec.discovery import decode_response
    from pymesh.xds.resource_types import ResourceType

    for _m in pkgutil.iter_modules(pymesh.xds.codec.__path__):  # decoders register lazily
        importlib.import_module(f"pymesh.xds.codec.{_m.name}")


def _xds(rtype: ResourceType):  # type: ignore[no-untyped-def]
    def run(data: bytes) -> None:
        decode_resource(rtype.type_url, data)

    return run


def _bootstrap(data: bytes) -> None:
    parse_bootstrap(data.decode("utf-8", "replace"), source="fuzz")


def _pem(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    chain = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    key = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    CertificateBundle.from_pem(chain, key, fdp.ConsumeBytes(fdp.remaining_bytes()))


def _token(data: bytes) -> None:
    verify_token(data.decode("latin-1"), (_KEY,), issuer="pymesh", now=time.time())


_KEY: Any = None
TARGETS = {
    "lds": _xds(ResourceType.LISTENER),
    "rds": _xds(ResourceType.ROUTE_CONFIGURATION),
    "cds": _xds(ResourceType.CLUSTER),
    "eds": _xds(ResourceType.CLUSTER_LOAD_ASSIGNMENT),
    "ads": decode_response,
    "bootstrap": _bootstrap,
    "pem": _pem,
    "token": _token,
}


def main() -> None:
    global _KEY
    from cryptography.hazmat.primitives.asymmetric import ec

    _KEY = ec.generate_private_key(ec.SECP256R1()).public_key()
    target = TARGETS[sys.argv[1]]

    def one(data: bytes) -> None:
        try:
            target(data)
        except PymeshError:
            pass

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
