"""The complete example of docs/metrics.md runs as written (in a subprocess, like a user's)."""

from __future__ import annotations

from pathlib import Path

from tests.docs_examples import run_complete_example


def test_the_complete_example_runs(tmp_path: Path) -> None:
    stdout = run_complete_example("metrics.md", tmp_path)
    assert stdout.count('"GET /ratings/0 HTTP/1.1" 200') == 3, stdout
    assert 'source_workload="productpage-v1"' in stdout
