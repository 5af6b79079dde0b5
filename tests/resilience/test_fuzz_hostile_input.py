"""Hostile and malformed input (hypothesis) against every decoder fed from the network or a file.

Each test drives one decoder with generated input and asserts that only the decoder's
documented error escapes (a :class:`pymesh.errors.PymeshError` subclass: ``ResourceError``,
``XdsError``, ``BootstrapError``, ``ConfigError``, ``TokenError``, ``CaRefused``; the CA's
request parser documents ``ValueError`` for grpc's deserializer) and that no single input
takes longer than ``SLOW_INPUT`` seconds (a hang or catastrophic backtracking). The number of
inputs each run tried is reported. ``PYMESH_FUZZ_EXAMPLES`` sets the examples per test
(default 400).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import random
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymesh.bootstrap import parse_bootstrap
from pymesh.controlplane.ca import CertificateAuthority
from pymesh.controlplane.config import load_config
from pymesh.core.hashing import request_hash
from pymesh.core.routing import choose_cluster, rewrite_request, route_request
from pymesh.core.types import Headers, RequestInfo
from pymesh.errors import PymeshError, ResourceError
from pymesh.model.route import RouteAction, RouteConfiguration
from pymesh.security import CertificateBundle, build_csr, generate_key, verify_token
from pymesh.security._ca_proto import decode_request
from pymesh.security._pki import cert_pem, certs_from_pem, key_pem, uri_sans
from pymesh.security._spiffe import SpiffeId
from pymesh.xds.codec import decode_resource
from pymesh.xds.codec.discovery import decode_delta_response, decode_response
from pymesh.xds.resource_types import ResourceType
from tests.integration.httpx.conftest import service_yaml
from tests.resilience._fuzz_inputs import HOSTILE_STRINGS, flip_bytes, mutate, seeds

EXAMPLES = int(os.environ.get("PYMESH_FUZZ_EXAMPLES", "400"))
SLOW_INPUT = 2.0  # seconds: any single input slower than this is a hang
SEEDS = seeds()
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


class Counter:
    """Counts inputs and the documented errors; fails on a slow input."""

    def __init__(self) -> None:
        self.cases = 0
        self.rejected = 0
        self.slowest = 0.0

    def run(self, fn: Callable[[], object], allowed: tuple[type[BaseException], ...]) -> None:
        self.cases += 1
        start = time.perf_counter()
        try:
            fn()
        except allowed:
            self.rejected += 1
        finally:
            took = time.perf_counter() - start
            self.slowest = max(self.slowest, took)
        assert took < SLOW_INPUT, f"one input took {took:.1f} s"

    def note(self) -> str:
        slowest = self.slowest * 1000
        return f"{self.rejected:,} rejected with the documented error, slowest {slowest:.0f} ms"


@pytest.fixture
def counter() -> Iterator[Counter]:
    yield Counter()


@pytest.fixture(autouse=True)
def memory_cap() -> Iterator[None]:
    """An input that makes a decoder allocate without bound fails here with MemoryError
    (not a documented error) instead of taking the machine down: the address space may grow
    by 3 GiB at most while a fuzz test runs."""
    vm = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmSize:")
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _chooser(data: st.DataObject) -> Callable[[int], int]:
    def choose(n: int) -> int:
        return 0 if n <= 1 else data.draw(st.integers(0, n - 1))

    return choose


# -- xDS resources -------------------------------------------------------------------------

RESOURCE_TYPES = [
    ResourceType.LISTENER,
    ResourceType.ROUTE_CONFIGURATION,
    ResourceType.CLUSTER,
    ResourceType.CLUSTER_LOAD_ASSIGNMENT,
]


@pytest.mark.parametrize("rtype", RESOURCE_TYPES, ids=lambda r: r.name)
def test_xds_resource_raw_bytes(rtype: ResourceType, counter: Counter, record: Any) -> None:
    """Random bytes and byte-damaged serialized seeds: ResourceError or a valid decode."""
    serialized = [m.SerializeToString() for m in SEEDS[rtype]]
    assert serialized

    @SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        if data.draw(st.booleans()):
            raw = data.draw(st.binary(max_size=2048))
        else:
            seed = serialized[data.draw(st.integers(0, len(serialized) - 1))]
            raw = flip_bytes(seed, _chooser(data), data.draw(st.integers(1, 8)))
        counter.run(lambda: decode_resource(rtype.type_url, raw), (PymeshError,))

    run()
    record(f"xDS {rtype.name} bytes (random, damaged)", cases=counter.cases, note=counter.note())
    assert counter.cases >= EXAMPLES // 2


@pytest.mark.parametrize("rtype", RESOURCE_TYPES, ids=lambda r: r.name)
def test_xds_resource_hostile_fields(rtype: ResourceType, counter: Counter, record: Any) -> None:
    """Structurally valid protos (the seeds) with hostile field values."""
    protos = SEEDS[rtype]

    @SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        msg = copy.deepcopy(protos[data.draw(st.integers(0, len(protos) - 1))])
        mutate(msg, _chooser(data), budget=[data.draw(st.integers(1, 6))])
        try:
            raw = msg.SerializeToString()
        except Exception:  # e.g. a string the protobuf runtime refuses to encode
            return
        counter.run(lambda: decode_resource(rtype.type_url, raw), (PymeshError,))

    run()
    record(f"xDS {rtype.name} hostile field values", cases=counter.cases, note=counter.note())
    assert counter.cases >= EXAMPLES // 2


def test_discovery_responses(counter: Counter, record: Any) -> None:
    """Whole DiscoveryResponse / DeltaDiscoveryResponse bytes from the stream."""
    from envoy.service.discovery.v3 import discovery_pb2

    good = discovery_pb2.DiscoveryResponse(
        version_info="1", nonce="n", type_url=RESOURCE_TYPES[2].type_url
    )
    for m in SEEDS[ResourceType.CLUSTER]:
        good.resources.add().Pack(m)
    good_raw = good.SerializeToString()

    @SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        raw = flip_bytes(good_raw, _chooser(data), data.draw(st.integers(1, 8)))
        if data.draw(st.booleans()):
            counter.run(lambda: decode_response(raw), (PymeshError,))
        else:
            counter.run(lambda: decode_delta_response(raw), (PymeshError,))

    run()
    record("ADS DiscoveryResponse bytes", cases=counter.cases, note=counter.note())


# -- bootstrap JSON --------------------------------------------------------------------------

JSON_HOSTILE: list[Any] = [
    None,
    True,
    0,
    -1,
    2**70,
    1.5,
    "",
    "x" * 10_000,
    [],
    {},
    [[[]]],
    {"": {}},
]


def _mutate_json(value: Any, choose: Callable[[int], int], depth: int = 0) -> Any:
    if depth > 6:
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            c = choose(8)
            if c == 0:
                continue  # drop the key
            out[k] = (
                JSON_HOSTILE[choose(len(JSON_HOSTILE))]
                if c == 1
                else _mutate_json(v, choose, depth + 1)
            )
        if choose(6) == 0:
            out[HOSTILE_STRINGS[choose(len(HOSTILE_STRINGS))]] = JSON_HOSTILE[
                choose(len(JSON_HOSTILE))
            ]
        return out
    if isinstance(value, list):
        return [_mutate_json(v, choose, depth + 1) for v in value] * (1 + choose(2))
    if choose(4) == 0:
        return JSON_HOSTILE[choose(len(JSON_HOSTILE))]
    return value


def test_bootstrap_json(counter: Counter, record: Any) -> None:
    base = json.loads((FIXTURES / "bootstrap" / "istio-agent-grpc-bootstrap.json").read_text())
    base_text = json.dumps(base)

    @SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        kind = data.draw(st.integers(0, 2))
        if kind == 0:
            text = json.dumps(_mutate_json(base, _chooser(data)))
        elif kind == 1:
            raw = flip_bytes(base_text.encode(), _chooser(data), data.draw(st.integers(1, 6)))
            text = raw.decode("utf-8", "replace")
        else:
            text = data.draw(st.text(max_size=300))
        counter.run(lambda: parse_bootstrap(text, source="fuzz"), (PymeshError,))

    run()
    record("bootstrap JSON", cases=counter.cases, note=counter.note())


# -- Istio YAML --------------------------------------------------------------------------------

YAML_SEEDS = [
    service_yaml(
        {"v1": 8001, "v2": 8002},
        virtual_service="""\
            http:
            - match: [{headers: {end-user: {exact: jason}}, uri: {prefix: /a}}]
              route: [{destination: {host: echo.default.svc.cluster.local, subset: v2}}]
              retries: {attempts: 3, perTryTimeout: 1s, retryOn: 5xx}
              timeout: 2s
              fault: {delay: {percentage: {value: 10}, fixedDelay: 1s}}
            - route:
              - {destination: {host: echo.default.svc.cluster.local, subset: v1}, weight: 90}
              - {destination: {host: echo.default.svc.cluster.local, subset: v2}, weight: 10}
            """,
        destination_rule="""\
            trafficPolicy:
              connectionPool: {http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}}
              outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m}
              loadBalancer: {consistentHash: {httpHeaderName: x-user}}
            """,
        extra="""\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/a]}}]
    to: [{operation: {methods: [GET], paths: [/x*]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: STRICT}}
""",
    )
]


def test_istio_yaml(counter: Counter, record: Any, tmp_path: Path) -> None:
    docs = [list(yaml.safe_load_all(text)) for text in YAML_SEEDS]
    target = tmp_path / "mesh.yaml"
    refused = [0]

    def load() -> None:
        cfg, issues = load_config([target])
        assert cfg is not None or issues  # a refused config always says why
        if cfg is None:
            refused[0] += 1

    @SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        choose = _chooser(data)
        kind = data.draw(st.integers(0, 2))
        if kind == 0:
            mutated = [_mutate_json(d, choose) for d in docs[0]]
            text = yaml.safe_dump_all(mutated)
        elif kind == 1:
            raw = flip_bytes(YAML_SEEDS[0].encode(), choose, data.draw(st.integers(1, 6)))
            text = raw.decode("utf-8", "replace")
        else:
            text = data.draw(
                st.sampled_from(
                    [
                        "a: &a [*a]",  # recursive alias
                        "- " * 200 + "x",
                        "{" * 500,
                        "!!python/object:os.system {}",
                        "a: !!binary AAAA",
                        "\t\x00",
                        "---\n" * 300,
                        "kind: VirtualService\nspec: " + "[" * 50 + "]" * 50,
                    ]
                )
            )
        target.write_text(text)
        counter.run(load, (PymeshError,))

    run()
    record(
        "Istio YAML",
        cases=counter.cases,
        note=f"{refused[0]:,} configs refused with their issues listed; " + counter.note(),
    )


# -- certificates, CSRs, tokens -----------------------------------------------------------------


@pytest.fixture(scope="module")
def authority() -> Iterator[CertificateAuthority]:
    with tempfile.TemporaryDirectory() as d:
        yield CertificateAuthority(Path(d) / "ca")


_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def _pem_damage(pem: bytes, choose: Callable[[int], int], data: st.DataObject) -> bytes:
    kind = data.draw(st.integers(0, 3))
    if kind == 0:
        return flip_bytes(pem, choose, data.draw(st.integers(1, 6)))
    lines = pem.splitlines()
    if kind == 1 and len(lines) > 2:  # damage inside the base64 body (valid base64, bad DER)
        b64 = bytes(c for c in b"".join(lines[1:-1]) if c in _B64_ALPHABET)
        b64 = b64[: len(b64) - len(b64) % 4]  # the body may span several PEM blocks
        body = bytearray(base64.b64decode(b64, validate=False))
        body = bytearray(flip_bytes(bytes(body), choose, data.draw(st.integers(1, 4))))
        return lines[0] + b"\n" + base64.encodebytes(bytes(body)) + lines[-1] + b"\n"
    if kind == 2:
        return pem * data.draw(st.integers(2, 50))
    return data.draw(st.binary(max_size=600))


def test_certificates(counter: Counter, record: Any, authority: CertificateAuthority) -> None:
    """PEM chains, keys and roots as a file_watcher provider reads them."""
    key = generate_key()
    chain = tuple(
        authority.sign(
            build_csr(key, SpiffeId("cluster.local", "default", "a")).decode(),
            3600,
            SpiffeId("cluster.local", "default", "a"),
        )
    )
    chain_pem = "".join(chain).encode()
    key_bytes = key_pem(key)
    roots = cert_pem(authority.roots)
    assert CertificateBundle.from_pem(chain_pem, key_bytes, roots).identity

    @SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        choose = _chooser(data)
        parts = [chain_pem, key_bytes, roots]
        i = data.draw(st.integers(0, 2))
        parts[i] = _pem_damage(parts[i], choose, data)
        counter.run(lambda: CertificateBundle.from_pem(*parts), (PymeshError,))

    run()
    record("certificates and keys (PEM)", cases=counter.cases, note=counter.note())


def test_csrs_and_ca_requests(
    counter: Counter, record: Any, authority: CertificateAuthority
) -> None:
    """CSRs the CA signs and the IstioCertificateRequest bytes it parses."""
    me = SpiffeId("cluster.local", "default", "a")
    csr = build_csr(generate_key(), me)
    from pymesh.security._ca_proto import CertificateRequest, encode_request

    request = encode_request(CertificateRequest(csr.decode(), 3600))

    @SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        choose = _chooser(data)
        if data.draw(st.booleans()):
            bad = _pem_damage(csr, choose, data).decode("latin-1")

            def sign() -> None:
                # a damage that leaves a valid CSR (e.g. the PEM repeated) is signed, for me only
                chain = authority.sign(bad, 3600, me)
                assert uri_sans(certs_from_pem(chain[0].encode())[0]) == (me.uri,)

            counter.run(sign, (PymeshError,))
        else:
            raw = flip_bytes(request, choose, data.draw(st.integers(1, 6)))
            counter.run(lambda: decode_request(raw), (ValueError,))

    run()
    record("CSRs and CA request bytes", cases=counter.cases, note=counter.note())


def test_tokens(counter: Counter, record: Any, authority: CertificateAuthority) -> None:
    good = authority.create_token("default", "a")
    keys = (authority._token_key.public_key(),)
    issuer = "pymesh"
    from pymesh.controlplane.ca._authority import TOKEN_ISSUER

    issuer = TOKEN_ISSUER
    accepted: list[str] = []

    @SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        choose = _chooser(data)
        kind = data.draw(st.integers(0, 3))
        if kind == 0:
            token = flip_bytes(good.encode(), choose, data.draw(st.integers(1, 4))).decode(
                "latin-1"
            )
        elif kind == 1:  # a re-encoded payload with hostile claims, original signature
            head, _, sig = good.split(".")
            claims = _mutate_json(
                {
                    "iss": issuer,
                    "sub": "system:serviceaccount:default:a",
                    "aud": ["istio-ca"],
                    "exp": 2**40,
                    "iat": 0,
                },
                choose,
            )
            body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
            token = f"{head}.{body}.{sig}"
        elif kind == 2:
            token = data.draw(st.text(max_size=200))
        else:
            token = ".".join(["x" * data.draw(st.integers(0, 5000))] * data.draw(st.integers(1, 5)))

        def check() -> None:
            if token != good:
                verify_token(token, keys, issuer=issuer, now=time.time())
                accepted.append(token)

        counter.run(check, (PymeshError,))
        counter.run(
            lambda: authority.authenticate({"authorization": "Bearer " + token}), (PymeshError,)
        )

    run()
    # a damaged token may still be the same token (base64 padding bits); never a forged one
    for t in accepted:
        assert t.split(".")[2].rstrip("=")[:-1] == good.split(".")[2][:-1]
    record("workload tokens (JWT)", cases=counter.cases, note=counter.note())


# -- HTTP headers through the routing core -------------------------------------------------------


def _route_config() -> RouteConfiguration:
    import yaml as _yaml
    from envoy.config.route.v3 import route_pb2
    from google.protobuf import json_format

    d = _yaml.safe_load((FIXTURES / "xds" / "rds_sidecar_9080.yaml").read_text())
    raw = json_format.ParseDict(d, route_pb2.RouteConfiguration()).SerializeToString()
    value = decode_resource(ResourceType.ROUTE_CONFIGURATION.type_url, raw).value
    assert isinstance(value, RouteConfiguration)
    return value


def _header_text(data: st.DataObject) -> str:
    # bytes off the wire, as an adapter gets them: latin-1 decoded, so any byte appears
    raw = data.draw(
        st.one_of(
            st.binary(max_size=64),
            st.sampled_from([b"\xff\xfe\x80", b"jason", b"x" * 65_536, b"\r\nx-evil: 1", b"\x00"]),
        )
    )
    return raw.decode("latin-1")


def test_routing_headers(counter: Counter, record: Any) -> None:
    config = _route_config()
    rng = random.Random(7)
    domains = [d for vh in config.virtual_hosts for d in vh.domains]
    names = [
        "end-user",
        "x-user",
        "cookie",
        "x-envoy-max-retries",
        "host",
        ":path",
        "user-agent",
        "x-forwarded-for",
    ]

    @SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        headers = [
            (
                data.draw(st.sampled_from(names))
                if data.draw(st.booleans())
                else _header_text(data),
                _header_text(data),
            )
            for _ in range(data.draw(st.integers(0, 40)))
        ]
        if data.draw(st.booleans()):  # one header repeated many times
            headers += [("end-user", _header_text(data))] * data.draw(st.integers(2, 500))
        authority = (
            data.draw(st.sampled_from(domains)) if data.draw(st.booleans()) else _header_text(data)
        )
        path = data.draw(
            st.sampled_from(["/", "/reviews/1", "/a/../b", "//x", "/%2F", "?"])
        ) + _header_text(data)
        req = RequestInfo(
            method=_header_text(data) or "GET",
            authority=authority,
            path=path,
            headers=Headers(headers),
        )

        def go() -> None:
            vhost = config.select_virtual_host(req.authority)
            if vhost is None:
                return
            route = route_request(vhost, req, rng=rng)
            if route is None or not isinstance(route.action, RouteAction):
                return
            cluster = choose_cluster(route.action, req, rng=rng)
            rewrite_request(route, route.action, vhost, config, req, cluster)
            request_hash(route.action.hash_policies, req)

        counter.run(go, (PymeshError,))

    run()
    record(
        "HTTP headers for routing (huge, non-UTF-8, repeated)",
        cases=counter.cases,
        note=counter.note(),
    )


@pytest.mark.parametrize("priority", [2, 2**16, 2**31 - 1, 2**32 - 1])
def test_eds_sparse_priority_is_refused_cheaply(priority: int, record: Any) -> None:
    """Found by the hostile-field fuzzer: one locality at priority 2^32-1 made the EDS
    decoder build the set of every missing priority (out of memory)."""
    from tests.resilience._xds_driver import cla

    msg = cla(8080, extra=2)
    msg.endpoints[1].priority = priority
    raw = msg.SerializeToString()
    start = time.perf_counter()
    with pytest.raises(ResourceError, match="contiguous"):
        decode_resource(ResourceType.CLUSTER_LOAD_ASSIGNMENT.type_url, raw)
    took = time.perf_counter() - start
    record(
        f"EDS locality at priority {priority:,} (gap)",
        cases=1,
        note=f"refused in {took * 1000:.1f} ms",
    )
    assert took < 0.5
