"""Agent loops the coordinator runs: the protocol, built-in agents and the loader."""

from .echo import EchoAgent
from .loader import AgentLoadError, load_agent
from .protocol import AgentContext, AgentFactory, AgentLoop, AgentState, EmitFn, Event
from .scripted import ScriptedAgent

__all__ = [
    "AgentContext",
    "AgentFactory",
    "AgentLoadError",
    "AgentLoop",
    "AgentState",
    "EchoAgent",
    "EmitFn",
    "Event",
    "ScriptedAgent",
    "load_agent",
]
