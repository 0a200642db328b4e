"""The check of the event store against Redis once it showed it lost events it had
acknowledged (a failover to a replica that lagged, a restore from an older backup), or
reconnected to another server (a failover, which may have).

The mover (``archive.py``) finds such a loss when it next moves that conversation and
stores the rest again from the log (``scripts.REWIND_STORED``). A conversation quiet
since would never show it: nothing of its is stored again, and once Redis let it go the
store's shorter copy would be the only one, its ids given again. So the first loss seen
starts a check of every conversation Redis holds (SCAN), and so does a store that
reconnected to another server, or reached another than the cluster's nodes last did
(``watch``, each store sweep), as no conversation need be busy to show a failover's
loss. What owes a check is told Redis (``{cluster}:store-audits``, numbering the
checks), where it stays owed until a check that began after it ends; one node of the
cluster checks at a time (``{cluster}:store-audit``), each at most once in
``AUDIT_EVERY`` seconds. Each conversation the store holds less of is noted for the sweep
(``note_unstored``), which stores it again once its mark in Redis is lowered to what the
store holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.exceptions import RedisClusterException

from .backoff import Backoff
from .errors import REDIS_TROUBLE
from .eventstore import EventStore, StoreError
from .state import RedisState
from .tasks import TaskSet

log = logging.getLogger(__name__)

AUDIT_BATCH = 200  # conversations read from Redis at a time
AUDIT_EVERY = 60.0  # seconds: at most one check in this many
AUDIT_TRIES = 5
AUDIT_LOCK_MS = 600_000  # one node checks at a time; a node that died lets go after this
AUDIT_LOCK_RENEW = 3  # times per AUDIT_LOCK_MS the checking node holds it longer
AUDIT_TROUBLE: tuple[type[Exception], ...] = (StoreError, RedisClusterException, *REDIS_TROUBLE)


class StoreAudit:
    """Losses of ``store`` said and counted (``rewinds``), and the check they start.
    ``owned(sid)``: whether ``sid``'s loop runs on this node, whose mover ``wake(sid)``
    then moves it (the sweep moves the others)."""

    def __init__(
        self,
        *,
        state: RedisState,
        store: EventStore,
        node: str,
        where: str,
        tasks: TaskSet,
        owned: Callable[[str], bool],
        wake: Callable[[str], None],
    ) -> None:
        self._state = state
        self._store = store
        self._node = node
        self._where = where
        self._tasks = tasks
        self._owned = owned
        self._wake = wake
        self._running: asyncio.Task[None] | None = None
        self._began = 0.0  # loop time the last check began
        self._to_tell = False  # a reason found here (a loss, a move), not told Redis yet
        self._owed = 0  # what Redis says a check must reach (``watch``), as last read
        self._changes_seen = store.server_changes
        self.rewinds = 0  # conversations found holding less than the store acknowledged

    def lost(self, sid: str, held: int, recorded: int, *, audit: bool = True) -> None:
        """The store holds ``sid`` up to ``held``, below the ``recorded`` it acknowledged:
        said, counted and (``audit``) every other conversation checked (``check``, owed
        from the next sweep on), at most once every ``AUDIT_EVERY`` seconds."""
        self.rewinds += 1
        log.error(
            "event store %s lost %s's events %d-%d it had acknowledged (a failover to a "
            "replica that lagged? a restore from an older backup?): storing them again "
            "from the Redis log (those it no longer holds, as lost)",
            self._where,
            sid,
            held + 1,
            recorded,
        )
        if audit:
            self._to_tell = True

    async def watch(self) -> None:
        """Called every store sweep. What owes a check of every conversation is told
        Redis (``RedisState.store_server``), where it stays owed until a check numbered
        after it ends, whichever node runs it (one whose node stopped or died leaves it
        owed): a loss found here; a store that reconnected to another server since the
        last look (``server_changes``: it may have failed over to a standby that lacked
        its last writes, and no conversation need be busy to show it, a quiet one's
        shorter copy found by nothing before Redis let it go); a server other than the
        one the cluster's nodes last reached (this node started after the failover).
        Then the check owed is started, unless one runs here."""
        changes = self._store.server_changes
        if changes != self._changes_seen:
            self._changes_seen = changes
            self._to_tell = True
            log.info(
                "event store %s: reconnected to another server (a failover?): every "
                "conversation is checked against it",
                self._where,
            )
        try:
            owed, changed = await self._state.store_server(self._store.server, self._to_tell)
        except AUDIT_TROUBLE as exc:  # told next sweep
            log.debug("event store %s: the checks owed not read: %s", self._where, exc)
            return
        self._to_tell = False
        if changed:
            log.info(
                "event store %s: another server than the cluster's nodes last reached "
                "(a failover while this node was away?): every conversation is checked "
                "against it",
                self._where,
            )
        if self._running is None or self._running.done():  # one running settles it, or not
            self._owed = owed
            self._start()

    def _start(self) -> None:
        """The check owed, if none runs here and none began in ``AUDIT_EVERY`` seconds."""
        now = asyncio.get_running_loop().time()
        idle = self._running is None or self._running.done()
        if self._owed and idle and now >= self._began + AUDIT_EVERY:
            owed, self._owed = self._owed, 0
            self._began = now
            self._running = self._tasks.spawn(self._check_all(owed), "event store audit")

    async def _check_all(self, owed: int) -> None:
        """``check``, by one node of the cluster at a time, unless a check numbered
        ``owed`` or after ended meanwhile; tried again after a backoff while Redis or the
        store fails it (a lowered mark is noted first: a pass cut short leaves nothing
        unfound for the next). Refused the lock, or failing every try, it leaves the
        check owed in Redis, where the next sweep reads it again."""
        me, where = self._node, self._where
        lock = self._state.keys.store_audit()
        backoff = Backoff(base=1.0, cap=30.0)
        state = self._state
        for _ in range(AUDIT_TRIES):
            try:
                if not await state.take_lock(lock, me, AUDIT_LOCK_MS):
                    log.info("event store %s: another node checks every conversation", where)
                    return
                try:
                    if (await state.audits())[1] >= owed:
                        log.info("event store %s: checked by another node meanwhile", where)
                        return
                    number = await state.audit_began()
                    keeping = asyncio.ensure_future(self._keep(lock))
                    try:
                        found = await self.check()
                    finally:
                        keeping.cancel()
                    await state.audit_done(number)
                finally:
                    with contextlib.suppress(*AUDIT_TROUBLE):
                        await state.drop_lock(lock, me)
            except AUDIT_TROUBLE as exc:
                delay = backoff.next()
                log.warning(
                    "checking every conversation against event store %s: %s; again in %.0fs",
                    where,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            log.warning("event store %s checked: %d more conversation(s) lost events", where, found)
            return

    async def _keep(self, lock: str) -> None:
        """Hold ``lock`` while a check runs, however long it takes (one of a cluster with
        many conversations on a slow store can outlast ``AUDIT_LOCK_MS``); one lost (a
        Redis failover) is said: another node may check beside this one, which changes
        nothing twice (each conversation's mark is lowered only from what was read)."""
        every = AUDIT_LOCK_MS / 1000 / AUDIT_LOCK_RENEW
        while True:
            await asyncio.sleep(every)
            try:
                if not await self._state.keep_lock(lock, self._node, AUDIT_LOCK_MS):
                    log.warning(
                        "event store %s: the lock of the check of every conversation was "
                        "lost (a Redis failover?); another node may check beside this one",
                        self._where,
                    )
                    return
            except AUDIT_TROUBLE as exc:  # tried again next time, well before it expires
                log.debug("event store %s: the check's lock not renewed: %s", self._where, exc)

    async def check(self) -> int:
        """Every conversation Redis holds whose store holds less than it acknowledged (a
        quiet one would never say so: nothing of its is stored again; once Redis let it
        go, the store's shorter copy would be the only one, its ids given again): noted
        for the sweep (``note_unstored``), which stores the rest again once its mark in
        Redis is lowered to what the store holds. How many were found."""
        found = 0
        async for marks in self._state.conversations_held(AUDIT_BATCH):
            marked = [sid for sid, stored in marks.items() if stored]
            held = await self._store.last_ids(marked)  # one read a batch
            short = [(sid, h) for sid, h in zip(marked, held, strict=True) if h < marks[sid]]
            if not short:
                continue
            purging = await self._state.purging([sid for sid, _ in short])
            short = [(sid, h) for sid, h in short if sid not in purging]
            await self._state.note_unstored(sid for sid, _ in short)
            for sid, h in short:
                # Its mover may have found the loss too, rewound the mark and stored
                # the rest again since the read above: the mark is back where this pass
                # read it, and would be rewound a second time (said lost twice).
                if await self._store.last_id(sid) >= marks[sid]:
                    continue
                stored, _ = await self._state.rewind_stored(sid, h, marks[sid], 1, 1)
                if stored != h:
                    continue  # moved meanwhile (by its mover, a sweep), or being purged
                self.lost(sid, h, marks[sid], audit=False)
                found += 1
                if self._owned(sid):
                    self._wake(sid)
        return found
