"""Node membership: the heartbeat lease, the local lease clock, and reaping the dead.

A node's conversation leases are its incarnation's heartbeat lease: renewing one key
renews them all. Renewals are sent from a thread of their own (``LeaseKeeper``) with its
own Redis connection, so a node whose event loop is busy (a join burst on a saturated
machine) keeps its lease; the event loop proves it is alive by ticking, and the keeper
stops renewing once the loop has not ticked for ``node_ttl - lease_margin`` (a loop that
is stuck is as good as dead). The node measures validity with the monotonic clock from
the moment it *sent* each successful renewal, and fences every loop ``lease_margin``
before the lease could expire in Redis; a successor can only take over after that
expiry, and the fencing epoch rejects any write the old owner still attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from . import scripts
from .codec import NODE_LOST, pack, status_event
from .config import ManagerConfig
from .state import RedisState, text

log = logging.getLogger(__name__)

REAP_CONCURRENCY = 32  # conversations of a dead incarnation released at once
RETRY_AFTER = 0.1  # seconds between renewal attempts while Redis does not answer


def new_incarnation(node: str) -> str:
    return f"{node}/{uuid.uuid4().hex[:12]}"


class Membership:
    def __init__(
        self,
        state: RedisState,
        config: ManagerConfig,
        on_lapse: Callable[[str], None],
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self._state = state
        self._config = config
        self._on_lapse = on_lapse
        self._on_lost = on_lost  # the incarnation must be replaced (called in the loop)
        self.node = config.node_id
        self.inc = ""
        self._valid_until = 0.0  # time.monotonic() at which the Redis lease may expire
        self._watchdog: asyncio.TimerHandle | None = None
        self._keeper: LeaseKeeper | None = None
        self.last_tick = time.monotonic()
        self.lapsed = True
        self.renew_failures = 0

    @property
    def ttl_ms(self) -> int:
        return int(self._config.node_ttl * 1000)

    @property
    def max_stall(self) -> float:
        """How long the event loop may go without ticking before renewals stop."""
        return self._config.node_ttl - self._config.lease_margin

    def lease_valid(self) -> bool:
        return not self.lapsed and time.monotonic() < self._valid_until - self._config.lease_margin

    async def register(self) -> str:
        """Register a new incarnation; returns the previous one of this node id ('' if none).

        If another incarnation of this node id still holds the lease (a restart within
        ``node_ttl``), wait for it to expire rather than run beside it.
        """
        inc = new_incarnation(self.node)
        deadline = time.monotonic() + self._config.node_ttl + 2
        while True:
            t0 = time.monotonic()
            ok, other = await self._state.register(self.node, inc, self.ttl_ms)
            if ok:
                self.inc = inc
                self.lapsed = False
                self._arm(t0)
                return other
            if time.monotonic() > deadline:
                raise RuntimeError(f"node id {self.node!r} is in use by {other}")
            log.warning("node id %s still leased by %s; waiting for it to expire", self.node, other)
            await asyncio.sleep(0.25)

    def start_keeper(self, redis_url: str) -> None:
        """Start renewing from the keeper thread (after ``register``)."""
        if self._keeper is None:
            self._keeper = LeaseKeeper(self, redis_url, asyncio.get_running_loop())
            self._keeper.start()

    async def renew_now(self) -> bool:
        """One renewal by the keeper, now (for tools and tests); False if Redis failed."""
        if self._keeper is None:
            raise RuntimeError("the lease keeper is not running")
        return await asyncio.to_thread(self._keeper.renew)

    def tick(self) -> None:
        """Called from the event loop: it is running (see ``max_stall``)."""
        self.last_tick = time.monotonic()

    def _arm(self, sent_at: float) -> None:
        self._valid_until = sent_at + self._config.node_ttl
        if self._watchdog is not None:
            self._watchdog.cancel()
        loop = asyncio.get_running_loop()
        delay = self._valid_until - self._config.lease_margin - time.monotonic()
        self._watchdog = loop.call_later(max(0.0, delay), self._expire)

    def _expire(self) -> None:
        # The clock, not the timer, decides; a timer that fired a hair early looks again.
        if self.lapsed:
            return
        deadline = self._valid_until - self._config.lease_margin
        if time.monotonic() < deadline:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(deadline - time.monotonic() + 0.001, self._expire)
        else:
            self._lapse("lease not renewed")

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

    def renewed(self, inc: str, sent_at: float, ok: bool) -> None:
        """A renewal's answer, handed to the event loop by the keeper."""
        if inc != self.inc:
            return  # a new incarnation registered meanwhile: this answer is stale
        self.renew_failures = 0
        if not ok:
            self._lapse("lease lost in Redis")
            self._on_lost()
        elif self.lapsed:
            self._on_lost()  # renewed too late: start a fresh incarnation all the same
        else:
            self._arm(sent_at)

    def renew_failed(self, exc: BaseException) -> None:
        self.renew_failures += 1
        if self.renew_failures % 10 == 1:  # retries come every 0.1 s: log a few
            log.warning("heartbeat failed (%r); lease valid for %.1fs", exc, self.remaining())
        self.check()

    def remaining(self) -> float:
        return max(0.0, self._valid_until - time.monotonic())

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._keeper is not None:
            self._keeper.stop()
            self._keeper = None


class LeaseKeeper(threading.Thread):
    """Renews the node's lease every ``heartbeat_interval`` from its own thread and Redis
    connection, while the event loop keeps ticking; answers go back to the loop."""

    def __init__(
        self, membership: Membership, redis_url: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(name=f"lease-{membership.node}", daemon=True)
        cfg = membership._config
        self._m = membership
        self._loop = loop
        self._interval = cfg.heartbeat_interval
        self._key = membership._state.keys.node_lease(membership.node)
        self._client = redis.Redis.from_url(
            redis_url,
            socket_timeout=cfg.heartbeat_interval,
            socket_connect_timeout=cfg.heartbeat_interval,
            # A connection Redis closed (a restart) fails once; retry on a fresh one.
            retry=Retry(NoBackoff(), 1),
        )
        self._renew = self._client.register_script(scripts.RENEW)
        self._stopping = threading.Event()
        self._stalled = False

    def run(self) -> None:
        wait = self._interval
        try:
            while not self._stopping.wait(wait):
                # After a failure, try again soon: Redis may be back well before the
                # next interval, and the lease clock keeps running.
                wait = self._interval if self.renew() else min(RETRY_AFTER, self._interval)
        finally:
            self._client.close()

    def renew(self) -> bool:
        """One renewal attempt; False when Redis could not be reached."""
        m = self._m
        stalled = time.monotonic() - m.last_tick > m.max_stall
        if stalled != self._stalled:
            self._stalled = stalled
            if stalled:
                log.error(
                    "event loop of %s has not run for %.1fs: renewals stop", m.inc, m.max_stall
                )
        if stalled:
            return True
        inc, sent_at = m.inc, time.monotonic()
        try:
            ok = bool(self._renew(keys=[self._key], args=[inc, m.ttl_ms]))
        except (RedisError, OSError) as exc:
            self._call(m.renew_failed, exc)
            return False
        self._call(m.renewed, inc, sent_at, ok)
        return True

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the node is gone
            self._stopping.set()

    def stop(self) -> None:
        self._stopping.set()


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
            gone = [(text(cid), text(sid), users.get(text(sid), "")) for cid, sid in conns.items()]
            await state.remove_connections(gone, inc)
        await state.redis.delete(keys.node_conns(inc))
    await state.redis.delete(keys.node_owned(inc), keys.node_idle(inc))
    if not keep_connections:  # else the caller forgets it once it re-added them
        await state.forget_retired(inc)
    return released


async def reap_dead_nodes(
    state: RedisState, me: str, lock_ms: int, maxlen: int
) -> list[tuple[str, str]]:
    """Find registered nodes whose lease is gone and reap them (one reaper at a time).

    Returns ``(sid, user)`` of every conversation released.
    """

    async def find_dead() -> list[tuple[str, str]]:
        registry = await state.registry()
        live = await state.live_leases(registry)
        dead = [(node, inc) for node, inc in registry.items() if node not in live]
        # Incarnations replaced by a re-registration stay listed until released: their
        # node may have died before it released them.
        retired = await state.retired()
        return dead + sorted((node, inc) for inc, node in retired.items())

    if not await find_dead():
        return []
    reaped: list[tuple[str, str]] = []
    async with reaper_lock(state, me, lock_ms, wait=0) as held:
        if not held:
            return []
        # Again under the lock: one reaped meanwhile is gone from both lists. A lapsed
        # node re-registering waits for this lock before it re-adds its connections, so
        # reaping its old incarnation here cannot delete them after they were re-added.
        for node, inc in await find_dead():
            released = await reap_incarnation(state, inc, keep_connections=False, maxlen=maxlen)
            await state.unregister(node, inc)
            log.warning("reaped dead node %s: released %d conversation(s)", inc, len(released))
            reaped.extend(released)
    return reaped


@contextlib.asynccontextmanager
async def reaper_lock(
    state: RedisState, me: str, lock_ms: int, *, wait: float
) -> AsyncIterator[bool]:
    """Hold the cluster's reaper lock (yields whether it was taken within ``wait`` s).

    Reapers hold it while they release dead incarnations; a node re-registering after a
    lapse holds it while it re-registers its connections, so no reaper that saw its old
    incarnation dead deletes them after it re-added them.
    """
    lock = state.keys.reaper_lock()
    deadline = time.monotonic() + wait
    held = bool(await state.redis.set(lock, me, nx=True, px=lock_ms))
    while not held and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        held = bool(await state.redis.set(lock, me, nx=True, px=lock_ms))
    try:
        yield held
    finally:
        if held:
            await state.delete_if(lock, me)
