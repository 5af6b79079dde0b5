"""When to renew a certificate and how long to back off: pure functions of time and chance.

Theory of operation: a certificate valid over ``[not_before, not_after]`` is renewed at
``not_before + lifetime * fraction * (1 - jitter * u)`` for a uniform ``u`` in ``[0, 1)``
(Istio's agent renews at 50 % of the lifetime by default; the jitter spreads renewals of
many workloads started together, and only ever moves renewal *earlier*). A failed renewal is
retried after an exponential backoff with full jitter, capped, and never later than a
safety margin before expiry.
"""

from __future__ import annotations

__all__ = ["renewal_time", "retry_delay"]


def renewal_time(
    not_before: float,
    not_after: float,
    *,
    fraction: float = 0.5,
    jitter: float = 0.1,
    u: float = 0.0,
) -> float:
    """The time to renew a certificate valid over ``[not_before, not_after]``.

    ``fraction`` in (0, 1], ``jitter`` in [0, 1), ``u`` a uniform draw in [0, 1).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError("fraction must be in (0, 1]")
    if not 0.0 <= jitter < 1.0:
        raise ValueError("jitter must be in [0, 1)")
    lifetime = max(0.0, not_after - not_before)
    return not_before + lifetime * fraction * (1.0 - jitter * u)


def retry_delay(
    attempt: int,
    *,
    base: float = 1.0,
    cap: float = 30.0,
    u: float = 1.0,
    now: float | None = None,
    not_after: float | None = None,
) -> float:
    """Seconds to wait before retry ``attempt`` (1 = the first retry), full jitter.

    ``u`` in [0, 1] scales the exponential step (``u=1`` gives the upper bound). With ``now``
    and ``not_after`` the delay never passes the last tenth of the remaining lifetime.
    """
    step = min(cap, base * (2.0 ** max(0, min(attempt, 32) - 1)))
    delay = max(base / 10.0, step * u)
    if now is not None and not_after is not None and not_after > now:
        delay = min(delay, max(base / 10.0, (not_after - now) * 0.1))
    return delay
