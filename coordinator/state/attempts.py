"""How often each action was dispatched in an agent worker: what stops a poison action.

An action whose dispatch stalls or kills its worker again and again is given up after
``max_dispatch_attempts`` (``remoteagent.py``). The count is kept with the inbox, in the
conversation's hash tag, so it follows the action from node to node: a successor that
finds it spent does not dispatch it again. It is counted before each dispatch starts
(one script written on the action path's lane beside the dispatch, whose reply is
read only if the dispatch fails) and forgotten once a
later action is dispatched, the loop closes, or a day passes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .core import StateCore, text

ATTEMPTS_TTL_MS = 24 * 3600 * 1000


class AttemptOps(StateCore):
    async def begin_attempt(self, sid: str, action_id: int) -> tuple[int, str]:
        """Count one more dispatch of ``action_id``: ``(dispatches so far, this one
        included; why the last one failed, '' if none did)``."""
        r = await self._run(
            "attempt", [self.keys.attempts(sid)], [action_id, ATTEMPTS_TTL_MS, ""], hot=True
        )
        return int(r[0]), text(r[1])

    def begin_attempt_now(
        self, sid: str, action_id: int, previous: int
    ) -> asyncio.Future[Any] | None:
        """``begin_attempt``, written to Redis at once on the lane (the action path's
        connection: ~20 us of CPU against ~100 us for a task and a call); its reply, for
        ``attempt_counted``, is the caller's. ``previous``: the action this loop counted
        before (its fields are dropped; 0: every other action's). None when the lane is
        not connected."""
        if self.lane is None:
            return None
        key = self.keys.attempts(sid)
        args = [action_id, ATTEMPTS_TTL_MS, previous or ""]
        return self.lane.send_now(self._scripts["attempt"], [key], args)

    @staticmethod
    def attempt_counted(reply: Any) -> tuple[int, str]:
        """What ``begin_attempt_now``'s reply says (as ``begin_attempt`` returns it)."""
        return int(reply[0]), text(reply[1])

    async def attempt_failed(self, sid: str, action_id: int, why: str) -> None:
        """Record why the last dispatch of ``action_id`` failed (for a successor that
        gives it up)."""
        key = self.keys.attempts(sid)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, f"{action_id}:why", why)
            pipe.pexpire(key, ATTEMPTS_TTL_MS)
            await pipe.execute()

    async def forget_attempts(self, sid: str, action_id: int) -> None:
        """``action_id`` was dispatched to the end: nothing to count any more."""
        await self.redis.hdel(self.keys.attempts(sid), str(action_id), f"{action_id}:why")

    async def attempts(self, sid: str) -> dict[str, str]:
        """The conversation's counts as stored (for tools and tests)."""
        raw = await self.redis.hgetall(self.keys.attempts(sid))
        return {text(k): text(v) for k, v in raw.items()}
