"""Istio CA wire format; the renewal schedule and backoff (pure, no clock)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymesh.security import renewal_time, retry_delay
from pymesh.security._ca_proto import (
    CREATE_CERTIFICATE,
    CertificateRequest,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


def test_request_wire_format_is_istios() -> None:
    # IstioCertificateRequest{csr=1 string, validity_duration=3 int64, metadata=4 Struct}
    entry = _ld(0x0A, b"k") + _ld(0x12, _ld(0x1A, b"v"))  # Struct.fields map entry
    expected = _ld(0x0A, b"CSR") + b"\x18" + _varint(3600) + _ld(0x22, _ld(0x0A, entry))
    data = encode_request(CertificateRequest("CSR", 3600, {"k": "v"}))
    assert data == expected
    assert decode_request(expected) == CertificateRequest("CSR", 3600, {"k": "v"})


def test_response_wire_format() -> None:
    expected = _ld(0x0A, b"leaf") + _ld(0x0A, b"root")
    assert encode_response(("leaf", "root")) == expected
    assert decode_response(expected) == ("leaf", "root")
    assert CREATE_CERTIFICATE == "/istio.v1.auth.IstioCertificateService/CreateCertificate"


def test_decode_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        decode_request(b"\x0a\xff\xff")


def test_renewal_at_half_life_without_jitter() -> None:
    assert renewal_time(1000.0, 4600.0, fraction=0.5, jitter=0.0, u=0.7) == 2800.0
    assert renewal_time(1000.0, 4600.0, fraction=0.5, jitter=0.1, u=0.0) == 2800.0
    assert renewal_time(1000.0, 4600.0, fraction=0.5, jitter=0.1, u=0.5) == 2710.0


@given(
    nb=st.floats(0, 1e9),
    life=st.floats(60, 1e6),
    fraction=st.floats(0.05, 1.0),
    jitter=st.floats(0, 0.99),
    u=st.floats(0, 0.999999),
)
def test_renewal_inside_lifetime_and_never_later_than_fraction(
    nb: float, life: float, fraction: float, jitter: float, u: float
) -> None:
    t = renewal_time(nb, nb + life, fraction=fraction, jitter=jitter, u=u)
    assert nb <= t <= nb + life * fraction + 1e-6


@pytest.mark.parametrize("bad", [{"fraction": 0.0}, {"fraction": 1.5}, {"jitter": 1.0}])
def test_renewal_rejects_bad_parameters(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        renewal_time(0.0, 10.0, **bad)


def test_backoff_grows_caps_and_respects_expiry() -> None:
    delays = [retry_delay(a, base=1.0, cap=30.0, u=1.0) for a in range(1, 9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert retry_delay(3, base=1.0, cap=30.0, u=0.5) == 2.0
    assert retry_delay(1000, base=1.0, cap=30.0, u=1.0) == 30.0
    # 50 s of lifetime left: never wait more than a tenth of it
    assert retry_delay(8, base=1.0, cap=30.0, u=1.0, now=100.0, not_after=150.0) == 5.0
    assert retry_delay(1, base=1.0, u=0.0) == 0.1  # floor: never a busy loop
