"""Node membership: the heartbeat lease, the local lease clock, and reaping the dead.

A node's conversation leases are its incarnation's heartbeat lease: renewing one key
renews them all. The node measures validity with its own monotonic clock from the moment
it *sent* each successful renewal, and fences every loop ``lease_margin`` before the
lease could expire in Redis; a successor can only take over after that expiry, and the
fencing epoch rejects any write the old owner still attempts.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

from redis.exceptions import RedisError

from .codec import NODE_LOST, pack, status_event
from .config import ManagerConfig
from .state import RedisState, text

log = logging.getLogger(__name__)

REAP_CONCURRENCY = 32  # conversations of a dead incarnation released at once


def new_incarnation(node: str) -> str:
    return f"{node}/{uuid.uuid4().hex[:12]}"


class Membership:
    def __init__(
        self,
        state: RedisState,
        config: ManagerConfig,
        on_lapse: Callable[[str], None],
    ) -> None:
        self._state = state
        self._config = config
        self._on_lapse = on_lapse
        self.node = config.node_id
        self.inc = ""
        self._valid_until = 0.0  # loop.time() at which the Redis lease may expire
        self._watchdog: asyncio.TimerHandle | None = None
        self.lapsed = True
        self.renew_failures = 0

    @property
    def ttl_ms(self) -> int:
        return int(self._config.node_ttl * 1000)

    def lease_valid(self) -> bool:
        loop = asyncio.get_running_loop()
        return not self.lapsed and loop.time() < self._valid_until - self._config.lease_margin

    async def register(self) -> str:
        """Register a new incarnation; returns the previous one of this node id ('' if none).

        If another incarnation of this node id still holds the lease (a restart within
        ``node_ttl``), wait for it to expire rather than run beside it.
        """
        inc = new_incarnation(self.node)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.node_ttl + 2
        while True:
            t0 = loop.time()
            ok, other = await self._state.register(self.node, inc, self.ttl_ms)
            if ok:
                self._arm(t0)
                self.inc = inc
                self.lapsed = False
                return other
            if loop.time() > deadline:
                raise RuntimeError(f"node id {self.node!r} is in use by {other}")
            log.warning("node id %s still leased by %s; waiting for it to expire", self.node, other)
            await asyncio.sleep(0.25)

    def _arm(self, sent_at: float) -> None:
        loop = asyncio.get_running_loop()
        self._valid_until = sent_at + self._config.node_ttl
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = loop.call_at(
            self._valid_until - self._config.lease_margin, self._lapse, "lease not renewed"
        )

    def _lapse(self, why: str) -> None:
        if self.lapsed:
            return
        self.lapsed = True
        log.error("node %s lease lapsed (%s): fencing its loops", self.inc, why)
        self._on_lapse(why)

    def check(self) -> bool:
        """Enforce the local lease clock now (a paused process may not have run its timer)."""
        if not self.lapsed and not self.lease_valid():
            self._lapse("lease clock ran out")
        return not self.lapsed

    async def heartbeat(self) -> bool:
        """One renewal. Returns False when the incarnation is gone and must be replaced."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        inc = self.inc
        try:
            ok = await asyncio.wait_for(
                self._state.renew(self.node, inc, self.ttl_ms),
                timeout=self._config.heartbeat_interval,
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self.renew_failures += 1
            log.warning("heartbeat failed (%s); lease valid for %.1fs", exc, self.remaining())
            self.check()
            return True
        self.renew_failures = 0
        if inc != self.inc:
            return True  # a new incarnation registered meanwhile: this answer is stale
        if not ok:
            self._lapse("lease lost in Redis")
            return False
        if self.lapsed:
            return False  # renewed late: start a fresh incarnation all the same
        self._arm(t0)
        return True

    def remaining(self) -> float:
        return max(0.0, self._valid_until - asyncio.get_running_loop().time())

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


async def reap_incarnation(
    state: RedisState, inc: str, *, keep_connections: bool, maxlen: int
) -> list[tuple[str, str]]:
    """Release everything a dead (or replaced) incarnation held. Idempotent.

    Its conversations become unowned (and their clients get a status event), their cap
    slots are freed, and, unless kept, its connections are forgotten. Returns the number
    ``(sid, user)`` of the conversations released.
    """
    keys = state.keys
    owned = await state.redis.hgetall(keys.node_owned(inc))
    released: list[tuple[str, str]] = []
    lost = pack(
        status_event(
            NODE_LOST,
            "The node running this conversation was lost; it restarts on the next action.",
            "stopped",
        )
    )
    gate = asyncio.Semaphore(REAP_CONCURRENCY)

    async def release(sid: str, user: str) -> None:
        async with gate:
            if await state.release(sid, inc, None, "stopped"):
                released.append((sid, user))
                await state.commit(sid, "", 0, [lost], maxlen=maxlen)
            await state.release_slot(user, sid, inc)

    # Concurrently, a bounded number at a time: a node may have held thousands.
    await asyncio.gather(*(release(text(s), text(u)) for s, u in owned.items()))
    if not keep_connections:
        conns = await state.redis.hgetall(keys.node_conns(inc))
        sids = sorted({text(v) for v in conns.values()})
        users: dict[str, str] = {}
        if sids:
            async with state.redis.pipeline(transaction=False) as pipe:
                for sid in sids:
                    pipe.hget(keys.conv(sid), "user")
                users = {sid: text(u) for sid, u in zip(sids, await pipe.execute(), strict=True)}
            async with state.redis.pipeline(transaction=False) as pipe:
                for raw_cid, raw_sid in conns.items():
                    sid = text(raw_sid)
                    pipe.hdel(keys.conv_conns(sid), raw_cid)
                    pipe.hdel(keys.user_conns(users.get(sid, "")), raw_cid)
                await pipe.execute()
        await state.redis.delete(keys.node_conns(inc))
    await state.redis.delete(keys.node_owned(inc), keys.node_idle(inc))
    return released


async def reap_dead_nodes(
    state: RedisState, me: str, lock_ms: int, maxlen: int
) -> list[tuple[str, str]]:
    """Find registered nodes whose lease is gone and reap them (one reaper at a time).

    Returns ``(sid, user)`` of every conversation released.
    """
    registry = await state.registry()
    if not registry:
        return []
    live = await state.live_incarnations(registry)
    dead = [(node, inc) for node, inc in registry.items() if live.get(node) != inc]
    if not dead:
        return []
    lock = state.keys.reaper_lock()
    if not await state.redis.set(lock, me, nx=True, px=lock_ms):
        return []
    reaped: list[tuple[str, str]] = []
    try:
        for node, inc in dead:
            released = await reap_incarnation(state, inc, keep_connections=False, maxlen=maxlen)
            await state.unregister(node, inc)
            log.warning("reaped dead node %s: released %d conversation(s)", inc, len(released))
            reaped.extend(released)
    finally:
        await state.delete_if(lock, me)
    return reaped
