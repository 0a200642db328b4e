"""Bad input gets a clear error and changes nothing."""

from __future__ import annotations

import math
import time

import pytest

from coordinator import (
    ConfigError,
    ConnectionNotFound,
    ConversationManager,
    ConversationNotFound,
    CoordinatorError,
    Forbidden,
    InvalidInput,
    ManagerConfig,
    RedisUnavailable,
)
from coordinator.config import Lifetimes
from tests.helpers import wait_until


async def _snapshot(redis) -> dict[bytes, object]:
    out: dict[bytes, object] = {}
    for key in sorted(await redis.keys("*")):
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            out[key] = await redis.hgetall(key)
        elif kind == "stream":
            out[key] = await redis.xlen(key)
        elif kind == "zset":
            out[key] = await redis.zrange(key, 0, -1)
        elif kind == "string" and b":lease" not in key:
            out[key] = await redis.get(key)
    return out


async def test_bad_calls_raise_clear_errors_and_change_nothing(make_nodes, redis_client) -> None:
    (a,) = await make_nodes(1)
    await a.join_conversation("good", "c1", {}, "alice")
    await a.send_to_event_stream("c1", {"action": "message", "args": {"content": "hi"}})

    async def settled() -> bool:  # answered, and both events in the event store
        meta = await redis_client.hgetall(a.keys.conv("good"))
        return meta.get(b"seq") == meta.get(b"stored") == b"2"

    await wait_until(settled, what="the action answered and stored")
    before = await _snapshot(redis_client)

    bad_calls = [
        (ConversationNotFound, a.attach_to_conversation("nope", "alice")),
        (ConversationNotFound, a.close_session("nope")),
        (ConnectionNotFound, a.send_to_event_stream("unknown-conn", {"action": "message"})),
        (InvalidInput, a.maybe_start_agent_loop(123, {}, "alice")),  # type: ignore[arg-type]
        (InvalidInput, a.maybe_start_agent_loop("has space", {}, "alice")),
        (InvalidInput, a.maybe_start_agent_loop("x" * 200, {}, "alice")),
        (InvalidInput, a.maybe_start_agent_loop("good", "settings", "alice")),  # type: ignore[arg-type]
        (InvalidInput, a.maybe_start_agent_loop("good", {}, "bad{user}")),
        (InvalidInput, a.maybe_start_agent_loop("good", {}, 42)),  # type: ignore[arg-type]
        (InvalidInput, a.send_to_event_stream("c1", "not a dict")),  # type: ignore[arg-type]
        (InvalidInput, a.send_to_event_stream("c1", {"args": {}})),
        (InvalidInput, a.send_to_event_stream("c1", {"action": "message", "args": []})),
        (InvalidInput, a.send_to_event_stream("c1", {"action": "m", "client_action_id": 1})),
        (
            InvalidInput,
            a.send_to_event_stream("c1", {"action": "message", "args": {"content": "x" * 70_000}}),
        ),
        (InvalidInput, a.join_conversation("good", "c2", {}, "alice", latest_event_id="3")),  # type: ignore[arg-type]
        (InvalidInput, a.join_conversation("good", "bad/conn", {}, "alice")),
        (Forbidden, a.join_conversation("good", "c3", {}, "mallory")),
        (Forbidden, a.attach_to_conversation("good", "mallory")),
        (Forbidden, a.close_session("good", "mallory")),
        (InvalidInput, a.detach_from_conversation("good")),  # type: ignore[arg-type]
        # A key JSON has not: it was logged, then broke every read of the conversation
        # (and, in a worker, its process and the other loops in it).
        (InvalidInput, a.send_to_event_stream("c1", {"action": "m", "args": {(1, 2): "x"}})),
        (InvalidInput, a.maybe_start_agent_loop("new1", {(1, 2): "x"}, "alice")),
        (InvalidInput, a.send_to_event_stream(["c1"], {"action": "m"})),  # type: ignore[arg-type]
        (InvalidInput, a.disconnect_from_session({"c": 1})),  # type: ignore[arg-type]
        # Settings as clients may give them (a worker gets them as msgpack).
        (InvalidInput, a.maybe_start_agent_loop("new2", {"s": {1, 2}}, "alice")),
        (InvalidInput, a.maybe_start_agent_loop("new3", {"n": 2**70}, "alice")),
        (InvalidInput, a.maybe_start_agent_loop("new4", {"x": "y" * 20_000}, "alice")),
        (InvalidInput, a.join_conversation("new5", "c5", {"f": math.nan}, "alice")),
        # Lifetimes: nan was recorded, and every later start of it failed until a purge.
        (InvalidInput, a.maybe_start_agent_loop("new6", {}, "alice", lifetimes="ten")),  # type: ignore[arg-type]
        (InvalidInput, a.events("good", after=-1)),
        (InvalidInput, a.events("good", after="1")),  # type: ignore[arg-type]
        (InvalidInput, a.events("good", limit=0)),
        (InvalidInput, a.events("good", limit=2**70)),
        (InvalidInput, a.get_running_agent_loops("")),
        (InvalidInput, a.get_connections(0)),  # type: ignore[arg-type]
        (InvalidInput, a.get_connections(None, "good")),  # type: ignore[arg-type]
        (InvalidInput, a.get_running_agent_loops(None, {"\ud800"})),
        (InvalidInput, a.join_conversation("new7", "c7", {}, "alice", org=0)),  # type: ignore[arg-type]
    ]
    for expected, call in bad_calls:
        with pytest.raises(expected) as info:
            await call
        assert str(info.value), expected
    for seconds in (math.nan, math.inf, -5, 0, "ten", True):
        with pytest.raises(InvalidInput):
            Lifetimes(close_delay=seconds)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            Lifetimes(max_running_time=seconds)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        a.runner(["good"])  # type: ignore[arg-type]
    assert await _snapshot(redis_client) == before
    assert a.local_connections() == {"c1": "good"}


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"max_concurrent_conversations": 0}, "max_concurrent_conversations must be > 0"),
        ({"max_concurrent_conversations": "3"}, "must be an integer"),
        ({"close_delay": -1.0}, "close_delay must be > 0"),
        ({"redis_url": "http://localhost"}, "redis_url must start with"),
        ({"node_id": "a b"}, "node_id must be 1-128 characters of \\[A-Za-z0-9_-\\], got .a b."),
        ({"key_prefix": "{x}"}, "key_prefix"),
        ({"agent": "no_colon"}, "agent must be"),
        ({"heartbeat_interval": 5.0, "node_ttl": 6.0}, "heartbeat_interval must leave room"),
        ({"log_window_events": True}, "must be an integer"),
        ({"log_window_events": 1}, "log_window_events must be at least 2"),
        (
            {"max_action_bytes": 4096, "log_window_bytes": 4096},
            "must hold at least one action and a loop's start note",
        ),
        # nan passes every bound (a node_ttl of nan: a node never dead), inf waits for good.
        ({"node_ttl": float("nan")}, "node_ttl must be a finite number"),
        ({"drain_timeout": float("inf")}, "drain_timeout must be a finite number"),
        ({"redis_url": "redis://"}, "no host"),
        ({"redis_url": "redis://u:pw@h:notaport/0"}, "u:\\*\\*\\*@h:notaport"),
    ],
)
def test_invalid_configuration_is_rejected_with_the_setting_named(changes, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        ManagerConfig(**changes)


def test_unknown_setting_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        ManagerConfig().replace(close_dealy=3)


async def test_unloadable_agent_is_a_config_error(redis_url) -> None:
    manager = ConversationManager(ManagerConfig(redis_url=redis_url, agent="nope.nothing:Agent"))
    with pytest.raises(ConfigError, match="cannot import agent module"):
        await manager.start()


async def test_unreachable_redis_fails_fast_naming_the_url() -> None:
    url = "redis://127.0.0.1:1/0"
    manager = ConversationManager(ManagerConfig(redis_url=url, connect_timeout=1.0))
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match=r"127\.0\.0\.1:1"):
        await manager.start()
    assert time.monotonic() - started < 10  # a clear error, not a hang


def test_config_must_be_a_manager_config() -> None:
    with pytest.raises(ConfigError, match="ManagerConfig"):
        ConversationManager({"redis_url": "redis://x"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "latest, fragment",
    [
        (2**64, "latest_event_id must be from 0"),
        (-2, "latest_event_id must be from 0"),
        (99, "beyond"),
    ],
)
async def test_a_join_that_cannot_be_caught_up_fails_and_leaves_no_connection(
    make_nodes, redis_client, latest: int, fragment: str
) -> None:
    """A cursor Redis would refuse as a stream id, or one beyond the conversation's last
    event, gets a clear error at once; the connection is in no map, here or in Redis."""
    (a,) = await make_nodes(1)
    await a.join_conversation("cursor", "c1", {}, "alice")
    await a.send_to_event_stream("c1", {"action": "message", "args": {"content": "hi"}})
    with pytest.raises(InvalidInput, match=fragment):
        await a.join_conversation("cursor", "c2", {}, "alice", latest_event_id=latest)
    assert a.local_connections() == {"c1": "cursor"}
    assert await a.get_connections() == {"c1": "cursor"}
    assert await redis_client.hkeys(a.keys.conv_conns("cursor")) == [b"c1"]


async def test_a_join_whose_log_read_redis_refuses_is_undone_not_retried(
    make_nodes, redis_client
) -> None:
    """A permanent Redis error during a join's catch-up (here: the log key holds the
    wrong type) fails the join with a clear error instead of retrying forever, and the
    join is undone."""
    (a,) = await make_nodes(1)
    await a.join_conversation("broken", "c1", {}, "bob")
    await a.disconnect_from_session("c1")
    await redis_client.delete(a.keys.events("broken"))
    await redis_client.set(a.keys.events("broken"), "not a stream")
    with pytest.raises(CoordinatorError, match="refused to read the log"):
        await a.join_conversation("broken", "c2", {}, "bob")
    assert a.local_connections() == {}
    assert await a.get_connections() == {}
