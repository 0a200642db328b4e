"""A slot moving from one Redis Cluster master to another (a reshard) under a running
node: the node's sharded subscriptions follow it, and every shard keeps serving joins.
Real cluster nodes; the slot moved as ``redis-cli --cluster reshard`` moves it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from coordinator import ConversationManager
from coordinator.cluster_lane import ClusterLane
from coordinator.embedded import free_port
from coordinator.errors import RedisUnavailable
from coordinator.keys import KeySchema
from coordinator.links import Endpoint
from coordinator.sharded import ShardedSubscriptions
from coordinator.slots import slot_of
from coordinator.state import RedisState
from tests.helpers import RecordingSink, fast_config, wait_until
from tests.redis_process import RedisProcess
from tests.redis_topologies import RedisClusterServers
from tests.redisproc import RedisProcess as SpareRedis
from tests.redisproc import redis_args


def move_slot(
    cluster: RedisClusterServers, slot: int, source: RedisProcess, target: RedisProcess
) -> None:
    """Move ``slot`` and its keys from ``source`` to ``target``, announced to every master."""
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    with target.client() as t, source.client() as s:
        t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        host, port = target.address
        while keys := s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            s.execute_command("MIGRATE", host, port, "", 0, 5000, "KEYS", *keys)
    for master in cluster.masters():
        with master.client() as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


def conversation_on(cluster: RedisClusterServers, master: RedisProcess) -> str:
    keys = KeySchema()
    return next(f"rs{i}" for i in range(10_000) if cluster.master_of(keys.conv(f"rs{i}")) is master)


@contextlib.asynccontextmanager
async def started(
    cluster: RedisClusterServers, name: str, prefix: str = "coord", url: str = ""
) -> AsyncIterator[tuple[ConversationManager, RecordingSink]]:
    """A node on ``cluster`` (its keys under ``prefix``; told ``url``, by default a node
    of it), closed afterwards."""
    sink = RecordingSink()
    config = fast_config(url or cluster.url, name, key_prefix=prefix)
    node = ConversationManager(config, sink=sink)
    await node.start()
    try:
        yield node, sink
    finally:
        with contextlib.suppress(Exception):
            await node.aclose()


async def answered(node: ConversationManager, sink: RecordingSink) -> None:
    """An action on connection "c" is answered."""
    action = await node.send_to_event_stream(
        "c", {"action": "message", "args": {"content": "after the reshard"}}
    )
    await wait_until(lambda: action + 1 in sink.ids("c"), timeout=20, what="the agent's answer")


async def test_a_node_whose_probe_slot_moved_keeps_serving_that_shard(
    redis_cluster: RedisClusterServers,
) -> None:
    """The slot of a shard's probe channel moves to another master: the node opens that
    shard's subscription again with a probe in its master's slots, stays healthy, and a
    conversation of that shard is joined and answered. Before, the link resubscribed the
    old probe and got MOVED for as long as the node ran, and every join to that shard
    was refused ("cannot reach Redis") while /healthz said ok."""
    async with started(redis_cluster, "reshard") as (node, sink):
        subs = node.node.subscriptions
        assert isinstance(subs, ShardedSubscriptions)
        address, probe = next(iter(subs.probe_channels.items()))
        source = redis_cluster.node_at(address)
        target = next(m for m in redis_cluster.masters() if m is not source)
        move_slot(redis_cluster, slot_of(probe), source, target)
        await wait_until(
            lambda: subs.probe_channels.get(address, probe) != probe,
            timeout=20,
            what="the shard's probe in its master's slots again",
        )
        await wait_until(lambda: subs.healthy, timeout=20, what="subscriptions healthy")
        sid = conversation_on(redis_cluster, source)
        await node.join_conversation(sid, "c", {}, "alice")
        await answered(node, sink)
        reconnects = subs.reconnects
        await wait_until(lambda: subs.healthy, timeout=5)
        assert subs.reconnects == reconnects  # no MOVED loop


async def test_a_join_after_a_reshard_the_node_did_not_see_is_served(
    redis_cluster: RedisClusterServers,
) -> None:
    """A slot moves while the node holds no channel of it (no unsubscribe tells it): its
    map is behind, and the first join of a conversation in that slot subscribes on the
    old master, which answers MOVED. The node reads the map again and the join goes
    through. Before, the refusal dropped the link, which subscribed on the old master
    again, and every such join was refused after 5 s for as long as the node ran."""
    async with started(redis_cluster, "unseen", "unseen") as (node, sink):  # its own keys
        subs = node.node.subscriptions
        assert isinstance(subs, ShardedSubscriptions)
        probes = {slot_of(p) for p in subs.probe_channels.values()}
        keys = KeySchema("unseen")
        master = redis_cluster.masters()[0]
        sid = next(
            s
            for i in range(10_000)
            if redis_cluster.master_of(keys.conv(s := f"unseen{i}")) is master
            and slot_of(keys.conv(s)) not in probes
        )
        target = next(m for m in redis_cluster.masters() if m is not master)
        move_slot(redis_cluster, slot_of(keys.conv(sid)), master, target)
        remaps = subs.remaps
        await node.join_conversation(sid, "c", {}, "alice")
        assert subs.remaps > remaps
        await answered(node, sink)
        assert keys.conv_channel(sid) in subs.channels
        await node.disconnect_from_session("c")


async def test_the_lane_follows_moved_when_the_map_it_reads_lags(
    redis_cluster: RedisClusterServers,
) -> None:
    """MOVED names the slot's master; a map read from a node whose view lags (as during a
    failover) still names the old one. The lane sent the call back to it, which answered
    MOVED again, and the call used up its redirections in a millisecond ("too many
    redirections"). It goes where MOVED said now, and so do the slot's later calls."""
    first, *others = sorted(redis_cluster.masters(), key=lambda m: m.address)
    source, target = others  # the map is read from ``first`` (the lowest address) first
    key = next(k for i in range(10_000) if redis_cluster.master_of(k := f"lag{i}") is source)
    slot = slot_of(key)
    lane = ClusterLane([Endpoint.from_url(redis_cluster.url)], timeout=2.0, connect_timeout=2.0)
    try:
        assert await lane.execute([["SET", key, "before"]]) == [b"OK"]
        move_slot(redis_cluster, slot, source, target)
        # ``first`` believes ``source`` still serves the slot, and keeps believing it:
        # ``source`` has the highest config epoch, so ``target``'s claim does not win.
        with source.client() as s, first.client() as f:
            s.execute_command("CLUSTER", "BUMPEPOCH")
            f.execute_command("CLUSTER", "SETSLOT", slot, "NODE", redis_cluster.node_id(source))
        fresh = await lane.refresh()
        assert fresh.master_of(slot) == source.address  # the lagging view
        for value in ("after", "again"):
            assert await lane.execute([["SET", key, value]]) == [b"OK"]
        with target.client() as t:
            assert t.execute_command("GET", key) == "again"
    finally:
        await lane.aclose()
        with target.client() as t, first.client() as f:  # every view agrees again
            t.execute_command("CLUSTER", "BUMPEPOCH")
            f.execute_command("CLUSTER", "SETSLOT", slot, "NODE", redis_cluster.node_id(target))


async def test_a_noscript_is_answered_by_loading_where_it_was_said(
    redis_cluster: RedisClusterServers,
) -> None:
    """A master new to the cluster (a rebalance's), or promoted, has no script cache: its
    NOSCRIPT loaded the scripts through redis-py, onto the masters redis-py knew, not
    always that one, and the read failed again (a replay warned and retried). They are
    loaded through the lane, on the shard that said NOSCRIPT."""
    first, second, _ = sorted(redis_cluster.masters(), key=lambda m: m.address)
    keys = KeySchema("noscript")
    sid = next(
        s for i in range(10_000) if redis_cluster.master_of(keys.conv(s := f"ns{i}")) is second
    )
    lane = ClusterLane([Endpoint.from_url(redis_cluster.url)], timeout=2.0, connect_timeout=2.0)
    known = aioredis.Redis(host=first.address[0], port=first.address[1])  # knows ``first`` only
    state = RedisState(known, keys, lane, sharded=True)
    try:
        with second.client() as s:
            s.execute_command("SCRIPT", "FLUSH")
        rows, _, seq = await state.events_after_sized(sid, 0, 10, 1 << 20)
        assert (rows, seq) == ([], None)
        with second.client() as s:
            assert s.execute_command("SCRIPT", "EXISTS", state._scripts["read"].sha) == [1]
    finally:
        await lane.aclose()
        await known.aclose()


async def test_a_slot_moved_to_a_master_that_then_fails_goes_back_to_the_map(
    redis_cluster: RedisClusterServers,
) -> None:
    """Where MOVED sent a slot is kept until a map read agrees; should that master fail
    (its own failover) the slot's calls would go on to it until their deadline. A call
    that cannot reach it forgets it, and the map decides again."""
    master = redis_cluster.masters()[0]
    key = next(k for i in range(10_000) if redis_cluster.master_of(k := f"gone{i}") is master)
    lane = ClusterLane([Endpoint.from_url(redis_cluster.url)], timeout=5.0, connect_timeout=1.0)
    try:
        await lane.refresh()
        lane._moved[slot_of(key)] = ("127.0.0.1", free_port())  # nothing listens there now
        assert await lane.execute([["SET", key, "v"]]) == [b"OK"]
        assert slot_of(key) not in lane._moved
    finally:
        await lane.aclose()


async def test_a_join_whose_shard_is_reopened_by_the_reshard_is_served(
    redis_cluster: RedisClusterServers,
) -> None:
    """One reshard moves a conversation's slot and its shard's probe slot, unseen by the
    node: the first join there is refused MOVED, and the remap closes the shard (its
    probe moved) and opens it again. The join waited on the closed shard's confirmation
    and was refused after 5 s; it follows its channel to where it is now."""
    async with started(redis_cluster, "reopened", "reopened") as (node, sink):
        subs = node.node.subscriptions
        assert isinstance(subs, ShardedSubscriptions)
        keys = KeySchema("reopened")
        address, probe = next(iter(subs.probe_channels.items()))
        source = redis_cluster.node_at(address)
        target = next(m for m in redis_cluster.masters() if m is not source)
        sid = next(
            s
            for i in range(10_000)
            if redis_cluster.master_of(keys.conv(s := f"ro{i}")) is source
            and slot_of(keys.conv(s)) != slot_of(probe)
        )
        move_slot(redis_cluster, slot_of(probe), source, target)
        move_slot(redis_cluster, slot_of(keys.conv(sid)), source, target)
        await node.join_conversation(sid, "c", {}, "alice")
        await answered(node, sink)


async def test_a_lane_call_waits_out_a_failover_within_its_deadline(
    redis_cluster_replicated: RedisClusterServers,
) -> None:
    """A master killed, its replica promoted seconds later: a call to its slot meets
    refused connections meanwhile. Those took from the call's 16 redirections, and it
    gave up about 2 s into a 4 s failover ("too many redirections"); only MOVED and ASK
    count now, the rest waits until the call's deadline."""
    cluster = redis_cluster_replicated
    master = cluster.masters()[0]
    key = next(k for i in range(10_000) if cluster.master_of(k := f"fo{i}") is master)
    lane = ClusterLane([Endpoint.from_url(cluster.url)], timeout=15.0, connect_timeout=1.0)
    try:
        assert await lane.execute([["SET", key, "before"]]) == [b"OK"]
        cluster.kill(master)
        assert await lane.execute([["SET", key, "after"]]) == [b"OK"]
    finally:
        await lane.aclose()


async def test_a_node_starts_when_the_first_cluster_node_it_is_told_is_down(
    redis_cluster: RedisClusterServers, tmp_path: Path
) -> None:
    """``--redis-url`` lists several nodes of the cluster (its seeds): a node starts and
    serves while the first of them is down (restarting, lost), or serves no slot (a node
    removed from the cluster, or never added), as it would not with that one alone. Told
    only nodes that are down, it says so for each."""
    down = [free_port(), free_port()]
    live = "{}:{}".format(*redis_cluster.addresses[0])
    seeds = f"redis://127.0.0.1:{down[0]},{live}/0"
    async with started(redis_cluster, "seeds", "seeds", url=seeds) as (node, sink):
        assert node.node.backend.mode == "cluster"
        await node.join_conversation("seeded", "c", {}, "alice")
        await answered(node, sink)
    # A node that is no part of the cluster (never added, or removed) listed first.
    port = free_port()
    spare = SpareRedis(
        [*redis_args(port, tmp_path), "--cluster-enabled", "yes"],
        lambda: redis.Redis(port=port).ping(),
        tmp_path,
    ).start()
    try:
        seeds = f"redis://127.0.0.1:{port},{live}/0"
        async with started(redis_cluster, "spare", "seeds", url=seeds) as (node, sink):
            await node.join_conversation("spared", "c", {}, "alice")
            await answered(node, sink)
    finally:
        spare.stop()
    config = fast_config(f"redis://127.0.0.1:{down[0]},127.0.0.1:{down[1]}/0", "none")
    node = ConversationManager(config, sink=RecordingSink())
    with pytest.raises(RedisUnavailable) as refused:
        await node.start()
    assert "none of its nodes answered" in str(refused.value)
    assert all(f"127.0.0.1:{port}: " in str(refused.value) for port in down)


async def test_a_seed_that_never_answers_is_passed_over_and_said(
    redis_cluster: RedisClusterServers, caplog: pytest.LogCaptureFixture
) -> None:
    """The first seed listed takes connections and never answers (a hung or paused
    node): the start asks every seed at once, says which it passed over and why, and
    leaves it out of the cluster clients. Before, the start often failed with a bare
    TimeoutError: redis-py, trying its seeds in a random order, waited on the hung one
    past the start's bound."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the other side goes

    hung = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    live = "{}:{}".format(*redis_cluster.addresses[1])
    try:
        for attempt in range(2):  # redis-py's order is random: more than one start
            url = f"redis://127.0.0.1:{port},{live}/0"
            async with started(redis_cluster, f"hung{attempt}", "hung", url=url) as (node, sink):
                await node.join_conversation(f"hung{attempt}", "c", {}, "alice")
                await answered(node, sink)
        passed = [r.getMessage() for r in caplog.records if "passed over" in r.getMessage()]
        assert len(passed) == 2 and all(f"127.0.0.1:{port}: " in m for m in passed), passed
    finally:
        hung.close()
