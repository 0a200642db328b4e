"""The loops this node runs: starting one (ownership, the cap, the runner) and stopping
one (when closed, idle, evicted, drained or fenced). Restarts are in ``restarts.py``.

``Loops`` owns the node's table of runners; ``Delivery`` and the idle tracker read it.
A start takes ownership (``acquire``: epoch bumped), lists the loop under this
incarnation, waits for one of the user's cap slots (``admission.py``), then starts the
runner; anything that fails on the way is given up (``give_up``) so a conversation is
never left owned by a live node that runs no loop for it. A stop releases slot,
ownership and the incarnation's indexes in one state call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from workers.protocol import AgentContext, AgentFactory, AgentState, Event

from . import codec
from .actions import Actions
from .admission import Admission
from .archive import Archiver
from .bus import CommandBus
from .config import ManagerConfig
from .delivery import Delivery
from .directory import Directory
from .errors import EXPECTED, REDIS_TROUBLE, Fenced, Forbidden, LimitExceeded, NodeDraining
from .eventstore import EventStore
from .idle import IdleTracker
from .membership import Membership
from .metrics import NodeMetrics
from .runner import LoopRunner
from .state import Lease, Ownership, RedisState
from .subscriptions import Interest
from .tasks import TaskSet

log = logging.getLogger(__name__)

SWEEP_BATCH = 32  # idle loops closed at once by a sweep
STORE_FLUSH_WITHIN = 2.0  # seconds a stopping loop waits for its events to be stored


@dataclass(frozen=True)
class ConversationInfo:
    sid: str
    user: str
    owner: str  # node id of the loop's owner ('' when not running)
    running: bool
    local: bool


@dataclass
class Intake:
    """Whether this node takes new loops and connections (not while it drains)."""

    node_id: str
    draining: bool = False

    def check(self) -> None:
        if self.draining:
            raise NodeDraining(f"node {self.node_id} is draining; connect to another node")


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
    ) -> None:
        self.runners = runners
        self._archiver = archiver
        self._store = store
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
        self.starting: dict[str, asyncio.Future[ConversationInfo]] = {}
        self._abandoned: list[Lease] = []  # starts that failed after taking ownership
        membership.on_lapse(self.fence_all)
        bus.on("evict", self._on_evict)
        bus.on("slot_freed", self._on_slot_freed)
        bus.on("close", self._on_close)

    def running(self) -> set[str]:
        return {sid for sid, r in self.runners.items() if r.running}

    # -- starting --------------------------------------------------------------------
    async def ensure_running(
        self, sid: str, user: str, settings: Mapping[str, Any], initial: codec.Action | None
    ) -> ConversationInfo:
        """Make sure ``sid``'s loop runs somewhere; start it here if nowhere (creating the
        conversation for ``user``). ``initial`` is accepted as its first action."""
        runner = self.runners.get(sid)
        if runner is not None and runner.running:
            if runner.lease.user != user and user:
                raise Forbidden(sid)
            if initial is not None:
                await self._actions.accept(sid, user, initial)
            return ConversationInfo(sid, runner.lease.user, self._config.node_id, True, True)
        pending = self.starting.get(sid)
        if pending is not None:
            info = await asyncio.shield(pending)
            if info.user != user and user:
                raise Forbidden(sid)
            if initial is not None:
                await self._actions.accept(sid, user, initial)
            return info
        fut: asyncio.Future[ConversationInfo] = asyncio.get_running_loop().create_future()
        self.starting[sid] = fut
        try:
            info = await self._start(sid, user, dict(settings), initial)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters get it through shield
            raise
        else:
            fut.set_result(info)
            return info
        finally:
            del self.starting[sid]

    async def restore(self, sid: str, user: str) -> ConversationInfo:
        """``sid`` is gone from Redis while clients here watch it: a loop of it here
        can no longer write (fenced), and it starts again from the event store."""
        runner = self.runners.get(sid)
        if runner is not None:
            runner.fence("its record is gone from Redis")
        log.warning("conversation %s is gone from Redis; restoring it from the event store", sid)
        return await self.ensure_running(sid, user, {}, None)

    async def _acquire(self, sid: str, user: str) -> Ownership | ConversationInfo:
        """Own ``sid`` (replacing a dead owner), or the info of the live owner holding it."""
        membership = self._membership
        dead = ""
        stored: tuple[int, int, int] | None = None  # the store's (last id, fence, bytes)
        while True:
            own = await self._state.acquire(
                sid,
                self._config.node_id,
                membership.inc,
                user,
                create=stored is not None and not self._intake.draining,
                dead_inc=dead,
                stored=stored or (0, 0, 0),
            )
            if own.status == "forbidden":
                raise Forbidden(sid)
            if own.status == "missing" and stored is None:
                # Not in Redis: new, or gone from Redis (expired, lost) but in the store,
                # whose ids and epochs it continues (never an id the store holds again).
                stored = await self._stored(sid, user)
                continue
            if own.status == "missing":
                self._intake.check()  # a conversation is created only while not draining
                raise NodeDraining(f"node {self._config.node_id} is draining")
            if own.status != "owned":
                return own
            # The live-node cache holds an owner alive only until its lease's expiry as
            # last read, so it never keeps a dead owner past the moment its loop could
            # be taken over; it saves the read when a second client joins.
            if await self._directory.alive(own.inc):
                return ConversationInfo(sid, own.user, own.owner, True, False)
            dead = own.inc

    async def _stored(self, sid: str, user: str) -> tuple[int, int, int]:
        """The event store's ``(last id, fence epoch, bytes)`` of ``sid``; Forbidden when
        it is another user's, LimitExceeded when it is new and ``user`` has
        ``max_conversations_per_user`` stored."""
        known = await self._store.conversation(sid)
        if known is None:
            quota = self._config.max_conversations_per_user
            if quota and user and (count := await self._store.count_conversations(user)) >= quota:
                raise LimitExceeded(
                    "conversations per user",
                    f"user {user!r} has {count} conversations stored (the limit is {quota}); "
                    "delete one for good (DELETE /api/conversations/ID?purge=true) first",
                )
            return 0, 0, 0
        if user and known.user != user:
            raise Forbidden(sid)
        if known.last_id:
            log.info("conversation %s comes back from the event store at %d", sid, known.last_id)
        return known.last_id, known.epoch, known.size

    async def _start(
        self, sid: str, user: str, settings: dict[str, Any], initial: codec.Action | None
    ) -> ConversationInfo:
        node = self._config.node_id
        if not self._membership.check():
            raise NodeDraining(f"node {node} lost its lease; it takes no loops until back")
        acquired = await self._acquire(sid, user)
        if isinstance(acquired, ConversationInfo):  # a live owner runs it
            if initial is not None:
                await self._actions.accept(sid, user, initial)
            return acquired
        own = acquired
        lease = Lease(sid, own.user, self._membership.inc, own.epoch)
        if self._intake.draining:
            await self._state.release(sid, lease.inc, lease.epoch, "stopped")
            self._intake.check()
        try:
            # Listed under this incarnation (for the reapers) and subscribed (before the
            # runner's first inbox read), in one round trip's time.
            done = await asyncio.gather(
                self._state.record_start(lease, created=own.status == "created"),
                self._interest.watch(sid),
                return_exceptions=True,
            )
            for result in done:
                if isinstance(result, BaseException):
                    raise result
            if initial is not None:
                await self._actions.accept(sid, user, initial)
            admitted = await self.admission.admit(lease)
            if lease.inc != self._membership.inc or self._membership.lapsed:
                # Our lease lapsed meanwhile: a loop started now would be fenced at once,
                # and a refused claim (dropped with the old incarnation) is no eviction.
                # The caller retries once the node is back.
                raise NodeDraining(f"node {node} lost its lease while starting {sid}")
        except BaseException:
            await self.give_up(lease, None)
            raise
        if not admitted:
            await self.give_up(lease, codec.evicted_event())
            return ConversationInfo(sid, lease.user, "", False, False)
        context = AgentContext(sid, lease.user or None, settings)
        runner = LoopRunner(
            lease=lease,
            applied=own.applied,
            new_agent=lambda: self._agent_factory(context),
            speculative=self._config.speculative_dispatch,
            state=self._state,
            config=self._config,
            lease_valid=self._membership.lease_valid,
            on_fenced=self._fenced,
            delivery=self._delivery,
            activity=self._idle,
            metrics=self._metrics,
            archiver=self._archiver,
        )
        self.runners[sid] = runner
        try:
            await runner.start()
        except BaseException:
            if self.runners.get(sid) is runner:
                del self.runners[sid]
            await runner.aclose()
            await self.give_up(lease, None)
            raise
        return ConversationInfo(sid, lease.user, node, True, True)

    async def give_up(self, lease: Lease, status: Event | None, *, retry: bool = False) -> bool:
        """Undo a start that never ran: tell the clients why, drop claim and ownership.

        If Redis fails meanwhile, the lease is kept and given up on a later heartbeat, so
        a conversation is never left owned by a live node that runs no loop for it.
        """
        try:
            if status is not None:
                await self._state.commit(
                    lease.sid,
                    lease.inc,
                    lease.epoch,
                    [codec.pack(status)],
                )
            await self._state.release_loop(lease, "stopped")
        except REDIS_TROUBLE as exc:
            log.warning("giving up %s deferred: %s", lease.sid, exc)
            if lease not in self._abandoned:
                self._abandoned.append(lease)
            return False
        finally:
            if not retry:  # the start's channel reference is dropped once
                await self._interest.unwatch(lease.sid)
        return True

    # -- stopping --------------------------------------------------------------------
    async def stop(self, sid: str, status: Event | None) -> bool:
        """Stop the local loop of ``sid`` (telling its clients ``status``); False if none."""
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
            retention = int(self._config.redis_retention * 1000) if stored else 0
            await self._state.release_loop(runner.lease, str(AgentState.STOPPED), retention)
        await self._interest.unwatch(sid)
        return True

    def fence_all(self, why: str) -> None:
        """The lease lapsed: every loop stops now, writing nothing."""
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
        if not self._membership.lapsed:
            with contextlib.suppress(*REDIS_TROUBLE):
                await self._state.forget_loop(runner.lease)
        await self._interest.unwatch(runner.sid)

    async def sweep_idle(self) -> list[str]:
        """Close this node's loops idle past close_delay, not RUNNING, with no connection
        anywhere; the ones closed. Costs O(expired) Redis commands (``idle.py``)."""
        expired = await self._idle.expired()
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

    async def sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.cleanup_interval)
            try:
                await self.sweep_idle()
            except EXPECTED as exc:
                log.warning("idle sweep failed: %s", exc)
            except Exception:  # the sweep goes on next round, whatever went wrong
                log.exception("idle sweep failed")

    # -- evictions (the cap) ---------------------------------------------------------
    async def evict_owner(self, sid: str, user: str, inc: str) -> None:
        """Have the owner ``inc`` of an evicted loop stop it (or free a dead one's hold)."""
        if inc == self._membership.inc:
            self._tasks.spawn(self._evict_local(sid, user, self._config.node_id), f"evict:{sid}")
        elif await self._directory.alive(inc):
            await self._bus.send_to_owner(inc, "evict", {"sid": sid, "user": user})
        else:
            await self.release_dead(sid, user, inc)

    async def _evict_local(self, sid: str, user: str, origin: str) -> None:
        pending = self.starting.get(sid)
        if pending is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        runner = self.runners.get(sid)
        backlog = False
        if runner is not None:
            # Acknowledged actions reach the loop before it stops; the cap holds meanwhile
            # (the slot stays taken until the loop is gone).
            backlog = not await runner.finish_backlog(min(10.0, self._config.start_timeout / 2))
        if not await self.stop(sid, codec.evicted_event()):
            await self._state.release_slot(user, sid, self._membership.inc)
        elif backlog:  # acknowledged actions still wait: they need a loop (restarts.py)
            await self._bus.send(self._config.node_id, "resume", {"sid": sid, "user": user})
        if origin == self._config.node_id:
            self.admission.slot_freed(user)
        else:
            await self._bus.send(origin, "slot_freed", {"user": user})

    async def release_dead(self, sid: str, user: str, inc: str) -> None:
        """Free what a dead incarnation held for one conversation; tell its clients."""
        if await self._state.release_lost(sid, user, inc):
            await self._state.commit(sid, "", 0, [codec.pack(codec.lost_event())])
        self.admission.slot_freed(user)

    async def retry_abandoned(self) -> list[tuple[str, str]]:
        """Give up (again) what failed starts left owned; ``(sid, user)`` of those given
        up, which still need a loop if their inbox holds actions."""
        done = []
        for lease in list(self._abandoned):
            # A later start may have taken the conversation up again meanwhile.
            busy = lease.sid in self.runners or lease.sid in self.starting
            if busy or await self.give_up(lease, None, retry=True):
                self._abandoned.remove(lease)
                done.append((lease.sid, lease.user))
        return done

    # -- commands from other nodes ---------------------------------------------------
    async def _on_evict(self, origin: str, p: dict[str, Any]) -> None:
        await self._evict_local(str(p["sid"]), str(p["user"]), origin)

    async def _on_slot_freed(self, origin: str, p: dict[str, Any]) -> None:
        self.admission.slot_freed(str(p["user"]))

    async def _on_close(self, origin: str, p: dict[str, Any]) -> None:
        closed = await self.stop(str(p["sid"]), codec.closed_event())
        await self._bus.reply(origin, p, {"closed": closed})
