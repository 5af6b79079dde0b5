"""Translate benchmark: load 1,000 ServiceEntries x 10 endpoints (+ a DestinationRule with 2
subsets and a 90/10 VirtualService each), then one full generation (LDS+RDS+CDS+EDS, wildcard)
for one proxyless node class; then the incremental paths the control plane takes on a reload:
ConfigLoader with one document changed, and a generator built from the previous one.
Prints CPU seconds. Run: python bench/translate_bench.py
"""

from __future__ import annotations

import pathlib
import tempfile
import time

from pymesh.controlplane.config import ProxyNode, load_config
from pymesh.controlplane.config._load import ConfigLoader
from pymesh.controlplane.translate import Generator
from pymesh.xds.resource_types import ResourceType

SERVICES, ENDPOINTS = 1000, 10


def _mesh() -> str:
    docs = []
    for i in range(SERVICES):
        eps = "".join(
            f"  - {{address: 10.{i // 250}.{i % 250}.{j + 1}, labels: {{version: v{j % 2}}}}}\n"
            for j in range(ENDPOINTS)
        )
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
            f"metadata: {{name: svc{i}, namespace: default}}\nspec:\n  hosts: [svc{i}]\n"
            "  ports: [{number: 8080, name: http}]\n  resolution: STATIC\n  endpoints:\n" + eps
        )
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
            f"metadata: {{name: svc{i}, namespace: default}}\nspec:\n  host: svc{i}\n"
            "  subsets: [{name: v0, labels: {version: v0}}, {name: v1, labels: {version: v1}}]\n"
        )
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            f"metadata: {{name: svc{i}, namespace: default}}\nspec:\n  hosts: [svc{i}]\n"
            f"  http: [{{route: [{{destination: {{host: svc{i}, subset: v0}}, weight: 90}},"
            f" {{destination: {{host: svc{i}, subset: v1}}, weight: 10}}]}}]\n"
        )
    return "---\n".join(docs)


def main() -> None:
    d = pathlib.Path(tempfile.mkdtemp())
    (d / "mesh.yaml").write_text(_mesh())
    t = time.process_time()
    cfg, issues = load_config([d])
    assert cfg is not None, [str(i) for i in issues if i.is_error]
    print(f"load_config: {time.process_time() - t:.3f} s CPU ({cfg})")
    gen = Generator(cfg)
    node = ProxyNode("bench", "default", generator="grpc")
    total = 0.0
    for rt in ResourceType:
        t = time.process_time()
        out = gen.generate(node, rt.type_url, None)
        dt = time.process_time() - t
        total += dt
        print(f"{rt.abbrev}: {len(out)} resources, {dt:.3f} s CPU")
    print(f"full generation for one node class: {total:.3f} s CPU")

    loader = ConfigLoader()
    loader.load([d])
    text = (d / "mesh.yaml").read_text()
    (d / "mesh.yaml").write_text(text.replace("10.0.0.1,", "10.0.0.99,", 1))
    t = time.process_time()
    cfg2, issues = loader.load([d])
    assert cfg2 is not None, [str(i) for i in issues if i.is_error]
    print(f"ConfigLoader reload, one document changed: {time.process_time() - t:.3f} s CPU")
    t = time.process_time()
    gen2 = Generator(cfg2, gen)
    for rt in ResourceType:
        gen2.generate(node, rt.type_url, None)
    print(f"full generation from the previous generator: {time.process_time() - t:.3f} s CPU")


if __name__ == "__main__":
    main()
