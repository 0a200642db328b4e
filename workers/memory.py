"""The memory agent: its answers depend on what came before, so a loop that resumes (after
its node died, an eviction, an idle close) shows whether it remembers.

It answers each user message with the number of the user's earlier messages and the
previous message's text (``args``: ``earlier``, ``previous``). Every ``checkpoint_every``
actions (a setting, 5 by default) it saves a checkpoint: the count and the last text,
covering the action just processed. A fresh instance starts from its context's
checkpoint and reads only the history after it, up to the last action processed
(``context.resumed_after``); the actions after that are dispatched to it. Its first
answer says where it started from (``args.recalled``: the checkpoint's id, the ids read).
"""

from __future__ import annotations

import json
import logging
from contextlib import aclosing
from typing import Any

from .protocol import AgentContext, AgentState, EmitFn, Event, loop_must_stop

log = logging.getLogger("workers.memory")

DEFAULT_CHECKPOINT_EVERY = 5


def _is_message(event: Event) -> bool:
    return event.get("source") == "user" and event.get("action") == "message"


def _text(event: Event) -> str:
    return str(event.get("args", {}).get("content", ""))


class MemoryAgent:
    # Not speculative: it saves checkpoints, and a fresh instance would re-read history.
    speculative = False

    def __init__(self, context: AgentContext) -> None:
        self.context = context
        every = context.settings.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"memory agent: checkpoint_every must be an integer >= 1: {every!r}")
        self.every = every
        self.earlier = 0  # user messages processed
        self.previous = ""  # the last one's text
        self.covers = 0  # the last event id the state includes
        self.unsaved = 0  # actions processed since the last checkpoint
        self.recalled: dict[str, Any] | None = None  # told with the first answer
        self._state = AgentState.LOADING
        self._emit: EmitFn | None = None

    @property
    def state(self) -> AgentState:
        return self._state

    async def start(self, emit: EmitFn) -> None:
        self._emit = emit
        context, read = self.context, []
        if context.checkpoint is not None:
            saved = json.loads(context.checkpoint.data)
            self.earlier, self.previous = int(saved["earlier"]), str(saved["previous"])
            self.covers = context.checkpoint.covers
        if context.resumed_after > self.covers:
            async with aclosing(context.history(after=self.covers)) as events:
                async for event in events:
                    if event["id"] > context.resumed_after:
                        break
                    read.append(event["id"])
                    self._remember(event)
            self.covers = context.resumed_after
        if context.resuming:
            self.recalled = {"checkpoint": getattr(context.checkpoint, "covers", 0), "read": read}
        self._state = AgentState.AWAITING_USER_INPUT

    def _remember(self, event: Event) -> None:
        if _is_message(event):
            self.earlier += 1
            self.previous = _text(event)

    async def dispatch(self, action: Event) -> None:
        if self._emit is None or not _is_message(action):
            return
        self._state = AgentState.RUNNING
        try:
            earlier, previous = self.earlier, self.previous
            self._remember(action)
            self.covers = int(action["id"])
            args: dict[str, Any] = {
                "content": f"{earlier} earlier message(s); the previous one: {previous!r}",
                "earlier": earlier,
                "previous": previous,
            }
            if self.recalled is not None:
                args["recalled"], self.recalled = self.recalled, None
            await self._emit({"action": "message", "source": "agent", "args": args})
            self.unsaved += 1
            if self.unsaved >= self.every:
                await self._checkpoint()
        finally:
            self._state = AgentState.AWAITING_USER_INPUT

    async def _checkpoint(self) -> None:
        """Save the state. A checkpoint only spares a successor some reading: one that
        cannot be saved now (the event store away) is tried again after the next action,
        and the action it follows stays answered. A loop that must stop stops."""
        state = {"earlier": self.earlier, "previous": self.previous}
        try:
            await self.context.save_checkpoint(json.dumps(state).encode(), self.covers)
        except Exception as exc:
            if loop_must_stop(exc):
                raise
            log.warning(
                "memory agent of %s: checkpoint after event %d not saved (%s); "
                "tried again after the next action",
                self.context.conversation_id,
                self.covers,
                exc,
            )
        else:
            self.unsaved = 0

    async def aclose(self) -> None:
        self._state = AgentState.STOPPED
        self._emit = None
