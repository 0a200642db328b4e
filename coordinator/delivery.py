"""Delivery of a conversation's events to this node's loop and client connections.

``Delivery`` is the one place events reach them: events this node committed (its loop's
answers, actions it accepted) at once, others as they arrive on the conversation's
channel; each goes to the loop first, then to the connections (``catchup.py``: each
connection sees every logged event once, in order).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from workers.protocol import Event

from .catchup import LocalConnections

if TYPE_CHECKING:
    from .runner import LoopRunner
    from .speculation import Speculation

# ``Delivery.floor``: the highest event id of a conversation this node knows was logged;
# every write carries it (a log Redis lost events of continues after it, state/writes.py).
Floor = Callable[[str], int]


class Delivery:
    """Hands a conversation's events to this node's loop (``runners``: the node's table
    of loops, read only) and to its connections, in id order, each once."""

    def __init__(self, runners: Mapping[str, LoopRunner], connections: LocalConnections):
        self._runners = runners
        self.connections = connections

    async def committed(self, sid: str, first_id: int, events: list[Event]) -> None:
        """This node logged ``events`` from ``first_id`` on; apply them now, without
        waiting for their pub/sub echo (which the cursors then drop). ``first_id`` 0: a
        retried commit that had already gone through, its ids unknown here (its events
        were published only if another node listened): local connections re-read."""
        if first_id <= 0:
            self.connections.catch_up_room(sid)
            return
        for offset, event in enumerate(events):
            await self._apply(sid, first_id + offset, event)

    async def user_event(
        self, sid: str, event_id: int, event: Event, spec: Speculation | None
    ) -> None:
        """An action this node accepted was logged as ``event_id``: the one place its user
        event is delivered. If the local loop dispatched it speculatively and the answer's
        commit is already on its way, the runner delivers the user event together with
        that answer (one pass through to the clients); otherwise now."""
        runner = self._runners.get(sid)
        if spec is not None and runner is not None and runner.take_user_event(spec, event_id):
            return
        await self._apply(sid, event_id, event)

    def floor(self, sid: str) -> int:
        """The highest event id of ``sid`` this node knows was logged: sent to one of its
        connections or seen by its loop. A write that finds the log below it learns that
        Redis lost events (``state/writes.py``)."""
        runner = self._runners.get(sid)
        known = runner.known_logged() if runner is not None else 0
        for conn in self.connections.room(sid):
            if conn.verified:  # a client's own latest_event_id is no evidence
                known = max(known, conn.cursor)
        return known

    async def published(self, sid: str, event_id: int, event: Event) -> None:
        """An event of ``sid`` arrived on its channel (written by another node)."""
        runner = self._runners.get(sid)
        if runner is not None:
            runner.observe(event_id, event)
        await self.connections.offer(sid, event_id, event)

    async def _apply(self, sid: str, event_id: int, event: Event) -> None:
        runner = self._runners.get(sid)
        if runner is not None and runner.observe(event_id, event):
            # It was waiting and has an action to dispatch: let it send its commit before
            # the event (and the caller's ack) are written, so they travel while Redis
            # runs the commit. Not while it is busy: the reply to a commit of its own
            # could then be handled first, its events offered ahead of this one (a gap,
            # read again from the log by every connection of the conversation).
            await asyncio.sleep(0)
        await self.connections.offer(sid, event_id, event)
