"""The complete example of docs/asgi.md runs as written and prints what the page says
(in a subprocess: it creates its own control plane, CA and temp files)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[3] / "docs" / "asgi.md"


def _block(section: str, lang: str) -> str:
    (code,) = re.findall(rf"```{lang}\n(.*?)```", section, re.S)
    return code


def test_the_complete_example_runs(tmp_path: Path) -> None:
    section = DOC.read_text().split("## A complete example", 1)[1].split("\n## ", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(_block(section, "python"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_XDS_BOOTSTRAP")}
    env["TMPDIR"] = str(tmp_path)
    env["PYTHONPATH"] = str(DOC.parents[1])
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines() == _block(section, "text").strip().splitlines()
