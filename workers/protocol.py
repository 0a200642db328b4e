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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
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


@dataclass(frozen=True)
class AgentContext:
    """What a loop is told about the conversation it serves."""

    conversation_id: str
    user_id: str | None
    settings: Mapping[str, Any] = field(default_factory=dict)


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
        """Prepare the agent; ``emit`` stays valid until ``aclose``.

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
