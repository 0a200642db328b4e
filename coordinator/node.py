"""A started node: every part built from one backend, its background tasks, shutdown.

``Node.start`` builds the parts in dependency order, each given what it needs (no part
calls back into the manager): the state layer and membership on the backend's
connections, the event store (checked to be the cluster's) and its archiver, the
subscription, the command bus, delivery, the loops and their restarts, client sessions,
recovery. Then it registers, reaps what a previous incarnation of this
node id left, subscribes and starts the background tasks. ``aclose`` and ``drain`` stop
it in named steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

from workers import heap
from workers.protocol import AgentFactory, Event

from . import codec, layout
from .actions import Actions
from .agentpool import AgentPool
from .archive import Archiver, check_cluster_store
from .backends import Backend
from .bus import CommandBus, Payload
from .catchup import EventSink, LocalConnections
from .config import ManagerConfig
from .delivery import Delivery
from .directory import Directory
from .errors import EXPECTED, REDIS_TROUBLE
from .eventstore import EventStore, open_store, shown_url
from .handles import AttachedHandles
from .history import History
from .idle import IdleTracker
from .keys import KeySchema
from .layout import LayoutMismatch
from .looplag import LoopLag
from .loops import Loops
from .membership import Membership
from .memory import Memories
from .metrics import NodeMetrics
from .owners import Intake
from .recovery import Recovery, reap_incarnation
from .redisurl import database_of
from .restarts import Restarts
from .revocations import REFRESH as REVOCATIONS_REFRESH
from .revocations import Revocations
from .runner import LoopRunner
from .sessions import Sessions
from .state import RedisState
from .subscriptions import Interest
from .tasks import TaskSet

log = logging.getLogger(__name__)


class Router:
    """Where the subscription's messages go: conversation events to delivery (and, when
    an owner was lost, to restarts), commands to the bus."""

    def __init__(
        self,
        *,
        keys: KeySchema,
        delivery: Delivery,
        restarts: Restarts,
        bus: CommandBus,
        runners: dict[str, LoopRunner],
    ) -> None:
        self._keys = keys
        self._delivery = delivery
        self._restarts = restarts
        self._bus = bus
        self._runners = runners

    async def message(self, channel: str, data: bytes) -> None:
        sid = self._keys.sid_from_channel(channel)
        if sid is None:
            self._bus.received(data)
            return
        event_id, event = codec.decode_published(data)
        if codec.owner_gone(event):
            room = self._delivery.connections.room(sid)
            if room:  # our clients still watch it: restart the loop (one node wins)
                moving = codec.notice_code(event) == codec.NODE_DRAINING
                self._restarts.owner_gone(
                    sid,
                    room[0].user,
                    codec.stamped_at(event),
                    moving_from=codec.moving_from(event) if moving else None,
                )
        await self._delivery.published(sid, event_id, event)

    async def reconnected(self) -> None:
        """After a pub/sub reconnect: re-read inboxes and catch every connection up."""
        for runner in self._runners.values():
            runner.poke()
        self._delivery.connections.catch_up_all()


class Node:
    """The parts of a started node (see the module docstring). Use ``Node.start``."""

    def __init__(self, config: ManagerConfig, backend: Backend, metrics: NodeMetrics):
        self.config = config
        self.backend = backend
        self.metrics = metrics
        self.keys = KeySchema(config.key_prefix, database_of(config.redis_url))
        self.tasks = TaskSet(log)
        self.intake = Intake(config.node_id)
        self.lag = LoopLag(metrics.loop_delay_seconds.observe)
        self.handles = AttachedHandles(config.close_delay)
        self.agents: AgentPool | None = None  # the worker processes, if agents run there
        self.store: EventStore | None = None  # the conversations' full history
        self.store_url = shown_url(config.event_store or None)  # without its password
        self.revocations = Revocations()  # users whose tokens were revoked (``start``)

    @classmethod
    async def start(
        cls,
        *,
        config: ManagerConfig,
        backend: Backend,
        sink: EventSink,
        agent_factory: AgentFactory | None,
        metrics: NodeMetrics,
        revocations: Revocations | None = None,
    ) -> Node:
        """Build and start a node; on failure nothing is left running or connected.
        Without ``agent_factory``, ``config.agent`` runs in worker processes;
        ``revocations`` is kept up to date from Redis."""
        node = cls(config, backend, metrics)
        if revocations is not None:
            node.revocations = revocations
        try:
            await node._build(sink, agent_factory)
        except BaseException:
            await node._abort()
            raise
        return node

    async def _build(self, sink: EventSink, agent_factory: AgentFactory | None) -> None:
        cfg, keys, tasks = self.config, self.keys, self.tasks
        await self.backend.check()
        await self.backend.check_settings()
        self.state: RedisState = self.backend.state(keys)
        await self.state.load_scripts()
        await layout.claim(self.state, cfg.node_id)  # before reading anything else
        await self._read_revocations()  # before any token is shown to this node
        self.store = store = await open_store(cfg.event_store or None)
        await check_cluster_store(self.state, store, cfg, self.store_url)
        if agent_factory is None:  # agent_isolation "process": agentpool.py
            self.agents = AgentPool(config=cfg, state=self.state, metrics=self.metrics)
            await self.agents.start()
            agent_factory = self.agents.new_agent
        self.membership = Membership(self.backend.registration_state(keys), cfg)
        self.metrics.lease_age_from(self.membership.renewal_age)
        self.metrics.gauge_from(
            "coordinator_event_loop_lag_seconds",
            "The most seconds the node's event loop ran a timer tick late, over its last "
            "20 ticks (one every 50 ms): how long a step of a join or an action waits.",
            self.lag.worst,
        )
        self.directory = Directory(self.state, self.membership, self.store)
        self.subscriptions = self.backend.subscriptions(
            keys, probe_interval=max(1.0, cfg.heartbeat_interval * 2)
        )
        interest = Interest(self.subscriptions, keys)
        self.bus = CommandBus(self.state, cfg.node_id, tasks, timeout=cfg.redis_timeout * 2)
        self.bus.on("revoked", self._on_revoked)
        self.runners: dict[str, LoopRunner] = {}
        self.history = History(self.state, self.store)
        self.connections = LocalConnections(self.history, sink, tasks)
        self.metrics.counter_from(
            "coordinator_connection_catch_ups",
            "Live connections switched to reading the log: an event arrived after a gap "
            "(out of order, or a pub/sub message lost) or the subscription reconnected.",
            lambda: self.connections.catch_ups,
        )
        self.delivery = Delivery(self.runners, self.connections)
        self.idle = IdleTracker(
            state=self.state, config=cfg, runners=self.runners, membership=self.membership
        )
        self.actions = Actions(
            state=self.state,
            config=cfg,
            membership=self.membership,
            runners=self.runners,
            delivery=self.delivery,
            metrics=self.metrics,
        )
        self.archiver = Archiver(
            state=self.state,
            store=self.store,
            config=cfg,
            runners=self.runners,
            where=self.store_url,
            tasks=tasks,
        )
        self.metrics.counter_from(
            "coordinator_store_rewinds",
            "Conversations the event store held fewer events of than it had acknowledged "
            "(a failover that lost its latest writes, a restore from an older backup), "
            "stored again from the Redis log.",
            lambda: self.archiver.audit.rewinds,
        )
        self.loops = Loops(
            runners=self.runners,
            state=self.state,
            config=cfg,
            intake=self.intake,
            membership=self.membership,
            directory=self.directory,
            bus=self.bus,
            interest=interest,
            actions=self.actions,
            delivery=self.delivery,
            idle=self.idle,
            metrics=self.metrics,
            tasks=tasks,
            agent_factory=agent_factory,
            archiver=self.archiver,
            store=self.store,
            memories=Memories(self.history, self.store, self.archiver),
        )
        self.restarts = Restarts(
            loops=self.loops,
            state=self.state,
            intake=self.intake,
            membership=self.membership,
            directory=self.directory,
            bus=self.bus,
            tasks=tasks,
            metrics=self.metrics,
            max_concurrent=cfg.max_concurrent_restarts,
        )
        self.sessions = Sessions(
            state=self.state,
            config=cfg,
            intake=self.intake,
            membership=self.membership,
            loops=self.loops,
            interest=interest,
            connections=self.connections,
        )
        self.recovery = Recovery(
            state=self.state,
            config=cfg,
            membership=self.membership,
            directory=self.directory,
            loops=self.loops,
            restarts=self.restarts,
            sessions=self.sessions,
            floor=self.delivery.floor,
            claim_facts=self._claim_cluster_facts,
        )
        router = Router(
            keys=keys,
            delivery=self.delivery,
            restarts=self.restarts,
            bus=self.bus,
            runners=self.runners,
        )
        # Registering, then reaping what a previous incarnation of this node id held.
        previous = await self.membership.register()
        try:
            await layout.verify(self.state)  # no node of another layout took over since
        except LayoutMismatch:
            with contextlib.suppress(*REDIS_TROUBLE):
                await self.state.unregister(cfg.node_id, self.membership.inc)
            raise
        self.membership.start_keeper(self.backend.lease_renewer(keys))
        await self.recovery.reap_previous(previous)
        await self.directory.refresh()
        await self.subscriptions.start()
        tasks.spawn(self.subscriptions.run(router), "pubsub")
        # Commands to this node (on one server, its channel is the probe's too).
        await self.subscriptions.add(keys.node_channel(cfg.node_id))
        tasks.spawn(self.membership.tick_loop(), "heartbeat")
        tasks.spawn(self.lag.run(), "loop lag")
        tasks.spawn(self.recovery.housekeeping_loop(), "housekeeping")
        tasks.every(cfg.idle_flush_interval, self.idle.flush, "activity flush", REDIS_TROUBLE)
        if self.backend.mode == "sentinel":
            tasks.every(cfg.heartbeat_interval, self.backend.follow_master, "master watch")
        tasks.every(cfg.cleanup_interval, self.loops.sweep_idle, "idle sweep", EXPECTED)
        tasks.spawn(self.archiver.run(), "event-store")
        tasks.every(cfg.store_sweep_interval, self.archiver.sweep, "store sweep", EXPECTED)
        tasks.every(REVOCATIONS_REFRESH, self._refresh_revocations, "revocations")
        heap.keep_trimming()  # the process's, whatever runs in it
        await self.restarts.resume_pending(self.recovery.released_at_start)
        log.info(
            "node %s started (incarnation %s) on %s, event store %s",
            cfg.node_id,
            self.membership.inc,
            self.backend.describe(),
            self.store_url,
        )

    @property
    def inc(self) -> str:
        return self.membership.inc

    async def _abort(self) -> None:
        """A start that failed: undo whatever was built."""
        with contextlib.suppress(Exception):
            await self.tasks.aclose()
        if self.agents is not None:
            await self.agents.aclose()
        if hasattr(self, "membership"):
            self.membership.stop()
        if hasattr(self, "subscriptions"):
            await self.subscriptions.aclose()
        await self._close_store()
        await self.backend.aclose()

    async def _close_store(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            try:
                await store.aclose()
            except Exception:
                log.exception("closing the event store %s failed", self.store_url)

    async def _claim_cluster_facts(self) -> None:
        """The cluster's layout and event store recorded again (after Redis came back
        empty: ``recovery.py``), or LayoutMismatch / StoreMismatch."""
        await layout.claim(self.state, self.config.node_id)
        assert self.store is not None  # open while the node runs
        await check_cluster_store(self.state, self.store, self.config, self.store_url)

    async def _read_revocations(self) -> None:
        self.revocations.update(await self.state.revocations())

    async def _refresh_revocations(self) -> None:
        with contextlib.suppress(*REDIS_TROUBLE):  # Redis away: /healthz says so, not this
            await self._read_revocations()

    async def revoked(self, user: str, at: float) -> None:
        """``user``'s tokens were revoked here at ``at`` (recorded in Redis): held at once,
        and told to the other live nodes, which would read it within a second anyway."""
        self.revocations.update({user: at})
        payload = {"user": user, "at": at}
        for node in await self.directory.nodes():
            if node != self.config.node_id:
                with contextlib.suppress(*REDIS_TROUBLE):  # they read it all the same
                    await self.bus.send(node, "revoked", payload)

    async def _on_revoked(self, origin: str, payload: Payload) -> None:
        user, at = payload.get("user"), payload.get("at")
        if isinstance(user, str) and isinstance(at, int | float):
            self.revocations.update({user: float(at)})

    async def halt(self) -> None:
        """Stop every task and renewing the lease, releasing nothing in Redis: what a
        kill -9 leaves behind (for fault-injection tests). Nothing works afterwards but
        ``aclose``."""
        await self.tasks.aclose()
        self.membership.stop()
        # A killed process runs no loop either: each stops here, writing nothing more
        # (for them the lease is lapsed, so not even their indexes are tidied).
        self.membership.lapsed = True
        self.loops.fence_all("halted")
        if self.agents is not None:
            await self.agents.halt()

    async def aclose(self, deadline: float | None = None) -> None:
        """Stop every local loop, forget local connections, deregister, stop tasks.

        What it writes to Redis ends by ``deadline`` (event loop time; default
        ``drain_timeout`` from now): a Redis that does not answer (hung, cut off) made
        each write wait ``redis_timeout`` and its retries, one after the other (83 s for
        one loop and one connection). What is left there then is the reapers' once this
        node's lease expires, as after a kill.
        """
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.config.drain_timeout
        self.intake.draining = True
        # A node whose lease lapsed has its loops fenced already, and whatever it holds
        # in Redis is the reapers' (Redis has not answered it for a lease's time).
        left = not self.membership.lapsed and await _until(deadline, self._leave())
        if not left:
            self.loops.fence_all("closing without Redis", offline=True)  # nothing written
        await self.subscriptions.aclose()
        await self.tasks.aclose()
        if self.agents is not None:
            await self.agents.aclose()
        self.membership.stop()
        if not (left and await _until(deadline, self._deregister())):
            log.error(
                "node %s: %s; what it holds in Redis is left to the reapers (its lease "
                "expires within node_ttl)",
                self.config.node_id,
                "its lease lapsed"
                if self.membership.lapsed
                else "Redis did not answer in time while it closed",
            )
        await self._close_store()
        await self.backend.aclose()

    async def _leave(self) -> None:
        await self._stop_loops(None)
        await self.sessions.settle()
        await self.sessions.leave_all()
        with contextlib.suppress(*REDIS_TROUBLE):  # else counted until the record goes
            for sid, held in self.handles.release_all().items():
                await self.state.attach(sid, "", -held)

    async def _deregister(self) -> None:
        with contextlib.suppress(*REDIS_TROUBLE):
            await reap_incarnation(
                self.state,
                self.inc,
                keep_connections=False,
                floor=self.delivery.floor,
                retention_ms=self.config.retention_ms,
            )
            await self.state.unregister(self.config.node_id, self.inc)

    async def _stop_loops(self, status: Event | None) -> list[tuple[str, str]]:
        """Stop every local loop (telling its clients ``status``), and the loop of every
        start under way once that start ends: the intake is closed, so none begins
        that is not refused, and none is left owned for a reaper to find. ``(sid,
        user)`` of the loops stopped."""
        tried: set[str] = set()
        stopped: list[tuple[str, str]] = []
        while fresh := {*self.runners, *self.loops.starting} - tried:
            tried |= fresh
            sids = sorted(fresh)
            done = await asyncio.gather(
                *(self._stop_loop(sid, status) for sid in sids), return_exceptions=True
            )
            for sid, outcome in zip(sids, done, strict=True):
                if isinstance(outcome, tuple):
                    stopped.append(outcome)
                elif isinstance(outcome, BaseException) and not isinstance(outcome, EXPECTED):
                    log.error("stopping loop %s failed", sid, exc_info=outcome)
        return stopped

    async def _stop_loop(self, sid: str, status: Event | None) -> tuple[str, str] | None:
        pending = self.loops.starting.get(sid)
        if pending is not None:
            await asyncio.wait([pending])
        runner = self.runners.get(sid)
        if runner is None or not await self.loops.stop(sid, status):
            return None
        return sid, runner.lease.user

    async def drain(self) -> None:
        """Graceful stop, bounded by ``drain_timeout``; then ``aclose``.

        In named steps: stop intake (no new loops or connections), hand off every local
        loop (it stops here, and a status event makes the nodes whose clients watch it
        restart it there), tell local clients to reconnect elsewhere and disconnect
        them, deregister.
        """
        self.intake.draining = True
        log.info("node %s draining", self.config.node_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._handoff()
        except TimeoutError:
            log.error(
                "drain of %s exceeded %.0fs; closing",
                self.config.node_id,
                self.config.drain_timeout,
            )
        # The close's writes get what is left, and at least one Redis timeout's worth.
        await self.aclose(max(deadline, loop.time() + self.config.redis_timeout))

    async def _handoff(self) -> None:
        leaving = await self._stop_loops(codec.moving_event(self.config.node_id))
        with contextlib.suppress(*REDIS_TROUBLE):
            await self.restarts.resume_pending(leaving)
        await self.sessions.settle()
        clients = len(self.sessions.connections)
        await self.sessions.farewell(
            codec.status_update(
                codec.NODE_DRAINING, "This node is shutting down; reconnect to continue."
            )
        )
        log.info(
            "node %s handed off %d loop(s) and told %d client(s) to reconnect elsewhere",
            self.config.node_id,
            len(leaving),
            clients,
        )


async def _until(deadline: float, step: Awaitable[None]) -> bool:
    """Run ``step`` until ``deadline`` (event loop time); False if it did not end by then."""
    try:
        async with asyncio.timeout_at(deadline):
            await step
        return True
    except TimeoutError:
        return False
