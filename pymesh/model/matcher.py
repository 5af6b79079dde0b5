"""String matching as Envoy's ``type.matcher.v3.StringMatcher`` defines it.

Used by route header/query matchers, RBAC principals and TLS SAN checks alike, so it lives
once, here. Regexes are Envoy RE2 expressions; we evaluate them with :mod:`re` using
full-match semantics, which agrees with RE2 on the syntax RE2 accepts except for a few
constructs (backreferences, lookaround) that RE2 rejects and the codec therefore rejects too.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["MatchKind", "StringMatcher"]


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    CONTAINS = "contains"
    REGEX = "safe_regex"


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """Match a string. ``pattern`` is the regex text for ``REGEX`` and the literal otherwise."""

    kind: MatchKind
    pattern: str
    ignore_case: bool = False
    _regex: re.Pattern[str] | None = None

    @classmethod
    def exact(cls, value: str, *, ignore_case: bool = False) -> StringMatcher:
        return cls(MatchKind.EXACT, value, ignore_case)

    @classmethod
    def prefix(cls, value: str, *, ignore_case: bool = False) -> StringMatcher:
        return cls(MatchKind.PREFIX, value, ignore_case)

    @classmethod
    def suffix(cls, value: str, *, ignore_case: bool = False) -> StringMatcher:
        return cls(MatchKind.SUFFIX, value, ignore_case)

    @classmethod
    def contains(cls, value: str, *, ignore_case: bool = False) -> StringMatcher:
        return cls(MatchKind.CONTAINS, value, ignore_case)

    @classmethod
    def regex(cls, pattern: str) -> StringMatcher:
        """Raises ``re.error`` for a pattern that does not compile (the codec turns it into
        a ``ResourceError`` naming the field)."""
        return cls(MatchKind.REGEX, pattern, False, re.compile(pattern))

    def matches(self, value: str) -> bool:
        kind = self.kind
        if kind is MatchKind.REGEX:
            assert self._regex is not None
            return self._regex.fullmatch(value) is not None
        pattern = self.pattern
        if self.ignore_case:
            value = value.lower()
            pattern = pattern.lower()
        if kind is MatchKind.EXACT:
            return value == pattern
        if kind is MatchKind.PREFIX:
            return value.startswith(pattern)
        if kind is MatchKind.SUFFIX:
            return value.endswith(pattern)
        return pattern in value
