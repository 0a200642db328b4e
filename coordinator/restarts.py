"""Restarting loops that lost theirs: after an action for a conversation nobody runs,
after its owner was lost or drained while clients here watch it, after a start or an
eviction left acknowledged actions waiting, and after this node's own lease lapsed.

Restarts run in the background, at most ``max_concurrent_restarts`` at once: when a node
with thousands of loops is lost, its conversations come back in waves. One that fails is
tried again each heartbeat (``retry``) until its pending actions have a loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .bus import CommandBus
from .directory import Directory
from .errors import EXPECTED, REDIS_TROUBLE
from .loops import STORE_FLUSH_WITHIN, Loops
from .membership import Membership
from .metrics import NodeMetrics
from .owners import ConversationInfo, Intake
from .ratelimit import LogThrottle, Rate
from .state import RedisState
from .tasks import TaskSet

log = logging.getLogger(__name__)

# Seconds a node whose clients watch a conversation its draining owner is moving waits
# for that owner to let it go: it stores what the store lacks first (STORE_FLUSH_WITHIN).
HANDOFF_WAIT = STORE_FLUSH_WITHIN + 3.0


class Restarts:
    def __init__(
        self,
        *,
        loops: Loops,
        state: RedisState,
        intake: Intake,
        membership: Membership,
        directory: Directory,
        bus: CommandBus,
        tasks: TaskSet,
        metrics: NodeMetrics,
        max_concurrent: int,
    ) -> None:
        self._loops = loops
        self._state = state
        self._intake = intake
        self._membership = membership
        self._directory = directory
        self._bus = bus
        self._tasks = tasks
        self._metrics = metrics
        self._later: dict[str, str] = {}  # sid -> user, restarts that failed
        self._running: set[str] = set()
        self._gate = asyncio.Semaphore(max_concurrent)
        self._restoring = LogThrottle(log, Rate(1.0, 10.0))
        bus.on("resume", self._on_resume)
        loops.orphaned = self.resume_pending

    def _busy(self, sid: str) -> bool:
        return sid in self._loops.starting or sid in self._loops.runners

    async def restore(self, sid: str, user: str) -> ConversationInfo:
        """``sid`` is gone from Redis while clients here watch it: a loop of it here
        can no longer write (fenced), and it starts again from the event store."""
        runner = self._loops.runners.get(sid)
        if runner is not None:
            runner.fence("its record is gone from Redis")
        # Each action of each watched conversation comes here until its record is back:
        # after a Redis restart that is a line per action, thousands at once.
        self._restoring.emit(
            logging.WARNING,
            "conversation %s is gone from Redis; restoring it from the event store",
            sid,
        )
        return await self._loops.ensure_running(sid, user, {}, None)

    async def ensure_served(self, sid: str, user: str, owner_inc: str) -> None:
        """An action was accepted for ``sid``, owned by ``owner_inc`` ('' if none): if no
        loop runs it, start one here in the background (the action waits in the inbox)."""
        if self._busy(sid) or self._intake.draining:
            return
        mine = owner_inc == self._membership.inc
        if mine or not owner_inc or not await self._directory.alive(owner_inc):
            self.schedule(sid, user)

    def owner_gone(
        self, sid: str, user: str, lost_at: float | None, *, moving_from: str | None = None
    ) -> None:
        """The owner of ``sid`` was lost or drained (noticed at Unix time ``lost_at``)
        and clients here watch it: restart it (one node wins the lease). ``moving_from``:
        the draining owner said so (naming itself; '' if its notice names none), which
        it does before it lets the loop go."""
        if not self._intake.draining and sid not in self._loops.starting:
            self.schedule(sid, user, lost_at, moving_from=moving_from)

    def schedule(
        self,
        sid: str,
        user: str,
        lost_at: float | None = None,
        *,
        moving_from: str | None = None,
    ) -> None:
        """Restart ``sid``'s loop in the background; while our lease is lapsed, only note
        it (thousands of conversations may come back at once) for after re-registering.
        ``lost_at``: when its owner was found lost, for the failover time."""
        if self._membership.lapsed:
            self._later[sid] = user
        elif sid not in self._running:
            self._tasks.spawn(self._restart(sid, user, lost_at, moving_from), f"restart:{sid}")

    async def _restart(
        self, sid: str, user: str, lost_at: float | None = None, moving_from: str | None = None
    ) -> None:
        if sid in self._running:
            return
        self._running.add(sid)
        try:
            if sid not in self._loops.runners:
                info = await self._start(sid, user)
                if moving_from is not None:
                    info = await self._once_let_go(sid, user, info, moving_from)
                if info.local and info.running and lost_at is not None:
                    self._metrics.observe_failover(max(0.0, time.time() - lost_at))
        except EXPECTED as exc:
            # E.g. our lease lapsed or Redis failed mid-start: try again each heartbeat.
            if self._membership.lapsed:
                log.debug("restart of %s waits for the lease: %s", sid, exc)
            else:
                log.warning("could not restart %s (%s); retrying", sid, exc)
            if not self._intake.draining:
                self._later[sid] = user
        finally:
            self._running.discard(sid)

    async def _once_let_go(
        self, sid: str, user: str, info: ConversationInfo, draining: str
    ) -> ConversationInfo:
        """A draining owner writes its notice, stores what the store lacks, then lets
        the loop go: found still running there, ``sid`` is started again once it is let
        go (unless another node takes it first), for up to ``HANDOFF_WAIT`` seconds.
        Found running on another node (it won), nothing is left to do. ``draining``: the
        node the notice named ('': none named; the node found running it is taken for it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDOFF_WAIT
        delay = 0.05
        holder = draining or info.owner
        while info.running and not info.local and info.owner == holder:
            if loop.time() + delay > deadline or self._intake.draining:
                break
            await asyncio.sleep(delay)  # not holding a place among the restarts
            delay = min(delay * 2, 0.5)
            info = await self._start(sid, user)
        return info

    async def _start(self, sid: str, user: str) -> ConversationInfo:
        async with self._gate:
            return await self._loops.ensure_running(sid, user, {}, None)

    async def resume_pending(
        self, released: list[tuple[str, str]], lost_at: float | None = None
    ) -> None:
        """Restart released conversations that hold acknowledged, unprocessed actions
        (those watched by clients are restarted by the nodes holding the clients, when
        the status event reaches them; this covers actions nobody watches). A draining
        node hands them to live nodes instead. ``lost_at``: when their owner was found
        lost (a reap), for the failover time."""
        if not released:
            return
        try:
            pending = await self._state.inbox_lengths([sid for sid, _ in released])
        except REDIS_TROUBLE:
            # Not forgotten: tried again on the next heartbeat (``retry``).
            for sid, user in released:
                self._later.setdefault(sid, user)
            raise
        others = sorted(self._directory.live_incarnations() - {self._membership.inc})
        for i, ((sid, user), n) in enumerate(zip(released, pending, strict=True)):
            if not n or self._busy(sid):
                continue
            if not self._intake.draining:
                self.schedule(sid, user, lost_at)
            elif others:
                target = others[i % len(others)]
                await self._bus.send_to_owner(target, "resume", {"sid": sid, "user": user})

    async def retry(self, also: list[tuple[str, str]]) -> None:
        """Each heartbeat: restarts that failed, and ``also`` (given up starts)."""
        for sid, user in also:
            self._later.setdefault(sid, user)
        if self._later and self._membership.check():
            retry, self._later = self._later, {}
            await self.resume_pending(list(retry.items()))

    async def _on_resume(self, origin: str, p: dict[str, Any]) -> None:
        """A draining node hands over a conversation with actions waiting."""
        await self.resume_pending([(str(p["sid"]), str(p["user"]))])
