"""Idle loops: this node's last-active times in Redis, and which loops are idle too long.

Runners mark themselves active in memory (``touched``); a flush writes the marked ones to
the node's idle index (a sorted set) and their users' claims, so it costs O(loops active
since the last flush). The index is scored by when each loop may close (last active plus
its own ``close_delay``, which a conversation may set at creation), so ``expired`` finds
the loops idle past theirs, not RUNNING and with no connection on any node, at
O(expired) Redis commands; ``Loops.sweep_idle`` closes them (guarantee 6 of
docs/design.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from workers.protocol import AgentState

from .config import ManagerConfig
from .membership import Membership
from .state import RedisState

if TYPE_CHECKING:
    from .runner import LoopRunner

log = logging.getLogger(__name__)


class IdleTracker:
    """``runners``: the node's table of loops (read only); ``membership`` names the
    incarnation whose idle index this is."""

    def __init__(
        self,
        *,
        state: RedisState,
        config: ManagerConfig,
        runners: Mapping[str, LoopRunner],
        membership: Membership,
    ) -> None:
        self._state = state
        self._config = config
        self._runners = runners
        self._membership = membership
        self._dirty: set[str] = set()  # loops active since the last flush
        self._writing = asyncio.Lock()  # one flush at a time (see ``flush``)

    def touched(self, sid: str) -> None:
        """A loop was active (its runner's ``last_active`` says when)."""
        self._dirty.add(sid)

    async def flush(self) -> None:
        """Write last-active times of this node's loops to the idle index and claims.

        Costs O(loops active since the last flush), not O(loops). A flush called while
        another writes waits for it, so what was touched before the call is in Redis
        when it returns (the other may have taken those marks)."""
        async with self._writing:
            await self._write()

    async def _write(self) -> None:
        marked, self._dirty = self._dirty, set()
        active = [self._runners[sid] for sid in marked if sid in self._runners]
        try:
            await self._state.flush_activity(
                self._membership.inc,
                {r.sid: int(r.last_active * 1000) for r in active},
                {r.sid: r.lease.user for r in active},
                {r.sid: int((r.last_active + r.close_delay) * 1000) for r in active},
            )
        except BaseException:
            self._dirty |= marked  # flush them next time
            raise

    async def expired(self) -> list[str]:
        """This node's loops idle past their close_delay, not RUNNING, with no connection.

        Costs O(expired) Redis commands: a flush, one range query on the idle index and
        one pipelined connection count for the candidates."""
        await self.flush()
        now = time.time()
        candidates = []
        for sid in await self._state.idle_since(self._membership.inc, int(now * 1000)):
            runner = self._runners.get(sid)
            if runner is None or runner.agent_state == AgentState.RUNNING:
                continue
            if runner.last_active + runner.close_delay > now:
                continue
            candidates.append(sid)
        counts = await self._state.connection_counts(candidates)
        return [sid for sid, n in zip(candidates, counts, strict=True) if n == 0]
