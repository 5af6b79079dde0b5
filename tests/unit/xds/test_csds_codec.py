"""The CSDS codec: ClientStatusResponse from resource statuses, and config dumps as JSON."""

from __future__ import annotations

import json

import pytest
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.status.v3 import csds_pb2
from google.protobuf import any_pb2

from pymesh.bootstrap import parse_bootstrap
from pymesh.errors import XdsError
from pymesh.xds.ads import ResourceStatus
from pymesh.xds.codec.csds import (
    decode_status_request,
    decode_status_response,
    encode_status_response,
    resource_to_json,
)
from pymesh.xds.resource_types import ResourceType

BOOTSTRAP = parse_bootstrap(
    json.dumps(
        {
            "xds_servers": [
                {"server_uri": "127.0.0.1:15010", "channel_creds": [{"type": "insecure"}]}
            ],
            "node": {
                "id": "sidecar~10.0.0.1~app.default~default.svc.cluster.local",
                "locality": {"region": "r1", "zone": "z1"},
                "metadata": {"NAMESPACE": "default"},
            },
        }
    ),
    source="test",
)
CLUSTER = cluster_pb2.Cluster(name="c1", type=cluster_pb2.Cluster.EDS)


def status(name: str, state: str, **kwargs: object) -> ResourceStatus:
    fields: dict[str, object] = {
        "rtype": ResourceType.CLUSTER,
        "name": name,
        "status": state,
        "version": "",
        "raw": None,
        "last_updated": 0.0,
        "error": None,
        "failed_version": None,
    }
    fields.update(kwargs)
    return ResourceStatus(**fields)  # type: ignore[arg-type]


def encode(*statuses: ResourceStatus, exclude: bool = False) -> csds_pb2.ClientStatusResponse:
    data = encode_status_response(BOOTSTRAP.node, statuses, exclude_resource_contents=exclude)
    return csds_pb2.ClientStatusResponse.FromString(data)


def test_statuses_map_to_generic_xds_configs() -> None:
    raw = CLUSTER.SerializeToString()
    response = encode(
        status("c1", "ACKED", version="7", raw=raw, last_updated=1_700_000_000.25),
        status(
            "c2",
            "NACKED",
            version="6",
            raw=raw,
            last_updated=1_700_000_001.0,
            error="Cluster 'c2': field lb_policy: unsupported",
            failed_version="7",
        ),
        status("c3", "DOES_NOT_EXIST"),
        status("c4", "REQUESTED"),
    )
    [config] = response.config
    assert config.node.id == BOOTSTRAP.node.id and config.node.locality.zone == "z1"
    by = {c.name: c for c in config.generic_xds_configs}
    assert [c.name for c in config.generic_xds_configs] == ["c1", "c2", "c3", "c4"]
    c1 = by["c1"]
    assert c1.client_status == config_dump_shared_pb2.ACKED and c1.version_info == "7"
    assert c1.xds_config.type_url == ResourceType.CLUSTER.type_url
    assert c1.xds_config.value == raw
    assert c1.last_updated.seconds == 1_700_000_000 and c1.last_updated.nanos == 250_000_000
    assert not c1.HasField("error_state")
    c2 = by["c2"]
    assert c2.client_status == config_dump_shared_pb2.NACKED
    assert c2.version_info == "6"  # the version still in use
    assert c2.error_state.version_info == "7" and "lb_policy" in c2.error_state.details
    assert c2.error_state.last_update_attempt.seconds == 1_700_000_001
    assert by["c3"].client_status == config_dump_shared_pb2.DOES_NOT_EXIST
    assert by["c4"].client_status == config_dump_shared_pb2.REQUESTED
    assert not by["c4"].HasField("xds_config")


def test_old_nack_detail_is_not_reported_once_acked() -> None:
    response = encode(
        status("c1", "ACKED", version="8", raw=b"", error="old problem", failed_version="7")
    )
    [generic] = response.config[0].generic_xds_configs
    assert not generic.HasField("error_state")


def test_exclude_resource_contents() -> None:
    response = encode(status("c1", "ACKED", raw=CLUSTER.SerializeToString()), exclude=True)
    assert not response.config[0].generic_xds_configs[0].HasField("xds_config")


def test_decode_status_request() -> None:
    request = csds_pb2.ClientStatusRequest(exclude_resource_contents=True)
    request.node.id = "n1"
    decoded = decode_status_request(request.SerializeToString())
    assert decoded.exclude_resource_contents and decoded.node_id == "n1"
    with pytest.raises(XdsError, match="ClientStatusRequest"):
        decode_status_request(b"\xff\xff\xff")


def test_decode_status_response_round_trip() -> None:
    as_json = decode_status_response(encode(status("c1", "ACKED")).SerializeToString())
    assert as_json["config"][0]["generic_xds_configs"][0]["client_status"] == "ACKED"


def test_resource_to_json_renders_unknown_extension_types() -> None:
    listener = listener_pb2.Listener(name="l1")
    private = any_pb2.Any(
        type_url="type.googleapis.com/istio.stats.PluginConfig", value=b"\x08\x01"
    )
    listener.listener_filters.add(name="istio.stats").typed_config.CopyFrom(private)
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="outbound")
    hcm.http_filters.add(name="istio.metadata_exchange").typed_config.CopyFrom(private)
    listener.api_listener.api_listener.Pack(hcm)
    result = resource_to_json(ResourceType.LISTENER.type_url, listener.SerializeToString())
    assert result is not None and result["name"] == "l1"
    inner = result["api_listener"]["api_listener"]
    assert inner["stat_prefix"] == "outbound"
    unknown = inner["http_filters"][0]["typed_config"]["value"]
    assert unknown["unknown_type"] == "type.googleapis.com/istio.stats.PluginConfig"
    assert result["listener_filters"][0]["typed_config"]["value"]["value_base64"] == "CAE="
    json.dumps(result)


def test_resource_to_json_unknown_or_garbage() -> None:
    assert resource_to_json("type.googleapis.com/no.such.Type", b"") is None
    assert resource_to_json(ResourceType.CLUSTER.type_url, b"\xff\xff\xff") is None
