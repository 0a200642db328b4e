"""redis-py raises AttributeError or RuntimeError from its connections when used in the
middle of a reconnect (seen while a cluster master failed over: ``'NoneType' object has
no attribute 'writelines'``). The state layer turns those into the ConnectionError they
mean, so retries cover them; the same errors from anywhere else are bugs and pass."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from coordinator.errors import redis_glitch
from coordinator.keys import KeySchema
from coordinator.state import RedisState


def _raiser(module: str, exc: BaseException) -> Any:
    """An async function whose frame belongs to ``module`` and raises ``exc``."""
    namespace: dict[str, Any] = {"__name__": module, "exc": exc}
    exec(compile("async def hgetall(*args, **kwargs):\n    raise exc\n", module, "exec"), namespace)
    return namespace["hgetall"]


class Client:
    def __init__(self, hgetall: Any) -> None:
        self.hgetall = hgetall

    def register_script(self, source: str) -> None:
        return None


async def test_a_redis_py_glitch_is_a_connection_error() -> None:
    glitch = AttributeError("'NoneType' object has no attribute 'writelines'")
    state = RedisState(Client(_raiser("redis.asyncio.connection", glitch)), KeySchema("g"))
    with pytest.raises(RedisConnectionError, match="mid-reconnect") as info:
        await state.meta("s")
    assert info.value.__cause__ is glitch


async def test_the_same_error_from_elsewhere_is_not_hidden() -> None:
    bug = AttributeError("a bug of ours")
    state = RedisState(Client(_raiser("coordinator.somewhere", bug)), KeySchema("g"))
    with pytest.raises(AttributeError, match="a bug of ours"):
        await state.meta("s")
    assert not redis_glitch(ValueError("x"))
