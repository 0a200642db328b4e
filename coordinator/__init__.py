"""Redis-backed distributed conversation coordinator."""

from .config import ManagerConfig
from .errors import (
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
)
from .handles import ConversationHandle
from .manager import ConversationInfo, ConversationManager, EventSink

__all__ = [
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
]
