"""The inbound path normalizer, on the cases held against Envoy in
tests/resilience/test_path_normalization.py (which runs the real binary), and the codec's
reading of the HCM fields that drive it."""

from __future__ import annotations

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from pymesh.core.path_normalization import REJECT, normalize
from pymesh.errors import ResourceError
from pymesh.model.listener import EscapedSlashesAction as Action
from pymesh.model.listener import PathNormalization
from pymesh.xds.codec._common import Ctx
from pymesh.xds.codec.listener import decode_http_connection_manager

BASE = PathNormalization(True, False, Action.KEEP_UNCHANGED)
MERGE = PathNormalization(True, True, Action.KEEP_UNCHANGED)
DECODE = PathNormalization(True, True, Action.UNESCAPE_AND_FORWARD)
NONE = PathNormalization(False, False, Action.KEEP_UNCHANGED)
REJECTING = PathNormalization(True, False, Action.REJECT_REQUEST)
REDIRECTING = PathNormalization(True, True, Action.UNESCAPE_AND_REDIRECT)

CASES: list[tuple[str, PathNormalization, bytes | int, bool]] = [
    ("/app/../admin", BASE, b"/admin", False),
    ("/app/%2E./admin", BASE, b"/admin", False),
    ("/%61dmin", BASE, b"/admin", False),
    ("/%2561dmin", BASE, b"/%2561dmin", False),  # decoded once only
    ("/app\\admin", BASE, b"/app/admin", False),
    ("/a/..", BASE, b"/", False),
    ("/a/.", BASE, b"/a/", False),
    ("/public/../../admin", BASE, b"/admin", False),
    ("//admin", BASE, b"//admin", False),
    ("/%2fadmin", BASE, b"/%2fadmin", False),  # escapes kept as written
    ("/%c0%2e%c0%2e/admin", BASE, b"/%c0.%c0./admin", False),
    ("/admin%00", BASE, REJECT, False),
    ("/admin%00", NONE, b"/admin%00", False),
    ("/public/../admin", NONE, b"/public/../admin", False),
    ("//admin", MERGE, b"/admin", False),
    ("/app/\\/\\/\\admin", MERGE, b"/app/admin", False),
    ("/app//../admin", MERGE, b"/app/admin", False),
    ("/xyz%30..//abc", MERGE, b"/xyz0../abc", False),
    ("/%2Fadmin", MERGE, b"/%2Fadmin", False),
    ("/%2Fadmin", DECODE, b"/admin", False),
    ("/public/..%2Fadmin", DECODE, b"/admin", False),
    ("/%2Fapp%5cadmin%5Cabc", DECODE, b"/app/admin/abc", False),
    ("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", DECODE, b"/app/admin/abc", False),
    ("/%c0%2fadmin", DECODE, b"/%c0/admin", False),
    ("/%2Fadmin", REJECTING, REJECT, False),
    ("/%5cadmin", REJECTING, REJECT, False),
    ("/admin", REJECTING, b"/admin", False),
    ("/a%2Fb/..", REDIRECTING, b"/a/", True),
    ("/public/../admin", REDIRECTING, b"/admin", False),
]


@pytest.mark.parametrize(("path", "policy", "want", "redirect"), CASES)
def test_normalize(path: str, policy: PathNormalization, want: bytes | int, redirect: bool) -> None:
    got = normalize(path.encode("latin-1"), policy)
    assert got == (want if isinstance(want, int) else (want, redirect))


def _decode(hcm: hcm_pb2.HttpConnectionManager) -> PathNormalization:
    hcm.route_config.name = "r"
    hcm.http_filters.add(
        name="router"
    ).typed_config.type_url = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    return decode_http_connection_manager(hcm, Ctx("LDS", "l"), "hcm").path_normalization


def test_codec_reads_the_hcm_fields() -> None:
    # unset normalize_path: normalized anyway (istiod's sidecar default; see PathNormalization)
    assert _decode(hcm_pb2.HttpConnectionManager()).normalize is True
    off = hcm_pb2.HttpConnectionManager(merge_slashes=True)
    off.normalize_path.value = False
    off.path_with_escaped_slashes_action = hcm_pb2.HttpConnectionManager.REJECT_REQUEST
    assert _decode(off) == PathNormalization(False, True, Action.REJECT_REQUEST)
    bad = hcm_pb2.HttpConnectionManager()
    bad.path_with_escaped_slashes_action = 99  # type: ignore[assignment]
    with pytest.raises(ResourceError, match="path_with_escaped_slashes_action"):
        _decode(bad)
