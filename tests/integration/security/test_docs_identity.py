"""The complete example of docs/identity.md runs as written (in a subprocess)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[3] / "docs" / "identity.md"


def test_the_complete_example_runs(tmp_path: Path) -> None:
    section = DOC.read_text().split("## A complete example", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "hello spiffe://cluster.local/ns/default/sa/productpage"
