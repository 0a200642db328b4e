"""After a lost node: reaping the dead, and this node's own comeback after a lapse.

Reaping: any live node, one at a time (the reaper lock), releases what a dead incarnation
held: its conversations become unowned and their clients get ``STATUS$NODE_LOST``, their
cap slots are freed, its connections are forgotten; conversations with acknowledged
actions waiting are restarted (``restarts.py``). An incarnation replaced by a
re-registration stays on the retired list until then, so a node that dies halfway
through coming back is still cleaned up.

Each heartbeat interval (at once when the lease was lost) ``housekeeping_loop``
re-registers if needed, retries deferred work, refreshes the live-node cache and reaps:
at once when that refresh saw a registered node without its lease, and at least every
``node_ttl / 2`` (for incarnations retired by a re-registration, which it does not see).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from . import codec
from .config import ManagerConfig
from .delivery import Floor
from .directory import Directory
from .errors import REDIS_TROUBLE
from .eventstore import StoreMismatch
from .layout import LayoutMismatch
from .loops import Loops
from .membership import Membership
from .restarts import Restarts
from .sessions import Sessions
from .state import RedisState

log = logging.getLogger(__name__)

REAP_CONCURRENCY = 32  # conversations of a dead incarnation released at once


async def reap_incarnation(
    state: RedisState, inc: str, *, keep_connections: bool, floor: Floor, retention_ms: int
) -> list[tuple[str, str]]:
    """Release everything a dead (or replaced) incarnation held. Idempotent.

    Its conversations become unowned (and their clients get a status event), their cap
    slots are freed, and, unless kept, its connections are forgotten (a conversation no
    node runs whose last connection one was retires after ``retention_ms``). Returns
    ``(sid, user)`` of the conversations released.
    """
    released: list[tuple[str, str]] = []
    lost = codec.pack(codec.lost_event())
    gate = asyncio.Semaphore(REAP_CONCURRENCY)

    async def release(sid: str, user: str) -> None:
        async with gate:
            if await state.release_lost(sid, user, inc):
                released.append((sid, user))
                await state.commit(sid, "", 0, [lost], floor=floor(sid))

    owned = await state.owned(inc)
    # Its loops could not store what they had logged: a sweep moves it (any node's).
    await state.note_unstored(owned)
    # Concurrently, a bounded number at a time: a node may have held thousands.
    await asyncio.gather(*(release(s, u) for s, u in owned.items()))
    if not keep_connections:
        conns = await state.node_connections(inc)
        users = await state.users_of(sorted(set(conns.values())))
        gone = [(cid, sid, users.get(sid, "")) for cid, sid in conns.items()]
        await state.remove_connections(gone, inc, retention_ms)
    await state.drop_incarnation_keys(inc, connections=not keep_connections)
    if not keep_connections:  # else the caller forgets it once it re-added them
        await state.forget_retired(inc)
    return released


async def reap_dead_nodes(
    state: RedisState, me: str, lock_ms: int, floor: Floor, retention_ms: int
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
            released = await reap_incarnation(
                state, inc, keep_connections=False, floor=floor, retention_ms=retention_ms
            )
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
    deadline = time.monotonic() + wait
    held = await state.take_lock(state.keys.reaper_lock(), me, lock_ms)
    while not held and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        held = await state.take_lock(state.keys.reaper_lock(), me, lock_ms)
    try:
        yield held
    finally:
        if held:
            await state.drop_lock(state.keys.reaper_lock(), me)


class Recovery:
    """This node's part in recovering from lost nodes, itself included."""

    def __init__(
        self,
        *,
        state: RedisState,
        config: ManagerConfig,
        membership: Membership,
        directory: Directory,
        loops: Loops,
        restarts: Restarts,
        sessions: Sessions,
        floor: Floor,
        claim_facts: Callable[[], Awaitable[None]],
    ) -> None:
        self._claim_facts = claim_facts
        self._state = state
        self._config = config
        self._membership = membership
        self._directory = directory
        self._loops = loops
        self._restarts = restarts
        self._sessions = sessions
        self._floor = floor
        self._ttl_ms = int(config.node_ttl * 1000)
        # What is released at start (a previous incarnation of this node id) is resumed
        # once the node runs.
        self.released_at_start: list[tuple[str, str]] = []

    async def reap_previous(self, previous: str) -> None:
        """At start: release what this node id's previous incarnation held."""
        if previous:
            self.released_at_start = await reap_incarnation(
                self._state,
                previous,
                keep_connections=False,
                floor=self._floor,
                retention_ms=self._config.retention_ms,
            )

    async def housekeeping_loop(self) -> None:
        """Each heartbeat interval (or at once when the lease was lost): re-register if
        needed, retry deferred work, refresh the live-node cache, reap dead nodes (as
        soon as the refresh sees one: each heartbeat it lists is a client's wait)."""
        cfg = self._config
        reap_every = max(1, round(cfg.node_ttl / 2 / cfg.heartbeat_interval))
        lost = self._membership.lost
        n = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.heartbeat_interval):
                    await lost.wait()
            n += 1
            try:
                if lost.is_set():
                    lost.clear()
                    await self.rotate_incarnation()
                await self._sessions.retry_deferred()
                await self._restarts.retry(await self._loops.owners.retry_abandoned())
                await self._directory.refresh()
                if self._directory.lost_self:
                    # Others see this node dead and take its conversations: stop its
                    # loops now and register afresh (at once: ``lost`` is set), before
                    # taking any conversation from a node just as dead.
                    self._membership.lost_in_redis()
                    continue
                if n % reap_every == 0 or self._directory.sees_dead:
                    reaped_at = time.time()
                    released = await reap_dead_nodes(
                        self._state,
                        self._membership.inc,
                        self._ttl_ms,
                        self._floor,
                        self._config.retention_ms,
                    )
                    await self._restarts.resume_pending(released, lost_at=reaped_at)
            except REDIS_TROUBLE as exc:
                log.warning("membership refresh failed: %s", exc)
            except Exception:
                log.exception("membership round failed; retrying next heartbeat")

    async def rotate_incarnation(self) -> None:
        """Our lease lapsed: loops are fenced; re-register and re-assert our connections."""
        membership, state = self._membership, self._state
        old = membership.inc
        # A late renewal may have kept our old lease alive: drop it, we start afresh.
        await state.drop_lease(membership.node, old)
        await membership.register()
        log.warning("node %s re-registered as %s", old, membership.inc)
        # A reaper that saw the old incarnation dead would delete our connections even
        # after they are re-added here: wait for it to finish (it holds the lock).
        async with reaper_lock(
            state, membership.inc, self._ttl_ms, wait=self._config.node_ttl
        ) as held:
            if not held:
                log.warning("re-registering connections without the reaper lock")
            released = await reap_incarnation(
                state, old, keep_connections=True, floor=self._floor, retention_ms=0
            )
            # Re-add first: were we to die between the two, a reaper (the old incarnation
            # stays on the retired list until the end) still finds every connection.
            await self._sessions.reassert()
            await state.drop_node_connections(old)
            await state.forget_retired(old)
        # While unregistered, writers that saw no other listener did not publish.
        self._sessions.connections.catch_up_all()
        await self._restarts.resume_pending(released)
        # Redis may have come back empty, the cluster's store and layout forgotten with
        # the rest: recorded again, so that a node started with another is refused.
        try:
            await self._claim_facts()
        except (StoreMismatch, LayoutMismatch) as exc:
            log.error("%s", exc)
