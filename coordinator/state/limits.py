"""Limits that must hold cluster-wide, in Redis: a user's token buckets (actions, joins,
conversation creations) and the cap on a user's open connections; and the sized log
read that keeps a replay's memory bounded.

A user's connections are counted by the hash every node already keeps of them
(``keys.user_conns``), which disconnects and the reapers of dead nodes clean: so a
connection's place under the cap is given back however it ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

from workers.protocol import Event

from .core import StateCore, entries, text


class LimitOps(StateCore):
    async def take_tokens(
        self, user: str, limit: str, per_second: float, burst: float, want: int = 1
    ) -> tuple[int, float]:
        """Up to ``want`` tokens from ``user``'s bucket for ``limit``: ``(granted, seconds
        until one more)``, granted 0 when the bucket is empty."""
        r = await self._run(
            "take_tokens",
            [self.keys.user_bucket(user, limit)],
            [repr(float(per_second)), repr(float(burst)), int(want)],
        )
        return int(r[0]), int(r[1]) / 1000

    async def claim_connection(self, cid: str, sid: str, user: str, inc: str, cap: int) -> int:
        """List connection ``cid`` under ``user`` unless the user already holds ``cap``
        connections; returns how many the user holds (with this one), or 0 if refused.

        The connection is first listed under this node's incarnation, in the same round
        trip: a node that dies right after leaves it where the reaper looks."""
        k = self.keys
        sha = self._scripts["claim_connection"].sha
        for attempt in (1, 2):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(k.node_conns(inc), cid, sid)
                pipe.evalsha(sha, 1, k.user_conns(user), cid, sid, cap)
                try:
                    _, (listed, count) = await pipe.execute()
                    break
                except NoScriptError:  # Redis lost its scripts (a restart): load, again
                    if attempt == 2:
                        raise
                    await self.load_scripts()
        if not listed:
            await self.redis.hdel(k.node_conns(inc), cid)
            return 0
        return int(count)

    # -- replays bounded in bytes (delivery.py) ----------------------------------------
    async def events_after_sized(
        self, sid: str, after: int, count: int
    ) -> tuple[list[tuple[int, Event]], int]:
        """``events_after`` with the packed size of what it read, so that a replay can
        size its next page in bytes: a client's replay holds one page at a time."""
        rows: Any = await self.redis.xrange(self.keys.events(sid), min=f"({after}-0", count=count)
        size = sum(len(fields[b"d"]) for _, fields in rows)
        return entries(rows), size

    # -- a user's view of the cluster --------------------------------------------------
    async def connection_holders(self, sids: Sequence[str]) -> dict[str, str]:
        """connection id -> incarnation holding it, for the connections of ``sids``."""
        rows = await self._hgetall_many([self.keys.conv_conns(sid) for sid in sids])
        return {cid: text(inc) for row in rows for cid, inc in row.items()}
