"""The echo agent: answers each user message with an agent message of the same content."""

from __future__ import annotations

from .protocol import AgentContext, AgentState, EmitFn, Event


class EchoAgent:
    # dispatch touches nothing outside the loop: it may run before the action is durable.
    speculative = True

    def __init__(self, context: AgentContext) -> None:
        self.context = context
        self._state = AgentState.LOADING
        self._emit: EmitFn | None = None

    @property
    def state(self) -> AgentState:
        return self._state

    async def start(self, emit: EmitFn) -> None:
        self._emit = emit
        self._state = AgentState.AWAITING_USER_INPUT

    async def dispatch(self, action: Event) -> None:
        if self._emit is None or action.get("action") != "message":
            return
        self._state = AgentState.RUNNING
        try:
            await self._emit(
                {
                    "action": "message",
                    "source": "agent",
                    "args": {"content": action.get("args", {}).get("content", "")},
                }
            )
        finally:
            self._state = AgentState.AWAITING_USER_INPUT

    async def aclose(self) -> None:
        self._state = AgentState.STOPPED
        self._emit = None
