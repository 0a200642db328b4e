"""Redis at its maxmemory (policy noeviction) refuses writes: whichever way the refusal
reaches the coordinator (a single command, a pipeline, a script), a client is told Redis
is full, not that Redis cannot be reached. A real Redis with a tiny maxmemory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from coordinator.errors import redis_full, redis_refused
from coordinator.http import client_message
from coordinator.links import reply_error
from coordinator.quotas import Quotas
from coordinator.ratelimit import Rate
from coordinator.serverconfig import NO_LIMITS, ServerConfig
from tests.helpers import wait_until
from tests.test_metrics import samples

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


async def test_a_command_redis_refuses_for_what_it_is_is_told_apart(
    redis_client: aioredis.Redis,
) -> None:
    """WRONGTYPE and NOPERM fail the same way every time: ``redis_refused``, an internal
    error for the client. A failover's or a resharding's refusals pass, and Redis full
    is its own message: neither is."""
    await redis_client.set("coord:s", "v")
    wrongtype = await refusal(redis_client.zadd("coord:s", {"c": 1}))
    pipe = redis_client.pipeline(transaction=False)
    pipe.get("coord:s")
    pipe.zadd("coord:s", {"c": 1})
    piped = await refusal(pipe.execute())
    assert "of pipeline caused error" in str(piped)
    await redis_client.acl_setuser(
        "limited", enabled=True, passwords=["+pw"], keys=["coord:*"], commands=["+get"]
    )
    where = redis_client.connection_pool.connection_kwargs
    limited = aioredis.Redis(
        host=where["host"], port=where["port"], username="limited", password="pw"
    )
    try:
        noperm = await refusal(limited.set("coord:k", "v"))
    finally:
        await limited.aclose()
        await redis_client.acl_deluser("limited")
    for exc in (wrongtype, piped, noperm):
        assert redis_refused(exc) and not redis_full(exc), repr(exc)
        assert client_message(exc).startswith("internal error: Redis refused"), exc

    noscript = await refusal(redis_client.evalsha("0" * 40, 0))
    passing = [noscript] + [
        reply_error(text)  # as the lane raises what Redis sent
        for text in (
            "READONLY You can't write against a read only replica.",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "NOREPLICAS Not enough good replicas to write.",
            "BUSY Redis is busy running a script.",
            "LOADING Redis is loading the dataset in memory",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "CLUSTERDOWN The cluster is down",
        )
    ]
    for exc in passing:
        assert not redis_refused(exc), repr(exc)
        assert client_message(exc) == "the coordinator cannot reach Redis right now; try again"


async def test_rest_reads_go_on_while_redis_is_full(
    servers: Any, redis_client: aioredis.Redis
) -> None:
    """Each REST request takes a token of its user's request rate, a write to Redis:
    at the bound that refused every authenticated call, reads of history included. A
    full (or unreachable) Redis now lets the request by, to meet Redis only if it must."""
    config = ServerConfig(**{**NO_LIMITS, "requests_per_user": Rate(20, 100)})
    (a,) = await servers.start(1, server_config=config)
    writer = await servers.join(a, "kept", "alice")
    assert (await writer.act({"action": "message", "args": {"content": "hi"}}))["ok"]
    await writer.wait_ids(2)
    policy = await redis_client.config_get("maxmemory-policy")
    await redis_client.config_set("maxmemory-policy", "noeviction")
    await redis_client.config_set("maxmemory", 1)
    try:
        status, body = await servers.request(
            "GET", a, "/api/conversations/kept/events?after=0", user="alice"
        )
        assert status == 200 and [e["id"] for e in body["events"]][:2] == [1, 2], body
        status, body = await servers.request("GET", a, "/api/conversations/kept", user="alice")
        assert status == 200, body
    finally:
        await redis_client.config_set("maxmemory", 0)
        await redis_client.config_set("maxmemory-policy", policy["maxmemory-policy"])


async def test_metrics_show_how_full_redis_is(servers: Any, redis_client: aioredis.Redis) -> None:
    """/metrics gives Redis' used memory and its bound, to alert on before Redis refuses
    every write; at the bound, used is past it (and /healthz says why it is 503)."""
    (a,) = await servers.start(1)
    _, text = await servers.request("GET", a, "/metrics")
    got = samples(text, a.node_id)
    assert got["coordinator_redis_memory_used_bytes"] > 0
    assert got["coordinator_redis_maxmemory_bytes"] == 0  # the suite's Redis: no bound
    policy = await redis_client.config_get("maxmemory-policy")
    await redis_client.config_set("maxmemory-policy", "noeviction")
    await redis_client.config_set("maxmemory", 1)
    try:
        _, text = await servers.request("GET", a, "/metrics")
        got = samples(text, a.node_id)
        assert got["coordinator_redis_maxmemory_bytes"] == 1
        assert got["coordinator_redis_memory_used_bytes"] > 1
        status, body = await servers.request("GET", a, "/healthz")
        assert status == 503 and "Redis is full" in body["reason"], body
    finally:
        await redis_client.config_set("maxmemory", 0)
        await redis_client.config_set("maxmemory-policy", policy["maxmemory-policy"])


async def test_refused_actions_do_not_each_replace_the_agent(
    make_nodes: Any, redis_client: aioredis.Redis
) -> None:
    """An action is dispatched to its agent before its accept answers (speculation);
    refused, the agent that saw it is replaced. At the bound every action was refused,
    and every one replaced the agent: now, after a refusal, the next waits for its
    accept, until one is taken."""
    (a,) = await make_nodes(1)
    await a.join_conversation("spec", "c1", {}, "alice")
    message = {"action": "message", "args": {"content": "hi"}}
    await a.send_to_event_stream("c1", message)
    await wait_until(lambda: len(make_nodes.sinks["node1"].events["c1"]) >= 2)
    lost = a.metrics.speculations_lost
    policy = await redis_client.config_get("maxmemory-policy")
    await redis_client.config_set("maxmemory-policy", "noeviction")
    await redis_client.config_set("maxmemory", 1)
    try:
        for _ in range(5):
            exc = await refusal(a.send_to_event_stream("c1", message))
            assert redis_full(exc), repr(exc)
            await asyncio.sleep(0.3)  # the loop idle again (its agent replaced, if so)
    finally:
        await redis_client.config_set("maxmemory", 0)
        await redis_client.config_set("maxmemory-policy", policy["maxmemory-policy"])
    assert a.metrics.speculations_lost - lost <= 1


async def test_a_request_limit_redis_refused_is_off_for_a_second(
    make_nodes: Any, redis_client: aioredis.Redis
) -> None:
    """After its bucket could not be taken, a user's request limit is off for a second:
    a Redis that does not answer made each request wait its timeout, one request of a
    user after the other. Requests then meet the bucket again."""
    (node,) = await make_nodes(1)
    asked: list[str] = []

    def state() -> Any:  # the node's real state layer; asked when a bucket is taken
        asked.append("state")
        return node.state

    quotas = Quotas(ServerConfig(**{**NO_LIMITS, "requests_per_user": Rate(20, 100)}), state)
    policy = await redis_client.config_get("maxmemory-policy")
    await redis_client.config_set("maxmemory-policy", "noeviction")
    await redis_client.config_set("maxmemory", 1)
    try:
        await quotas.request("alice")  # refused by Redis: let by
        assert len(asked) == 1
        for _ in range(5):
            await quotas.request("alice")
        assert len(asked) == 1  # not asked while the limit is off
    finally:
        await redis_client.config_set("maxmemory", 0)
        await redis_client.config_set("maxmemory-policy", policy["maxmemory-policy"])
    await wait_until(_asked_again(quotas, asked), what="the limit is on again")


def _asked_again(quotas: Quotas, asked: list[str]) -> Any:
    async def check() -> bool:
        before = len(asked)
        await quotas.request("alice")
        return len(asked) > before

    return check


async def test_a_commit_retried_while_redis_is_full_warns_once(
    make_nodes: Any, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit refused by Redis is retried until it lands: said at WARNING once a
    write, then at DEBUG (a line per conversation per retry was 36 a second from 25
    conversations, for as long as Redis stayed full)."""
    caplog.set_level(logging.DEBUG, logger="coordinator.runner")
    (a,) = await make_nodes(1, agent="workers.scripted:ScriptedAgent")
    await a.join_conversation("slow", "c1", {"think_time": 0.3}, "alice")
    await a.send_to_event_stream("c1", {"action": "message", "args": {"content": "hi"}})
    policy = await redis_client.config_get("maxmemory-policy")
    await redis_client.config_set("maxmemory-policy", "noeviction")
    await redis_client.config_set("maxmemory", 1)
    try:
        await wait_until(lambda: _commit_lines(caplog, logging.DEBUG) >= 3, what="retries")
    finally:
        await redis_client.config_set("maxmemory", 0)
        await redis_client.config_set("maxmemory-policy", policy["maxmemory-policy"])
    sink = make_nodes.sinks["node1"]
    await wait_until(
        lambda: any(e.get("source") == "agent" for e in sink.events["c1"]), what="reply"
    )
    assert _commit_lines(caplog, logging.WARNING) == 1


def _commit_lines(caplog: pytest.LogCaptureFixture, level: int) -> int:
    return sum(
        1
        for r in caplog.records
        if r.levelno == level and "commit for slow failed" in r.getMessage()
    )
