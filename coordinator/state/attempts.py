"""How often an action's dispatch failed its agent worker: what stops a poison action.

An action whose dispatch stalled or killed its worker ``max_dispatch_attempts`` times is
answered with an error instead of being dispatched again (``remoteagent.py``). The count
is kept with the inbox, in the conversation's hash tag, so it follows the action from
node to node: a successor that finds it spent does not dispatch it. It is written when a
failure happens (the node saw the worker fail), read before a fresh agent instance's
first dispatch, forgotten when a failed action then goes through, and otherwise left to
expire (a day after its last failure) or to be dropped by the next action's failure.
"""

from __future__ import annotations

from .core import StateCore, text

ATTEMPTS_TTL_MS = 24 * 3600 * 1000


class AttemptOps(StateCore):
    async def failed_dispatches(self, sid: str, action_id: int) -> tuple[int, str]:
        """``(dispatches of action_id that failed their worker, why the last did)``."""
        r = await self._run(
            "attempts", [self.keys.attempts(sid)], [action_id, "", ATTEMPTS_TTL_MS], hot=True
        )
        return int(r[0]), text(r[1])

    async def dispatch_failed(self, sid: str, action_id: int, why: str) -> int:
        """Count a dispatch of ``action_id`` that failed its worker (``why``: stalled,
        worker died, memory); the count so far."""
        r = await self._run(
            "attempts", [self.keys.attempts(sid)], [action_id, why, ATTEMPTS_TTL_MS], hot=True
        )
        return int(r[0])

    async def forget_attempts(self, sid: str, action_id: int) -> None:
        """``action_id`` went through after all: nothing to count any more."""
        await self.redis.hdel(self.keys.attempts(sid), str(action_id), f"{action_id}:why")

    async def attempts(self, sid: str) -> dict[str, str]:
        """The conversation's counts as stored (for tools and tests)."""
        raw = await self.redis.hgetall(self.keys.attempts(sid))
        return {text(k): text(v) for k, v in raw.items()}
