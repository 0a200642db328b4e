"""What the browser pages need from Redis: the nodes' advertised public URLs and a few
read-only views of conversations (their watchers by node).

An advertisement is a field of one cluster-wide hash (node id -> JSON), written again by
its node every few seconds while it serves and withdrawn when it stops; one left behind
by a killed node is pruned by a reader once it is old. Nothing here is on a hot path.
"""

from __future__ import annotations

from collections.abc import Sequence

from .core import StateCore, text


class ViewOps(StateCore):
    # -- advertised public URLs ------------------------------------------------------
    async def advertise(self, node: str, value: str) -> None:
        """Write ``node``'s advertisement (replacing its previous one)."""
        await self.redis.hset(self.keys.node_urls(), node, value)

    async def withdraw(self, node: str, value: str) -> bool:
        """Delete ``node``'s advertisement if it is still ``value`` (a newer one by a
        restarted node of the same id stays)."""
        return bool(await self._run("hdel_if", [self.keys.node_urls()], [node, value]))

    async def advertisements(self) -> dict[str, str]:
        """node id -> its advertisement, live or not."""
        raw = await self.redis.hgetall(self.keys.node_urls())
        return {text(k): text(v) for k, v in raw.items()}

    # -- conversations ---------------------------------------------------------------
    async def watchers(self, sids: Sequence[str]) -> list[dict[str, str]]:
        """Per conversation: connection id -> incarnation of the node holding it."""
        return await self._hgetall_many([self.keys.conv_conns(s) for s in sids])
