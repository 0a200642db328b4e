"""Idle loops: this node's last-active times in Redis, and closing the loops idle too long.

Runners mark themselves active in memory; a flush writes the marked ones to the node's
idle index (a sorted set) and their users' claims, so it costs O(loops active since the
last flush). A sweep closes the loops idle past ``close_delay``, not RUNNING and with no
connection on any node, at O(expired) Redis commands (DESIGN guarantee 6).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from redis.exceptions import RedisError

from workers.protocol import AgentState

from .config import ManagerConfig
from .errors import CoordinatorError
from .runner import LoopRunner
from .state import RedisState, text

log = logging.getLogger(__name__)

SWEEP_BATCH = 32  # idle loops closed at once by a sweep


class IdleSweeper:
    def __init__(
        self,
        state: RedisState,
        config: ManagerConfig,
        runners: Mapping[str, LoopRunner],
        inc: Callable[[], str],
        close: Callable[[str], Awaitable[bool]],
    ) -> None:
        """``runners``: the node's live table of loops; ``inc``: its current incarnation;
        ``close(sid)``: stop a loop, True when it was stopped."""
        self._state = state
        self._config = config
        self._runners = runners
        self._inc = inc
        self._close = close
        self._dirty: set[str] = set()  # loops active since the last flush

    def touched(self, sid: str) -> None:
        """A loop was active (its runner's ``last_active`` says when)."""
        self._dirty.add(sid)

    async def flush(self) -> None:
        """Write last-active times of this node's loops to the idle index and claims.

        Costs O(loops active since the last flush), not O(loops)."""
        keys = self._state.keys
        marked, self._dirty = self._dirty, set()
        dirty = {sid: self._runners[sid].last_active for sid in marked if sid in self._runners}
        if not dirty:
            return
        by_user: dict[str, dict[str, int]] = {}
        for sid, ts in dirty.items():
            by_user.setdefault(self._runners[sid].lease.user, {})[sid] = int(ts * 1000)
        async with self._state.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.node_idle(self._inc()), {s: int(t * 1000) for s, t in dirty.items()})
            for user, scores in by_user.items():
                pipe.zadd(keys.user_claims(user), scores, xx=True, gt=True)
            try:
                await pipe.execute()
            except BaseException:
                self._dirty |= marked  # flush them next time
                raise

    async def sweep(self) -> list[str]:
        """Close this node's loops idle past close_delay, not RUNNING, with no connection.

        Costs O(expired) Redis commands: one range query on the idle index, one
        pipelined connection count for the candidates, then the closes.
        """
        keys = self._state.keys
        await self.flush()
        threshold = int((time.time() - self._config.close_delay) * 1000)
        raw = await self._state.redis.zrangebyscore(keys.node_idle(self._inc()), "-inf", threshold)
        candidates = []
        for name in raw:
            sid = text(name)
            runner = self._runners.get(sid)
            if runner is None or runner.agent_state == AgentState.RUNNING:
                continue
            if runner.last_active * 1000 > threshold:
                continue
            candidates.append(sid)
        if not candidates:
            return []
        async with self._state.redis.pipeline(transaction=False) as pipe:
            for sid in candidates:
                pipe.hlen(keys.conv_conns(sid))
            counts = await pipe.execute()
        expired = [sid for sid, n in zip(candidates, counts, strict=True) if n == 0]
        closed = []
        # Closed concurrently, a bounded number at a time: the sweep's duration stays
        # a few round trips however many loops expired together.
        for start in range(0, len(expired), SWEEP_BATCH):
            batch = expired[start : start + SWEEP_BATCH]
            results = await asyncio.gather(
                *(self._close(sid) for sid in batch), return_exceptions=True
            )
            for sid, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("closing idle loop %s failed: %s", sid, result)
                elif result:
                    closed.append(sid)
        if closed:
            log.info("closed %d idle loop(s)", len(closed))
        return closed

    async def flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.idle_flush_interval)
            try:
                await self.flush()
            except (RedisError, OSError) as exc:
                log.warning("activity flush failed: %s", exc)

    async def sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.cleanup_interval)
            try:
                await self.sweep()
            except (RedisError, OSError, CoordinatorError) as exc:
                log.warning("idle sweep failed: %s", exc)
