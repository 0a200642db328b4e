"""Redis-backed distributed conversation coordinator.

The names below are imported on first use (PEP 562): an agent worker process imports
``coordinator.errors`` (for ``Fenced`` and ``SpeculationLost``) without the whole node,
whose imports (redis, socket.io, Starlette) would cost it ~0.2 s and ~15 MB.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ManagerConfig
    from .errors import (
        AgentFailed,
        CapacityTimeout,
        ConfigError,
        ConnectionNotFound,
        ConversationNotFound,
        CoordinatorError,
        Fenced,
        Forbidden,
        InboxFull,
        InvalidInput,
        LimitExceeded,
        NodeBusy,
        NodeDraining,
        RedisUnavailable,
        SpeculationLost,
        StoreBehind,
    )
    from .handles import ConversationHandle
    from .manager import ConversationInfo, ConversationManager, EventSink

__all__ = [
    "AgentFailed",
    "CapacityTimeout",
    "ConfigError",
    "ConnectionNotFound",
    "ConversationHandle",
    "ConversationInfo",
    "ConversationManager",
    "ConversationNotFound",
    "CoordinatorError",
    "EventSink",
    "Fenced",
    "Forbidden",
    "InboxFull",
    "InvalidInput",
    "LimitExceeded",
    "ManagerConfig",
    "NodeBusy",
    "NodeDraining",
    "RedisUnavailable",
    "SpeculationLost",
    "StoreBehind",
]
_WHERE = {
    "ManagerConfig": ".config",
    "ConversationHandle": ".handles",
    "ConversationInfo": ".manager",
    "ConversationManager": ".manager",
    "EventSink": ".manager",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name, ".errors" if name in __all__ else None)
    if module is None:
        raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
