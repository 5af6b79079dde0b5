"""Bookinfo's mesh: the API tests and tools use (``Bookinfo``), and the mesh config beside
this file (``bookinfo.yaml``: services and workload groups; ``networking/``: Istio's samples).

```python
from examples.bookinfo.mesh import Bookinfo

with Bookinfo(tmp_path) as bookinfo:          # control plane, CA, six workload processes
    httpx.get(bookinfo.productpage_url + "/productpage")
    bookinfo.apply("reviews-50-v3")           # Istio's virtual-service-reviews-50-v3.yaml
    bookinfo.remove("reviews-50-v3")
```
"""

from examples.bookinfo.launcher import (
    MESH_DIR,
    NETWORKING_DIR,
    SCENARIOS_DIR,
    SERVICES,
    Bookinfo,
    BookinfoError,
    ConfigLayers,
    ServiceProc,
    resolve_scenario,
    scenario_names,
)

__all__ = [
    "MESH_DIR",
    "NETWORKING_DIR",
    "SCENARIOS_DIR",
    "SERVICES",
    "Bookinfo",
    "BookinfoError",
    "ConfigLayers",
    "ServiceProc",
    "resolve_scenario",
    "scenario_names",
]
