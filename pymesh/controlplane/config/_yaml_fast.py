"""A line-oriented reader for the plain YAML most config is written in, or ``None``.

Kubernetes-style config is mostly block mappings and sequences of plain scalars, with
one-line flow collections (``{address: 10.0.0.1, ports: {http: 80}}``). PyYAML (even with
libyaml) builds a node object per value and calls back into Python for each one's tag;
:func:`load_plain` reads that subset directly, line by line, and returns exactly what
PyYAML's safe loader returns for it.

It is deliberately narrow: anything outside the subset (quotes, anchors, aliases, tags,
block scalars, comments after content, multi-line plain scalars or flow collections, tabs,
non-ASCII, directives, keys that are not plain strings, irregular indentation) returns
``None`` and the caller uses PyYAML, which also reports any error with its positions. Tags
of plain scalars are resolved by PyYAML's own resolver and built by its own constructors, so
``9000`` is an int, ``true`` and ``yes`` are bools, ``~`` is null, exactly as PyYAML reads
them.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["load_plain"]

# Characters a scalar of the subset may hold (in block context also inner spaces and ':'
# not followed by a space). Everything else sends the document to PyYAML.
_SCALAR = re.compile(r"[A-Za-z0-9_./+=~-]+(?:[ :][A-Za-z0-9_./+=~-]+)*")
_FLOW_SCALAR = re.compile(r"[A-Za-z0-9_./+=~-]+(?: [A-Za-z0-9_./+=~-]+)*")
_FLOW_SPLIT = re.compile(r"([{}\[\],])")
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")
# Anything that may change the meaning of a line or a document: not for this reader.
_UNSAFE = re.compile(r"[^ -~\n]|['\"&*!|>%@`?\\]")
_STR_TAG = "tag:yaml.org,2002:str"
_MAX_DEPTH = 64
_MEMO_MAX = 20_000
_MISS: Any = object()


class _Unsupported(Exception):
    """Outside the subset: PyYAML decides."""


class _Scalars:
    """Plain scalar text -> value, with PyYAML's resolver and constructors, memoised per
    context (a text valid in block context may not be in flow context)."""

    def __init__(self) -> None:
        self._loader: Any = yaml.SafeLoader("")
        self.block: dict[str, Any] = {}
        self.flow: dict[str, Any] = {}
        self.keys: set[str] = set()

    def new(self, text: str, flow: bool) -> Any:
        """The value of a plain scalar not seen before in this context (checked)."""
        pattern = _FLOW_SCALAR if flow else _SCALAR
        if not text or pattern.fullmatch(text) is None:
            raise _Unsupported(text)
        if text[0] in "-:" and not _number_like(text):
            raise _Unsupported(text)  # an indicator, not a sign
        tag = self._loader.resolve(yaml.ScalarNode, text, (True, False))
        if tag == _STR_TAG:
            value: Any = text
        else:
            ctor = self._loader.yaml_constructors.get(tag)
            if ctor is None:
                raise _Unsupported(tag)
            value = ctor(self._loader, yaml.ScalarNode(tag, text))
            if isinstance(value, (list, dict, set)):  # never shared between documents
                raise _Unsupported(tag)
        memo = self.flow if flow else self.block
        if len(memo) < _MEMO_MAX:
            memo[text] = value
        return value

    def key(self, text: str) -> str:
        if text in self.keys:
            return text
        if _KEY.fullmatch(text) is None or self.new(text, flow=True) != text:
            raise _Unsupported(text)  # a key PyYAML would read as another type
        if len(self.keys) < _MEMO_MAX:
            self.keys.add(text)
        return text


_scalars = _Scalars()


def load_plain(text: str) -> list[Any] | None:
    """The documents of ``text`` (one ``---`` section at most) as PyYAML's safe loader
    reads them, or ``None`` when ``text`` is not in the subset this reader handles."""
    if _UNSAFE.search(text) is not None:
        return None
    lines = text.split("\n")
    start = 0
    if lines and lines[0].startswith("---"):
        if lines[0].rstrip(" ") != "---":
            return None  # content after the marker
        start = 1
    body: list[tuple[int, str]] = []
    for line in lines[start:]:
        content = line.lstrip(" ")
        if not content or content.startswith("#"):
            continue  # a blank or comment line
        if "#" in content:
            return None
        if content.startswith("---") or content.startswith("..."):
            return None
        body.append((len(line) - len(content), content.rstrip(" ")))
    if not body:  # an empty document after a marker; no document at all without one
        return [None] if start else []
    try:
        value, end = _block(body, 0, body[0][0], 0)
    except (_Unsupported, yaml.YAMLError, ValueError, TypeError, RecursionError):
        return None
    if end != len(body) or not isinstance(value, dict):
        return None
    return [value]


def _block(body: list[tuple[int, str]], i: int, indent: int, depth: int) -> tuple[Any, int]:
    """The block collection whose first line is ``body[i]`` (at ``indent``)."""
    if depth > _MAX_DEPTH:
        raise _Unsupported("depth")
    if _is_entry(body[i][1]):
        return _sequence(body, i, indent, depth)
    return _mapping(body, i, indent, depth)


def _mapping(body: list[tuple[int, str]], i: int, indent: int, depth: int) -> tuple[Any, int]:
    out: dict[str, Any] = {}
    n = len(body)
    while (content := _at(body, i, indent)) is not None:
        if _is_entry(content):
            break  # a sequence entry at this indent: not part of this mapping
        key, sep, rest = content.partition(":")
        if not sep or (rest and rest[0] != " "):
            raise _Unsupported("not a key")
        k = _scalars.key(key)
        rest = rest.strip(" ")
        i += 1
        if rest:
            out[k] = _inline(rest, depth)
            if i < n and body[i][0] > indent:
                raise _Unsupported("continuation")
            continue
        if i < n and body[i][0] > indent:
            out[k], i = _block(body, i, body[i][0], depth + 1)
        elif i < n and body[i][0] == indent and _is_entry(body[i][1]):
            out[k], i = _sequence(body, i, indent, depth + 1)  # "key:" then "- item" lines
        else:
            out[k] = None
    return out, i


def _is_entry(content: str) -> bool:
    return content.startswith("-") and (len(content) == 1 or content[1] == " ")


def _at(body: list[tuple[int, str]], i: int, indent: int) -> str | None:
    """Line ``i``'s content when it continues the collection at ``indent`` (``None``: the
    collection ends before it)."""
    if i >= len(body) or body[i][0] < indent:
        return None
    if body[i][0] > indent:
        raise _Unsupported("indent")
    return body[i][1]


def _sequence(body: list[tuple[int, str]], i: int, indent: int, depth: int) -> tuple[Any, int]:
    out: list[Any] = []
    n = len(body)
    while (content := _at(body, i, indent)) is not None:
        if not _is_entry(content):
            break
        rest = content[1:].lstrip(" ")
        i += 1
        if not rest:
            if i < n and body[i][0] > indent:
                item, i = _block(body, i, body[i][0], depth + 1)
                out.append(item)
            else:
                out.append(None)
            continue
        inner = indent + len(content) - len(rest)
        if _is_entry(rest):
            raise _Unsupported("nested compact sequence")
        _, sep, after = rest.partition(":")
        if sep and (not after or after[0] == " ") and rest[0] not in "{[":
            # "- key: value": a mapping whose keys sit at the column of ``key``.
            sub = [(inner, rest), *body[i:]]
            item, used = _mapping(sub, 0, inner, depth + 1)
            i += used - 1
            out.append(item)
            continue
        out.append(_inline(rest, depth))
        if i < n and body[i][0] > indent:
            raise _Unsupported("continuation")
    return out, i


def _inline(text: str, depth: int) -> Any:
    """A value on one line: a plain scalar or a one-line flow collection."""
    if text[0] in "{[":
        return _flow(text, depth + 1)
    value = _scalars.block.get(text, _MISS)
    return _scalars.new(text, flow=False) if value is _MISS else value


def _number_like(text: str) -> bool:
    """A leading '-' is fine when it is a sign (``-1``), not an indicator."""
    return text[0] == "-" and len(text) > 1 and text[1] not in " -"


def _flow(text: str, depth: int) -> Any:
    """A one-line flow collection (``text`` starts with ``{`` or ``[``)."""
    parts = _FLOW_SPLIT.split(text)
    value, i = _collection(parts, 1, depth)
    if i != len(parts) - 1 or parts[i].strip(" "):
        raise _Unsupported("after flow")
    return value


def _collection(parts: list[str], i: int, depth: int) -> tuple[Any, int]:
    """The flow collection opened by ``parts[i]`` (``parts`` alternate text pieces and
    delimiters); returns it and the index of the text piece after its closing delimiter."""
    if depth > _MAX_DEPTH:
        raise _Unsupported("depth")
    mapping = parts[i] == "{"
    close = "}" if mapping else "]"
    out_map: dict[str, Any] = {}
    out_seq: list[Any] = []
    i += 1
    last = len(parts) - 1
    if i < last and parts[i + 1] == close and not parts[i].strip(" "):
        return (out_map if mapping else out_seq), i + 2
    while i < last:
        raw = parts[i]
        delim = parts[i + 1]
        if delim in "{[":  # a nested collection, after "key: " in a mapping
            if mapping:
                key = raw.rstrip(" ")
                if not key.endswith(":") or len(key) == len(raw):
                    raise _Unsupported("flow key")
                k = _scalars.key(key[:-1].lstrip(" "))
            elif raw.strip(" "):
                raise _Unsupported("flow entry")
            value, i = _collection(parts, i + 1, depth + 1)
            if i >= last or parts[i].strip(" "):
                raise _Unsupported("after nested flow")
            delim = parts[i + 1]
        else:
            text = raw.strip(" ")
            if mapping:
                key, sep, text = text.partition(": ")
                if not sep:
                    raise _Unsupported("flow key")
                k = key if key in _scalars.keys else _scalars.key(key)
                text = text.lstrip(" ")
            value = _scalars.flow.get(text, _MISS)
            if value is _MISS:
                value = _scalars.new(text, flow=True)
        if mapping:
            out_map[k] = value
        else:
            out_seq.append(value)
        if delim == close:
            return (out_map if mapping else out_seq), i + 2
        if delim != ",":
            raise _Unsupported("flow separator")
        i += 2
    raise _Unsupported("unclosed")
