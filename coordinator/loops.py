"""The loops this node runs: starting one (ownership, the cap, the runner) and stopping
one (when closed, idle, evicted, drained or fenced). Restarts are in ``restarts.py``.

``Loops`` owns the node's table of runners; ``Delivery`` and the idle tracker read it.
A start takes ownership (``owners.py``: epoch bumped), lists the loop under this
incarnation, waits for one of the user's cap slots (``admission.py``), then starts the
runner; anything that fails on the way is given up (``Owners.give_up``) so a conversation is
never left owned by a live node that runs no loop for it. A stop releases slot,
ownership and the incarnation's indexes in one state call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from workers.protocol import AgentFactory, AgentState, Event

from . import codec
from .actions import Actions
from .admission import Admission
from .archive import Archiver
from .bus import CommandBus
from .config import DEFAULT_LIFETIMES, Lifetimes, ManagerConfig
from .delivery import Delivery
from .directory import Directory
from .errors import EXPECTED, REDIS_TROUBLE, Fenced, Forbidden, NodeDraining
from .eventstore import EventStore
from .idle import IdleTracker
from .membership import Membership
from .memory import Memories
from .metrics import NodeMetrics
from .owners import ConversationInfo, Intake, Owners
from .runner import LoopRunner
from .state import Lease, RedisState
from .subscriptions import Interest
from .tasks import TaskSet

log = logging.getLogger(__name__)

SWEEP_BATCH = 32  # idle loops closed at once by a sweep
STORE_FLUSH_WITHIN = 2.0  # seconds a stopping loop waits for its events to be stored


def _running(loop: weakref.ref[LoopRunner] | None) -> bool:
    runner = loop() if loop is not None else None
    return runner is not None and runner.running


class Loops:
    """Starts, stops and restarts this node's agent loops. Built once per node start;
    ``runners`` is the node's table of loops (this class is its only writer)."""

    def __init__(
        self,
        *,
        runners: dict[str, LoopRunner],
        state: RedisState,
        config: ManagerConfig,
        intake: Intake,
        membership: Membership,
        directory: Directory,
        bus: CommandBus,
        interest: Interest,
        actions: Actions,
        delivery: Delivery,
        idle: IdleTracker,
        metrics: NodeMetrics,
        tasks: TaskSet,
        agent_factory: AgentFactory,
        archiver: Archiver,
        store: EventStore,
        memories: Memories,
    ) -> None:
        self.runners = runners
        self._offline = False  # closing without Redis (``fence_all``)
        self._archiver = archiver
        self._memories = memories
        self._state = state
        self._config = config
        self._intake = intake
        self._membership = membership
        self._directory = directory
        self._bus = bus
        self._interest = interest
        self._actions = actions
        self._delivery = delivery
        self._idle = idle
        self._metrics = metrics
        self._tasks = tasks
        self._agent_factory = agent_factory
        self.admission = Admission(state, config, self.evict_owner)
        self.owners = Owners(
            state=state,
            config=config,
            intake=intake,
            membership=membership,
            directory=directory,
            store=store,
            interest=interest,
            busy=lambda sid: sid in self.runners or sid in self.starting,
            floor=delivery.floor,
        )
        self.starting: dict[str, asyncio.Future[ConversationInfo]] = {}
        # Evictions under way here: sid -> the nodes to tell when its slot is free.
        self._evicting: dict[str, set[str]] = {}
        # Conversations left with acknowledged actions and no loop here (a fenced loop,
        # an eviction's backlog): ``Restarts`` sets this to its ``resume_pending``.
        self.orphaned: Callable[[list[tuple[str, str]]], Awaitable[None]] | None = None
        membership.on_lapse(self.fence_all)
        bus.on("evict", self._on_evict)
        bus.on("slot_freed", self._on_slot_freed)
        bus.on("close", self._on_close)

    def running(self) -> set[str]:
        return {sid for sid, r in self.runners.items() if r.running}

    # -- starting --------------------------------------------------------------------
    async def ensure_running(
        self,
        sid: str,
        user: str,
        settings: Mapping[str, Any],
        initial: codec.Action | None,
        org: str = "",
        lifetimes: Lifetimes = DEFAULT_LIFETIMES,
        *,
        joining: bool = False,
        latest: int | None = None,
    ) -> ConversationInfo:
        """Make sure ``sid``'s loop runs somewhere; start it here if nowhere (creating the
        conversation for ``user``, with ``lifetimes``). ``initial`` is accepted as its
        first action when this call starts the loop, as the seed's: not when it runs
        already, here or elsewhere, or another call is starting it (so a retried create
        does not send its message twice); ``org``: the user's organisation, from their
        token (admission.py).
        ``joining``: a connection's join asks, having seen events up to ``latest``; what
        would refuse the join (``latest`` past the last event, the user's connection
        cap) refuses the start before it creates, takes or evicts anything."""
        runner = self.runners.get(sid)
        if runner is not None and runner.running:
            if runner.lease.user != user and user:
                raise Forbidden(sid)
            return ConversationInfo(sid, runner.lease.user, self._config.node_id, True, True)
        pending = self.starting.get(sid)
        if pending is not None:
            info = replace(await asyncio.shield(pending), created=False)  # not by this call
            if info.user != user and user:
                raise Forbidden(sid)
            return info
        fut: asyncio.Future[ConversationInfo] = asyncio.get_running_loop().create_future()
        self.starting[sid] = fut
        try:
            info = await self._start(
                sid, user, dict(settings), initial, org, lifetimes, joining, latest
            )
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters get it through shield
            raise
        else:
            fut.set_result(info)
            return info
        finally:
            del self.starting[sid]

    async def _start(
        self,
        sid: str,
        user: str,
        settings: dict[str, Any],
        initial: codec.Action | None,
        org: str,
        lifetimes: Lifetimes,
        joining: bool,
        latest: int | None,
    ) -> ConversationInfo:
        node = self._config.node_id
        if not self._membership.check():
            raise NodeDraining(f"node {node} lost its lease; it takes no loops until back")
        acquired = await self.owners.acquire(sid, user, lifetimes, latest)
        if isinstance(acquired, ConversationInfo):  # a live owner runs it
            return acquired
        own = acquired
        # New here: not one the store held and Redis had let go (created again from it).
        created = own.status == "created" and not own.applied
        lease = Lease(sid, own.user, self._membership.inc, own.epoch)
        close_delay, max_running_time = Lifetimes(own.close_delay, own.max_running_time).effective(
            self._config
        )
        if self._intake.draining:
            await self._state.release(sid, lease.inc, lease.epoch, "stopped")
            self._intake.check()
        try:
            # Listed under this incarnation (for the reapers) and subscribed (before the
            # runner starts: actions accepted after its first write or read go by as
            # events), in one round trip's time.
            done = await asyncio.gather(
                self._state.record_start(
                    lease, created=own.status == "created", idle_for=close_delay
                ),
                self._interest.watch(sid),
                return_exceptions=True,
            )
            for result in done:
                if isinstance(result, BaseException):
                    raise result
            if initial is not None:
                await self._actions.accept(sid, user, initial)
            admitted = await self.admission.admit(lease, org, joining)
            if lease.inc != self._membership.inc or self._membership.lapsed:
                # Our lease lapsed meanwhile: a loop started now would be fenced at once,
                # and a refused claim (dropped with the old incarnation) is no eviction.
                # The caller retries once the node is back.
                raise NodeDraining(f"node {node} lost its lease while starting {sid}")
        except BaseException:
            await self.owners.give_up(lease, None)
            raise
        if not admitted:
            await self.owners.give_up(lease, codec.evicted_event())
            return ConversationInfo(sid, lease.user, "", False, False, created)
        # The memory knows its runner weakly: the runner holds it (its agents' contexts),
        # and a cycle would wait for the cyclic GC's rare full collection.
        loop: weakref.ref[LoopRunner] | None = None
        memory = await self._memories.open(
            lease,
            lambda: _running(loop) and self._membership.lease_valid(),
            resume=not created,
        )
        runner = LoopRunner(
            lease=lease,
            applied=own.applied,
            new_agent=lambda after: self._agent_factory(memory.context(settings, after)),
            speculative=self._config.speculative_dispatch,
            state=self._state,
            config=self._config,
            lease_valid=self._membership.lease_valid,
            on_fenced=self._fenced,
            delivery=self._delivery,
            activity=self._idle,
            metrics=self._metrics,
            close_delay=close_delay,
            max_running_time=max_running_time,
            archiver=self._archiver,
        )
        loop = weakref.ref(runner)
        self.runners[sid] = runner
        try:
            await runner.start()
        except BaseException:
            if self.runners.get(sid) is runner:
                del self.runners[sid]
            await runner.aclose()
            # A runner fenced meanwhile gave its channel reference back (``_fenced``).
            await self.owners.give_up(lease, None, watched=not runner.fenced)
            raise
        return ConversationInfo(sid, lease.user, node, True, True, created)

    # -- stopping --------------------------------------------------------------------
    async def stop(self, sid: str, status: Event | None) -> bool:
        """Stop the local loop of ``sid`` (telling its clients ``status``), once its start
        under way here (if any) has ended; False if none runs."""
        pending = self.starting.get(sid)
        if pending is not None:  # its outcome is its own caller's; a cancel here is ours
            await asyncio.wait([pending])
        runner = self.runners.get(sid)
        if runner is None:
            return False
        await runner.aclose()
        if status is not None:
            with contextlib.suppress(Fenced, *REDIS_TROUBLE):
                await runner.emit_status(status)
        stored = False
        if not runner.fenced:
            # Stopped with nothing left in Redis that the store lacks, when it can be had
            # quickly; else its next owner moves the rest.
            stored = await self._archiver.flush(runner.lease, STORE_FLUSH_WITHIN)
        if self.runners.get(sid) is runner:
            del self.runners[sid]
        self._archiver.forget(sid)
        if not runner.fenced:
            # All in the store: its Redis state may expire (--redis-retention).
            retention = self._config.retention_ms if stored else 0
            try:
                if not stored:  # the store lacks some: a sweep moves them (any node's)
                    await self._state.note_unstored([sid])
                await self._state.release_loop(runner.lease, str(AgentState.STOPPED), retention)
            except REDIS_TROUBLE as exc:
                log.warning("releasing %s deferred: %s", sid, exc)
                self.owners.abandon(runner.lease)
        if not runner.fenced:  # fenced while stopping: ``_finish_fenced`` gives it back
            await self._interest.unwatch(sid)
        return True

    def fence_all(self, why: str, *, offline: bool = False) -> None:
        """The lease lapsed: every loop stops now, writing nothing. ``offline``: the node
        closes without Redis (its stop ran out of time): nothing is written after them
        either, what they held is the reapers'."""
        self._offline = self._offline or offline
        runners = list(self.runners.values())
        if runners:
            log.warning("fencing %d loop(s): %s", len(runners), why)
        for runner in runners:
            runner.fence(why, quiet=True)

    def _fenced(self, runner: LoopRunner) -> None:
        if self.runners.get(runner.sid) is runner:
            del self.runners[runner.sid]
            self._archiver.forget(runner.sid)
        self._tasks.spawn(self._finish_fenced(runner), f"fenced:{runner.sid}")

    async def _finish_fenced(self, runner: LoopRunner) -> None:
        await runner.aclose()
        if not self._membership.lapsed and not self._offline:
            with contextlib.suppress(*REDIS_TROUBLE):  # the restarts retry theirs
                await self._state.forget_loop(runner.lease)
                # Whoever fenced it may not run it: acknowledged actions need a loop.
                await self._orphaned(runner.sid, runner.lease.user)
        await self._interest.unwatch(runner.sid)

    async def _orphaned(self, sid: str, user: str) -> None:
        if self.orphaned is not None:
            await self.orphaned([(sid, user)])

    async def sweep_idle(self) -> list[str]:
        """Close this node's loops idle past their close_delay, not RUNNING, with no
        connection anywhere; the ones closed. Costs O(expired) Redis commands
        (``idle.py``). Loops past their max_running_time are closed first, with their
        connections (found in memory: a look at each local loop's deadline)."""
        expired = await self._idle.expired()
        now = time.time()
        overdue = [sid for sid, r in self.runners.items() if r.stop_at and r.stop_at <= now]
        for sid in overdue:  # ran their max_running_time: closed, their clients told
            with contextlib.suppress(*EXPECTED):
                await self.stop(sid, codec.overdue_event())
        closed = []
        # Closed concurrently, a bounded number at a time: the sweep's duration stays
        # a few round trips however many loops expired together.
        for start in range(0, len(expired), SWEEP_BATCH):
            batch = expired[start : start + SWEEP_BATCH]
            results = await asyncio.gather(
                *(self.stop(sid, None) for sid in batch), return_exceptions=True
            )
            for sid, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("closing idle loop %s failed: %s", sid, result)
                elif result:
                    closed.append(sid)
        if closed:
            log.info("closed %d idle loop(s)", len(closed))
        return closed

    # -- evictions (the cap) ---------------------------------------------------------
    async def evict_owner(self, sid: str, user: str, inc: str) -> None:
        """Have the owner ``inc`` of an evicted loop stop it (or free a dead one's hold)."""
        if inc == self._membership.inc:
            self._evict_once(sid, user, self._config.node_id)
        elif await self._directory.alive(inc):
            await self._bus.send_to_owner(inc, "evict", {"sid": sid, "user": user})
        else:
            await self.release_dead(sid, user, inc)

    def _evict_once(self, sid: str, user: str, origin: str) -> None:
        """Evict ``sid`` here, once at a time: a start waiting for the slot asks again
        every second (``Admission._nudge``), and each ask used to start another drain of
        the loop's backlog beside the first. A later ask joins the one under way, which
        tells its ``origin`` too when the slot is free."""
        origins = self._evicting.get(sid)
        if origins is not None:
            origins.add(origin)
            return
        self._evicting[sid] = {origin}
        self._tasks.spawn(self._evict_local(sid, user), f"evict:{sid}")

    async def _evict_local(self, sid: str, user: str) -> None:
        try:
            pending = self.starting.get(sid)
            if pending is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pending)
            runner = self.runners.get(sid)
            backlog = False
            if runner is not None:
                # Acknowledged actions reach the loop before it stops; the cap holds
                # meanwhile (the slot stays taken until the loop is gone).
                within = min(10.0, self._config.start_timeout / 2)
                backlog = not await runner.finish_backlog(within)
            if not await self.stop(sid, codec.evicted_event()):
                await self._state.release_slot(user, sid, self._membership.inc)
            elif backlog:  # acknowledged actions still wait: they need a loop (restarts.py)
                await self._orphaned(sid, user)
        finally:
            # An ask from now on is a new eviction (of whatever runs then): the ones
            # that joined this one are told now, as its own origin is.
            origins = self._evicting.pop(sid, set())
        for origin in sorted(origins):
            if origin == self._config.node_id:
                self.admission.slot_freed(user)
            else:
                await self._bus.send(origin, "slot_freed", {"user": user})

    async def release_dead(self, sid: str, user: str, inc: str) -> None:
        """Free what a dead incarnation held for one conversation; tell its clients."""
        if await self._state.release_lost(sid, user, inc):
            await self._state.commit(
                sid, "", 0, [codec.pack(codec.lost_event())], floor=self._delivery.floor(sid)
            )
        self.admission.slot_freed(user)

    async def close_unserved(self, sid: str, user: str, inc: str) -> None:
        """Close a conversation no live node runs (``close_session``): free what a dead
        owner ``inc`` held, and log the closed notice (unowned, a system write), which
        closes its connections on every node; with none, and no owner to free, there is
        nothing to close (a close again logs nothing again)."""
        freed = bool(inc) and await self._state.release_lost(sid, user, inc)
        if freed:
            self.admission.slot_freed(user)
        (watchers,) = await self._state.watchers([sid])
        if not freed and not watchers:
            return
        await self._state.commit(
            sid, "", 0, [codec.pack(codec.closed_event())], floor=self._delivery.floor(sid)
        )

    # -- commands from other nodes ---------------------------------------------------
    async def _on_evict(self, origin: str, p: dict[str, Any]) -> None:
        self._evict_once(str(p["sid"]), str(p["user"]), origin)

    async def _on_slot_freed(self, origin: str, p: dict[str, Any]) -> None:
        self.admission.slot_freed(str(p["user"]))

    async def _on_close(self, origin: str, p: dict[str, Any]) -> None:
        closed = await self.stop(str(p["sid"]), codec.closed_event())
        await self._bus.reply(origin, p, {"closed": closed})
