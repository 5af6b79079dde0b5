"""The complete example of docs/httpx.md runs as written (in a subprocess, like a user's)."""

from __future__ import annotations

from pathlib import Path

from tests.docs_examples import run_complete_example


def test_the_complete_example_runs(tmp_path: Path) -> None:
    stdout = run_complete_example("httpx.md", tmp_path)
    assert "Counter(" in stdout
