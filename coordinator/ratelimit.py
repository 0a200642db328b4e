"""Token buckets: the limits a node puts on what one client may do, and on its own logs.

``Rate`` is a limit's configuration (tokens per second and a burst); ``TokenBucket`` is
one bucket, refilled continuously, with no I/O: the caller passes the time. Limits that
hold per connection live in memory on the node that holds the connection; limits that
must hold cluster-wide (per user) are buckets in Redis (``state/limits.py``, the script
``scripts/buckets.py``), from which
``UserAllowance`` takes a few tokens at a time so that a steady stream of actions costs
one Redis call per batch rather than one per action.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .errors import ConfigError, LimitExceeded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rate:
    """``per_second`` tokens a second, at most ``burst`` saved up; ``per_second`` 0 means
    no limit. Written ``RATE`` or ``RATE:BURST`` (burst defaults to twice the rate)."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.per_second) and math.isfinite(self.burst)):
            raise ConfigError(f"a rate must be a finite number, got {self}")
        if self.per_second < 0 or (self.per_second > 0 and self.burst < 1):
            raise ConfigError(f"a rate needs per_second >= 0 and burst >= 1, got {self}")

    @property
    def unlimited(self) -> bool:
        return self.per_second == 0

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"20"`` (20/s, burst 40), ``"20:100"``, ``"0"`` or ``"off"`` (no limit)."""
        word = text.strip().lower()
        if word in ("0", "off", "none"):
            return UNLIMITED
        head, _, tail = word.partition(":")
        try:
            per_second = float(head)
            burst = float(tail) if tail else 2 * per_second
        except ValueError:
            raise ConfigError(f"expected RATE or RATE:BURST (e.g. 20:40), got {text!r}") from None
        return cls(per_second, max(1.0, burst))

    def __str__(self) -> str:
        if self.unlimited:
            return "off"
        return f"{_number(self.per_second)}/s (burst {_number(self.burst)})"


def _number(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:g}"


UNLIMITED = Rate(0.0, 0.0)


class TokenBucket:
    """One bucket; ``take`` at time ``now`` (seconds, monotonic). Starts full."""

    __slots__ = ("_at", "_tokens", "rate")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self._tokens = rate.burst
        self._at = now

    def take(self, now: float, n: float = 1.0) -> float:
        """Take ``n`` tokens: 0.0 when granted, else the seconds until they would be."""
        rate = self.rate
        if rate.unlimited:
            return 0.0
        tokens = min(rate.burst, self._tokens + (now - self._at) * rate.per_second)
        self._at = now
        if tokens >= n:
            self._tokens = tokens - n
            return 0.0
        self._tokens = tokens
        return (n - tokens) / rate.per_second

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled completely (it may as well be dropped)."""
        rate = self.rate
        return rate.unlimited or self._tokens + (now - self._at) * rate.per_second >= rate.burst


def retry_after(seconds: float) -> float:
    """A wait as told to clients: rounded up to milliseconds, never 0."""
    return max(0.001, math.ceil(seconds * 1000) / 1000)


def over(limit: str, rate: Rate, wait: float) -> LimitExceeded:
    return LimitExceeded(
        limit,
        f"rate limit: too many {limit} (limit {rate}); retry in {retry_after(wait):g}s",
        retry_after(wait),
    )


class LogThrottle:
    """At most ``rate`` log lines a second from one source, the rest counted: a client
    that sends garbage must not be able to fill the node's disk."""

    def __init__(self, logger: logging.Logger, rate: Rate = Rate(2.0, 20.0)) -> None:
        self._log = logger
        self._bucket = TokenBucket(rate, time.monotonic())
        self.suppressed = 0

    def info(self, msg: str, *args: object) -> None:
        self.emit(logging.INFO, msg, *args)

    def emit(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        said = self.allow()
        if said is not None:
            self._log.log(level, msg + said.replace("%", "%%"), *args, exc_info=exc_info)

    def allow(self) -> str | None:
        """Whether a line may go out now: None (it is counted), else what to add to it
        (the count of those left out since the last, or '')."""
        if self._bucket.take(time.monotonic()) > 0:
            self.suppressed += 1
            return None
        said = f" ({self.suppressed} similar line(s) suppressed)" if self.suppressed else ""
        self.suppressed = 0
        return said


# -- per-user limits, cluster-wide ---------------------------------------------------------
Take = Callable[[str, int], Awaitable[tuple[int, float]]]


class UserAllowance:
    """Tokens of each user's Redis bucket for one limit, taken a batch at a time.

    ``take_redis(user, want)`` takes up to ``want`` tokens from the user's bucket in Redis
    and returns ``(granted, seconds until one more)``. Tokens taken but not used within
    ``hold`` seconds are dropped, so a node never sits on a user's allowance; a user
    spread over several nodes can lose at most one batch per node that way, so the limit
    is never exceeded, only sometimes met a little early. A user's actions on one node
    wait for one Redis call at a time. A user Redis refused is
    refused here, without asking again, until the wait it was told has passed: a flood
    over the limit costs no Redis call per request.
    """

    def __init__(
        self,
        name: str,
        rate: Rate,
        take_redis: Take,
        *,
        batch: int | None = None,
        hold: float = 5.0,
    ) -> None:
        self.name = name
        self.rate = rate
        self._take = take_redis
        self._hold = hold
        # One Redis call per batch: a tenth of a second of the rate, within the burst.
        self.batch = batch or max(1, min(int(rate.burst) // 4, math.ceil(rate.per_second / 10)))
        self._held: dict[str, tuple[int, float]] = {}  # user -> (tokens, drop at)
        self._refused: dict[str, float] = {}  # user -> refused until (monotonic)
        self._fetching: dict[str, asyncio.Future[None]] = {}  # user -> its Redis call

    async def take(self, user: str, n: int = 1) -> None:
        """``n`` tokens for ``user`` (an action, or its bytes), or LimitExceeded with the
        wait. More than the burst can never be granted: refused as too large."""
        if self.rate.unlimited:
            return
        if n > self.rate.burst:
            raise LimitExceeded(
                self.name, f"too large for the limit on {self.name} ({self.rate})", None
            )
        while True:
            now = time.monotonic()
            until = self._refused.get(user)
            if until is not None:
                if now < until:
                    raise over(self.name, self.rate, until - now)
                del self._refused[user]
            if self._take_held(user, n, now):
                return
            fetching = self._fetching.get(user)
            if fetching is None:
                break
            # One Redis call per user at a time: a burst of one user's actions would
            # otherwise open as many calls (and grow the Redis pool as far).
            await asyncio.shield(fetching)
        held, _ = self._held.pop(user, (0, 0.0))
        done = asyncio.get_running_loop().create_future()
        self._fetching[user] = done
        try:
            granted, wait = await self._take(user, max(self.batch, n - held))
        finally:
            del self._fetching[user]
            done.set_result(None)
        now = time.monotonic()
        if len(self._held) + len(self._refused) > PRUNE_AT:
            self.forget_expired(now)
        tokens = held + granted
        if tokens < n:
            if tokens:  # kept for the next try, within the hold
                self._held[user] = (tokens, now + self._hold)
            else:  # the bucket is empty: nothing passes before the wait Redis told
                self._refused[user] = now + wait
            raise over(self.name, self.rate, max(wait, (n - tokens) / self.rate.per_second))
        if tokens > n:
            self._held[user] = (tokens - n, now + self._hold)

    def _take_held(self, user: str, n: int, now: float) -> bool:
        held = self._held.get(user)
        if held is None:
            return False
        tokens, until = held
        if now >= until:
            del self._held[user]
            return False
        if tokens < n:
            return False
        self._held[user] = (tokens - n, until)
        return True

    def forget_expired(self, now: float) -> None:
        """Drop what no user can use any more."""
        for user in [u for u, (n, until) in self._held.items() if n <= 0 or until <= now]:
            del self._held[user]
        for user in [u for u, until in self._refused.items() if until <= now]:
            del self._refused[user]


PRUNE_AT = 10_000  # users remembered before the expired ones are dropped
