"""The Redis state layer: every Redis operation the coordinator makes, as typed methods.

One class, ``RedisState``, grouped by what the operations are about: conversations and
their logs (``conversations.py``), the event store's progress and the log's window
(``archive.py``), running loops and the cap (``loops.py``), connections
(``connections.py``), node membership (``registry.py``), the clients' rate limits
(``limits.py``) and what the browser pages read (``views.py``). The key schema is in
``keys.py``, the Lua scripts in ``scripts/``; nothing here keeps state of its own, and
every method is one Redis round trip or a few sent together.
"""

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError

from ..errors import redis_glitch
from .archive import ArchiveOps
from .attempts import AttemptOps
from .connections import ConnectionOps
from .core import SizeHint, accept_token, text
from .limits import LimitOps
from .loops import LoopOps
from .registry import LeaseRenewer, RegistryOps
from .results import Accepted, Admitted, Committed, Lease, Ownership
from .views import ViewOps
from .writes import WriteOps

T = TypeVar("T")


def _glitches_as_connection_errors(cls: type[T]) -> type[T]:
    """Every coroutine method of ``cls`` raises a redis-py glitch (``errors.redis_glitch``)
    as the ConnectionError it means, so callers' retries cover it."""
    for name in dir(cls):
        method = getattr(cls, name)
        if name.startswith("__") or not inspect.iscoroutinefunction(method):
            continue

        def wrap(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            @functools.wraps(method)
            async def translated(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await method(*args, **kwargs)
                except (AttributeError, RuntimeError) as exc:
                    if redis_glitch(exc):
                        raise RedisConnectionError(f"redis-py mid-reconnect: {exc!r}") from exc
                    raise

            return translated

        setattr(cls, name, wrap(method))
    return cls


@_glitches_as_connection_errors
class RedisState(
    WriteOps, LoopOps, ConnectionOps, RegistryOps, ViewOps, AttemptOps, LimitOps, ArchiveOps
):
    """Typed operations over one Redis deployment (see the package docstring)."""


__all__ = [
    "Accepted",
    "Admitted",
    "Committed",
    "Lease",
    "LeaseRenewer",
    "Ownership",
    "RedisState",
    "SizeHint",
    "accept_token",
    "text",
]
