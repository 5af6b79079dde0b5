"""Running a docs page's "A complete example" as a user would: its one python block, as a
script in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def run_complete_example(page: str, tmp_path: Path) -> str:
    """Run the python block of ``docs/PAGE``'s "A complete example" section (it must exit
    0 within 120 s); returns its standard output."""
    text = (DOCS / page).read_text()
    section = text.split("## A complete example", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
