"""Node membership in Redis: the registry of incarnations, their heartbeat leases, the
retired list, the reaper lock, and what a dead incarnation left behind."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import redis
import redis.cluster

from .. import scripts
from ..keys import KeySchema
from .core import StateCore, text


class RegistryOps(StateCore):
    # -- registration ----------------------------------------------------------------
    async def register(self, node: str, inc: str, ttl_ms: int) -> tuple[bool, str]:
        """Take the node's lease for ``inc``.

        Returns ``(True, previous registered incarnation or '')`` or, when another
        incarnation still holds the lease, ``(False, that incarnation)``.
        """
        k = self.keys
        if not await self.redis.set(k.node_lease(node), inc, nx=True, px=ttl_ms):
            return False, text(await self.redis.get(k.node_lease(node)))
        # The lease and the registry hash in different slots: a crash between the two
        # leaves the registry naming the old incarnation, whose lease is gone (reaped).
        prev = await self._run("enroll", [k.registry(), k.retired()], [node, inc])
        return True, text(prev)

    async def drop_lease(self, node: str, inc: str) -> bool:
        """Delete the node's lease if ``inc`` still holds it."""
        return bool(await self._run("delete_if", [self.keys.node_lease(node)], [inc]))

    async def unregister(self, node: str, inc: str) -> None:
        await self.drop_lease(node, inc)
        await self._run("hdel_if", [self.keys.registry()], [node, inc])

    async def registry(self) -> dict[str, str]:
        """node id -> its registered incarnation."""
        raw = await self.redis.hgetall(self.keys.registry())
        return {text(k): text(v) for k, v in raw.items()}

    async def retired(self) -> dict[str, str]:
        """Replaced incarnation -> node id, for those not yet released."""
        raw = await self.redis.hgetall(self.keys.retired())
        return {text(k): text(v) for k, v in raw.items()}

    async def forget_retired(self, inc: str) -> None:
        """Everything ``inc`` held has been released."""
        await self.redis.hdel(self.keys.retired(), inc)

    # -- leases ----------------------------------------------------------------------
    async def live_leases(self, incs: Mapping[str, str]) -> dict[str, float]:
        """Of ``incs`` (node -> incarnation), node -> seconds left on the lease, for the
        nodes whose lease that incarnation still holds. One round trip."""
        names = [node for node, inc in incs.items() if inc]
        if not names:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(self.keys.node_lease(name))
                pipe.pttl(self.keys.node_lease(name))
            rows = await pipe.execute()
        live: dict[str, float] = {}
        for i, name in enumerate(names):
            holder, ttl_ms = text(rows[2 * i]), int(rows[2 * i + 1])
            # PTTL -2: gone since the GET; -1 (never set by us): held, time unknown.
            if holder == incs[name] and ttl_ms != -2:
                live[name] = max(ttl_ms, 0) / 1000
        return live

    async def lease_left(self, inc: str) -> float | None:
        """Seconds left on ``inc``'s lease; None when it holds none (dead or replaced)."""
        node = inc.rsplit("/", 1)[0]
        return (await self.live_leases({node: inc})).get(node)

    async def owned(self, inc: str) -> dict[str, str]:
        """sid -> user of the loops ``inc`` runs (or ran, if it died)."""
        raw = await self.redis.hgetall(self.keys.node_owned(inc))
        return {text(k): text(v) for k, v in raw.items()}

    async def owned_by(self, incs: Sequence[str]) -> set[str]:
        """Conversations whose loops any of ``incs`` runs (one round trip)."""
        if not incs:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for inc in incs:
                pipe.hkeys(self.keys.node_owned(inc))
            rows = await pipe.execute()
        return {text(sid) for names in rows for sid in names}

    async def loads(self, incs: Sequence[str]) -> list[tuple[list[str], int]]:
        """Per incarnation: the loops it runs (sorted) and its connection count."""
        if not incs:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for inc in incs:
                pipe.hkeys(self.keys.node_owned(inc))
                pipe.hlen(self.keys.node_conns(inc))
            rows = await pipe.execute()
        return [
            (sorted(text(s) for s in rows[2 * i]), int(rows[2 * i + 1])) for i in range(len(incs))
        ]

    async def drop_incarnation_keys(self, inc: str, *, connections: bool) -> None:
        """Delete ``inc``'s indexes once what they list was released."""
        k = self.keys
        names = [k.node_owned(inc), k.node_idle(inc)]
        if connections:
            names.append(k.node_conns(inc))
        await self.redis.delete(*names)

    # -- node-to-node commands -------------------------------------------------------
    async def publish_command(self, node: str, message: bytes) -> None:
        channel = self.keys.node_channel(node)
        if self.sharded:
            await self.redis.spublish(channel, message)
        else:
            await self.redis.publish(channel, message)


class LeaseRenewer:
    """The lease keeper thread's own Redis access: one blocking client, one script."""

    def __init__(self, client: redis.Redis | redis.cluster.RedisCluster, keys: KeySchema) -> None:
        self._client = client
        self._keys = keys
        self._renew = client.register_script(scripts.RENEW)

    def renew(self, node: str, inc: str, ttl_ms: int) -> bool:
        """Extend the node's lease if ``inc`` still holds it; False when it was lost."""
        return bool(self._renew(keys=[self._keys.node_lease(node)], args=[inc, ttl_ms]))

    def close(self) -> None:
        self._client.close()
