"""Agent loops the coordinator runs: the protocol, built-in agents and the loader."""

from .echo import EchoAgent
from .loader import AgentLoadError, load_agent
from .memory import MemoryAgent
from .protocol import (
    AgentContext,
    AgentFactory,
    AgentLoop,
    AgentState,
    Checkpoint,
    EmitFn,
    Event,
    Memory,
)
from .scripted import ScriptedAgent

__all__ = [
    "AgentContext",
    "AgentFactory",
    "AgentLoadError",
    "AgentLoop",
    "AgentState",
    "Checkpoint",
    "EchoAgent",
    "EmitFn",
    "Event",
    "Memory",
    "MemoryAgent",
    "ScriptedAgent",
    "load_agent",
]
