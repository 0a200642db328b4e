"""What one client may ask of a node: its rate limits, checked at the edge (socket.io
handlers, REST) before any work is done.

- actions per connection: a bucket in memory, per connection;
- actions per user, and their bytes: the user's buckets in Redis, taken a batch at a
  time (``ratelimit.UserAllowance``), so they hold across every node the user reaches;
- joins per user and conversation creations per user: a token from the user's Redis
  bucket each;
- REST requests per user: the user's Redis bucket, taken a batch at a time.

The number of connections a user holds open is capped where joins are registered
(``sessions.py``, ``max_connections_per_user``). Every refusal is a ``LimitExceeded``
naming the limit and the wait: an error ack with ``retry_after``, a connect error, or
HTTP 429 with Retry-After.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from . import codec
from .errors import REDIS_TROUBLE, LimitExceeded, NodeStopped
from .ratelimit import LogThrottle, Rate, Take, TokenBucket, UserAllowance, over
from .serverconfig import ServerConfig
from .state import RedisState

log = logging.getLogger(__name__)
# Why a bucket in Redis could not be asked: Redis full or away, or the node stopped.
UNASKED: tuple[type[Exception], ...] = (*REDIS_TROUBLE, NodeStopped)


class Quotas:
    """The per-client limits of one node; ``state`` gives the started node's state layer."""

    def __init__(self, config: ServerConfig, state: Callable[[], RedisState]) -> None:
        self.config = config
        self._state = state
        self._buckets: dict[str, TokenBucket] = {}
        self.user_actions = UserAllowance(
            "actions per user", config.actions_per_user, self._redis_bucket("actions")
        )
        self.user_bytes = UserAllowance(
            "action bytes per user",
            config.action_bytes_per_user,
            self._redis_bucket("action_bytes"),
        )
        self.joins = UserAllowance(
            "joins per user", config.joins_per_user, self._redis_bucket("joins"), batch=1
        )
        self.creations = UserAllowance(
            "creations per user",
            config.creations_per_user,
            self._redis_bucket("creations"),
            batch=1,
        )
        self.requests = UserAllowance(
            "requests per user", config.requests_per_user, self._redis_bucket("requests")
        )
        self.refused: Counter[str] = Counter()  # limit -> refusals, for /metrics
        self._requests_off_until = 0.0  # monotonic: the request limit's bucket failed
        self._limit_off = LogThrottle(log, Rate(0.1, 1.0))

    def _redis_bucket(self, limit: str) -> Take:
        rate = getattr(self.config, f"{limit}_per_user")
        assert isinstance(rate, Rate)

        async def take(user: str, want: int) -> tuple[int, float]:
            return await self._state().take_tokens(user, limit, rate.per_second, rate.burst, want)

        return take

    # -- connections -----------------------------------------------------------------
    def opened(self, cid: str) -> None:
        self._buckets[cid] = TokenBucket(self.config.actions_per_connection, time.monotonic())

    def closed(self, cid: str) -> None:
        self._buckets.pop(cid, None)

    # -- checks: each returns, or raises LimitExceeded -------------------------------
    async def action(self, cid: str | None, user: str | None, action: Any = None) -> None:
        """An action (or, without ``action``, any event) from connection ``cid`` (None: a
        REST request's) of ``user`` (None: not joined, so only the connection's own
        bucket applies); its packed bytes count against the user's byte rate."""
        try:
            bucket = self._buckets.get(cid) if cid is not None else None
            if bucket is not None:
                wait = bucket.take(time.monotonic())
                if wait > 0:
                    raise over("actions per connection", bucket.rate, wait)
            if user:
                await self.user_actions.take(user)
                size = self._size(action)
                if size:
                    await self.user_bytes.take(user, size)
        except LimitExceeded as exc:
            self.refused[exc.limit] += 1
            raise

    def _size(self, action: Any) -> int:
        """The packed size of an action, for the bytes a user may send (0 when that is not
        limited, or when it cannot be packed: the action's check says why then)."""
        if action is None or self.config.action_bytes_per_user.unlimited:
            return 0
        try:
            return len(codec.pack(action))
        except (TypeError, ValueError, OverflowError):
            return 0

    async def join(self, user: str) -> None:
        await self._one(self.joins, user)

    async def creation(self, user: str) -> None:
        await self._one(self.creations, user)

    async def request(self, user: str) -> None:
        """An authenticated REST request of ``user`` (taken a batch at a time). Its
        bucket is a write to Redis: a Redis that is full or away lets the request by,
        which then meets Redis itself only if it needs it (history is read from the
        store; a purge is what frees Redis). Refusing them all made every REST call
        answer "Redis is full" at the bound. After such a failure the limit is off for
        a second: a Redis that does not answer made each request wait its timeout, one
        request of a user after the other. A stopped node's requests pass too (each says
        so itself)."""
        if time.monotonic() < self._requests_off_until:
            return
        try:
            await self._one(self.requests, user)
        except UNASKED as exc:
            self._requests_off_until = time.monotonic() + 1.0
            self._limit_off.emit(
                logging.WARNING, "REST request limit not applied for 1s: %s", exc or repr(exc)
            )

    async def _one(self, allowance: UserAllowance, user: str) -> None:
        try:
            await allowance.take(user)
        except LimitExceeded as exc:
            self.refused[exc.limit] += 1
            raise
