"""Translate benchmark: load 1,000 ServiceEntries x 10 endpoints (+ a DestinationRule with 2
subsets and a 90/10 VirtualService each), then one full generation (LDS+RDS+CDS+EDS, wildcard)
for one proxyless node class. Prints CPU seconds. Run: python bench/translate_bench.py
"""

import pathlib
import tempfile
import time

lines = []
for i in range(1000):
    lines.append(
        f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc{i}, namespace: default}}
spec:
  hosts: [svc{i}]
  ports: [{{number: 8080, name: http}}]
  resolution: STATIC
  endpoints:
"""
        + "".join(
            f"  - {{address: 10.{i // 250}.{i % 250}.{j + 1}, labels: {{version: v{j % 2}}}}}\n"
            for j in range(10)
        )
    )
    lines.append(f"""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc{i}, namespace: default}}
spec:
  host: svc{i}
  subsets: [{{name: v0, labels: {{version: v0}}}}, {{name: v1, labels: {{version: v1}}}}]
""")
    lines.append(f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc{i}, namespace: default}}
spec:
  hosts: [svc{i}]
  http: [{{route: [{{destination: {{host: svc{i}, subset: v0}}, weight: 90}}, {{destination: {{host: svc{i}, subset: v1}}, weight: 10}}]}}]
""")
d = pathlib.Path(tempfile.mkdtemp())
(d / "mesh.yaml").write_text("---\n".join(lines))
from pymesh.controlplane.config import ProxyNode, load_config
from pymesh.controlplane.translate import Generator
from pymesh.xds.resource_types import ResourceType as R

t = time.process_time()
cfg, iss = load_config([d])
print("load", round(time.process_time() - t, 3), cfg, len([i for i in iss if i.is_error]))
g = Generator(cfg)
n = ProxyNode("a", "default", generator="grpc")
tot = 0
for rt in R:
    t = time.process_time()
    out = g.generate(n, rt.value, None)
    dt = time.process_time() - t
    tot += dt
    print(rt.abbrev, len(out), round(dt, 3))
print("total generate", round(tot, 3))
