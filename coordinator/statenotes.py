"""The agent states a runner logs (``--agent-state-events on``), and when.

OpenHands' web client follows the logged ``agent_state_changed`` observations (it keeps
its input disabled while the agent is "loading", its first state). A runner records the
state its agent was last logged in; every commit it makes logs the agent's state when
that changed (``codec.with_state_note``: ``running`` before the events, any other after).

An agent that answers at once has its ``running`` state logged with its first answer,
in the same commit (no write of its own: an echo answers in a millisecond). One that has
not answered within ``RUNNING_NOTE_AFTER`` (a real agent waiting for its model, seconds)
has it logged then, on its own, so that its clients see it working meanwhile. That note
answers no action (it is written as the runner's own, like the state a start leaves the
agent in): an action counts as processed only once the agent answered it, so a successor
after a lost node still dispatches an action whose agent was only thinking.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

RUNNING_NOTE_AFTER = 0.1  # seconds without an answer before ``running`` is logged alone


class StateNotes:
    """``enabled``: whether notes are logged (the state is recorded in Redis either
    way). One dispatch at a time: ``arm`` when it starts, ``disarm`` when it ends;
    ``settle`` before any other write for it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._recorded = ""
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None

    def change(self, agent_state: str) -> str:
        """The agent's state now (``agent_state``, as text) when it is not the one last
        recorded, else ''."""
        state = str(agent_state)
        return state if state != self._recorded else ""

    def recorded(self, changed: str) -> None:
        """A commit recorded ``changed`` ('' for no change)."""
        self._recorded = changed or self._recorded

    def arm(self, due: Callable[[], bool], write: Callable[[], Awaitable[None]]) -> None:
        """In ``RUNNING_NOTE_AFTER`` s, ``write`` the ``running`` note if ``due()`` still
        says so; ``write`` handles its own errors."""
        if not self.enabled:
            return

        def fire() -> None:
            self._timer = None
            if due():
                self._writing = asyncio.ensure_future(write())

        self.disarm()
        self._timer = asyncio.get_running_loop().call_later(RUNNING_NOTE_AFTER, fire)

    def disarm(self) -> None:
        """No note after this (one being written still is: ``settle``)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def settle(self) -> None:
        """Return once the note being written, if any, is."""
        writing = self._writing
        if writing is not None:
            await asyncio.shield(writing)
            if self._writing is writing:
                self._writing = None
