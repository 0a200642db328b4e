"""The clients' rate limits that must hold cluster-wide: a user's token buckets
(actions, their bytes, joins, conversation creations), in Redis (``quotas.py`` takes
them a batch at a time).

The cap on a user's open connections needs no state of its own: it counts the hash
every node already keeps of them (``keys.user_conns``, ``connections.py``), which
disconnects and the reapers of dead nodes clean, so a connection's place under the cap
is given back however it ends.
"""

from __future__ import annotations

from .core import StateCore, text


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

    async def revoke_user(self, user: str, at_ms: int, keep_ms: int) -> None:
        """Record that ``user``'s tokens issued until ``at_ms`` are revoked, and forget
        revocations older than ``keep_ms`` (no token issued before them is valid still)."""
        key = self.keys.revoked()
        _, old = await self._commands(
            [("ZADD", key, "GT", at_ms, user), ("ZRANGEBYSCORE", key, "-inf", at_ms - keep_ms - 1)]
        )
        if old:
            await self.redis.zrem(key, *old)

    async def revocations(self) -> dict[str, float]:
        """user -> when (Unix time, seconds) their tokens issued until then were revoked."""
        rows = await self.redis.zrangebyscore(self.keys.revoked(), "-inf", "+inf", withscores=True)
        return {text(row[0]): float(row[1]) / 1000 for row in rows}
