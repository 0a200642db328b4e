"""Bad Redis settings get a clear error naming the setting, and no password in it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from coordinator import ConfigError, ConversationManager, ManagerConfig, RedisUnavailable
from coordinator.embedded import free_port
from coordinator.redisurl import parse_sentinel_url
from tests.helpers import RecordingSink, fast_config, wait_until
from tests.redis_topologies import RedisClusterServers, SentinelServers
from tests.test_cli import run


async def _start(**settings: object) -> ConversationManager:
    manager = ConversationManager(ManagerConfig(connect_timeout=1.0, **settings))  # type: ignore[arg-type]
    await manager.start()
    return manager


async def test_a_cluster_node_in_standalone_mode_is_refused_naming_the_setting(
    redis_cluster: RedisClusterServers,
) -> None:
    with pytest.raises(ConfigError, match=r"cluster_enabled:1.*--redis-mode cluster"):
        await _start(redis_url=redis_cluster.url, redis_mode="standalone")


async def test_a_plain_server_in_cluster_mode_is_refused(redis_url: str) -> None:
    with pytest.raises(ConfigError, match="not a Redis Cluster node"):
        await _start(redis_url=redis_url, redis_mode="cluster")


async def test_several_nodes_of_which_the_first_answering_is_a_plain_server_are_refused(
    redis_url: str,
) -> None:
    """A cluster's seeds that lead to a plain server (a URL meant for Sentinel, a typo):
    refused, not run as a standalone node on whichever answered."""
    host, port = urlsplit(redis_url).hostname, urlsplit(redis_url).port
    seeds = f"redis://:S3CRET@127.0.0.1:{free_port()},{host}:{port}/0"
    with pytest.raises(ConfigError, match=r"lists several nodes.*not Redis Cluster nodes") as e:
        await _start(redis_url=seeds)
    assert "S3CRET" not in str(e.value)


async def test_a_plain_server_listed_before_cluster_nodes_is_passed_over(
    redis_url: str, redis_cluster: RedisClusterServers
) -> None:
    """Seeds of which the first is a plain server (cluster support disabled: it refuses
    CLUSTER INFO): the node goes on to the next, a cluster node, and runs on the cluster.
    Before, the plain server's refusal stopped the start."""
    plain = urlsplit(redis_url).netloc.rpartition("@")[2]
    live = "{}:{}".format(*redis_cluster.addresses[0])
    manager = await _start(redis_url=f"redis://{plain},{live}/0", key_prefix="plainfirst")
    try:
        assert manager.node.backend.mode == "cluster"
    finally:
        await manager.aclose()


async def test_auto_mode_finds_the_cluster_and_says_so(redis_cluster: RedisClusterServers) -> None:
    manager = await _start(redis_url=redis_cluster.url)
    try:
        assert manager.node.backend.describe().startswith("cluster Redis at redis://127.0.0.1:")
    finally:
        await manager.aclose()


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("redis+sentinel://127.0.0.1:26379", "master's name"),
        ("redis+sentinel:///mymaster", "at least one HOST:PORT"),
        ("redis+sentinel://h:port/m", "not HOST:PORT"),
        ("redis+sentinel://h:1/m/x/y", "MASTER_NAME"),
    ],
)
def test_sentinel_urls_that_lack_a_part_say_which(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        ManagerConfig(redis_url=url)
    with pytest.raises(ConfigError, match=fragment):
        parse_sentinel_url(url)


def test_modes_that_contradict_the_url_are_refused() -> None:
    with pytest.raises(ConfigError, match="redis_mode sentinel needs"):
        ManagerConfig(redis_url="redis://h:6379/0", redis_mode="sentinel")
    with pytest.raises(ConfigError, match="Sentinel URL but redis_mode is cluster"):
        ManagerConfig(redis_url="redis+sentinel://h:1/m", redis_mode="cluster")
    with pytest.raises(ConfigError, match="redis_mode must be one of"):
        ManagerConfig(redis_mode="replicated")
    with pytest.raises(ConfigError, match="ack_replicas must be >= 0"):
        ManagerConfig(ack_replicas=-1)


async def test_an_unreachable_seed_names_the_url_without_its_password() -> None:
    for mode in ("auto", "cluster"):
        with pytest.raises(RedisUnavailable, match=r"127\.0\.0\.1:1") as info:
            await _start(redis_url="redis://admin:hunter2@127.0.0.1:1/0", redis_mode=mode)
        assert "hunter2" not in str(info.value) and "admin:***@" in str(info.value)


async def test_unreachable_sentinels_are_a_clear_error_without_the_password() -> None:
    url = "redis+sentinel://:hunter2@127.0.0.1:1/mymaster?sentinel_password=alsosecret"
    with pytest.raises(RedisUnavailable) as info:
        await _start(redis_url=url)
    assert "hunter2" not in str(info.value) and "alsosecret" not in str(info.value)


async def test_a_cluster_never_created_is_named_in_one_line(tmp_path: Path) -> None:
    """Cluster-enabled nodes started but never made a cluster (no ``--cluster create``):
    the error says so, naming the URL without its password, instead of an IndexError from
    inside redis-py's cluster client."""
    with RedisClusterServers(tmp_path, masters=3) as servers:
        servers.start(create=False)
        url = servers.url
        with pytest.raises(RedisUnavailable) as info:
            await _start(redis_url=url)
        with pytest.raises(RedisUnavailable):
            await _start(redis_url=url, redis_mode="cluster")
    message = str(info.value)
    assert "no slots assigned (was the cluster created?" in message, message
    assert url in message and "\n" not in message


async def test_sentinel_start_up_errors_say_what_failed(
    redis_sentinel: SentinelServers, redis_url: str
) -> None:
    """Each way a Sentinel URL can be wrong is named (once asked, no retries hiding it
    behind a timeout), never with a password."""
    sentinels = ",".join(f"{h}:{p}" for h, p in redis_sentinel.sentinel_addresses)
    name = redis_sentinel.master_name
    plain = urlsplit(redis_url)
    cases = [
        (f"redis+sentinel://{sentinels}/wrongname", "no sentinel knows master 'wrongname'"),
        (f"redis+sentinel://nobody:S3CRET@{sentinels}/{name}", "invalid username-password"),
        (f"redis+sentinel://127.0.0.1:{free_port()}/{name}", "Error 111 connecting to"),
        (
            f"redis+sentinel://{sentinels}/{name}?sentinel_username=u&sentinel_password=S3CRET",
            "invalid username-password",
        ),
        (f"redis+sentinel://{plain.hostname}:{plain.port}/{name}", "unknown command"),
    ]
    for url, why in cases:
        with pytest.raises(RedisUnavailable) as info:
            await (await _start(redis_url=url)).aclose()
            raise AssertionError(f"{url} started")
        message = str(info.value)
        assert why in message, (url, message)
        assert "TimeoutError" not in message and "S3CRET" not in message, message
    manager = await _start(redis_url=f"redis+sentinel://{sentinels}/{name}")
    await manager.aclose()


async def test_deployments_in_two_databases_of_one_server_do_not_hear_each_other(
    redis_url: str, tmp_path: Path
) -> None:
    """Pub/sub is server-wide, whatever the database: two deployments sharing a server
    and a key prefix in databases 0 and 6 heard each other's events (another tenant's
    messages in a client's stream, and false "Redis lost events" notices). A channel of
    a database other than 0 has it in its name."""
    parts = urlsplit(redis_url)
    other_url = parts._replace(path="/6").geturl()
    zero_url = parts._replace(path="/0").geturl()
    zero = ConversationManager(fast_config(zero_url, "db0"), sink=(a := RecordingSink()))
    # A second node of database 0 with a connection of alice's: the owner publishes
    # (with one node alone it has no one to publish to).
    also = ConversationManager(fast_config(zero_url, "db0-b"), sink=RecordingSink())
    six = ConversationManager(
        fast_config(other_url, "db6", event_store=f"file://{tmp_path}/db6"),
        sink=(b := RecordingSink()),
    )
    await zero.start()
    await also.start()
    await six.start()
    try:
        await zero.join_conversation("shared-id", "alice", {}, "alice")
        await also.join_conversation("shared-id", "alice-2", {}, "alice")
        await six.join_conversation("shared-id", "bob", {}, "bob")
        sent = await zero.send_to_event_stream(
            "alice", {"action": "message", "args": {"content": "for alice only"}}
        )
        await wait_until(lambda: sent + 1 in a.ids("alice"), what="alice's answer")
        mine = await six.send_to_event_stream(
            "bob", {"action": "message", "args": {"content": "bob's"}}
        )
        await wait_until(lambda: mine + 1 in b.ids("bob"), what="bob's answer")
        await asyncio.sleep(0.3)  # what would cross over has had its time
        assert "for alice only" not in str(b.events["bob"])
        assert "bob's" not in str(a.events["alice"])
        assert not b.updates["bob"] and not a.updates["alice"], (a.updates, b.updates)
    finally:
        await six.aclose()
        await also.aclose()
        await zero.aclose()
        with redis.Redis.from_url(other_url) as c:
            c.flushdb()


async def test_a_redis_that_evicts_keys_is_refused_naming_its_policy(
    redis_url: str, redis_cluster: RedisClusterServers, caplog: pytest.LogCaptureFixture
) -> None:
    """A server with an evicting maxmemory-policy and a maxmemory would drop leases,
    records and logs without a word at its bound: a node refuses it, naming the server,
    the policy and the fix (`coordinator serve` exits 2 with that line); without a
    maxmemory it starts and warns. On a cluster, every master is checked."""
    plain = redis.Redis.from_url(redis_url)
    kept = plain.config_get("maxmemory-policy")["maxmemory-policy"]
    try:
        plain.config_set("maxmemory-policy", "allkeys-lru")
        await (await _start(redis_url=redis_url)).aclose()
        assert "maxmemory-policy allkeys-lru: with a maxmemory set" in caplog.text
        plain.config_set("maxmemory", 1 << 30)
        with pytest.raises(ConfigError) as info:
            await _start(redis_url=redis_url)
        message = str(info.value)
        assert f"Redis at {redis_url} evicts keys" in message, message
        assert "maxmemory-policy allkeys-lru" in message and "noeviction" in message
        rc, _, err = await run(
            "serve", "--port", "0", "--secret", "s", "--redis-url", redis_url, within=60
        )
        assert rc == 2 and f"error: {message}" in err and "Traceback" not in err, (rc, err)
        # A user who may read INFO memory and not INFO replication, with --ack-replicas:
        # the replicas' read failing skipped the policy's verdict (a warning, and it ran).
        plain.acl_setuser(
            "evictcheck", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
            commands=["+@all", "-info", "+info|memory", "+info|cluster", "+info|server"],
        )  # fmt: skip
        limited = redis_url.replace("redis://", "redis://evictcheck:pw@")
        with pytest.raises(ConfigError, match="evicts keys"):
            await _start(redis_url=limited, ack_replicas=1)
    finally:
        plain.acl_deluser("evictcheck")
        plain.config_set("maxmemory", 0)
        plain.config_set("maxmemory-policy", kept)
        plain.close()
    last = redis_cluster.masters()[-1]
    host, port = last.address
    with last.client() as client:
        try:
            client.config_set("maxmemory-policy", "volatile-lru")
            client.config_set("maxmemory", 1 << 30)
            with pytest.raises(ConfigError, match=f"Redis at {host}:{port} evicts keys"):
                await _start(redis_url=redis_cluster.url)
        finally:
            client.config_set("maxmemory", 0)
            client.config_set("maxmemory-policy", "noeviction")


async def test_a_sentinel_urls_socket_options_reach_the_masters_connections(
    redis_sentinel: SentinelServers,
) -> None:
    """``?socket_timeout=`` and ``?socket_connect_timeout=`` on a Sentinel URL apply to
    the connections to the master, as they do on a redis:// URL (before, only TLS
    parameters were passed on and these were dropped without a word)."""
    sentinels = ",".join(f"{h}:{p}" for h, p in redis_sentinel.sentinel_addresses)
    url = (
        f"redis+sentinel://{sentinels}/{redis_sentinel.master_name}"
        "?socket_timeout=0.75&socket_connect_timeout=0.5"
    )
    manager = await _start(redis_url=url)
    try:
        client = manager.node.backend.client
        assert await client.ping()
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.75, 0.5)
    finally:
        await manager.aclose()
