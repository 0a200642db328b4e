"""The actions an owned loop has yet to dispatch, in id order, as its node knows them.

The queue learns of actions from the conversation's events as they go by (``observe``)
and tracks ``seen``, the highest event id such that every action up to it is queued.
With ``--ack-replicas`` it counts only ids replicas hold (events are published once they
do; the inbox is read through the same barrier), so a failover cannot undo an id it
counted and give it to an action it would pass over; the one exception, an action
dispatched before its accept answered, is checked by its commits (speculation.py). A
gap, a reconnect or a start marks it for a re-read of the durable inbox, so no accepted
action is skipped (a start's is spared when the loop's first write was the
conversation's first event: ``first_event``). ``applied`` is the last action the log
records as processed: a successor resumes after it.

It holds at most ``QUEUED_BYTES`` of payloads (counted at ``max_action_bytes`` each):
an action past them waits in the durable inbox and is read once the queue has room, so
a stuck agent's backlog (up to ``inbox_max`` actions) is not kept in the node's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from workers.protocol import Event

from .backoff import Backoff
from .errors import REDIS_TROUBLE, UnreplicatedRead
from .state import RedisState

log = logging.getLogger(__name__)

PAGE = 500  # actions at most per inbox read
QUEUED_BYTES = 1 << 20  # payloads at most per queue (counted at max_action_bytes each)
# A read retried: Redis' trouble, or replicas that do not hold the inbox yet.
RETRIED: tuple[type[Exception], ...] = (*REDIS_TROUBLE, UnreplicatedRead)


class ActionQueue:
    def __init__(self, sid: str, state: RedisState, applied: int, *, max_action_bytes: int) -> None:
        self.sid = sid
        self.room = min(PAGE, max(2, QUEUED_BYTES // max(1, max_action_bytes)))
        self._state = state
        self.applied = applied
        self.seen = 0
        self.pending: dict[int, Event] = {}
        self._start_due = True  # the start's read (``first_event`` may spare it)
        self._asked = False  # a gap, a poke or a full page asks for a read
        self.wake = asyncio.Event()
        self.wake.set()
        self._progress = asyncio.Event()

    @property
    def reread(self) -> bool:
        """A read of the durable inbox is due."""
        return self._start_due or self._asked

    @property
    def quiet(self) -> bool:
        """Nothing to dispatch and nothing to read: every event so far was seen."""
        return not (self.wake.is_set() or self.reread or self.pending)

    def observe(self, event_id: int, event: Event) -> bool:
        """An event of the conversation went by; True when it woke the loop."""
        if event_id <= self.seen:
            return False
        if event_id == self.seen + 1:
            if event.get("source") != "user" or event_id <= self.applied:
                self.seen = event_id
                return False
            if len(self.pending) >= self.room:
                self._asked = True  # it waits in the inbox: read when the queue has room
            else:
                self.seen = event_id
                self.pending[event_id] = event
        else:
            self._asked = True
        self.wake.set()
        return True

    def predict(self, action: Event) -> int:
        """Queue ``action`` as the next event id (speculatively): that id."""
        self.seen += 1
        self.pending[self.seen] = action
        self.wake.set()
        return self.seen

    def forget_from(self, event_id: int) -> None:
        """What was queued from ``event_id`` on may be wrong: drop the queue and re-read."""
        self.pending.clear()
        self.seen = min(self.seen, event_id - 1)
        self.poke()

    def first_event(self) -> None:
        """The loop's first write was the conversation's first event: no action came before
        it, so the start's read finds nothing; later ones go by as events (``observe``).
        A read a gap or a poke asked for meanwhile is still made."""
        self._start_due = False
        self.seen = max(self.seen, 1)

    def poke(self) -> None:
        """Re-read the inbox (after a reconnect, when channel messages may be lost)."""
        self._asked = True
        self.wake.set()

    async def read(self) -> None:
        """Queue what the durable inbox holds after ``applied``, ``room`` actions at most
        (a full read asks for the next). A gap or a poke while it reads asks for another
        read: the snapshot may predate the event that showed it."""
        self._start_due = self._asked = False
        try:
            seq, rows = await self._state.inbox_snapshot(self.sid, self.applied, count=self.room)
        except BaseException:
            self._asked = True  # read again
            raise
        for n, action in rows:
            if n > self.applied:
                self.pending[n] = action
        if len(rows) < self.room:
            self.seen = max(self.seen, seq)
        else:
            self.seen = max(self.seen, max(self.pending))
            self._asked = True  # the next page

    async def refresh(self, backoff: Backoff) -> bool:
        """Read the inbox if due. On Redis trouble the actions stay in the durable inbox:
        wait ``backoff``'s next delay, ask to be woken again and return False."""
        try:
            if self.reread:
                await self.read()
            backoff.reset()
            return True
        except RETRIED as exc:
            delay = backoff.next()
            # Said once per outage of each loop: the rest at debug (hundreds of loops
            # retry through a Redis restart).
            level = logging.WARNING if backoff.failures == 1 else logging.DEBUG
            log.log(level, "inbox read for %s failed (%s); retry in %.2fs", self.sid, exc, delay)
            await asyncio.sleep(delay)
            self.wake.set()
            return False

    def next(self) -> tuple[int, Event] | None:
        """The next action to dispatch, if any."""
        while self.pending:
            n = min(self.pending)
            action = self.pending.pop(n)
            if n > self.applied:
                return n, action
        return None

    def mark_applied(self, n: int) -> None:
        if n > self.applied:
            self.applied = n
            self._progress.set()

    async def drain(self, running: Callable[[], bool], within: float) -> bool:
        """Wait until every action accepted so far is applied (while ``running``), for at
        most ``within`` s; True when the inbox was emptied in time (else it says so).
        It reads only the newest waiting action's id: every action up to ``seen`` is
        queued already, and one after it is read by the loop, a page at a time (a read of
        the whole inbox per answer held up to ``inbox_max`` actions' payloads at once)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while running():
            try:
                target = await self._state.inbox_last(self.sid, self.applied)
            except UnreplicatedRead:  # the read waited --ack-timeout for replicas: again
                if loop.time() < deadline:
                    continue
                log.warning("loop %s stops: its inbox was not replicated in time", self.sid)
                return False
            if target <= self.applied:
                return True
            if target > self.seen:
                self._asked = True  # not all of it queued: the loop reads the inbox
            self.wake.set()
            while self.applied < target and running():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    log.warning(
                        "loop %s stops with actions after %d unprocessed", self.sid, self.applied
                    )
                    return False
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._progress.wait()
        return False
