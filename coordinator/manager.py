"""The distributed conversation manager: the seed's API, with all of its state in Redis.

One instance is one node. It runs the agent loops it owns, holds the socket connections
that reached it, and answers every query for the whole cluster from Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from workers.loader import AgentLoadError, load_agent
from workers.protocol import AgentContext, AgentFactory, AgentState, Event

from . import codec
from .admission import Admission
from .config import (
    ManagerConfig,
    check_connection_id,
    check_conversation_id,
    check_user_id,
)
from .delivery import LocalConnections
from .errors import (
    ConfigError,
    ConnectionNotFound,
    ConversationNotFound,
    CoordinatorError,
    Fenced,
    Forbidden,
    InboxFull,
    InvalidInput,
    NodeBusy,
    NodeDraining,
    RedisUnavailable,
)
from .handles import AttachedHandles, ConversationHandle
from .idle import IdleSweeper
from .keys import KeySchema
from .lane import ScriptLane, lane_supported
from .membership import Membership, reap_dead_nodes, reap_incarnation, reaper_lock
from .metrics import NodeMetrics
from .runner import Lease, LoopRunner, SpeculationStats
from .state import RedisState, accept_token, text
from .subscriptions import Subscriptions
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")


class EventSink(Protocol):
    """Where a node delivers a conversation's events to its local connections."""

    async def deliver(self, connection_id: str, event: Event) -> None: ...

    async def disconnect(self, connection_id: str) -> None:
        """Close the client's connection (during a drain, after telling it why)."""


class NullSink:
    async def deliver(self, connection_id: str, event: Event) -> None:
        return None

    async def disconnect(self, connection_id: str) -> None:
        return None


@dataclass(frozen=True)
class ConversationInfo:
    sid: str
    user: str
    owner: str  # node id of the loop's owner ('' when not running)
    running: bool
    local: bool


def _started(part: T | None) -> T:
    """A part of the node that exists once it started."""
    if part is None:
        raise CoordinatorError("the manager is not started (use 'async with')")
    return part


def _user(user_id: str | None) -> str:
    return "" if user_id is None else check_user_id(user_id)


class ConversationManager:
    """A coordinator node. Use as ``async with ConversationManager(config) as m: ...``."""

    def __init__(
        self,
        config: ManagerConfig | None = None,
        *,
        sink: EventSink | None = None,
        agent_factory: AgentFactory | None = None,
        redis: aioredis.Redis | None = None,
    ) -> None:
        if config is not None and not isinstance(config, ManagerConfig):
            raise ConfigError(f"config must be a ManagerConfig, got {type(config).__name__}")
        self.config = config or ManagerConfig()
        self.node_id = self.config.node_id
        self.keys = KeySchema(self.config.key_prefix)
        self.sink: EventSink = sink or NullSink()
        self._agent_factory = agent_factory
        self._redis_given = redis
        self._redis: aioredis.Redis | None = None
        self._lease_redis: aioredis.Redis | None = None
        self._pubsub_redis: aioredis.Redis | None = None
        self._state: RedisState | None = None
        self._membership: Membership | None = None
        self._subs: Subscriptions | None = None
        self._runners: dict[str, LoopRunner] = {}
        self._starting: dict[str, asyncio.Future[ConversationInfo]] = {}
        self._connections = LocalConnections(self._read_log, self._deliver, self._spawn)
        self._handles = AttachedHandles(self.config.close_delay)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._admission: Admission | None = None
        # Incarnations known alive -> until when (monotonic: their lease's expiry as last
        # read; refreshed each heartbeat, read again by _alive once it passed).
        self._live: dict[str, float] = {}
        self._idle: IdleSweeper | None = None
        self._departed: list[tuple[str, str, str]] = []  # removals Redis missed
        self._restart_later: dict[str, str] = {}  # sid -> user, restarts that failed
        # Backpressure: a join burst or a lost node's conversations are worked through a
        # bounded number at a time, so the event loop (and the lease clock) keep up.
        self._join_gate = asyncio.Semaphore(self.config.max_concurrent_joins)
        self._restart_gate = asyncio.Semaphore(self.config.max_concurrent_restarts)
        # Thousands of clients may leave at once: their removals take a bounded share of
        # the Redis pool instead of all of it (and none waits out the pool's timeout).
        self._leave_gate = asyncio.Semaphore(max(1, self.config.redis_max_connections // 4))
        self._restarting: set[str] = set()
        self._lease_lost = asyncio.Event()  # set when the lease is gone: re-register
        self._abandoned: list[Lease] = []  # starts that failed after taking ownership
        self.speculations = SpeculationStats()  # actions dispatched before their accept
        self.metrics = NodeMetrics(self.node_id)  # this node's counters and histograms
        self.draining = False
        self.started = False

    # -- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> ConversationManager:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def state(self) -> RedisState:
        return _started(self._state)

    @property
    def admission(self) -> Admission:
        return _started(self._admission)

    @property
    def idle(self) -> IdleSweeper:
        return _started(self._idle)

    @property
    def membership(self) -> Membership:
        return _started(self._membership)

    @property
    def inc(self) -> str:
        return self.membership.inc

    async def start(self) -> None:
        cfg = self.config
        if self._agent_factory is None:
            try:
                self._agent_factory = load_agent(cfg.agent)
            except AgentLoadError as exc:
                raise ConfigError(str(exc)) from None
        if self._redis_given is not None:
            self._redis = self._redis_given
        else:
            # A bounded pool that makes callers wait for a connection instead of failing.
            pool = aioredis.BlockingConnectionPool.from_url(
                cfg.redis_url,
                max_connections=cfg.redis_max_connections,
                timeout=cfg.redis_timeout,
                socket_connect_timeout=cfg.connect_timeout,
                socket_timeout=cfg.redis_timeout,
                retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), 2),
                health_check_interval=10,
            )
            self._redis = aioredis.Redis(connection_pool=pool)
        try:
            async with asyncio.timeout(cfg.connect_timeout + 1):
                await self._redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            await self._redis.aclose()
            raise RedisUnavailable(cfg.redis_url, str(exc) or type(exc).__name__) from None
        lane = None
        if self._redis_given is None and lane_supported(cfg.redis_url):
            lane = ScriptLane(
                cfg.redis_url, timeout=cfg.redis_timeout, connect_timeout=cfg.connect_timeout
            )
        self._state = RedisState(self._redis, self.keys, lane)
        await self._state.load_scripts()
        self._admission = Admission(self._state, cfg, self._evict_owner)
        self._idle = IdleSweeper(
            self._state, cfg, self._runners, lambda: self.inc, self._close_idle
        )
        # Registering (again, after a lapse) gets a connection of its own: a pool
        # saturated by a burst of joins must not hold it up. Renewals have their own
        # connection in the lease keeper's thread.
        self._lease_redis = aioredis.Redis.from_url(
            cfg.redis_url,
            socket_connect_timeout=cfg.connect_timeout,
            socket_timeout=cfg.redis_timeout,
            single_connection_client=True,
        )
        self._membership = Membership(
            RedisState(self._lease_redis, self.keys), cfg, self._on_lapse, self._lease_lost.set
        )
        previous = await self._membership.register()
        self._membership.start_keeper(cfg.redis_url)
        if previous:
            released = await reap_incarnation(
                self._state, previous, keep_connections=False, maxlen=cfg.event_log_maxlen
            )
            orphans = released
        else:
            orphans = []
        await self._refresh_live()
        # The subscription (and its probe) also get their own connections: a reconnect
        # must not wait behind a pool that a join burst has exhausted.
        self._pubsub_redis = aioredis.Redis.from_url(
            cfg.redis_url,
            socket_connect_timeout=cfg.connect_timeout,
            socket_timeout=cfg.redis_timeout,
        )
        self._subs = Subscriptions(
            self._pubsub_redis,
            self._on_message,
            self._on_resubscribed,
            self.keys.node_channel(self.node_id),
            probe_interval=max(1.0, cfg.heartbeat_interval * 2),
        )
        await self._subs.start()
        self._spawn(self._subs.run(), "pubsub")
        self._spawn(self._lease_loop(), "heartbeat")
        self._spawn(self._housekeeping_loop(), "housekeeping")
        self._spawn(self.idle.flush_loop(), "activity-flush")
        self._spawn(self.idle.sweep_loop(), "cleanup")
        self.started = True
        await self._resume_pending(orphans)
        log.info("node %s started (incarnation %s)", self.node_id, self.inc)

    async def aclose(self) -> None:
        """Stop every local loop, forget local connections, deregister, stop tasks."""
        if not self.started:
            await self._close_redis()
            return
        self.started = False
        self.draining = True
        for sid in list(self._runners):
            with contextlib.suppress(CoordinatorError, RedisError, OSError):
                await self._stop_loop(sid, None, AgentState.STOPPED)
        for conn in self._connections:
            with contextlib.suppress(CoordinatorError, RedisError, OSError):
                await self.disconnect_from_session(conn.cid)
        self._handles.release_detached()
        if self._subs is not None:
            await self._subs.aclose()
        for task in await cancel_and_wait(list(self._tasks), within=5):
            log.error("task %s did not stop within 5s of cancellation", task.get_name())
        self.membership.stop()
        with contextlib.suppress(RedisError, OSError):
            await reap_incarnation(
                self.state, self.inc, keep_connections=False, maxlen=self.config.event_log_maxlen
            )
            await self.state.unregister(self.node_id, self.inc)
        for client in (self._lease_redis, self._pubsub_redis):
            if client is not None:
                await client.aclose()
        await self._close_redis()

    async def _close_redis(self) -> None:
        if self._state is not None and self._state.lane is not None:
            await self._state.lane.aclose()
        if self._redis is not None and self._redis_given is None:
            await self._redis.aclose()

    async def drain(self) -> None:
        """Graceful stop, bounded by ``drain_timeout``; then ``aclose``.

        In named steps: stop intake (no new loops or connections), hand off every local
        loop (it stops here, and a status event makes the nodes whose clients watch it
        restart it there), tell local clients to reconnect elsewhere and disconnect
        them, deregister.
        """
        if not self.started:
            return
        self.draining = True
        log.info("node %s draining", self.node_id)
        try:
            async with asyncio.timeout(self.config.drain_timeout):
                await self._handoff()
        except TimeoutError:
            log.error(
                "drain of %s exceeded %.0fs; closing", self.node_id, self.config.drain_timeout
            )
        await self.aclose()

    async def _handoff(self) -> None:
        moving = codec.status_event(
            codec.NODE_DRAINING,
            "The node running this conversation is shutting down; it moves to another node.",
            "stopped",
        )
        leaving = [(sid, r.lease.user) for sid, r in self._runners.items()]
        await asyncio.gather(
            *(self._stop_loop(sid, moving, AgentState.STOPPED) for sid, _ in leaving),
            return_exceptions=True,
        )
        with contextlib.suppress(RedisError, OSError):
            await self._resume_pending(leaving)
        bye = codec.status_event(
            codec.NODE_DRAINING, "This node is shutting down; reconnect to continue."
        )
        for conn in self._connections:
            with contextlib.suppress(Exception):
                await self.sink.deliver(conn.cid, bye)
            with contextlib.suppress(CoordinatorError, RedisError, OSError):
                await self.disconnect_from_session(conn.cid)
            with contextlib.suppress(Exception):
                await self.sink.disconnect(conn.cid)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # -- the seed's API --------------------------------------------------------------
    async def attach_to_conversation(
        self, sid: str, user_id: str | None = None
    ) -> ConversationHandle:
        """Take a handle on an existing conversation (REST callers); counted cluster-wide."""
        check_conversation_id(sid)
        user = _user(user_id)
        status, _ = await self.state.attach(sid, user, +1)
        if status == "missing":
            raise ConversationNotFound(sid)
        if status == "forbidden":
            raise Forbidden(sid)
        return self._handles.attach(sid, user)

    async def detach_from_conversation(self, conversation: ConversationHandle) -> None:
        """Drop one reference; the handle is released ``close_delay`` after the last one."""
        handle = self._handles.check(conversation)
        await self.state.attach(handle.sid, "", -1)
        self._handles.detach(handle)

    async def attached_count(self, sid: str) -> int:
        """Attach refcount of the conversation across the cluster."""
        return int(await self.state.redis.hget(self.keys.conv(sid), "refs") or 0)

    async def join_conversation(
        self,
        sid: str,
        connection_id: str,
        settings: Mapping[str, Any] | None,
        user_id: str | None,
        latest_event_id: int | None = None,
    ) -> ConversationInfo:
        """Join a connection to a conversation (creating and starting it when needed).

        The connection first receives every logged event after ``latest_event_id`` (all
        of them when None), then live events, with no gap and no duplicate.
        """
        check_conversation_id(sid)
        check_connection_id(connection_id)
        user = _user(user_id)
        if latest_event_id is not None and (
            isinstance(latest_event_id, bool) or not isinstance(latest_event_id, int)
        ):
            raise InvalidInput(f"latest_event_id must be an integer, got {latest_event_id!r}")
        if connection_id in self._connections:
            raise InvalidInput(f"connection {connection_id!r} already joined a conversation")
        self._check_intake()
        try:
            async with asyncio.timeout(self.config.join_wait):
                await self._join_gate.acquire()
        except TimeoutError:
            raise NodeBusy(
                f"node {self.node_id} is busy ({self.config.max_concurrent_joins} joins in "
                f"progress for over {self.config.join_wait:g}s); try again"
            ) from None
        try:
            info = await self.maybe_start_agent_loop(sid, settings, user_id)
            conn = self._connections.add(connection_id, sid, user, latest_event_id or 0)
            try:
                await self._subscribe(sid)
                await self.state.add_connection(connection_id, sid, user, self.inc)
            except BaseException:
                self._connections.forget(conn)
                raise
        finally:
            self._join_gate.release()
        await self._connections.catch_up(conn)
        return info

    async def maybe_start_agent_loop(
        self,
        sid: str,
        settings: Mapping[str, Any] | None,
        user_id: str | None,
        initial_user_msg: Mapping[str, Any] | None = None,
    ) -> ConversationInfo:
        """Make sure the conversation's loop runs somewhere; start it here if nowhere.

        Creates the conversation for ``user_id`` if it does not exist. At most one loop
        runs cluster-wide, and the user's cap holds: the least recently updated of the
        user's other loops are evicted to make room.
        """
        check_conversation_id(sid)
        user = _user(user_id)
        if settings is not None and not isinstance(settings, Mapping):
            raise InvalidInput("settings must be a mapping")
        initial: tuple[Event, bytes] | None = None
        if initial_user_msg is not None:
            initial = codec.user_action(initial_user_msg, self.config.max_action_bytes)
        runner = self._runners.get(sid)
        if runner is not None and runner.running:
            if runner.lease.user != user and user:
                raise Forbidden(sid)
            if initial is not None:
                await self._accept(sid, user, initial)
            return ConversationInfo(sid, runner.lease.user, self.node_id, True, True)
        pending = self._starting.get(sid)
        if pending is not None:
            info = await asyncio.shield(pending)
            if info.user != user and user:
                raise Forbidden(sid)
            if initial is not None:
                await self._accept(sid, user, initial)
            return info
        fut: asyncio.Future[ConversationInfo] = asyncio.get_running_loop().create_future()
        self._starting[sid] = fut
        try:
            info = await self._start(sid, user, dict(settings or {}), initial)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters get it through shield
            raise
        else:
            fut.set_result(info)
            return info
        finally:
            del self._starting[sid]

    async def send_to_event_stream(self, connection_id: str, data: Mapping[str, Any]) -> int:
        """Accept a user action durably; returns its event id once it is in Redis."""
        conn = self._connections.get(connection_id)
        if conn is None:
            raise ConnectionNotFound(connection_id)
        action = codec.user_action(data, self.config.max_action_bytes)
        return await self._accept(conn.sid, conn.user, action)

    async def disconnect_from_session(self, connection_id: str) -> None:
        conn = self._connections.get(connection_id)
        if conn is None:
            log.debug("disconnect of unknown connection %s", connection_id)
            return
        self._connections.forget(conn)
        async with self._leave_gate:
            await self._unsubscribe(conn.sid)  # never raises: see Subscriptions.discard
            try:
                await self.state.remove_connection(connection_id, conn.sid, conn.user, self.inc)
            except (RedisError, OSError) as exc:
                # The client is gone either way; forget it in Redis once Redis answers again.
                log.warning("connection %s removal deferred: %s", connection_id, exc)
                self._departed.append((connection_id, conn.sid, conn.user))

    async def close_session(self, sid: str, user_id: str | None = None) -> bool:
        """Stop the conversation's loop wherever it runs. Returns whether one was running."""
        check_conversation_id(sid)
        user = _user(user_id)
        meta = await self.state.meta(sid)
        if not meta:
            raise ConversationNotFound(sid)
        if user and meta.get("user") != user:
            raise Forbidden(sid)
        if sid in self._runners:
            await self._stop_loop(sid, _closed_event(), AgentState.STOPPED)
            return True
        owner_inc = meta.get("inc", "")
        if not owner_inc:
            return False
        if await self._alive(owner_inc):
            reply = await self._request(owner_inc, "close", {"sid": sid})
            return bool(reply.get("closed"))
        await self._release_dead(sid, meta.get("user", ""), owner_inc)
        return False

    async def get_running_agent_loops(
        self, user_id: str | None = None, filter_to_sids: set[str] | None = None
    ) -> set[str]:
        """Ids of conversations whose loop runs on any live node."""
        if user_id:
            loops = await self.state.user_loops(check_user_id(user_id))
            await self._refresh_live()
            sids = {
                sid
                for sid, held in loops.items()
                if held.startswith("live:") and held[5:] in self._live
            }
        else:
            incs = await self._refresh_live()
            sids = set()
            if incs:
                async with self.state.redis.pipeline(transaction=False) as pipe:
                    for inc in incs:
                        pipe.hkeys(self.keys.node_owned(inc))
                    for names in await pipe.execute():
                        sids.update(text(n) for n in names)
        if filter_to_sids is not None:
            sids &= set(filter_to_sids)
        return sids

    async def get_connections(
        self, user_id: str | None = None, filter_to_sids: set[str] | None = None
    ) -> dict[str, str]:
        """connection id -> conversation id, for connections on every node."""
        if filter_to_sids is not None:
            sids = sorted(filter_to_sids)
            rows = await self.state.hgetall_many([self.keys.conv_conns(s) for s in sids])
            out = {cid: sid for sid, row in zip(sids, rows, strict=True) for cid in row}
            if user_id and out:
                owners = await self._users_of(sids)
                out = {cid: sid for cid, sid in out.items() if owners.get(sid) == user_id}
            return out
        if user_id:
            rows = await self.state.hgetall_many([self.keys.user_conns(check_user_id(user_id))])
            return rows[0]
        incs = await self._refresh_live()
        out = {}
        for row in await self.state.hgetall_many([self.keys.node_conns(i) for i in incs]):
            out.update(row)
        return out

    async def is_agent_loop_running(self, sid: str) -> bool:
        check_conversation_id(sid)
        runner = self._runners.get(sid)
        if runner is not None:
            return runner.running
        inc = (await self.state.meta(sid)).get("inc", "")
        return bool(inc) and await self._alive(inc)

    # -- introspection ---------------------------------------------------------------
    def local_loops(self) -> set[str]:
        """Conversations whose loop runs in this process right now (lease enforced)."""
        if self._membership is not None:
            self._membership.check()
        return {sid for sid, r in self._runners.items() if r.running}

    def local_connections(self) -> dict[str, str]:
        return {c.cid: c.sid for c in self._connections}

    async def conversation(self, sid: str) -> dict[str, str]:
        """The conversation's record in Redis ({} when unknown)."""
        check_conversation_id(sid)
        return await self.state.meta(sid)

    async def events(self, sid: str, after: int = 0, limit: int = 1000) -> list[Event]:
        check_conversation_id(sid)
        rows = await self.state.events_after(sid, after, count=limit)
        return [codec.with_id(i, e) for i, e in rows]

    async def nodes(self) -> dict[str, str]:
        """node id -> incarnation, for nodes whose lease is alive."""
        registry = await self.state.registry()
        live = await self.state.live_leases(registry)
        return {n: i for n, i in registry.items() if n in live}

    # -- starting loops --------------------------------------------------------------
    def _check_intake(self) -> None:
        if self.draining:
            raise NodeDraining(f"node {self.node_id} is draining; connect to another node")

    async def _start(
        self, sid: str, user: str, settings: dict[str, Any], initial: tuple[Event, bytes] | None
    ) -> ConversationInfo:
        if not self.membership.check():
            raise NodeDraining(f"node {self.node_id} lost its lease; it takes no loops until back")
        dead = ""
        while True:
            own = await self.state.acquire(
                sid, self.node_id, self.inc, user, create=not self.draining, dead_inc=dead
            )
            if own.status == "forbidden":
                raise Forbidden(sid)
            if own.status == "missing":
                raise NodeDraining(f"node {self.node_id} is draining; connect to another node")
            if own.status == "owned":
                # Ask Redis, not the cache: a start is where a dead owner gets replaced.
                if await self.state.lease_left(own.inc) is not None:
                    if initial is not None:
                        await self._accept(sid, user, initial)
                    return ConversationInfo(sid, own.user, own.owner, True, False)
                dead = own.inc
                continue
            break
        if self.draining:
            await self.state.release(sid, self.inc, own.epoch, "stopped")
            raise NodeDraining(f"node {self.node_id} is draining; connect to another node")
        if own.status == "created" and own.user:
            await self.state.redis.zadd(
                self.keys.user_convs(own.user), {sid: int(time.time() * 1000)}, nx=True
            )
        lease = Lease(sid, own.user, self.inc, own.epoch)
        try:
            # Listed under our incarnation at once, so that if we die while starting, the
            # reaper releases it with the rest.
            await self.state.redis.hset(self.keys.node_owned(self.inc), sid, lease.user)
            if initial is not None:
                await self._accept(sid, user, initial)
            await self._subscribe(sid)
            admitted = await self.admission.admit(lease)
            if lease.inc != self.inc or self.membership.lapsed:
                # Our lease lapsed meanwhile: a loop started now would be fenced at once,
                # and a refused claim (dropped with the old incarnation) is no eviction.
                # The caller retries once the node is back.
                raise NodeDraining(f"node {self.node_id} lost its lease while starting {sid}")
        except BaseException:
            await self._give_up(lease, None)
            raise
        if not admitted:
            await self._give_up(lease, _evicted_event())
            return ConversationInfo(sid, lease.user, "", False, False)
        factory = self._agent_factory
        assert factory is not None
        context = AgentContext(sid, lease.user or None, settings)
        runner = LoopRunner(
            lease,
            own.applied,
            lambda: factory(context),
            self.state,
            self.config,
            self.membership.lease_valid,
            self._on_runner_fenced,
            self._apply_committed,
            self.idle.touched,
            self.speculations,
        )
        self._runners[sid] = runner
        try:
            await self.state.redis.zadd(
                self.keys.node_idle(self.inc), {sid: int(time.time() * 1000)}
            )
            await runner.start()
        except BaseException:
            if self._runners.get(sid) is runner:
                del self._runners[sid]
            await runner.aclose()
            await self._give_up(lease, None)
            raise
        return ConversationInfo(sid, lease.user, self.node_id, True, True)

    async def _close_idle(self, sid: str) -> bool:
        return await self._stop_loop(sid, None, AgentState.STOPPED)

    async def _evict_owner(self, sid: str, user: str, inc: str) -> None:
        """Have the owner ``inc`` of an evicted loop stop it (or free a dead one's hold)."""
        if inc == self.inc:
            self._spawn(self._evict_local(sid, user, self.node_id), f"evict:{sid}")
        elif await self._alive(inc):
            await self._send(inc, "evict", {"sid": sid, "user": user})
        else:
            await self._release_dead(sid, user, inc)

    async def _give_up(self, lease: Lease, status: Event | None, *, retry: bool = False) -> bool:
        """Undo a start that never ran: tell the clients why, drop claim and ownership.

        If Redis fails meanwhile, the lease is kept and given up on a later heartbeat, so
        a conversation is never left owned by a live node that runs no loop for it.
        """
        try:
            if status is not None:
                await self.state.commit(
                    lease.sid,
                    lease.inc,
                    lease.epoch,
                    [codec.pack(status)],
                    maxlen=self.config.event_log_maxlen,
                )
            await self.state.release_slot(lease.user, lease.sid, lease.inc)
            await self.state.release(lease.sid, lease.inc, lease.epoch, "stopped")
            await self.state.redis.hdel(self.keys.node_owned(lease.inc), lease.sid)
        except (RedisError, OSError) as exc:
            log.warning("giving up %s deferred: %s", lease.sid, exc)
            if lease not in self._abandoned:
                self._abandoned.append(lease)
            return False
        finally:
            if not retry:  # the start's channel reference is dropped once
                await self._unsubscribe(lease.sid)
        return True

    async def _accept(self, sid: str, user: str, action: tuple[Event, bytes]) -> int:
        event, packed = action
        key = event.get(codec.CLIENT_ACTION_ID)
        token = accept_token(None if key is None else str(key))
        runner = self._runners.get(sid)
        # The local loop may start on it now, under the id it should get (runner.py).
        spec = runner.speculate(event, token) if runner is not None else None
        landed = 0
        try:
            r = await self.state.accept(
                sid,
                user,
                packed,
                self.config.event_log_maxlen,
                self.config.inbox_max,
                self.inc,
                token=token,
            )
            landed = r.event_id if r.status == "ok" else 0
        finally:
            if spec is not None:
                spec.settle(landed)
        if r.status == "missing":
            raise ConversationNotFound(sid)
        if r.status == "forbidden":
            raise Forbidden(sid)
        if r.status == "full":
            raise InboxFull(f"conversation {sid!r} has {self.config.inbox_max} unprocessed actions")
        # With the agent's answer one Redis call behind, the runner delivers this event
        # together with it, and the ack goes out now, while Redis runs that call.
        if spec is None or runner is None or not runner.take_user_event(spec, r.event_id):
            await self._apply_local(sid, r.event_id, event)
        if sid in self._starting or sid in self._runners or self.draining:
            return r.event_id
        if r.inc == self.inc or not r.inc or not await self._alive(r.inc):
            # No loop runs it (no live owner, or ours failed to start): the action waits
            # durably in the inbox; start one here.
            self._schedule_restart(sid, user)
        return r.event_id

    def _schedule_restart(self, sid: str, user: str) -> None:
        """Restart ``sid``'s loop in the background; while our lease is lapsed, only note
        it (thousands of conversations may come back at once) for after re-registering."""
        if self.membership.lapsed:
            self._restart_later[sid] = user
        elif sid not in self._restarting:
            self._spawn(self._restart(sid, user), f"restart:{sid}")

    async def _restart(self, sid: str, user: str) -> None:
        """Start a loop for a conversation whose loop is gone (in the background).

        At most ``max_concurrent_restarts`` run at once: when a node with thousands of
        loops is lost, its conversations come back in waves instead of all at once.
        """
        if sid in self._restarting:
            return
        self._restarting.add(sid)
        try:
            async with self._restart_gate:
                if sid in self._runners:
                    return
                await self.maybe_start_agent_loop(sid, None, user or None)
        except (CoordinatorError, RedisError, OSError, TimeoutError) as exc:
            # E.g. our lease lapsed or Redis failed mid-start: try again each heartbeat
            # until the pending actions have a loop.
            if self.membership.lapsed:
                log.debug("restart of %s waits for the lease: %s", sid, exc)
            else:
                log.warning("could not restart %s (%s); retrying", sid, exc)
            if not self.draining:
                self._restart_later[sid] = user
        finally:
            self._restarting.discard(sid)

    # -- stopping loops --------------------------------------------------------------
    async def _stop_loop(self, sid: str, status: Event | None, final: AgentState) -> bool:
        runner = self._runners.get(sid)
        if runner is None:
            return False
        await runner.aclose()
        if status is not None:
            with contextlib.suppress(Fenced, RedisError, OSError):
                await runner.emit_status(status)
        if self._runners.get(sid) is runner:
            del self._runners[sid]
        if not runner.fenced:
            lease = runner.lease
            await self.state.release_slot(lease.user, sid, lease.inc)
            await self.state.release(sid, lease.inc, lease.epoch, str(final))
            async with self.state.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(self.keys.node_owned(lease.inc), sid)
                pipe.zrem(self.keys.node_idle(lease.inc), sid)
                await pipe.execute()
        await self._unsubscribe(sid)
        return True

    def _on_runner_fenced(self, runner: LoopRunner) -> None:
        if self._runners.get(runner.sid) is runner:
            del self._runners[runner.sid]
        self._spawn(self._finish_fenced(runner), f"fenced:{runner.sid}")

    async def _finish_fenced(self, runner: LoopRunner) -> None:
        await runner.aclose()
        if not self.membership.lapsed:
            with contextlib.suppress(RedisError, OSError):
                async with self.state.redis.pipeline(transaction=False) as pipe:
                    pipe.hdel(self.keys.node_owned(runner.lease.inc), runner.sid)
                    pipe.zrem(self.keys.node_idle(runner.lease.inc), runner.sid)
                    await pipe.execute()
        await self._unsubscribe(runner.sid)

    def _on_lapse(self, why: str) -> None:
        runners = list(self._runners.values())
        if runners:
            log.warning("fencing %d loop(s): %s", len(runners), why)
        for runner in runners:
            runner.fence(why, quiet=True)

    async def _evict_local(self, sid: str, user: str, origin: str) -> None:
        pending = self._starting.get(sid)
        if pending is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        runner = self._runners.get(sid)
        if runner is not None:
            # Acknowledged actions reach the loop before it stops; the cap holds meanwhile
            # (the slot stays taken until the loop is gone).
            await runner.finish_backlog(min(10.0, self.config.start_timeout / 2))
        if not await self._stop_loop(sid, _evicted_event(), AgentState.STOPPED):
            await self.state.release_slot(user, sid, self.inc)
        else:
            await self._resume_pending([(sid, user)])
        if origin == self.node_id:
            self.admission.slot_freed(user)
        else:
            await self._send_node(origin, "slot_freed", {"user": user})

    async def _release_dead(self, sid: str, user: str, inc: str) -> None:
        """Free what a dead incarnation held for one conversation."""
        if await self.state.release(sid, inc, None, "stopped"):
            event = codec.status_event(
                codec.NODE_LOST,
                "The node running this conversation was lost; it restarts on the next action.",
                "stopped",
            )
            await self.state.commit(
                sid, "", 0, [codec.pack(event)], maxlen=self.config.event_log_maxlen
            )
        await self.state.release_slot(user, sid, inc)
        self.admission.slot_freed(user)

    # -- delivery to local connections -----------------------------------------------
    async def _apply_local(self, sid: str, event_id: int, event: Event) -> None:
        """An event this node just wrote: hand it to the local loop and connections now,
        without waiting for its pub/sub echo (which the cursors then drop)."""
        runner = self._runners.get(sid)
        if runner is not None and runner.observe(event_id, event):
            # It has an action to dispatch: let it send its commit before the event (and
            # the caller's ack) are written, so they travel while Redis runs the commit.
            await asyncio.sleep(0)
        await self._connections.offer(sid, event_id, event)

    async def _apply_committed(self, sid: str, first_id: int, events: list[Event]) -> None:
        """The local loop committed ``events`` from ``first_id`` on; 0 means a retried
        commit that had already gone through: its ids are unknown here, and its events
        were published only if another node listened, so local connections re-read."""
        if first_id <= 0:
            self._connections.catch_up_room(sid)
            return
        for offset, event in enumerate(events):
            await self._apply_local(sid, first_id + offset, event)

    async def _read_log(self, sid: str, after: int, count: int) -> list[tuple[int, Event]]:
        return await self.state.events_after(sid, after, count=count)

    async def _deliver(self, connection_id: str, event: Event) -> None:
        await self.sink.deliver(connection_id, event)

    async def _subscribe(self, sid: str) -> None:
        assert self._subs is not None
        await self._subs.add(self.keys.conv_channel(sid))

    async def _unsubscribe(self, sid: str) -> None:
        if self._subs is not None:
            await self._subs.discard(self.keys.conv_channel(sid))

    async def _on_message(self, channel: str, data: bytes) -> None:
        sid = self.keys.sid_from_channel(channel)
        if sid is not None:
            event_id, event = codec.decode_published(data)
            runner = self._runners.get(sid)
            if runner is not None:
                runner.observe(event_id, event)
            room = self._connections.room(sid)
            if (
                room
                and event.get("status") in (codec.NODE_LOST, codec.NODE_DRAINING)
                and not self.draining
                and sid not in self._starting
            ):
                # Our clients still watch it: restart the loop (one node wins the lease).
                self._schedule_restart(sid, room[0].user)
            await self._connections.offer(sid, event_id, event)
            return
        method, origin, payload = codec.open_envelope(data)
        self._spawn(self._on_command(method, origin, payload), f"cmd:{method}")

    async def _on_resubscribed(self) -> None:
        """After a pub/sub reconnect: re-read inboxes and catch every connection up."""
        for runner in self._runners.values():
            runner.poke()
        self._connections.catch_up_all()

    # -- node-to-node commands -------------------------------------------------------
    async def _send(self, inc: str, method: str, payload: dict[str, Any]) -> None:
        await self._send_node(inc.rsplit("/", 1)[0], method, payload)

    async def _send_node(self, node: str, method: str, payload: dict[str, Any]) -> None:
        await self.state.redis.publish(
            self.keys.node_channel(node), codec.envelope(method, self.node_id, payload)
        )

    async def _request(self, inc: str, method: str, payload: dict[str, Any]) -> dict[str, Any]:
        rid = uuid.uuid4().hex
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        try:
            await self._send(inc, method, {**payload, "rid": rid})
            async with asyncio.timeout(self.config.redis_timeout * 2):
                return await fut
        except TimeoutError:
            raise CoordinatorError(f"node {inc} did not answer {method!r} in time") from None
        finally:
            self._replies.pop(rid, None)

    async def _on_command(self, method: str, origin: str, p: dict[str, Any]) -> None:
        if method == "evict":
            await self._evict_local(str(p["sid"]), str(p["user"]), origin)
        elif method == "resume":
            if not self.draining:
                await self._restart(str(p["sid"]), str(p["user"]))
        elif method == "slot_freed":
            self.admission.slot_freed(str(p["user"]))
        elif method == "close":
            closed = await self._stop_loop(str(p["sid"]), _closed_event(), AgentState.STOPPED)
            await self._send_node(origin, "reply", {"rid": p["rid"], "closed": closed})
        elif method == "reply":
            fut = self._replies.get(str(p.get("rid")))
            if fut is not None and not fut.done():
                fut.set_result(p)
        else:
            log.warning("unknown command %r from %s", method, origin)

    # -- background work -------------------------------------------------------------
    async def _alive(self, inc: str) -> bool:
        """Whether ``inc`` holds its lease. Known from the last read until that lease's
        expiry; then read again, so a dead owner is seen as dead as soon as its lease
        expires, not at the next heartbeat."""
        if inc == self.inc:
            return not self.membership.lapsed
        now = time.monotonic()
        if self._live.get(inc, 0.0) > now:
            return True
        left = await self.state.lease_left(inc)
        if left is None:
            self._live.pop(inc, None)
            return False
        self._live[inc] = now + left
        return True

    async def _refresh_live(self) -> set[str]:
        registry = await self.state.registry()
        live = await self.state.live_leases(registry)
        now = time.monotonic()
        self._live = {registry[node]: now + left for node, left in live.items()}
        return set(self._live)

    async def _users_of(self, sids: list[str]) -> dict[str, str]:
        async with self.state.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hget(self.keys.conv(sid), "user")
            users = await pipe.execute()
        return {sid: text(u) for sid, u in zip(sids, users, strict=True)}

    async def _lease_loop(self) -> None:
        """Tick: tells the lease keeper thread that this event loop runs. Renewals and
        their answers need nothing else from the loop, so a busy loop keeps its lease."""
        interval = min(0.25, self.config.heartbeat_interval / 2)
        while True:
            self.membership.tick()
            await asyncio.sleep(interval)

    async def _housekeeping_loop(self) -> None:
        """Each heartbeat interval (or at once when the lease was lost): re-register if
        needed, retry deferred work, refresh the live-node cache, reap dead nodes."""
        reap_every = max(1, round(self.config.node_ttl / 2 / self.config.heartbeat_interval))
        n = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.heartbeat_interval):
                    await self._lease_lost.wait()
            n += 1
            try:
                if self._lease_lost.is_set():
                    self._lease_lost.clear()
                    await self._rotate_incarnation()
                if self._departed:
                    # Removals failing meanwhile are appended: drop only what was sent.
                    retried = list(self._departed)
                    await self.state.remove_connections(retried, self.inc)
                    del self._departed[: len(retried)]
                for lease in list(self._abandoned):
                    # A later start may have taken the conversation up again meanwhile.
                    busy = lease.sid in self._runners or lease.sid in self._starting
                    if busy or await self._give_up(lease, None, retry=True):
                        self._abandoned.remove(lease)
                        self._restart_later.setdefault(lease.sid, lease.user)
                if self._restart_later and self.membership.check():
                    retry, self._restart_later = self._restart_later, {}
                    await self._resume_pending(list(retry.items()))
                await self._refresh_live()
                if n % reap_every == 0:
                    released = await reap_dead_nodes(
                        self.state,
                        self.inc,
                        int(self.config.node_ttl * 1000),
                        self.config.event_log_maxlen,
                    )
                    await self._resume_pending(released)
            except (RedisError, OSError) as exc:
                log.warning("membership refresh failed: %s", exc)
            except Exception:
                log.exception("membership round failed; retrying next heartbeat")

    async def _rotate_incarnation(self) -> None:
        """Our lease lapsed: loops are fenced; re-register and re-assert our connections."""
        old = self.inc
        # A late renewal may have kept our old lease alive: drop it, we start afresh.
        await self.state.delete_if(self.keys.node_lease(self.node_id), old)
        await self.membership.register()
        log.warning("node %s re-registered as %s", old, self.inc)
        # A reaper that saw the old incarnation dead would delete our connections even
        # after they are re-added here: wait for it to finish (it holds the lock).
        ttl_ms = int(self.config.node_ttl * 1000)
        async with reaper_lock(self.state, self.inc, ttl_ms, wait=self.config.node_ttl) as held:
            if not held:
                log.warning("re-registering connections without the reaper lock")
            released = await reap_incarnation(
                self.state, old, keep_connections=True, maxlen=self.config.event_log_maxlen
            )
            # Re-add first: were we to die between the two, a reaper (the old incarnation
            # stays on the retired list until the end) still finds every connection.
            await self.state.add_connections(
                [(conn.cid, conn.sid, conn.user) for conn in self._connections], self.inc
            )
            await self.state.redis.delete(self.keys.node_conns(old))
            await self.state.forget_retired(old)
        # While unregistered, writers that saw no other listener did not publish.
        self._connections.catch_up_all()
        await self._resume_pending(released)

    async def _resume_pending(self, released: list[tuple[str, str]]) -> None:
        """Restart released conversations that hold acknowledged, unprocessed actions.

        Conversations with connections are restarted by the nodes holding them when the
        NODE_LOST status event reaches them; this covers actions nobody watches.
        """
        if not released:
            return
        async with self.state.redis.pipeline(transaction=False) as pipe:
            for sid, _ in released:
                pipe.xlen(self.keys.inbox(sid))
            pending = await pipe.execute()
        others = sorted(set(self._live) - {self.inc})
        for i, ((sid, user), n) in enumerate(zip(released, pending, strict=True)):
            if not n or sid in self._starting or sid in self._runners:
                continue
            if not self.draining:
                self._schedule_restart(sid, user)
            elif others:  # hand it to a live node
                await self._send(others[i % len(others)], "resume", {"sid": sid, "user": user})

    async def flush_activity(self) -> None:
        """Write last-active times of this node's loops to Redis (see ``idle.py``)."""
        await self.idle.flush()

    async def sweep_idle(self) -> list[str]:
        """Close this node's loops idle past close_delay, not RUNNING, with no connection;
        the ones closed (see ``idle.py``)."""
        return await self.idle.sweep()


def _evicted_event() -> Event:
    return codec.status_event(
        codec.TOO_MANY_CONVERSATIONS,
        "Too many conversations are running for this user; the least recently used was stopped.",
        "stopped",
    )


def _closed_event() -> Event:
    return codec.status_event(codec.CONVERSATION_CLOSED, "The conversation was closed.", "stopped")
