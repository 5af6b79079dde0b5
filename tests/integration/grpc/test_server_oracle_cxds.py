"""Oracle: grpcio's own C-core xDS server (``grpc.server(xds=True)``) and pymesh's server get
the same inbound listeners from one ADS server; the same RPCs must get the same status codes.
One deliberate difference is shown too: C-core NACKs a server listener with a fault filter,
pymesh applies it (as an Envoy inbound listener does).

C-core runs in a subprocess (GRPC_XDS_BOOTSTRAP is read once per process); the pymesh server
runs here. Each case installs one listener for both ports, waits until both apply it, and
compares the answers to a fixed list of RPCs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.listener.v3 import listener_pb2

import pymesh.grpc._server as xds_server
from pymesh.xds.client import XdsClient
from tests.integration.grpc.test_server_xds import (
    SERVICE,
    TEMPLATE,
    echo_handlers,
    fault_filter,
    header_policy,
    inbound_listener,
    listener_name,
    make_bootstrap,
    path_policy,
    rbac_filter,
)
from tests.xdsserver import LDS, XdsTestServer

CORE_SERVER = textwrap.dedent(
    f"""
    import sys
    from concurrent import futures
    import grpc

    def unary(request, context):
        return b"echo:" + request

    server = grpc.server(futures.ThreadPoolExecutor(4), xds=True)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("{SERVICE}", {{
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Other": grpc.unary_unary_rpc_method_handler(unary),
    }})])
    server.add_insecure_port(sys.argv[1])
    server.start()
    print("started", flush=True)
    sys.stdin.read()  # until the test closes stdin
    server.stop(0)
    """
)

# (method, metadata) of every RPC compared in every case.
CALLS: list[tuple[str, tuple[tuple[str, str], ...]]] = [
    ("Unary", ()),
    ("Unary", (("x-user", "bad"),)),
    ("Other", ()),
    ("Other", (("x-user", "good"),)),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answer(channel: grpc.Channel, method: str, metadata: Any) -> tuple[str, str]:
    try:
        channel.unary_unary(f"/{SERVICE}/{method}")(b"x", timeout=5, metadata=metadata)
    except grpc.RpcError as e:
        code = e.code()
        # Codes only: A36's UNAVAILABLE texts are implementation-specific, and for RBAC
        # denials pymesh answers Envoy's "RBAC: access denied" where C-core says
        # "Unauthorized RPC rejected".
        return code.name, ""
    return "OK", ""


def _answers(channel: grpc.Channel) -> list[tuple[str, str]]:
    return [_answer(channel, m, md) for m, md in CALLS]


@pytest.fixture
def ads() -> Iterator[XdsTestServer]:
    with XdsTestServer() as server:
        yield server


@pytest.fixture
def core_port(ads: XdsTestServer, tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "bootstrap.json"
    data = ads.bootstrap_dict()
    data["server_listener_resource_name_template"] = TEMPLATE
    path.write_text(json.dumps(data))
    env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(path)}
    env.pop("GRPC_XDS_BOOTSTRAP_CONFIG", None)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", CORE_SERVER, f"127.0.0.1:{port}"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "started"
    try:
        yield port
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def ours(ads: XdsTestServer) -> Iterator[int]:
    client = XdsClient(make_bootstrap(ads))
    srv = xds_server.server(
        futures.ThreadPoolExecutor(max_workers=4), handlers=echo_handlers(), xds_client=client
    )
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield port
    srv.stop(None).wait(5)
    client.close()


CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "rbac deny header": {
        "filters": [rbac_filter("DENY", {"deny-bad": header_policy("x-user", "bad")})]
    },
    "rbac deny then allow path": {
        "filters": [
            rbac_filter("DENY", {"deny-bad": header_policy("x-user", "bad")}, "rbac.deny"),
            rbac_filter("ALLOW", {"unary": path_policy(f"/{SERVICE}/Unary")}, "rbac.allow"),
        ]
    },
    "rbac allow nothing": {"filters": [rbac_filter("ALLOW", {})]},
    "route action is not served": {"forward_prefixes": [f"/{SERVICE}/Other"]},
}


def _acked_by_both(ads: XdsTestServer, version: str, timeout: float = 15) -> None:
    """Both ADS streams (C-core's and ours) ACKed LDS ``version``."""
    deadline = time.monotonic() + timeout
    while True:
        streams = {
            r.stream
            for r in list(ads.requests)
            if r.type_url == LDS
            and not r.is_nack
            and r.request.version_info == version
            and r.request.response_nonce
        }
        if len(streams) >= 2:
            return
        nacks = [r.request.error_detail.message for r in list(ads.requests) if r.is_nack]
        assert time.monotonic() < deadline, f"LDS version {version} ACKed by {streams}; {nacks}"
        time.sleep(0.02)


def _settled(channel: grpc.Channel, want: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    """The answers once they match ``want`` (or, with ``None``, two equal readings in a
    row): a server may finish switching listeners just after its ACK."""
    deadline = time.monotonic() + 5
    got = _answers(channel)
    while time.monotonic() < deadline:
        again = _answers(channel)
        if (want is None and again == got) or again == want:
            return again
        got = again
        time.sleep(0.05)
    return got


def test_same_answers_as_grpcio_xds_server(ads: XdsTestServer, core_port: int, ours: int) -> None:
    core_channel = grpc.insecure_channel(f"127.0.0.1:{core_port}")
    our_channel = grpc.insecure_channel(f"127.0.0.1:{ours}")
    try:
        results: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {}
        for case, kw in CASES.items():
            listeners: dict[str, listener_pb2.Listener] = {
                listener_name("127.0.0.1", p): inbound_listener(p, **kw) for p in (core_port, ours)
            }
            version = ads.set_resources(LDS, listeners)
            _acked_by_both(ads, version)
            core = _settled(core_channel, None)
            mine = _settled(our_channel, core)
            results[case] = (core, mine)
        mismatches = {c: r for c, r in results.items() if r[0] != r[1]}
        assert not mismatches, json.dumps(mismatches, indent=1)
        # The cases do differ from each other (the oracle saw every config).
        assert results["rbac deny header"][0][1] == ("PERMISSION_DENIED", "")
        assert results["route action is not served"][0][2][0] == "UNAVAILABLE"
        assert results["plain"][0] == [("OK", "")] * len(CALLS)
        # Where pymesh goes beyond C-core: gRPC servers NACK the fault filter ("filter is not
        # supported on servers", A33 is client-side); pymesh applies it, as Envoy's inbound
        # listener does.
        before = len(ads.requests)
        ads.set_resources(
            LDS,
            {
                listener_name("127.0.0.1", p): inbound_listener(
                    p, filters=[fault_filter(abort_grpc=8)]
                )
                for p in (core_port, ours)
            },
        )
        nack = ads.wait_for_request(lambda r: r.type_url == LDS and r.is_nack, start=before)
        assert "not supported on servers" in nack.request.error_detail.message
        assert _settled(our_channel, [("RESOURCE_EXHAUSTED", "")] * len(CALLS))[0][0] == (
            "RESOURCE_EXHAUSTED"
        )
        assert _answers(core_channel) == results["route action is not served"][0]
    finally:
        core_channel.close()
        our_channel.close()
