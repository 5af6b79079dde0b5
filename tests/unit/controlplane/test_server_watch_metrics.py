"""Config file fingerprints and the Prometheus rendering."""

from __future__ import annotations

import os
from pathlib import Path

from pymesh.controlplane.server._backend import to_jsonable
from pymesh.controlplane.server._metrics import Metrics
from pymesh.controlplane.server._watch import config_files, fingerprint


def test_fingerprint_sees_edits_new_and_removed_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("a: 1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yml").write_text("b: 1")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.yaml").write_text("ignored")
    assert [p.name for p in config_files([tmp_path])] == ["a.yaml", "b.yml"]
    fp0 = fingerprint([tmp_path])
    assert fingerprint([tmp_path]) == fp0
    os.utime(tmp_path / "a.yaml", ns=(1, 1))
    fp1 = fingerprint([tmp_path])
    assert fp1 != fp0
    (tmp_path / "c.json").write_text("{}")
    fp2 = fingerprint([tmp_path])
    assert len(fp2) == 3
    (tmp_path / "sub" / "b.yml").unlink()
    assert len(fingerprint([tmp_path])) == 2
    missing = tmp_path / "missing.yaml"
    assert fingerprint([missing]) == ((str(missing), -1, -1),)


def test_metrics_render() -> None:
    m = Metrics()
    m.inc("pilot_xds_pushes", type="CDS")
    m.inc("pilot_xds_pushes", type="CDS")
    m.inc("pilot_xds_pushes", type='E"DS')
    m.gauge("pilot_xds", lambda: 3)
    text = m.render()
    assert 'pilot_xds_pushes{type="CDS"} 2\n' in text
    assert 'pilot_xds_pushes{type="E\\"DS"} 1\n' in text
    assert "# TYPE pilot_xds gauge\npilot_xds 3\n" in text
    assert "pilot_total_xds_rejects 0\n" in text  # known counters render as 0
    assert m.total("pilot_xds_pushes") == 3


def test_to_jsonable() -> None:
    import types
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Thing:
        name: str
        tags: frozenset[str]
        attrs: types.MappingProxyType[str, int]
        where: Path

    out = to_jsonable(
        Thing("x", frozenset({"b", "a"}), types.MappingProxyType({"k": 1}), Path("/p"))
    )
    assert out == {"name": "x", "tags": ["a", "b"], "attrs": {"k": 1}, "where": "/p"}
