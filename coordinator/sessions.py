"""Client connections joining and leaving conversations on this node.

A join makes sure the conversation's loop runs somewhere (``Loops.ensure_running``),
registers the connection here (``LocalConnections``) and in Redis, with the channel
subscribed first, then catches it up from the log: gap-free and duplicate-free, whatever
``latest_event_id`` it brought. A burst of joins is worked through a bounded number at a
time (``max_concurrent_joins``); one that waited ``join_wait`` for a place is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from workers.protocol import Event

from .catchup import Connection, LocalConnections
from .config import ManagerConfig
from .errors import (
    EXPECTED,
    REDIS_TROUBLE,
    ConversationClosed,
    NodeBusy,
    too_many_connections,
)
from .loops import Loops
from .membership import Membership
from .owners import ConversationInfo, Intake
from .state import RedisState, SizeHint
from .subscriptions import Interest

log = logging.getLogger(__name__)


class Sessions:
    def __init__(
        self,
        *,
        state: RedisState,
        config: ManagerConfig,
        intake: Intake,
        membership: Membership,
        loops: Loops,
        interest: Interest,
        connections: LocalConnections,
    ) -> None:
        self._state = state
        self._config = config
        self._intake = intake
        self._membership = membership
        self._loops = loops
        self._interest = interest
        self.connections = connections
        connections.on_closed = self.release  # a closing notice ended it (catchup.py)
        self._join_gate = asyncio.Semaphore(config.max_concurrent_joins)
        # Thousands of clients may leave at once: their removals take a bounded share of
        # the Redis pool instead of all of it (and none waits out the pool's timeout).
        self._leave_gate = asyncio.Semaphore(max(1, config.redis_max_connections // 4))
        self.deferred: list[tuple[str, str, str]] = []  # removals Redis missed
        self._joining: dict[str, asyncio.Future[None]] = {}  # connection id -> its join

    async def join(
        self,
        sid: str,
        cid: str,
        user: str,
        settings: Mapping[str, Any],
        latest_event_id: int | None,
        org: str = "",
    ) -> ConversationInfo:
        """Join connection ``cid`` to ``sid``; one join of a connection at a time (a second
        waits, then finds it joined: already there, or it moves)."""
        async with self._turn_of(cid):
            joined = self.connections.get(cid)
            if joined is not None and (joined.sid, joined.user) == (sid, user):
                # Already in it (the seed's map assignment): nothing changes, the loop runs.
                return await self._loops.ensure_running(sid, user, settings, None, org)
            self._intake.check()
            cfg = self._config
            began = time.time()
            if self._join_gate.locked():
                try:
                    async with asyncio.timeout(cfg.join_wait):
                        await self._join_gate.acquire()
                except TimeoutError:
                    raise NodeBusy(
                        f"node {cfg.node_id} is busy ({cfg.max_concurrent_joins} joins in "
                        f"progress for over {cfg.join_wait:g}s); try again"
                    ) from None
            else:  # taken at once: no timer (a cancelled one would stay in the loop's heap)
                await self._join_gate.acquire()
            try:
                info = await self._loops.ensure_running(
                    # A connection that moves here holds its place already (left after).
                    sid,
                    user,
                    settings,
                    None,
                    org,
                    joining=joined is None,
                    latest=latest_event_id,
                )
                if joined is not None:  # in another conversation: it moves, once this one may
                    await self._leave(cid)
                conn = self.connections.add(cid, sid, user, latest_event_id or 0, began)
                try:
                    await self._interest.watch(sid)
                except BaseException:
                    # Undone in full: a watch that fails still holds its reference.
                    self.connections.forget(conn)
                    await self._interest.unwatch(sid)
                    raise
            finally:
                self._join_gate.release()

            async def register_and_read(
                after: int, count: int, max_bytes: int, hint: SizeHint
            ) -> Any:
                # Registered before the first read, in the same round trip (state layer), and
                # counted under the user's cap on all nodes together.
                inc = self._membership.inc
                last, rows, size, held = await self._state.join_and_read(
                    cid, sid, user, inc, after, count, max_bytes, hint
                )
                cap = cfg.max_connections_per_user
                if cap and held > cap:
                    raise too_many_connections(user, cap)
                return last, rows, size

            try:
                # Bounded: no input (a cursor Redis refuses, a Redis that stays away) may
                # leave a join hanging; a join that fails is undone.
                await self.connections.catch_up(
                    conn, within=cfg.join_wait, joining=register_and_read
                )
            except BaseException:
                await self._leave(cid)
                raise
            if self.connections.get(cid) is not conn:
                # A closing notice among what it was sent ended it (catchup.py): refused,
                # not left connected to nothing.
                raise ConversationClosed(sid)
            return info

    @contextlib.asynccontextmanager
    async def _turn_of(self, cid: str) -> AsyncIterator[None]:
        """The one join of ``cid`` under way (``leave`` waits for it)."""
        await self._after_join_of(cid)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._joining[cid] = done
        try:
            yield
        finally:
            del self._joining[cid]
            done.set_result(None)

    async def _after_join_of(self, cid: str) -> None:
        while (pending := self._joining.get(cid)) is not None:
            await asyncio.wait([pending])

    async def leave(self, cid: str) -> None:
        """Forget connection ``cid`` and give up what it held, once a join of it under way
        has ended (a disconnect during its join is not lost)."""
        await self._after_join_of(cid)
        await self._leave(cid)

    async def _leave(self, cid: str) -> None:
        conn = self.connections.get(cid)
        if conn is None:
            log.debug("disconnect of unknown connection %s", cid)
            return
        self.connections.forget(conn)
        await self.release(conn)

    async def release(self, conn: Connection) -> None:
        """Give up what a forgotten connection held: its channel reference, its place
        in Redis' connection maps."""
        cid = conn.cid
        async with self._leave_gate:
            await self._interest.unwatch(conn.sid)
            try:
                await self._state.remove_connections(
                    [(cid, conn.sid, conn.user)], self._membership.inc, self._config.retention_ms
                )
            except REDIS_TROUBLE as exc:
                # The client is gone either way; forget it in Redis once Redis answers again.
                log.warning("connection %s removal deferred: %s", cid, exc)
                self.deferred.append((cid, conn.sid, conn.user))

    async def retry_deferred(self) -> None:
        """Each heartbeat: the removals Redis missed."""
        if self.deferred:
            # Removals failing meanwhile are appended: drop only what was sent.
            retried = list(self.deferred)
            await self._state.remove_connections(
                retried, self._membership.inc, self._config.retention_ms
            )
            del self.deferred[: len(retried)]

    async def reassert(self) -> None:
        """After re-registering: list every local connection under the new incarnation."""
        conns = [(c.cid, c.sid, c.user) for c in self.connections]
        await self._state.add_connections(conns, self._membership.inc)

    async def farewell(self, update: Event) -> None:
        """Tell every local client ``update`` (a status update), forget it and
        disconnect it (a drain)."""
        sink = self.connections.sink
        for conn in self.connections:
            with contextlib.suppress(Exception):
                await sink.deliver(conn.cid, update)
            with contextlib.suppress(*EXPECTED):
                await self.leave(conn.cid)
            with contextlib.suppress(Exception):
                await sink.disconnect(conn.cid)

    async def settle(self) -> None:
        """Wait for the joins under way (a drain: the intake is closed, so each ends soon,
        joined or refused; each is bounded by ``join_wait``)."""
        while self._joining:
            await asyncio.wait(list(self._joining.values()))

    async def leave_all(self) -> None:
        for conn in self.connections:
            with contextlib.suppress(*EXPECTED):
                await self.leave(conn.cid)
