"""The script lane (accept and commit go through it): pipelined calls on one connection
to real Redis, and what happens when that connection fails."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from coordinator.codec import pack
from coordinator.embedded import EmbeddedRedis
from coordinator.keys import KeySchema
from coordinator.lane import ScriptLane, lane_supported
from coordinator.state import RedisState
from tests.helpers import wait_until
from tests.tcpproxy import TcpProxy

ECHO = "return {ARGV[1], redis.call('INCR', KEYS[1])}"
FAIL = "return redis.error_reply('ERR bad input: ' .. ARGV[1])"


@pytest.fixture
async def lane(redis_url: str) -> AsyncIterator[ScriptLane]:
    lane = ScriptLane(redis_url, timeout=2.0, connect_timeout=2.0, name="lane-test")
    yield lane
    await lane.aclose()


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_reply(
    lane: ScriptLane, redis_client: aioredis.Redis
) -> None:
    echo = redis_client.register_script(ECHO)
    replies = await asyncio.gather(*(lane.run(echo, ["lane:n"], [f"call-{i}"]) for i in range(500)))
    assert [r[0] for r in replies] == [f"call-{i}".encode() for i in range(500)]
    assert sorted(r[1] for r in replies) == list(range(1, 501))
    mine = [c for c in await redis_client.client_list() if c["name"] == "lane-test"]
    assert len(mine) == 1, mine


async def test_an_error_reply_fails_only_its_call(
    lane: ScriptLane, redis_client: aioredis.Redis
) -> None:
    echo, fail = redis_client.register_script(ECHO), redis_client.register_script(FAIL)
    ok1, bad, ok2 = await asyncio.gather(
        lane.run(echo, ["lane:e"], ["a"]),
        lane.run(fail, [], ["x"]),
        lane.run(echo, ["lane:e"], ["b"]),
        return_exceptions=True,
    )
    assert ok1 == [b"a", 1] and ok2 == [b"b", 2]
    assert isinstance(bad, ResponseError) and "bad input: x" in str(bad)


async def test_a_cancelled_call_does_not_shift_the_replies_of_the_others(
    lane: ScriptLane, redis_client: aioredis.Redis
) -> None:
    echo = redis_client.register_script(ECHO)
    await lane.run(echo, ["lane:c"], ["warm"])  # connected
    tasks = [asyncio.create_task(lane.run(echo, ["lane:c"], [str(i)])) for i in range(3)]
    await asyncio.sleep(0)  # all three written
    tasks[1].cancel()
    first, third = await tasks[0], await tasks[2]
    assert first[0] == b"0" and third[0] == b"2"
    assert (await lane.run(echo, ["lane:c"], ["after"]))[0] == b"after"


async def test_a_flushed_script_cache_is_reloaded(
    lane: ScriptLane, redis_client: aioredis.Redis
) -> None:
    echo = redis_client.register_script(ECHO)
    await redis_client.script_flush()
    assert (await lane.run(echo, ["lane:f"], ["x"])) == [b"x", 1]


async def test_a_redis_restart_fails_the_calls_then_the_lane_reconnects() -> None:
    server = EmbeddedRedis().start()
    lane = ScriptLane(server.url, timeout=2.0, connect_timeout=0.5)
    client = aioredis.Redis.from_url(server.url)
    try:
        echo = client.register_script(ECHO)
        assert (await lane.run(echo, ["lane:r"], ["before"]))[0] == b"before"
        server.stop(kill=True)
        with pytest.raises(RedisConnectionError):
            await lane.run(echo, ["lane:r"], ["down"])
        server.start()
        # A fresh server: no script cache, no data; the lane reconnects and reloads.
        assert (await lane.run(echo, ["lane:r"], ["back"])) == [b"back", 1]
    finally:
        await lane.aclose()
        await client.aclose()
        server.cleanup()


async def test_a_silent_connection_times_out_every_call_in_flight(
    redis_server: str, redis_client: aioredis.Redis
) -> None:
    port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    proxy = await TcpProxy(port).start()
    lane = ScriptLane(proxy.url, timeout=0.5, connect_timeout=0.5)
    try:
        echo = redis_client.register_script(ECHO)
        assert (await lane.run(echo, ["lane:t"], ["ok"]))[0] == b"ok"
        proxy.cut(blackhole=True)  # connections accepted, nothing answered
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(lane.run(echo, ["lane:t"], [str(i)]) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, RedisTimeoutError | RedisConnectionError) for r in results)
        assert time.monotonic() - t0 < 10
        proxy.restore()
        assert (await lane.run(echo, ["lane:t"], ["again"]))[0] == b"again"
    finally:
        await lane.aclose()
        await proxy.aclose()


async def test_password_and_database_from_the_url() -> None:
    server = EmbeddedRedis().start()
    client = aioredis.Redis.from_url(server.url)
    try:
        await client.config_set("requirepass", "s3cret")
        authed = aioredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        echo = authed.register_script(ECHO)
        lane = ScriptLane(
            f"redis://:s3cret@127.0.0.1:{server.port}/3", timeout=2.0, connect_timeout=2.0
        )
        assert (await lane.run(echo, ["lane:db"], ["x"])) == [b"x", 1]
        assert await authed.get("lane:db") == b"1"  # written in database 3
        await lane.aclose()
        wrong = ScriptLane(
            f"redis://:wrong@127.0.0.1:{server.port}/3", timeout=2.0, connect_timeout=2.0
        )
        with pytest.raises(AuthenticationError):
            await wrong.run(echo, ["lane:db"], ["y"])
        await wrong.aclose()
        await authed.aclose()
    finally:
        await client.aclose()
        server.cleanup()


def test_the_lane_takes_every_url_redis_py_takes() -> None:
    assert lane_supported("redis://127.0.0.1:6379/0")
    assert lane_supported("unix:///tmp/redis.sock")
    assert lane_supported("rediss://127.0.0.1:6380/0")
    with pytest.raises(ValueError, match="rediss://"):
        ScriptLane("http://127.0.0.1:6380/0", timeout=1.0, connect_timeout=1.0)


async def test_a_lost_reply_is_retried_by_the_lane_and_recorded_once(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """The lane re-sends a call whose reply was lost after Redis ran it: the accept's token
    and the commit's (cause, index), or (writer, index) for a write answering no action,
    make the second run a no-op, so an action and its answers are logged once. Each reply
    is held at a TCP proxy until Redis has made the write, then the link is cut."""
    proxy = await TcpProxy(redis_client.connection_pool.connection_kwargs["port"]).start()
    lane = ScriptLane(proxy.url, timeout=2.0, connect_timeout=2.0)
    state = RedisState(redis_client, KeySchema("lost"), lane)
    keys = state.keys

    async def reply_lost(call: Any, written: Any) -> Any:
        proxy.hold_replies()
        task = asyncio.create_task(call)
        await wait_until(written, what="the write made in Redis")
        proxy.cut()  # the reply is lost with the connection
        proxy.restore()
        proxy.release_replies()
        return await task

    async def logged(n: int) -> bool:
        return await redis_client.xlen(keys.events("s")) == n

    try:
        await state.load_scripts()
        await state.acquire("s", "n1", "n1/a", "u", create=True)  # through redis-py
        await lane.run(redis_client.register_script("return 1"), [], [])  # connected
        accepted = await reply_lost(
            state.accept("s", "u", pack({"action": "message"}), 100, 10, floor=0), lambda: logged(1)
        )
        committed = await reply_lost(
            state.commit("s", "n1/a", 1, [pack({"r": 1})], cause=1, floor=0),
            lambda: logged(2),
        )
        # An agent's write answering no action: known by its writer token and index.
        unprompted = await reply_lost(
            state.commit("s", "n1/a", 1, [pack({"r": 2})], writer="w", index=1, floor=0),
            lambda: logged(3),
        )
        assert (accepted.status, accepted.event_id) == ("ok", 1)
        assert committed.status == "dup"  # the retry found the first run's write
        assert unprompted.status == "dup"
        assert [i for i, _ in await state.events_after("s", 0)] == [1, 2, 3]
        assert await redis_client.xlen(keys.inbox("s")) == 0
    finally:
        await lane.aclose()
        await proxy.aclose()
