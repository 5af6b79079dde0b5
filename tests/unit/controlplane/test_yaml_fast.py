"""The plain-YAML reader against PyYAML: the same values, or ``None`` (PyYAML decides)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.controlplane.config._load import _LOADER, _chunks
from pymesh.controlplane.config._yaml_fast import load_plain

REPO = Path(__file__).resolve().parents[3]


def pyyaml(text: str) -> list[Any] | Exception:
    try:
        return list(yaml.load_all(text, Loader=_LOADER))
    except yaml.YAMLError as exc:
        return exc


def agrees(text: str) -> bool:
    """``load_plain`` declines, or reads what PyYAML reads (never accepts what it rejects)."""
    fast = load_plain(text)
    if fast is None:
        return True
    slow = pyyaml(text)
    assert not isinstance(slow, Exception), (text, fast, slow)
    assert fast == slow, (text, fast, slow)
    # Same types too (True == 1 and 1.0 == 1 in Python).
    assert repr(fast) == repr(slow), (text, fast, slow)
    return True


SERVICE_ENTRY = """---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: svc-1, namespace: bench}
spec:
  hosts: [svc-1.bench.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.1.1.1, ports: {http: 9000}, labels: {version: v0}}
  - address: 10.1.1.2
    ports:
      http: 9001
    labels: {version: v1, enabled: yes, weight: -3, ratio: 0.5, when: 2001-12-14, x: ~}
"""


def test_a_plain_document_is_read_as_pyyaml_reads_it() -> None:
    fast = load_plain(SERVICE_ENTRY)
    assert fast is not None  # the subset covers it
    assert fast == pyyaml(SERVICE_ENTRY)
    labels = fast[0]["spec"]["endpoints"][1]["labels"]
    assert labels["enabled"] is True and labels["weight"] == -3 and labels["x"] is None


def test_outside_the_subset_declines() -> None:
    for text in (
        "a: 'quoted'\n",
        'a: "quoted"\n',
        "a: &x 1\nb: *x\n",
        "a: !!str 1\n",
        "a: |\n  block\n",
        "a: b # comment\n",
        "a: multi\n  line\n",
        "a: {b: 1,\n  c: 2}\n",
        "a:\tb\n",
        "<<: {a: 1}\n",
        "1: a\n",
        "true: a\n",
        "a: b: c\n",
        "a: [b: c]\n",
        "a: {b}\n",
        "a: [b, ]\n",
        "- a\n- b\n",  # not a mapping at the top: PyYAML's job
        "a: 1\n ...\n",
        "a: é\n",
        "a: {b: 1} c\n",
        "a: 1\n  b: 2\n",
        "--- a: 1\n",
    ):
        assert load_plain(text) is None, text
        assert agrees(text)


def test_empty_documents() -> None:
    assert load_plain("") == pyyaml("") == []
    assert load_plain("# only a comment\n") == pyyaml("# only a comment\n") == []
    assert load_plain("---\n") == pyyaml("---\n") == [None]


def test_every_yaml_file_of_the_repository_agrees() -> None:
    files = [
        *sorted((REPO / "tests").rglob("*.yaml")),
        *sorted((REPO / "docs").rglob("*.yaml")),
        *sorted((REPO / "examples").rglob("*.yaml")),
    ]
    taken = 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        for chunk in _chunks(text) or ():
            agrees(chunk)
            taken += load_plain(chunk) is not None
    assert taken > 0


_WORDS = st.sampled_from(
    [
        "a", "b", "name", "app.kubernetes.io/name", "x-y", "yes", "no", "on", "off", "true",
        "null", "~", "1", "-1", "0x1F", "0o17", "017", "1_000", "1e3", "1.5e3", "-.5", ".inf",
        ".NaN", "2001-12-14", "2001-12-14 21:59:43.10", "12:30:00", "a:b", "a b", "-a", "=",
        "v0", "10.1.2.3", "http", "a.b.c", "+1", "a=b", "~x", "_",
    ]
)  # fmt: skip
_KEYS = st.sampled_from(["a", "b", "name", "app.kubernetes.io/name", "x-y", "v0", "_", "a.b", "on"])
_VALUES = st.recursive(
    _WORDS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_WORDS, _VALUES, min_size=1, max_size=5), st.sampled_from([False, None]))
def test_dumped_documents_agree(data: dict[str, Any], flow: bool | None) -> None:
    agrees(yaml.safe_dump(data, default_flow_style=flow, sort_keys=False))
    agrees("---\n" + yaml.safe_dump(data, default_flow_style=flow, indent=4, sort_keys=False))


_FRAGMENTS = st.sampled_from(
    [
        "", "1", "a", "yes", "-1", "-a", "- a", "a:b", "a b", "~", "{}", "[]", "{a: 1}",
        "[1, 2]", "{a: [1, {b: c}]}", "[a, ]", "{a}", "{a: b: c}", "[a: b]", "{a: 1, a: 2}",
        "{a:1}", "{ a : 1 }", "[ [1], [2] ]", "{a: {b: {c: d}}}", "[a, [b, c], {d: e}]",
    ]
)  # fmt: skip
_LINE = st.tuples(
    st.sampled_from([0, 1, 2, 3, 4, 6]),
    st.sampled_from(["", "- ", "-  ", "-"]),
    st.sampled_from(["", "a", "b", "c", "1", "true", "-x", "a b", "a.b"]),
    st.sampled_from([": ", ":", " :", "", ":  "]),
    _FRAGMENTS,
).map(lambda t: " " * t[0] + t[1] + t[2] + t[3] + t[4])


@settings(max_examples=500, deadline=None)
@given(st.lists(_LINE, min_size=1, max_size=8), st.booleans())
def test_random_lines_agree(lines: list[str], marker: bool) -> None:
    agrees(("---\n" if marker else "") + "\n".join(lines) + "\n")


def _flow(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_flow(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_flow(x) for x in v) + "]"
    return str(v)


def _emit(v: Any, ind: int, draw: Any) -> list[str]:
    """``v`` (words, lists, dicts) written as block YAML with random but valid layout
    choices (the words unquoted: PyYAML decides what they mean)."""
    pad = " " * ind
    lines: list[str] = []
    items = v.items() if isinstance(v, dict) else ((None, x) for x in v)
    for k, x in items:
        head = f"{pad}{k}:" if k is not None else f"{pad}-"
        if not isinstance(x, (dict, list)) or not x or draw(st.integers(0, 3)) == 0:
            lines.append(f"{head} {_flow(x)}")
            continue
        if k is None and isinstance(x, dict) and draw(st.booleans()):
            sub = _emit(x, ind + 2, draw)  # "- key: value" with the rest under "key"
            lines.append(pad + "- " + sub[0][ind + 2 :])
            lines.extend(sub[1:])
            continue
        lines.append(head)
        same = k is not None and isinstance(x, list) and draw(st.booleans())
        lines.extend(_emit(x, ind if same else ind + draw(st.sampled_from([1, 2, 4])), draw))
    return lines


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, min_size=1, max_size=5), st.data())
def test_generated_block_documents_agree(data: dict[str, Any], draw: st.DataObject) -> None:
    text = "\n".join(_emit(data, draw.draw(st.sampled_from([0, 2])), draw.draw)) + "\n"
    agrees(text)
