"""Redis at its maxmemory (policy noeviction) refuses writes: whichever way the refusal
reaches the coordinator (a single command, a pipeline, a script), a client is told Redis
is full, not that Redis cannot be reached. A real Redis with a tiny maxmemory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from coordinator.errors import redis_full
from coordinator.http import client_message

FULL = "Redis is full (at its maxmemory): nothing was written; try again later"


@pytest.fixture
async def full_redis(redis_client: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    """The suite's Redis at its maxmemory, put back as it was afterwards."""
    policy = await redis_client.config_get("maxmemory-policy")
    await redis_client.config_set("maxmemory-policy", "noeviction")
    await redis_client.config_set("maxmemory", 1)
    try:
        yield redis_client
    finally:
        await redis_client.config_set("maxmemory", 0)
        await redis_client.config_set("maxmemory-policy", policy["maxmemory-policy"])


async def refusal(call: Any) -> Exception:
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("Redis at its maxmemory took the write")


async def test_a_write_refused_through_a_pipeline_is_redis_full(
    full_redis: aioredis.Redis,
) -> None:
    pipe = full_redis.pipeline(transaction=False)
    pipe.zadd("coord:{n:x}:idle", {"c": 1})
    pipe.set("coord:{n:x}:other", "v")
    exc = await refusal(pipe.execute())
    assert "of pipeline caused error" in str(exc)  # redis-py's rewrite of the reply
    assert redis_full(exc)
    assert client_message(exc) == FULL


async def test_a_write_refused_in_a_transaction_is_redis_full(
    full_redis: aioredis.Redis,
) -> None:
    pipe = full_redis.pipeline(transaction=True)
    pipe.zadd("coord:{n:x}:idle", {"c": 1})
    exc = await refusal(pipe.execute())
    assert redis_full(exc)
    assert client_message(exc) == FULL


async def test_a_single_write_and_a_script_refused_are_redis_full(
    full_redis: aioredis.Redis,
) -> None:
    for call in (
        full_redis.set("coord:k", "v"),
        full_redis.eval("return redis.call('SET', KEYS[1], 'v')", 1, "coord:k"),
    ):
        exc = await refusal(call)
        assert redis_full(exc), repr(exc)
        assert client_message(exc) == FULL


async def test_other_refusals_are_not_redis_full(redis_client: aioredis.Redis) -> None:
    await redis_client.set("coord:s", "v")
    exc = await refusal(redis_client.zadd("coord:s", {"c": 1}))  # WRONGTYPE
    assert not redis_full(exc)
