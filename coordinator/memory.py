"""A loop's memory, the node's side: its conversation's history a page at a time, and its
checkpoints in the event store (``workers.protocol.Memory``; ``AgentContext`` is the
agent's side, and in a worker process ``RemoteAgent`` serves its frames with this).

- **History** is what replay reads (``history.py``: the store below the Redis window,
  then the window), in pages bounded in events and bytes.
- **Checkpoints are fenced by the loop's ownership.** A loop saves only while it owns the
  conversation (its runner runs, its node's lease holds); the store refuses a
  checkpoint from an older epoch than the newest writer's, and a loop that resumes a
  stored conversation raises the store's fence to its epoch first (``resume``), so a
  replaced owner's late checkpoint cannot land after its successor started.
- **A checkpoint covers stored events.** Before saving, the owner moves what the store
  lacks (``Archiver.move``); a checkpoint covering an id not logged yet is refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from workers.protocol import AgentContext, Checkpoint, Event

from .archive import Archiver
from .codec import with_id
from .errors import Fenced, InvalidInput
from .eventstore import EventStore, StoreError
from .history import History
from .ratelimit import LogThrottle
from .state import Lease, SizeHint

log = logging.getLogger(__name__)

# Seconds a restarting loop waits for the store to fence its predecessors and hand it
# their checkpoint, before it starts without (its answers wait for its start).
RESUME_WITHIN = 2.0

PAGE_EVENTS = 500  # at most this many events a page
PAGE_BYTES = 4 << 20  # and about this many bytes (at least one event)


class Memories:
    """Makes each loop's memory from the node's history, event store and archiver."""

    def __init__(self, history: History, store: EventStore, archiver: Archiver) -> None:
        self._history = history
        self._store = store
        self._archiver = archiver
        self._without = LogThrottle(log)  # a store outage: every loop that restarts

    async def open(self, lease: Lease, owned: Callable[[], bool], *, resume: bool) -> LoopMemory:
        """The memory of the loop holding ``lease`` (``owned``: whether it still owns
        it); ``resume``: the conversation may have something stored (``LoopMemory.resume``)."""
        memory = LoopMemory(
            lease=lease,
            history=self._history,
            store=self._store,
            archiver=self._archiver,
            owned=owned,
        )
        if resume:
            try:
                async with asyncio.timeout(RESUME_WITHIN):
                    await memory.resume()
            except (StoreError, OSError, TimeoutError) as exc:
                # A store that hangs held the start, and its answers, for its own timeouts
                # (5 s to connect, 30 s a query): the loop starts without it instead.
                why = str(exc) or f"the event store did not answer within {RESUME_WITHIN:g}s"
                self._without.emit(
                    logging.WARNING, "%s starts without its checkpoint: %s", lease.sid, why
                )
        return memory


class LoopMemory:
    """One loop's history and checkpoints (see the module docstring); ``owned`` says
    whether the loop still owns its conversation."""

    def __init__(
        self,
        *,
        lease: Lease,
        history: History,
        store: EventStore,
        archiver: Archiver,
        owned: Callable[[], bool],
    ) -> None:
        self._lease = lease
        self._history = history
        self._store = store
        self._archiver = archiver
        self._owned = owned
        self.latest: Checkpoint | None = None  # the newest checkpoint: loaded or saved
        self._sizes = SizeHint()  # what its history's reads learnt (plain XRANGEs after)

    def context(self, settings: Mapping[str, Any], after: int) -> AgentContext:
        """The context of an agent instance resuming after action ``after``, from the
        newest checkpoint."""
        sid, user = self._lease.sid, self._lease.user or None
        return AgentContext(sid, user, settings, after, self.latest, self)

    async def read(self, after: int, limit: int) -> list[Event]:
        for name, value, least in (("after", after, 0), ("limit", limit, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InvalidInput(f"history: {name!r} must be an integer >= {least}")
        count = min(limit, PAGE_EVENTS)
        rows, _ = await self._history.after(
            self._lease.sid, after, count, PAGE_BYTES, shown=False, hint=self._sizes
        )
        return [with_id(i, event) for i, event in rows]

    async def save(self, covers: int, data: bytes) -> None:
        sid, epoch = self._lease.sid, self._lease.epoch
        if not self._owned():
            raise Fenced(sid, epoch, -1)
        stored = await self._archiver.move(self._lease)
        if isinstance(covers, int) and covers > stored:
            raise InvalidInput(
                f"a checkpoint of {sid!r} covers event {covers}, after the last logged ({stored})"
            )
        status = await self._store.save_checkpoint(sid, epoch, covers, data)
        if status == "fenced":
            raise Fenced(sid, epoch, -1)
        if status == "stale":
            raise InvalidInput(
                f"a checkpoint of {sid!r} covering event {covers} is older than the saved one"
            )
        self.latest = Checkpoint(covers, data)

    async def resume(self) -> Checkpoint | None:
        """Fence the predecessors in the store and load the newest checkpoint (None when
        there is none). The store's errors pass: ``Memories.open`` starts the loop
        without its checkpoint then (a predecessor's late checkpoint may land: it holds
        a state after events the log has, and this loop's first save fences it)."""
        sid, epoch = self._lease.sid, self._lease.epoch
        known = await self._store.conversation(sid)
        if known is None:
            return None
        if known.epoch < epoch:
            await self._store.append(sid, epoch, [], user=known.user)
        saved = await self._store.load_checkpoint(sid)
        self.latest = None if saved is None else Checkpoint(*saved)
        return self.latest
