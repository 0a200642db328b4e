"""A scripted agent for demos, tests and benchmarks: configurable think time and replies.

Settings (from the conversation's settings mapping, else the constructor):
``think_time`` seconds before answering, ``reply_size`` bytes of content per reply,
``replies`` events per user message.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .protocol import AgentContext, AgentState, EmitFn, Event


def _number(settings: Any, name: str, default: float) -> float:
    value = settings.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"scripted agent setting {name} must be a number >= 0, got {value!r}")
    return float(value)


class ScriptedAgent:
    # dispatch touches nothing outside the loop: it may run before the action is durable.
    speculative = True

    def __init__(
        self,
        context: AgentContext,
        think_time: float = 0.05,
        reply_size: int = 64,
        replies: int = 1,
    ) -> None:
        self.context = context
        self.think_time = _number(context.settings, "think_time", think_time)
        self.reply_size = int(_number(context.settings, "reply_size", reply_size))
        self.replies = int(_number(context.settings, "replies", replies))
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
            content = str(action.get("args", {}).get("content", ""))
            for i in range(self.replies):
                if self.think_time:
                    await asyncio.sleep(self.think_time)
                body = (content + " ")[: self.reply_size].ljust(self.reply_size, ".")
                await self._emit(
                    {
                        "action": "message",
                        "source": "agent",
                        "args": {"content": body, "part": i, "in_reply_to": action.get("id")},
                    }
                )
        finally:
            self._state = AgentState.AWAITING_USER_INPUT

    async def aclose(self) -> None:
        self._state = AgentState.STOPPED
        self._emit = None
