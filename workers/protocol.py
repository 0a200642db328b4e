"""The contract between the coordinator and an agent loop.

The coordinator owns ordering, durability and fencing; an agent loop only reacts to
actions and emits events. Every action a loop receives was recorded durably first, and it
is dispatched once, in order. Events the loop emits get their integer id, are logged and
are delivered by the coordinator.

Speculative dispatch (opt in): a loop class with ``speculative = True`` may receive an
action sent through its own node before the action is durable, under the id it will get
if nothing else is logged first. Its events are logged only if that holds; if it does not
(another node's action came first, or Redis failed the accept), they are dropped, the
loop is closed and a fresh instance of the class takes over and receives the actions in
log order, as after a failover. This saves one Redis round trip per action. Only loops
whose ``dispatch`` has no effect outside the loop before its first ``emit`` returns
should allow it (the built-in echo and scripted agents do).

Memory: a loop stops and starts again elsewhere (a lost node, an eviction, an idle
close, a replaced worker) as a fresh instance. Its ``AgentContext`` says after which
action it resumes and gives it the newest checkpoint its predecessors saved and a reader
over the conversation's history; it saves checkpoints through it (``workers/memory.py``
is the example).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

Event = dict[str, Any]
EmitFn = Callable[[Event], Awaitable[int]]
"""Append an event to the conversation; returns the id it was given."""


class AgentState(StrEnum):
    """Agent states as OpenHands names them."""

    LOADING = "loading"
    INIT = "init"
    RUNNING = "running"
    AWAITING_USER_INPUT = "awaiting_user_input"
    PAUSED = "paused"
    FINISHED = "finished"
    STOPPED = "stopped"
    ERROR = "error"

    @classmethod
    def parse(cls, value: object) -> AgentState:
        """The state ``value`` names; ``ERROR`` for anything else (a buggy agent's)."""
        try:
            return cls(str(value))
        except ValueError:
            return cls.ERROR


@dataclass(frozen=True)
class Checkpoint:
    """State a loop saved: ``data`` holds what it knew after event ``covers``."""

    covers: int
    data: bytes


class Memory(Protocol):
    """The node's side of a loop's memory (``coordinator/memory.py``; in a worker
    process, frames to the node that answers them: ``workers/channel.py``)."""

    async def read(self, after: int, limit: int) -> list[Event]:
        """Up to ``limit`` events with ids above ``after``, oldest first (each with its
        ``id``); fewer (at least one) when they are large; none after the last."""
        ...

    async def save(self, covers: int, data: bytes) -> None:
        """Save a checkpoint; raises ``Fenced`` when the loop was replaced, and an error
        naming the size and the limit when ``data`` is too large."""
        ...


HISTORY_PAGE = 200  # events a history page asks for


@dataclass(frozen=True)
class AgentContext:
    """What a loop is told about the conversation it serves.

    ``resumed_after``: the last action a predecessor processed (0: none, a new
    conversation; the actions after it are dispatched to this instance); ``checkpoint``:
    the newest one saved when the instance was made (None: none). ``history`` and
    ``save_checkpoint`` reach the node through ``memory`` (None: a context made outside
    a node, with no history).
    """

    conversation_id: str
    user_id: str | None
    settings: Mapping[str, Any] = field(default_factory=dict)
    resumed_after: int = 0
    checkpoint: Checkpoint | None = None
    memory: Memory | None = field(default=None, repr=False, compare=False)

    @property
    def resuming(self) -> bool:
        """Whether this loop continues a conversation whose actions were processed."""
        return self.resumed_after > 0 or self.checkpoint is not None

    async def history(self, after: int = 0) -> AsyncGenerator[Event, None]:
        """The conversation's events with ids above ``after``, in id order (the event
        store's, then the Redis window's, read a page at a time), up to the last one
        logged when the reader reaches it."""
        if self.memory is None:
            return
        while page := await self.memory.read(after, HISTORY_PAGE):
            for event in page:
                yield event
            after = int(page[-1]["id"])

    async def save_checkpoint(self, data: bytes, covers: int) -> None:
        """Save ``data`` as this loop's state after event ``covers`` (a successor gets
        it as ``checkpoint``). Fenced by the loop's ownership (``Fenced``: let it
        propagate), bounded by the event store's limit (1 MiB by default), never older
        than the saved one (an error); the store holds the events it covers first."""
        if self.memory is None:
            raise RuntimeError("this context has no node to save a checkpoint to")
        await self.memory.save(covers, data)


@runtime_checkable
class AgentLoop(Protocol):
    """One conversation's agent, run by the node that owns the conversation.

    ``speculative``: whether the loop may get an action before it is durable (see the
    module docstring); a class attribute, ``False`` unless ``dispatch`` touches nothing
    outside the loop before its first ``emit`` returns.
    """

    speculative: bool

    @property
    def state(self) -> AgentState: ...

    async def start(self, emit: EmitFn) -> None:
        """Prepare the agent; ``emit`` stays valid until ``aclose``. A join waits for it:
        past the node's ``agent_start_timeout`` (60 s by default) it is cancelled and
        the start refused.

        An initial user message, if the conversation was started with one, arrives as
        the first ``dispatch`` call, like any other action.
        """

    async def dispatch(self, action: Event) -> None:
        """Handle one user action (``{"action": ..., "args": {...}, "id": n}``).

        ``emit`` raises ``Fenced`` or ``SpeculationLost`` when the loop must stop
        handling it; let those propagate."""

    async def aclose(self) -> None:
        """Stop the agent and release what it holds. Must be idempotent."""


AgentFactory = Callable[[AgentContext], AgentLoop]


def cancelled_here(exc: BaseException) -> bool:
    """Whether ``exc``, caught around an agent's code, is the running task being
    cancelled (a loop stopping, a worker's CANCEL), not a CancelledError the agent raised
    of its own: that one is the agent's error like any other (named, answered)."""
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling() > 0


# The module of the coordinator's errors. It imports redis-py (0.2 s, ~19 MB), which a
# worker process pays only once it meets one of them (``channel.refusal``).
ERRORS = "coordinator.errors"


def loop_must_stop(exc: BaseException) -> bool:
    """Whether ``exc``, raised by ``emit`` or ``save_checkpoint``, says the loop must stop:
    ``Fenced`` (another owner took the conversation, or the loop stops) or
    ``SpeculationLost``. An agent that catches errors around those calls lets these
    propagate (``workers/memory.py``)."""
    errors = sys.modules.get(ERRORS)  # not imported yet: it cannot be one of them
    return errors is not None and isinstance(exc, errors.Fenced | errors.SpeculationLost)
