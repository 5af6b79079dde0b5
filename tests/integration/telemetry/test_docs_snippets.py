"""The telemetry pages' code snippets run against the real API: each is executed with the
names it assumes (a bootstrap node, an ASGI app, a request's fields) defined, so a renamed
argument or function fails here (the complete example: test_docs_example.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import pymesh.asgi
from pymesh import telemetry
from pymesh.bootstrap import generate_bootstrap, parse_bootstrap

DOCS = Path(__file__).resolve().parents[3] / "docs"


def snippets(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


def namespace() -> dict[str, Any]:
    data = generate_bootstrap(xds_address="127.0.0.1:1", namespace="default", workload="w")
    node = parse_bootstrap(json.dumps(data), source="docs").node

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    return {
        "telemetry": telemetry,
        "pymesh": pymesh,
        "node": node,
        "app": app,
        "my_exporter": InMemorySpanExporter(),
        # a request as another server would hand it over (metrics.md, "ASGI and other servers")
        "method": "GET",
        "host": "reviews:9080",
        "path": "/reviews/0",
        "headers": {"traceparent": f"00-{'a' * 32}-{'b' * 16}-01"},
        "status": 200,
        "sans": ("spiffe://cluster.local/ns/default/sa/productpage",),
        "mtls": True,
        "received": 0,
        "sent": 17,
    }


@pytest.mark.parametrize(
    ("page", "index"),
    [("access-logs.md", 0), ("tracing.md", 0), ("metrics.md", 1), ("metrics.md", 3),
     ("metrics.md", 4)],
)  # fmt: skip
def test_snippet_runs(page: str, index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYMESH_TELEMETRY", raising=False)
    code = snippets(page)[index]
    ns = namespace()
    if "telemetry.current()" in code:  # a snippet for code running under telemetry
        telemetry.install(telemetry.Telemetry(node=ns["node"]))
    try:
        exec(compile(code, f"{page}[{index}]", "exec"), ns)  # the docs' own code
        tel = telemetry.current()
        if "server_call" in code:  # the request was reported: one destination series
            assert tel is not None
            labels = [labels for labels, _ in tel.requests.snapshot()]
            assert [lb[0] for lb in labels] == ["destination"]
    finally:
        tel = telemetry.current()
        if tel is not None:
            tel.close()
        telemetry.uninstall()


def test_the_snippets_are_the_ones_listed() -> None:
    """A new snippet must be added to the list above (or be a complete example)."""
    assert len(snippets("access-logs.md")) == 1
    assert len(snippets("tracing.md")) == 1
    assert len(snippets("metrics.md")) == 5  # 0: needs the process's mesh; 2: the complete example
