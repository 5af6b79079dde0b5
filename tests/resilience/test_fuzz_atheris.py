"""atheris (coverage-guided libFuzzer) against the same decoders, each in a subprocess with a
bounded ``-runs`` and ``-max_total_time``; seeds are the codec fixtures. The case count is
libFuzzer's own ("Done N runs"). ``PYMESH_ATHERIS_RUNS`` / ``PYMESH_ATHERIS_SECONDS`` set
the bounds (default 200,000 runs or 20 s per target)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pymesh.xds.resource_types import ResourceType
from tests.resilience._fuzz_inputs import seeds

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNS = int(os.environ.get("PYMESH_ATHERIS_RUNS", "200000"))
SECONDS = int(os.environ.get("PYMESH_ATHERIS_SECONDS", "20"))
XDS = {
    "lds": ResourceType.LISTENER,
    "rds": ResourceType.ROUTE_CONFIGURATION,
    "cds": ResourceType.CLUSTER,
    "eds": ResourceType.CLUSTER_LOAD_ASSIGNMENT,
}


def _corpus(target: str, directory: Path) -> Path:
    directory.mkdir()
    if target in XDS:
        for i, msg in enumerate(seeds()[XDS[target]]):
            (directory / f"seed{i}").write_bytes(msg.SerializeToString())
    elif target == "bootstrap":
        src = REPO / "tests" / "fixtures" / "bootstrap" / "istio-agent-grpc-bootstrap.json"
        (directory / "seed0").write_text(json.dumps(json.loads(src.read_text())))
    return directory


@pytest.mark.slow
@pytest.mark.timeout(SECONDS * 3 + 60)
@pytest.mark.parametrize("target", ["lds", "rds", "cds", "eds", "ads", "bootstrap", "pem", "token"])
def test_atheris(target: str, tmp_path: Path, record: Any) -> None:
    corpus = _corpus(target, tmp_path / "corpus")
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "_atheris_target.py"),
            target,
            f"-runs={RUNS}",
            f"-max_total_time={SECONDS}",
            "-rss_limit_mb=2048",
            "-timeout=5",  # one input slower than 5 s is a hang
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS * 3 + 30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
    )
    done = re.search(r"Done (\d+) runs in (\d+) second", proc.stderr)
    runs = int(done.group(1)) if done else 0
    record(
        f"atheris: {target}",
        cases=runs,
        failed=int(proc.returncode != 0),
        note=f"libFuzzer, {done.group(2) if done else '?'} s" if done else proc.stderr[-300:],
    )
    log = "\n".join(line for line in proc.stderr.splitlines() if "Instrumenting" not in line)
    assert proc.returncode == 0, log[-3000:]
    assert runs > 0, proc.stderr[-2000:]
