"""Every YAML example of docs/control-plane.md loads, step by step, without errors, and the
last step produces the documented resources."""

from __future__ import annotations

import re
from pathlib import Path

from pymesh.cli.main import main as cli_main
from pymesh.controlplane.config import ProxyNode, load_config
from pymesh.controlplane.translate import Generator
from pymesh.xds.resource_types import ResourceType

DOC = Path(__file__).resolve().parents[3] / "docs" / "control-plane.md"


def _blocks() -> list[tuple[str, str]]:
    out = []
    for body in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S):
        first = body.splitlines()[0]
        m = re.fullmatch(r"# mesh/(\S+\.yaml)", first)
        assert m, f"every example starts with '# mesh/FILE.yaml': {first!r}"
        out.append((m.group(1), body))
    return out


def test_doc_examples_load_step_by_step(tmp_path: Path, capsys: object) -> None:
    blocks = _blocks()
    assert len(blocks) >= 6
    for name, body in blocks:
        (tmp_path / name).write_text(body)
        config, issues = load_config([tmp_path])
        assert config is not None, (name, [str(i) for i in issues if i.is_error])
        assert [str(i) for i in issues] == [], name
    gen = Generator(config)
    node = ProxyNode("n", "default", generator="grpc")
    clusters = gen.generate(node, ResourceType.CLUSTER.type_url, None)
    assert "outbound|9080|v2|reviews.default.svc.cluster.local" in clusters
    assert cli_main(["analyze", str(tmp_path)]) == 0


def test_doc_analyze_example_is_what_analyze_prints(tmp_path: Path, capsys: object) -> None:
    for name, body in _blocks():
        (tmp_path / name).write_text(
            body.replace("subset: v2}\n      weight: 10", "subset: v3}\n      weight: 10")
        )
    assert cli_main(["analyze", str(tmp_path)]) == 1
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    expected = re.search(r"\$ pymesh analyze mesh/\n(Error .*)\n", DOC.read_text())
    assert expected is not None
    assert expected.group(1).replace("mesh/", f"{tmp_path}/") in out
