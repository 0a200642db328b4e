"""The Redis state layer: every Redis operation the coordinator makes, as typed methods.

One class, ``RedisState``, grouped by what the operations are about: conversations and
their logs (``conversations.py``), running loops and the cap (``loops.py``), connections
(``connections.py``) and node membership (``registry.py``). The key schema is in
``keys.py``, the Lua scripts in ``scripts.py``; nothing here keeps state of its own, and
every method is one Redis round trip or a few sent together.
"""

from .connections import ConnectionOps
from .core import accept_token, text
from .limits import LimitOps
from .loops import LoopOps
from .registry import LeaseRenewer, RegistryOps
from .results import Accepted, Admitted, Committed, Lease, Ownership


class RedisState(LoopOps, ConnectionOps, RegistryOps, LimitOps):
    """Typed operations over one Redis deployment (see the package docstring)."""


__all__ = [
    "Accepted",
    "Admitted",
    "Committed",
    "Lease",
    "LeaseRenewer",
    "Ownership",
    "RedisState",
    "accept_token",
    "text",
]
