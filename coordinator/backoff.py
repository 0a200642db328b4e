"""Retry delays from redis-py's backoff strategies, with the failure count they need.

Equal jitter (redis-py's ``EqualJitterBackoff``): the n-th delay is uniform in
``[d/2, d]`` with ``d = min(cap, base * 2**n)``, so retries spread out but never come
back sooner than half the nominal delay (full jitter may retry at once, which a loop
retrying a Redis that is down does not need).
"""

from __future__ import annotations

from redis.backoff import AbstractBackoff, EqualJitterBackoff


class Backoff:
    """Successive delays of one retrying operation; ``reset`` after a success."""

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self._strategy: AbstractBackoff = EqualJitterBackoff(cap=cap, base=base)
        self._failures = 0

    def next(self) -> float:
        delay = self._strategy.compute(self._failures)
        self._failures = min(self._failures + 1, 30)
        return delay

    @property
    def failures(self) -> int:
        """Failures since the last success (``next`` calls since ``reset``)."""
        return self._failures

    def reset(self) -> None:
        self._failures = 0
