"""Route configuration models (RDS): virtual hosts, routes, matchers and actions."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FractionalPercent"]


@dataclass(frozen=True, slots=True)
class FractionalPercent:
    """``numerator / denominator`` (Envoy ``type.v3.FractionalPercent``).

    ``denominator`` is 100, 10 000 or 1 000 000. Envoy draws ``random % denominator`` and
    compares it with ``numerator``; :meth:`hits` does the same with an injected random value.
    A numerator above the denominator means "always".
    """

    numerator: int
    denominator: int = 100

    @property
    def fraction(self) -> float:
        """The probability in ``[0, 1]``."""
        return min(self.numerator, self.denominator) / self.denominator

    def hits(self, random_value: int) -> bool:
        """Whether a draw of ``random_value`` (any non-negative int) falls inside."""
        return random_value % self.denominator < self.numerator
