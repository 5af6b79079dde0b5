"""The complete example of docs/metrics.md runs as written (in a subprocess, like a user's)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[3] / "docs" / "metrics.md"


def test_the_complete_example_runs(tmp_path: Path) -> None:
    text = DOC.read_text()
    section = text.split("## A complete example", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count('"GET /ratings/0 HTTP/1.1" 200') == 3, out.stdout
    assert 'source_workload="productpage-v1"' in out.stdout
