"""The server's fast W3C ``traceparent`` path agrees with the general parser."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pymesh.telemetry._propagation import _traceparent, extract_ids

HEX = "0123456789abcdefABCDEF"


def _ids(value: str) -> tuple[int, int, bool] | None:
    found = _traceparent(value)
    if found is None:
        return None
    return found.trace_id, found.span_id, found.trace_flags.sampled


@given(
    st.sampled_from(["00", "01", "ff", "0"]),
    st.text(HEX, min_size=31, max_size=33),
    st.text(HEX, min_size=15, max_size=17),
    st.text(HEX + "x", min_size=1, max_size=3),
    st.sampled_from(["", "-extra", " "]),
)
def test_fast_path_matches_the_parser(
    version: str, trace: str, span: str, flags: str, tail: str
) -> None:
    value = f"{version}-{trace}-{span}-{flags}{tail}"
    assert extract_ids({"traceparent": value}.get) == _ids(value), value


def test_zero_ids_and_sampling_bit() -> None:
    zero = "00-" + "0" * 32 + "-b7ad6b7169203331-01"
    assert extract_ids({"traceparent": zero}.get) is None
    ok = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03"
    assert extract_ids({"traceparent": ok}.get) == (
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        True,
    )


def test_peer_exchange_from_the_environment() -> None:
    import pytest

    from pymesh import telemetry
    from pymesh.errors import ConfigError

    env = {"PYMESH_TELEMETRY": "on", "PYMESH_PROMETHEUS_ADDRESS": "off"}
    for value, expected in (("off", False), ("on", True), (None, True)):
        tel = telemetry.configure_from_env(
            env=env if value is None else {**env, "PYMESH_PEER_EXCHANGE": value}
        )
        assert tel is not None
        try:
            assert tel.peer_exchange is expected
        finally:
            tel.close()
    with pytest.raises(ConfigError, match="PYMESH_PEER_EXCHANGE"):
        telemetry.configure_from_env(env={**env, "PYMESH_PEER_EXCHANGE": "maybe"})
