"""Validation issues, in the shape ``istioctl analyze`` reports them.

Every issue names the FILE, the DOCUMENT inside it (index, kind, namespace/name) and the
dotted FIELD path (``spec.http[0].route[1].weight``), so the message alone is enough to fix
the input.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["ConfigIssue", "IssueLevel", "IssueSink"]


class IssueLevel(enum.Enum):
    ERROR = "Error"
    WARNING = "Warning"
    INFO = "Info"


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One finding about the configuration. ``doc`` is the 0-based document index in ``file``
    (``-1`` when the issue is about the whole file)."""

    level: IssueLevel
    file: str
    doc: int
    kind: str
    name: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.doc}" if self.doc >= 0 else self.file
        if self.kind or self.name:
            where = f"{where} {self.kind}/{self.name}"
        field = f" {self.field}:" if self.field else ""
        return f"{self.level.value} [{where}]{field} {self.message}"

    @property
    def is_error(self) -> bool:
        return self.level is IssueLevel.ERROR


class IssueSink:
    """Collects issues for one document (file, index, kind, ``namespace/name``)."""

    def __init__(self, out: list[ConfigIssue], file: str, doc: int, kind: str, name: str):
        self._out = out
        self.file = file
        self.doc = doc
        self.kind = kind
        self.name = name
        self.errors = 0

    def error(self, field: str, message: str) -> None:
        self.errors += 1
        self._out.append(
            ConfigIssue(IssueLevel.ERROR, self.file, self.doc, self.kind, self.name, field, message)
        )

    def warn(self, field: str, message: str) -> None:
        self._out.append(
            ConfigIssue(
                IssueLevel.WARNING, self.file, self.doc, self.kind, self.name, field, message
            )
        )

    def info(self, field: str, message: str) -> None:
        self._out.append(
            ConfigIssue(IssueLevel.INFO, self.file, self.doc, self.kind, self.name, field, message)
        )
