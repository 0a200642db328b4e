"""The distributed conversation manager: the seed's API, with all of its state in Redis.

One instance is one node. It runs the agent loops it owns, holds the socket connections
that reached it, and answers every query for the whole cluster from Redis. This class is
the API only: it checks its input and hands each call to the part of the started node
that owns it (``node.py`` lists them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Mapping
from types import TracebackType
from typing import Any

from workers.loader import AgentLoadError, load_agent
from workers.protocol import AgentFactory, Event

from . import codec
from .backends import Backend, open_backend
from .catchup import EventSink, NullSink
from .config import DEFAULT_LIFETIMES, Lifetimes, ManagerConfig
from .directory import Directory
from .errors import (
    EXPECTED,
    REDIS_TROUBLE,
    ConfigError,
    ConnectionNotFound,
    ConversationNotFound,
    Forbidden,
    InvalidInput,
    NodeStopped,
)
from .handles import ConversationHandle
from .inputs import (
    MAX_EVENT_ID,
    check_connection_id,
    check_conversation_id,
    check_int,
    check_settings,
    check_user_id,
    shown,
)
from .keys import KeySchema
from .membership import Membership
from .metrics import NodeMetrics
from .node import Node
from .owners import ConversationInfo
from .redisurl import database_of
from .revocations import Revocations
from .runner import LoopRunner
from .state import RedisState

__all__ = ["ConversationInfo", "ConversationManager", "EventSink", "NullSink"]

log = logging.getLogger(__name__)

# How long a purge may take beyond a start it waits for (``agent_start_timeout``): past
# it, should the purging node die, its mark expires and the conversation may be taken.
PURGE_WITHIN = 60.0
EMPTIED = "emptied"  # a purge mark left by a purge that emptied the store, not Redis
MAX_EVENTS_READ = 10_000  # events one ``events`` call returns at most
# ... and about this many bytes of them (as logged): a page of the largest events
# (1 MiB each by default) is read and sent a few at a time, not a thousand at once.
MAX_PAGE_BYTES = 4 << 20


def _user(user_id: str | None) -> str:
    return "" if user_id is None else check_user_id(user_id)


async def _uncount(state: RedisState, sid: str, counting: asyncio.Future[Any]) -> None:
    """Take back an attach whose caller was cancelled, once it is known to have counted."""
    with contextlib.suppress(*EXPECTED):
        status, _ = await counting
        if status == "ok":
            await state.attach(sid, "", -1)


def _org(org: str | None) -> str:
    """An organisation id is checked as a user id is (None or '': none)."""
    return "" if org is None or org == "" else check_user_id(org)


def _whose(user_id: str | None) -> str | None:
    """A filter by user: None for every user's; '' is no user id, not a wildcard."""
    return None if user_id is None else check_user_id(user_id)


def _sids(filter_to_sids: Collection[str] | None) -> set[str] | None:
    if filter_to_sids is None:
        return None
    if isinstance(filter_to_sids, str | bytes) or not isinstance(filter_to_sids, Collection):
        raise InvalidInput("filter_to_sids must be a set of conversation ids")
    return {check_conversation_id(sid) for sid in filter_to_sids}


def _settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Settings given to the Python API held to what clients may give (``check_settings``:
    JSON, bounded): a worker process gets them as msgpack."""
    if settings is not None and not isinstance(settings, Mapping):
        raise InvalidInput("settings must be a mapping")
    return check_settings(None if settings is None else dict(settings))


class ConversationManager:
    """A coordinator node. Use as ``async with ConversationManager(config) as m: ...``.

    ``sink`` receives the events for this node's connections (``app.SocketSink`` emits
    them as socket.io ``oh_event``); ``agent_factory`` makes agent loops (default: the
    class ``config.agent`` names, run in worker processes unless ``agent_isolation`` is
    ``none``; a factory given here cannot be sent to another process, so its loops run in
    this one: isolation ``none``); ``backend`` makes the Redis connections (default: a
    backend for ``config.redis_url``: ``backends.open_backend``).
    """

    def __init__(
        self,
        config: ManagerConfig | None = None,
        *,
        sink: EventSink | None = None,
        agent_factory: AgentFactory | None = None,
        backend: Backend | None = None,
    ) -> None:
        if config is not None and not isinstance(config, ManagerConfig):
            raise ConfigError(f"config must be a ManagerConfig, got {type(config).__name__}")
        self.config = config or ManagerConfig()
        self.node_id = self.config.node_id
        self.keys = KeySchema(self.config.key_prefix, database_of(self.config.redis_url))
        self.sink: EventSink = sink or NullSink()
        self.metrics = NodeMetrics(self.node_id)
        self._agent_factory = agent_factory
        self._backend = backend
        self._node: Node | None = None
        # Users whose tokens were revoked, read from Redis by the node once started.
        self.revocations = Revocations()

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

    async def start(self) -> None:
        if self._node is not None:
            return
        factory = self._agent_factory
        if factory is None and self.config.agent_isolation == "none":
            try:
                factory = load_agent(self.config.agent)
            except AgentLoadError as exc:
                raise ConfigError(str(exc)) from None
        backend = self._backend or await open_backend(self.config)
        self._node = await Node.start(
            config=self.config,
            backend=backend,
            sink=self.sink,
            agent_factory=factory,
            metrics=self.metrics,
            revocations=self.revocations,
        )

    async def aclose(self) -> None:
        """Stop every local loop, forget local connections, deregister, stop tasks."""
        node, self._node = self._node, None
        if node is not None:
            await node.aclose()

    async def drain(self) -> None:
        """Graceful stop, bounded by ``drain_timeout`` (see ``Node.drain``). The node
        stays this manager's while it drains: what asks meanwhile is told it drains
        (``draining``; 503 ``draining`` on /healthz), not that nothing runs."""
        node = self._node
        if node is None:
            return
        try:
            await node.drain()
        finally:
            if self._node is node:
                self._node = None

    @property
    def node(self) -> Node:
        """The started node's parts (for tools and tests); CoordinatorError before start."""
        if self._node is None:
            raise NodeStopped("the manager is not started (use 'async with')")
        return self._node

    @property
    def started(self) -> bool:
        return self._node is not None

    @property
    def draining(self) -> bool:
        return self._node is not None and self._node.intake.draining

    @property
    def state(self) -> RedisState:
        return self.node.state

    @property
    def membership(self) -> Membership:
        return self.node.membership

    @property
    def directory(self) -> Directory:
        return self.node.directory

    @property
    def inc(self) -> str:
        return self.node.inc

    # -- the seed's API --------------------------------------------------------------
    async def attach_to_conversation(
        self, sid: str, user_id: str | None = None
    ) -> ConversationHandle:
        """Take a handle on an existing conversation (REST callers); counted cluster-wide.
        A call cancelled meanwhile takes its count back (its caller has no handle to
        detach) once Redis has answered."""
        check_conversation_id(sid)
        user = _user(user_id)
        node = self.node
        counting = asyncio.ensure_future(node.state.attach(sid, user, +1))
        try:
            status, _ = await asyncio.shield(counting)
        except asyncio.CancelledError:
            node.tasks.spawn(_uncount(node.state, sid, counting), f"uncount:{sid}")
            raise
        if status == "missing":
            raise ConversationNotFound(sid)
        if status == "forbidden":
            raise Forbidden(sid)
        return node.handles.attach(sid, user)

    async def detach_from_conversation(self, conversation: ConversationHandle) -> None:
        """Drop one reference; the handle is released ``close_delay`` after the last one."""
        handle = self.node.handles.check(conversation)
        await self.state.attach(handle.sid, "", -1)
        self.node.handles.detach(handle)

    async def attached_count(self, sid: str) -> int:
        """Attach refcount of the conversation across the cluster."""
        return await self.state.refs(check_conversation_id(sid))

    async def join_conversation(
        self,
        sid: str,
        connection_id: str,
        settings: Mapping[str, Any] | None,
        user_id: str | None,
        latest_event_id: int | None = None,
        org: str | None = None,
    ) -> ConversationInfo:
        """Join a connection to a conversation (creating and starting it when needed).

        The connection first receives every logged event after ``latest_event_id`` (all
        of them when None), then live events, with no gap and no duplicate. ``org``: the
        user's organisation, whose cap the loop counts against too.
        """
        check_conversation_id(sid)
        check_connection_id(connection_id)
        user = _user(user_id)
        if latest_event_id is not None:
            check_int("latest_event_id", latest_event_id, 0, MAX_EVENT_ID)
        return await self.node.sessions.join(
            sid, connection_id, user, _settings(settings), latest_event_id, _org(org)
        )

    async def maybe_start_agent_loop(
        self,
        sid: str,
        settings: Mapping[str, Any] | None,
        user_id: str | None,
        initial_user_msg: Mapping[str, Any] | None = None,
        org: str | None = None,
        lifetimes: Lifetimes | None = None,
    ) -> ConversationInfo:
        """Make sure the conversation's loop runs somewhere; start it here if nowhere.

        Creates the conversation for ``user_id`` if it does not exist. At most one loop
        runs cluster-wide, and the user's cap holds: the least recently updated of the
        user's other loops are evicted to make room. ``lifetimes``: what a conversation
        created here asks for (``config.Lifetimes``, checked against the node's bounds).
        """
        check_conversation_id(sid)
        user = _user(user_id)
        checked = _settings(settings)
        if lifetimes is not None and not isinstance(lifetimes, Lifetimes):
            raise InvalidInput(f"lifetimes must be a config.Lifetimes, got {shown(lifetimes)}")
        initial = None
        if initial_user_msg is not None:
            initial = codec.user_action(initial_user_msg, self.config.max_action_bytes)
        return await self.node.loops.ensure_running(
            sid, user, checked, initial, _org(org), lifetimes or DEFAULT_LIFETIMES
        )

    async def send_to_event_stream(self, connection_id: str, data: Mapping[str, Any]) -> int:
        """Accept a user action durably; returns its event id once it is in Redis."""
        node = self.node
        conn = node.connections.get(check_connection_id(connection_id))
        if conn is None:
            raise ConnectionNotFound(connection_id)
        action = codec.user_action(data, self.config.max_action_bytes)
        try:
            accepted = await node.actions.accept(conn.sid, conn.user, action)
        except ConversationNotFound:
            # It was joined, so Redis lost it (restarted empty): its record comes back
            # from the event store, ids after the store's and after what its clients saw
            # (they are told what was lost: state/writes.py, rewind).
            await node.restarts.restore(conn.sid, conn.user)
            accepted = await node.actions.accept(conn.sid, conn.user, action)
        await node.restarts.ensure_served(conn.sid, conn.user, accepted.inc)
        return accepted.event_id

    async def disconnect_from_session(self, connection_id: str) -> None:
        await self.node.sessions.leave(check_connection_id(connection_id))

    async def close_session(self, sid: str, user_id: str | None = None) -> bool:
        """Stop the conversation's loop wherever it runs and close its connections on
        every node (told why, forgotten, disconnected). Returns whether a loop ran."""
        check_conversation_id(sid)
        user = _user(user_id)
        node = self.node
        meta = await self.state.meta(sid)
        if not meta:  # retired from Redis, its history in the store: nothing runs
            owner = await self._user_if_known(sid)
            if owner is None:
                raise ConversationNotFound(sid)
            if user and owner != user:
                raise Forbidden(sid)
            return False
        if user and meta.get("user") != user:
            raise Forbidden(sid)
        if sid in node.runners or sid in node.loops.starting:
            return await node.loops.stop(sid, codec.closed_event())
        owner_inc = meta.get("inc", "")
        if owner_inc and await node.directory.alive(owner_inc):
            reply = await node.bus.request(owner_inc, "close", {"sid": sid})
            return bool(reply.get("closed"))
        # No live node runs it: its connections are closed all the same (as the seed's).
        await node.loops.close_unserved(sid, meta.get("user", ""), owner_inc)
        return False

    async def get_running_agent_loops(
        self, user_id: str | None = None, filter_to_sids: set[str] | None = None
    ) -> set[str]:
        """Ids of conversations whose loop runs on any live node."""
        return await self.directory.running_loops(_whose(user_id), _sids(filter_to_sids))

    async def get_connections(
        self, user_id: str | None = None, filter_to_sids: set[str] | None = None
    ) -> dict[str, str]:
        """connection id -> conversation id, for connections on every node."""
        return await self.directory.connections(_whose(user_id), _sids(filter_to_sids))

    async def is_agent_loop_running(self, sid: str) -> bool:
        check_conversation_id(sid)
        runner = self.node.runners.get(sid)
        if runner is not None:
            return runner.running
        return await self.directory.owner_alive(sid)

    # -- this node -------------------------------------------------------------------
    def local_loops(self) -> set[str]:
        """Conversations whose loop runs in this process right now (lease enforced)."""
        if self._node is None:
            return set()
        self._node.membership.check()
        return self._node.loops.running()

    def local_connections(self) -> dict[str, str]:
        if self._node is None:
            return {}
        return {c.cid: c.sid for c in self._node.connections}

    def runner(self, sid: str) -> LoopRunner | None:
        """The local loop of ``sid``, if this node runs it."""
        return self.node.runners.get(check_conversation_id(sid))

    async def revoke_user(self, user_id: str, keep: float) -> float:
        """Revoke ``user_id``'s tokens issued until now, on every node (``keep``: the
        tokens' longest lifetime, how long the revocation must be kept); when (Unix
        time). The user's connections holding one end: here at once, on the other nodes
        as they hear of it (a command to each; or their next read, within
        ``revocations.REFRESH``)."""
        user = check_user_id(user_id)
        at_ms = int(time.time() * 1000)
        await self.state.revoke_user(user, at_ms, int(keep * 1000))
        await self.node.revoked(user, at_ms / 1000)
        return at_ms / 1000

    async def conversation(self, sid: str) -> dict[str, str]:
        """The conversation's record in Redis ({} when unknown)."""
        return await self.state.meta(check_conversation_id(sid))

    async def purge(self, sid: str, user_id: str | None = None) -> dict[str, Any]:
        """Stop ``sid``'s loop and delete it everywhere: its history in the event store,
        then its Redis state (a store that fails leaves the conversation whole, its
        unstored events included; Redis failing after the store leaves a record a purge
        again finishes, held as being purged meanwhile, for the retention at most, so that
        no node stores it again). Says what it removed."""
        check_conversation_id(sid)
        user = _user(user_id)
        owner = await self._user_if_known(sid)
        if owner is None:
            raise ConversationNotFound(sid)
        if user and owner != user:
            raise Forbidden(sid)
        # No node takes it from here on (a create or join meanwhile is refused: 409); a
        # start already under way is waited for and stopped by the close.
        within = PURGE_WITHIN + self.config.agent_start_timeout
        before = await self.state.mark_purging(sid, within)
        emptied = before == EMPTIED  # by a purge before this one, whose Redis part failed
        try:
            closed = False
            if await self.conversation(sid):
                closed = await self.close_session(sid, owner or None)
            store = self.node.store
            events, size = await store.purge(sid) if store is not None else (0, 0)
            emptied = True
            keys = await self.state.purge(sid, owner)
        except BaseException:
            if emptied:  # Redis not purged: no move may store it again (its mark lasts)
                with contextlib.suppress(*REDIS_TROUBLE):
                    await self.state.mark_purging(sid, self.config.retention_ms / 1000, EMPTIED)
            else:
                await self.state.unmark_purging(sid)
            raise
        await self.state.unmark_purging(sid)
        log.info("conversation %s purged: %d Redis keys, %d stored events", sid, keys, events)
        return {
            "closed": closed,
            "purged": {"redis_keys": keys, "stored_events": events, "stored_bytes": size},
        }

    async def user_of(self, sid: str) -> str:
        """The user of conversation ``sid`` ('' when unknown, or of no user), from its
        record in Redis or, once that expired, the event store."""
        return await self._user_if_known(sid) or ""

    async def _user_if_known(self, sid: str) -> str | None:
        """``user_of``, None when no conversation ``sid`` is known ('' is one of no
        user: the seed's ``user_id=None``)."""
        meta = await self.conversation(sid)
        if meta:
            return meta.get("user", "")
        stored = await self.node.store.conversation(sid) if self.node.store else None
        return stored.user if stored is not None else None

    async def events(self, sid: str, after: int = 0, limit: int = 1000) -> list[Event]:
        """Up to ``limit`` events of ``sid`` after id ``after``, in order, wherever they
        are kept (the event store, then the Redis window: ``history.py``), and about
        ``MAX_PAGE_BYTES`` at most (at least one event): fewer than ``limit`` may be
        followed by more (``events_page`` says whether)."""
        return (await self.events_page(sid, after, limit))[0]

    async def events_page(
        self, sid: str, after: int = 0, limit: int = 1000
    ) -> tuple[list[Event], bool]:
        """``events``, and whether more may follow them."""
        check_conversation_id(sid)
        check_int("after", after, 0, MAX_EVENT_ID)
        check_int("limit", limit, 1, MAX_EVENTS_READ)
        rows, more = await self.node.history.after(sid, after, limit, MAX_PAGE_BYTES)
        return [codec.with_id(i, e) for i, e in rows], more

    async def nodes(self) -> dict[str, str]:
        """node id -> incarnation, for nodes whose lease is alive."""
        return await self.directory.nodes()

    async def flush_activity(self) -> None:
        """Write last-active times of this node's loops to Redis (see ``idle.py``)."""
        await self.node.idle.flush()

    async def sweep_idle(self) -> list[str]:
        """Close this node's loops idle past close_delay, not RUNNING, with no connection;
        the ones closed (see ``idle.py``)."""
        return await self.node.loops.sweep_idle()
