"""A Redis master lost under load, on real deployments (guarantee 10).

Two in-process nodes share a busy conversation: a client on each node sends an action
every 50 ms, each with its own ``client_action_id``, resending it (to the same node)
until it is acknowledged. Then the master holding the conversation is killed (SIGKILL)
and its replica promoted, by the cluster or by Sentinel (behind Sentinel, then the new
master is failed over in turn). With ``--ack-replicas 1``:
every acknowledged action is in the log afterwards, once; the log's ids are gap-free but
for ids the clients were told Redis lost (writes no replica had confirmed); no id a
client saw is given to another event; the conversation is served again. With
``--ack-replicas 0`` and a replica that lagged (paused with SIGSTOP while the master took
writes), the failover loses events: the nodes notice, the ids go on after the last one
the clients saw and the clients are told which ids were lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from coordinator import ConversationManager
from coordinator.actionqueue import ActionQueue
from coordinator.backends.discovery import GRACE, AskingAll, KeeperAskingAll
from coordinator.codec import EVENTS_LOST, NODE_LOST, notice_code
from coordinator.errors import NotReplicated
from coordinator.keys import KeySchema
from coordinator.lane import ScriptLane
from coordinator.state import RedisState, accept_token
from tests.helpers import RecordingSink, fast_config, wait_until
from tests.redis_process import HOST, START_TIMEOUT, RedisProcess, stop_all, wait_for
from tests.redis_topologies import (
    SENTINEL_CONF,
    SENTINEL_NODE_CONF,
    RedisClusterServers,
    SentinelServers,
    sentinel_config,
)

SID = "busy"


@dataclass
class Client:
    """One client of the busy conversation on ``node``, sending an action every 50 ms."""

    node: ConversationManager
    cid: str
    acked: dict[str, int] = field(default_factory=dict)  # client_action_id -> event id
    refused: int = 0

    async def send(self, key: str, content: str) -> None:
        action = {"action": "message", "args": {"content": content}, "client_action_id": key}
        while True:  # as a socket.io client resends what got an error ack
            try:
                self.acked[key] = await self.node.send_to_event_stream(self.cid, action)
                return
            except Exception:
                self.refused += 1
                await asyncio.sleep(0.1)

    async def run(self, stop: asyncio.Event, prefix: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await self.send(f"{prefix}{n}", f"{prefix}{n}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def nodes() -> AsyncIterator[Callable[..., Any]]:
    made: list[ConversationManager] = []

    async def start(url: str, n: int = 2, **overrides: Any) -> list[Any]:
        out = []
        for _ in range(n):
            sink = RecordingSink()
            # A node's lease lives on one shard (or the one master): it must outlast a
            # failover there (about 4 s here), else every node's lease lapses with it.
            config = fast_config(
                url,
                f"f{len(made) + 1}",
                node_ttl=10.0,
                heartbeat_interval=1.0,
                lease_margin=2.0,
                redis_timeout=10.0,
                **overrides,
            )
            manager = ConversationManager(config, sink=sink)
            await manager.start()
            made.append(manager)
            out.append((manager, sink))
        return out

    yield start
    for manager in made:
        with contextlib.suppress(Exception):
            await manager.aclose()


async def _busy(started: list[Any]) -> list[Client]:
    clients = []
    for i, (node, _) in enumerate(started):
        await node.join_conversation(SID, f"c{i}", {}, "alice")
        clients.append(Client(node, f"c{i}"))
    return clients


async def _under_load(clients: list[Client], fault: Callable[[], Any], seconds: float) -> None:
    """Load before, during and after ``fault`` (awaited), ``seconds`` on each side."""
    stop = asyncio.Event()
    runs = [asyncio.create_task(c.run(stop, f"{c.cid}-")) for c in clients]
    await asyncio.sleep(seconds)
    await fault()
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*runs)


async def _log(node: ConversationManager) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        page = await node.events(SID, after=out[-1]["id"] if out else 0, limit=1000)
        if not page:
            return out
        out += page


def _asked_and_unanswered(log: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """Actions logged since the last loss notice, and those of them with no answer yet.

    After a loss, only those: an answer can be among the writes lost, and the action is
    not run twice.
    """
    answered = {e["args"]["content"] for e in log if e.get("source") == "agent"}
    since = max((e["id"] for e in log if notice_code(e) == EVENTS_LOST), default=0)
    asked = {e["args"]["content"] for e in log if e.get("source") == "user" and e["id"] > since}
    return asked, asked - answered


async def _check_nothing_acknowledged_was_lost(
    clients: list[Client], sinks: list[RecordingSink], node: ConversationManager
) -> None:
    # Served again: every action gets its answer, the last ones included. The load has
    # just stopped: the answer to the last action can still be on its way (a commit
    # retried while the cluster remaps its slots), so the log is read until it has them.
    async def served() -> list[dict[str, Any]] | None:
        log = await _log(node)
        return log if not _asked_and_unanswered(log)[1] else None

    with contextlib.suppress(AssertionError):
        await wait_until(served, timeout=20.0, interval=0.2, what="every action answered")
    log = await _log(node)
    ids = [e["id"] for e in log]
    assert ids == sorted(set(ids)), "log ids in order, once each"
    # Gap-free, but for ids Redis lost and the clients were told of: writes no replica
    # confirmed (never acknowledged), lost by a failover (a second one, a master slow
    # to answer on a loaded machine; or the kill landing between a write and its WAIT).
    told = {
        i
        for e in log
        if notice_code(e) == EVENTS_LOST
        for i in range(e["extras"]["first"], e["extras"]["last"] + 1)
    }
    missing = set(range(1, ids[-1] + 1)) - set(ids)
    assert missing <= told, f"ids missing from the log, no client told: {missing - told}"
    logged = [e for e in log if e.get("source") == "user"]
    keys = [e["client_action_id"] for e in logged]
    assert len(keys) == len(set(keys)), "an action logged twice"
    by_key = {e["client_action_id"]: e["id"] for e in logged}
    for client in clients:
        assert client.acked, "nothing was acknowledged"
        for key, event_id in client.acked.items():
            assert by_key.get(key) == event_id, f"acknowledged {key} as {event_id}: lost"
    # No id a client saw was given to another event.
    content = {e["id"]: e.get("args", {}).get("content") for e in log}
    for sink in sinks:
        for events in sink.events.values():
            for e in events:
                if e["id"] not in told:
                    assert content.get(e["id"]) == e.get("args", {}).get("content"), e
    asked, unanswered = _asked_and_unanswered(log)
    assert asked, "no action logged after the failover"
    assert not unanswered, f"actions never answered (20 s after the load): {sorted(unanswered)}"


def _master_of_conversation(cluster: RedisClusterServers) -> RedisProcess:
    return cluster.master_of(KeySchema().conv(SID))


async def test_cluster_master_killed_under_load_loses_nothing_acknowledged(
    redis_cluster_replicated: RedisClusterServers, nodes: Any
) -> None:
    cluster = redis_cluster_replicated
    started = await nodes(cluster.url, ack_replicas=1)
    clients = await _busy(started)
    victim = _master_of_conversation(cluster)

    async def fault() -> None:
        cluster.kill(victim)
        await cluster.async_wait_failover(victim)
        # Acknowledgements need a replica again: the old master comes back as one.
        await cluster.async_restart(victim)

    await _under_load(clients, fault, 1.5)
    node = started[0][0]
    await _check_nothing_acknowledged_was_lost(clients, [s for _, s in started], node)


async def test_sentinel_master_killed_then_its_successor_paused_loses_nothing_acknowledged(
    redis_sentinel: SentinelServers, nodes: Any
) -> None:
    """Two failovers in a row: the master is killed; once it is back as the new
    master's replica, the new master stops answering (SIGSTOP past down-after) and is
    failed over too. Seen in CI as one: on a loaded machine a master slow to answer for
    down-after (1 s) was failed over again. The second failover loses the writes no
    replica had confirmed yet (the returning replica was still syncing): never an
    acknowledged action, and the clients are told."""
    servers = redis_sentinel
    hosts = ",".join(f"{h}:{p}" for h, p in servers.sentinel_addresses)
    url = f"redis+sentinel://{hosts}/{servers.master_name}"
    started = await nodes(url, ack_replicas=1)
    assert started[0][0].node.backend.mode == "sentinel"
    clients = await _busy(started)

    async def fault() -> None:
        old = servers.kill_master()
        new = await servers.async_wait_promoted()
        # Acknowledgements need a replica again: the old master comes back, and Sentinel
        # makes it the new master's replica (on its own schedule: about 10 s).
        old.start().wait_started()
        await wait_until(lambda: _has_replica(servers), timeout=60, what="a replica again")
        with _paused(new):
            await wait_until(lambda: _master(servers) is old, timeout=30, what="failed back")
        await wait_until(lambda: _has_replica(servers), timeout=60, what="a replica again")

    await _under_load(clients, fault, 1.5)
    await _check_nothing_acknowledged_was_lost(clients, [s for _, s in started], started[0][0])


async def test_a_paused_master_back_after_its_failover_costs_no_node_its_lease(
    redis_sentinel: SentinelServers, nodes: Any
) -> None:
    """The master stops (SIGSTOP) past down-after and is failed over; back (SIGCONT),
    it says role:master until the Sentinels make it a replica (seconds later). The
    nodes' pooled connections opened before the pause went on writing to it: every node
    registered again there, then found its lease missing on the real master and lapsed,
    fencing all its loops (a NODE_LOST notice in each conversation), with no node dead."""
    servers = redis_sentinel
    hosts = ",".join(f"{h}:{p}" for h, p in servers.sentinel_addresses)
    url = f"redis+sentinel://{hosts}/{servers.master_name}"
    started = await nodes(url)
    clients = await _busy(started)
    incarnations = [node.node.membership.inc for node, _ in started]

    async def fault() -> None:
        old = servers.master()
        with _paused(old):
            await servers.async_wait_promoted(old=old)
            await asyncio.sleep(2.0)  # the nodes on the new master meanwhile
            print("SIGCONT", time.time())
        # Back as a master the Sentinels have not converted yet.
        await wait_until(
            lambda: old.info("replication").get("role") == "slave",
            timeout=60,
            what="the old master made a replica",
        )

    await _under_load(clients, fault, 1.5)
    await _check_nothing_acknowledged_was_lost(clients, [s for _, s in started], started[0][0])
    assert [node.node.membership.inc for node, _ in started] == incarnations, "a lease lapsed"
    log = await _log(started[0][0])
    assert not [e for e in log if notice_code(e) == NODE_LOST], "a node reported lost"


async def test_a_sentinel_that_missed_the_failover_does_not_send_the_nodes_to_a_replica(
    redis_sentinel: SentinelServers, nodes: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Sentinel that has not heard of a failover (here the data nodes' ACL keeps it off
    their hello channel, where Sentinels tell each other of one) names the old master, a
    replica now, and looks sound for down-after plus 20 s. Listed first, it was the one
    redis-py asked and believed: the nodes' writes went to the replica and were refused.
    They take the answer in the newest configuration epoch instead (the pool's, the lane's,
    the subscription's and the lease keeper's discovery alike), even from the one Sentinel
    of three that knows of the failover, answering after the two that agree on the old
    master (as its leader may be, right after it)."""
    servers = redis_sentinel
    name = servers.master_name
    old, new = servers.data_nodes
    for node in servers.data_nodes:
        with node.client() as c:
            c.execute_command(
                "ACL", "SETUSER", "cutoff", "on", ">pw", "~*", "resetchannels", "+@all"
            )
    with servers.sentinels[0].client() as c:
        c.execute_command("SENTINEL", "FAILOVER", name)
    await servers.async_wait_promoted(old=old)
    with old.client() as c:  # as the Sentinels convert it, ten seconds later
        c.replicaof(*new.address)
    behind = [
        RedisProcess(
            f"sentinel-behind{i}",
            tmp_path / f"sentinel-behind{i}",
            [
                *sentinel_config(SENTINEL_CONF, old.address),
                f"sentinel auth-user {name} cutoff",
                f"sentinel auth-pass {name} pw",
            ],
            sentinel=True,
        )
        for i in (1, 2)
    ]

    def behind_name_the_old_master() -> bool:
        for sentinel in behind:
            with sentinel.client() as c:
                state = c.sentinel_master(name)
            sound = state["is_master"] and not state["is_sdown"] and not state["is_odown"]
            if not (sound and (state["ip"], state["port"]) == old.address):
                return False
        return True

    try:
        for sentinel in behind:
            sentinel.start().wait_started()
        assert behind_name_the_old_master()
        listed = [behind[0].address, *servers.sentinel_addresses]
        hosts = ",".join(f"{h}:{p}" for h, p in listed)
        (a, a_sink), (b, b_sink) = await nodes(f"redis+sentinel://{hosts}/{name}")
        incarnations = [a.node.membership.inc, b.node.membership.inc]
        await a.join_conversation("epoch", "ca", {}, "dora")
        await b.join_conversation("epoch", "cb", {}, "dora")
        await b.send_to_event_stream("cb", {"action": "message", "args": {"content": "hi"}})
        for sink, cid in ((a_sink, "ca"), (b_sink, "cb")):
            await wait_until(lambda s=sink, c=cid: len(s.events[c]) == 2, what=f"{cid}'s answer")
        await asyncio.sleep(3)  # heartbeats: the lease keeper's renewals and master watch
        assert [a.node.membership.inc, b.node.membership.inc] == incarnations, "a lease lapsed"
        with new.client() as c:
            assert c.exists(KeySchema("coord").events("epoch"))

        # Two of three behind, the one that knows answering last.
        three = [behind[0].address, behind[1].address, servers.sentinels[1].address]
        asking = AskingAll(three)
        knowing = asking.sentinels[2]
        real = knowing.sentinel_masters

        async def later() -> Any:
            await asyncio.sleep(GRACE / 2)
            return await real()

        knowing.sentinel_masters = later
        try:
            assert await asking.discover_master(name) == new.address
            assert await asking.discover_master(name) == new.address
        finally:
            await asking.aclose()
        # Said by each node (its one behind Sentinel) and, once, by this discovery.
        two = f"2 named {old.address[0]}:{old.address[1]} (epoch 0)"
        said = [r.getMessage() for r in caplog.records if "Sentinels disagree" in r.getMessage()]
        assert len([m for m in said if two in m]) == 1, said
        keeper = KeeperAskingAll(three)
        assert await asyncio.to_thread(keeper.discover_master, name) == new.address
        for blocking in keeper.sentinels:
            blocking.close()
        # Still behind when the nodes were done: what they did was done with them first.
        assert behind_name_the_old_master(), "a Sentinel caught up during the test"
    finally:
        for sentinel in behind:
            sentinel.stop()


async def test_sentinel_with_a_database_number_keeps_everything_in_that_database(
    redis_sentinel: SentinelServers, nodes: Any
) -> None:
    """``redis+sentinel://.../master/3``: the pool, the script lane and the subscription
    each connect to the master the Sentinels name, and all of them to database 3 (the
    lane and the subscription locate the master and keep the URL's database), so an
    action accepted and answered on one node reaches a client on another."""
    servers = redis_sentinel
    hosts = ",".join(f"{h}:{p}" for h, p in servers.sentinel_addresses)
    url = f"redis+sentinel://{hosts}/{servers.master_name}/3"
    (a, a_sink), (b, b_sink) = await nodes(url)
    await a.join_conversation("db3", "ca", {}, "dora")
    await b.join_conversation("db3", "cb", {}, "dora")
    await b.send_to_event_stream("cb", {"action": "message", "args": {"content": "hi"}})
    for sink, cid in ((a_sink, "ca"), (b_sink, "cb")):
        await wait_until(lambda s=sink, c=cid: len(s.events[c]) == 2, what=f"{cid}'s answer")
    with servers.master().client(db=3) as c:
        assert c.exists(KeySchema("coord").events("db3"))
    with servers.master().client(db=0) as c:
        assert c.dbsize() == 0


def _master(servers: SentinelServers) -> RedisProcess | None:
    """The node a majority of the sentinels names as master (None: no majority yet)."""
    try:
        return servers.master()
    except AssertionError:
        return None


def _has_replica(servers: SentinelServers) -> bool:
    """Whether the node a majority of the sentinels names as master has a replica."""
    master = _master(servers)
    try:
        return master is not None and master.info("replication")["connected_slaves"] >= 1
    except redis.RedisError:  # it does not answer
        return False


@contextlib.contextmanager
def _paused(process: RedisProcess) -> Any:
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


async def test_without_replica_acks_a_lagging_failover_is_detected_and_told(
    redis_sentinel: SentinelServers, nodes: Any
) -> None:
    """--ack-replicas 0: the replica's link is cut (and the replica paused, so it cannot
    reconnect) while the master logs three actions and their answers, then the master
    dies and the replica, without them, is promoted. The
    next action finds the log behind what the node delivered: its id follows the last
    one the client saw, and the client is told which ids were lost."""
    servers = redis_sentinel
    hosts = ",".join(f"{h}:{p}" for h, p in servers.sentinel_addresses)
    url = f"redis+sentinel://{hosts}/{servers.master_name}"
    ((node, sink),) = await nodes(url, n=1)
    await node.join_conversation(SID, "c", {}, "alice")
    await node.send_to_event_stream("c", {"action": "message", "args": {"content": "kept"}})
    await wait_until(lambda: len(sink.events["c"]) == 2, what="the first answer")
    master = servers.master()
    replica = next(p for p in servers.data_nodes if p is not master)
    with _paused(replica):
        # Cut the replication link while the replica cannot reconnect: what the master
        # logs now exists only there (a replica that lagged).
        with master.client() as client:
            client.client_kill_filter(_type="replica")
        for i in range(3):
            await node.send_to_event_stream(
                "c", {"action": "message", "args": {"content": f"lost{i}"}}
            )
        await wait_until(lambda: len(sink.events["c"]) == 8, what="answers before the kill")
        servers.kill_master()
    await servers.async_wait_promoted()
    seen = sink.ids("c")[-1]
    assert seen == 8
    after = await _send_until_acked(node, "c", "after the failover")
    assert after > seen + 1, "an id the client saw was given again"
    await wait_until(
        lambda: any(notice_code(e) == EVENTS_LOST for e in sink.events["c"]),
        what="the client told of the loss",
    )
    notice = next(e for e in sink.events["c"] if notice_code(e) == EVENTS_LOST)
    assert notice["id"] == seen + 1 and "to 8" in notice["message"], notice
    ids = sink.ids("c")
    assert ids == sorted(set(ids)), "ids delivered twice or out of order"
    await wait_until(
        lambda: any(
            e.get("args", {}).get("content") == "after the failover" and e["source"] == "agent"
            for e in sink.events["c"]
        ),
        timeout=15,
        what="served again",
    )


def _sentinel_tail(servers: SentinelServers) -> tuple[str, Any]:
    """The Sentinel URL and the function giving the master and its replica."""
    hosts = ",".join(f"{h}:{p}" for h, p in servers.sentinel_addresses)

    def pair() -> tuple[RedisProcess, RedisProcess]:
        master = servers.master()
        return master, next(p for p in servers.data_nodes if p is not master)

    return f"redis+sentinel://{hosts}/{servers.master_name}", pair


@contextlib.asynccontextmanager
async def _unconfirmed_tail(
    url: str,
    conversation_master: Callable[[], tuple[RedisProcess, RedisProcess]],
    nodes: Any,
    **overrides: Any,
) -> AsyncIterator[tuple[Any, RecordingSink, Any, RecordingSink, RedisProcess]]:
    """Two nodes on ``url`` with --ack-replicas 1, a client on each ("a" on the loop's
    node, "b" on the other), events 1-2 confirmed; then, with the replica of the
    conversation's master (``conversation_master()`` gives both) paused for the block,
    an action ("held", refused: NotReplicated) and its answer logged on the master as
    3-4. Yields the nodes, their sinks and the master."""
    (n1, s1), (n2, s2) = await nodes(url, ack_replicas=1, **overrides)
    await n1.join_conversation(SID, "a", {}, "alice")
    await n2.join_conversation(SID, "b", {}, "alice")
    await _send_until_acked(n1, "a", "kept")
    await wait_until(lambda: s1.ids("a") == s2.ids("b") == [1, 2], what="the first answer")
    master, replica = conversation_master()
    held = {"action": "message", "args": {"content": "held"}, "client_action_id": "held"}

    def logged() -> bool:  # on the master (a node's reads wait for replicas)
        with master.client(decode_responses=False) as c:
            rows = c.xrange(n1.keys.events(SID), min="(2-0")
        return [int(entry_id.split(b"-")[0]) for entry_id, _ in rows] == [3, 4]

    with _paused(replica):
        with pytest.raises(NotReplicated):
            await n1.send_to_event_stream("a", held)
        await wait_until(logged, what="the action and its answer on the master")
        yield n1, s1, n2, s2, master


async def test_a_write_no_replica_confirmed_reaches_no_client_until_one_does(
    redis_sentinel: SentinelServers, nodes: Any
) -> None:
    """--ack-replicas 1, the replica paused: an action is logged on the master but not
    acknowledged, and the owner's answer to it is logged there too, unconfirmed. Neither
    reaches a client on either node while a failover could still undo them (ids a client
    saw would then go to other events); both written again on a new connection are
    still unconfirmed (recent Redis versions WAIT for the connection's last write: a
    retry that wrote nothing would look confirmed). Once the replica is back,
    the retry is acknowledged under the first id and every client gets both, once."""
    url, pair = _sentinel_tail(redis_sentinel)
    async with _unconfirmed_tail(url, pair, nodes) as (n1, s1, _, s2, master):
        # Both again, on connections that have written nothing.
        async with _fresh_state(master, n1.keys) as state:
            again = await state.accept(
                SID, "alice", b"", 100, 100, token=accept_token("held"), floor=0
            )
            assert (again.status, again.event_id) == ("ok", 3) and again.unconfirmed
        async with _fresh_state(master, n1.keys) as state:
            meta = await state.redis.hmget(n1.keys.conv(SID), "inc", "epoch")
            answer = await state.commit(
                SID, meta[0].decode(), int(meta[1]), [b""], cause=3, floor=0
            )
            assert answer.status == "dup" and answer.unconfirmed
        await asyncio.sleep(1.0)  # the owner's commit is retried meanwhile
        assert s1.ids("a") == [1, 2] and s2.ids("b") == [1, 2], "delivered unconfirmed"
    assert await _send_until_acked(n1, "a", "held") == 3
    with contextlib.suppress(AssertionError):
        await wait_until(lambda: s1.ids("a") == s2.ids("b") == [1, 2, 3, 4])
    assert s1.ids("a") == s2.ids("b") == [1, 2, 3, 4], (s1.ids("a"), s2.ids("b"))
    assert s1.events["a"][3]["source"] == "agent" == s2.events["b"][3]["source"]


async def test_a_replay_shows_no_event_the_replicas_lack(
    redis_sentinel: SentinelServers, nodes: Any
) -> None:
    """--ack-replicas 1, the replica paused while an action and its answer are logged on
    the master (unconfirmed): a client joining then, and the catch-up of every connection
    after a pub/sub reconnect, read the log but show none of it until the replica holds
    it (a failover now would lose it, and its ids would go to other events; seen in the
    double-failover test above before reads waited for replicas). Once the replica is
    back, the joiner gets the whole log and the others the two events, once."""
    url, pair = _sentinel_tail(redis_sentinel)
    await _replays_wait_for_the_replica(url, pair, nodes)


async def test_on_a_cluster_reads_wait_for_the_replica_of_the_conversations_shard(
    redis_cluster_replicated: RedisClusterServers, nodes: Any
) -> None:
    """As above on Redis Cluster, where the read's WAIT must go to the shard holding the
    conversation: sent to another shard, whose replica is not paused, it would be
    answered at once and the unconfirmed events shown."""
    cluster = redis_cluster_replicated

    def pair() -> tuple[RedisProcess, RedisProcess]:
        master = _master_of_conversation(cluster)
        replica = cluster.replica_of(master)
        assert replica is not None
        return master, replica

    await _replays_wait_for_the_replica(cluster.url, pair, nodes)


async def _replays_wait_for_the_replica(url: str, pair: Any, nodes: Any) -> None:
    async with _unconfirmed_tail(url, pair, nodes, join_wait=30.0) as (n1, s1, n2, s2, _):
        joining = asyncio.create_task(n2.join_conversation(SID, "c", {}, "alice"))
        n2.node.delivery.connections.catch_up_all()  # as after a pub/sub reconnect
        n1.node.delivery.connections.catch_up_all()
        await asyncio.sleep(1.5)
        assert not joining.done()
        assert s2.ids("c") == [], "a replay showed events no replica holds"
        assert s1.ids("a") == [1, 2] and s2.ids("b") == [1, 2], "delivered unconfirmed"
    await joining
    for sink, cid in ((s1, "a"), (s2, "b"), (s2, "c")):
        await wait_until(lambda s=sink, c=cid: s.ids(c) == [1, 2, 3, 4], what=f"{cid} caught up")


@contextlib.asynccontextmanager
async def _fresh_state(master: RedisProcess, keys: KeySchema) -> AsyncIterator[RedisState]:
    """The state API on new connections to ``master``, acknowledging with one replica."""
    url = f"redis://{master.address[0]}:{master.address[1]}"
    lane = ScriptLane(url, timeout=5.0, connect_timeout=2.0)
    client = aioredis.Redis.from_url(url)
    try:
        yield RedisState(client, keys, lane, replicas=1, replica_timeout_ms=300)
    finally:
        await lane.aclose()
        await client.aclose()


async def _send_until_acked(node: ConversationManager, cid: str, content: str) -> int:
    action = {"action": "message", "args": {"content": content}, "client_action_id": content}
    for _ in range(100):
        try:
            return await node.send_to_event_stream(cid, action)
        except Exception:
            await asyncio.sleep(0.1)
    raise AssertionError("never acknowledged")


@pytest.fixture
def master_and_replica(tmp_path: Path) -> Iterator[tuple[RedisProcess, RedisProcess]]:
    """A master and its replica, configured as the Sentinel data nodes are (no Sentinel:
    the test moves the roles itself)."""
    data = [f'include "{SENTINEL_NODE_CONF}"', 'save ""']
    master = RedisProcess("m", tmp_path / "m", data)
    replica = RedisProcess("r", tmp_path / "r", [*data, f"replicaof {HOST} {master.port}"])
    try:
        master.start().wait_started()
        replica.start().wait_started()
        _wait_linked(master, replica)
        yield master, replica
    finally:
        stop_all([replica, master])


def _wait_linked(master: RedisProcess, replica: RedisProcess) -> None:
    def linked() -> bool | None:  # None: not yet
        up = replica.info("replication").get("master_link_status") == "up"
        return (up and master.info("replication")["connected_slaves"] >= 1) or None

    wait_for("the replica linked to its master", linked, START_TIMEOUT, replica.log_tail)


def _lose_unreplicated_writes(master: RedisProcess, replica: RedisProcess) -> None:
    """What a failover to a replica that lacks the newest writes does, at the master's own
    address: the master takes the (detached) replica's data set, then both go back to
    their roles."""

    def synced() -> bool | None:  # None: not yet
        up = master.info("replication").get("master_link_status") == "up"
        return (up and not master.info("persistence")["loading"]) or None

    with master.client() as m:
        m.replicaof(*replica.address)
    wait_for("the master synced from the replica", synced, START_TIMEOUT, master.log_tail)
    with master.client() as m:
        m.replicaof("NO", "ONE")
    with replica.client() as r:
        r.replicaof(*master.address)
    _wait_linked(master, replica)


@pytest.mark.parametrize("through", ["owner", "other"])
async def test_an_id_redis_lost_and_gave_to_another_action_does_not_hide_it(
    master_and_replica: tuple[RedisProcess, RedisProcess], nodes: Any, through: str
) -> None:
    """--ack-replicas 1, the replica detached: an action ("held") is logged on the master
    as id 1, not confirmed, and the loop starts on it (sent through the loop's node, it is
    dispatched before its accept answers; sent through the other node, the loop is asked
    to read its inbox). The master then loses it (it takes the replica's data set, as a
    failover to that replica would), and an action acknowledged on the other node
    ("other") is logged as 1 again. The loop must not take "other" for the action it
    knew as 1: "other" is answered, and so is "held", sent again."""
    master, replica = master_and_replica
    scripted = "workers.scripted:ScriptedAgent"
    (n1, _), (n2, s2) = await nodes(master.url, ack_replicas=1, agent=scripted)
    await n1.join_conversation(SID, "a", {"think_time": 3.0}, "alice")
    await n2.join_conversation(SID, "b", {}, "alice")
    runner = n1.runner(SID)
    assert runner is not None
    with replica.client() as r:
        r.replicaof("NO", "ONE")
    await wait_until(lambda: master.info("replication")["connected_slaves"] == 0, what="detached")
    held = {"action": "message", "args": {"content": "held"}, "client_action_id": "held"}
    sender, cid = (n1, "a") if through == "owner" else (n2, "b")
    with pytest.raises(NotReplicated):
        await sender.send_to_event_stream(cid, held)
    # Counted where /metrics says so (before, only agents' commits were).
    assert sender.node.metrics.writes_not_replicated == 1
    if through == "other":
        runner.poke()  # as after a pub/sub reconnect: the loop reads its inbox
    await asyncio.sleep(0.3)
    await asyncio.to_thread(_lose_unreplicated_writes, master, replica)
    with master.client() as m:
        assert m.hget(n1.keys.conv(SID), "seq") == "0", "held was not lost"
    other_id = await _send_until_acked(n2, "b", "other")
    assert other_id == 1, "the scenario needs 'other' logged under the lost id"
    assert await _send_until_acked(sender, cid, "held") > other_id

    def answered(content: str) -> bool:
        return any(
            e.get("source") == "agent" and e["args"]["content"].startswith(content)
            for e in s2.events["b"]
        )

    with contextlib.suppress(AssertionError):
        await wait_until(lambda: answered("other") and answered("held"), timeout=15)
    assert answered("other"), f"'other' never answered: {s2.events['b']}"
    assert answered("held"), f"'held' never answered: {s2.events['b']}"
    log = await _log(n1)
    ids = [e["id"] for e in log]
    assert ids == sorted(set(ids)), ids
    users = [e["args"]["content"] for e in log if e.get("source") == "user"]
    assert sorted(users) == ["held", "other"], users


async def test_a_drain_of_an_inbox_no_replica_holds_gives_up_at_its_deadline(
    master_and_replica: tuple[RedisProcess, RedisProcess], nodes: Any
) -> None:
    """--ack-replicas 1, the replica detached: an evicted loop's drain (every accepted
    action answered before it stops) cannot read an inbox replicas do not hold; it tries
    until its deadline and says the backlog is left, instead of raising out of the
    eviction."""
    master, replica = master_and_replica
    ((node, _),) = await nodes(master.url, n=1, ack_replicas=1)
    await node.join_conversation(SID, "a", {}, "alice")
    with replica.client() as r:
        r.replicaof("NO", "ONE")
    async with _fresh_state(master, node.keys) as state:
        held = await state.accept(SID, "alice", b"\x80", 100, 100, floor=0)
        assert held.status == "ok" and held.unconfirmed
        queue = ActionQueue(SID, state, applied=0, max_action_bytes=1024)
        assert await queue.drain(lambda: True, within=1.0) is False


async def test_the_master_watch_drops_no_connection_to_the_master_it_follows(
    redis_sentinel: SentinelServers, nodes: Any
) -> None:
    """The watch drops the connections to the master the Sentinels no longer name. It
    dropped all of the pool's, those already on the new master too (redis-py's retry
    gets there before the next heartbeat): a command in flight on one was sent again,
    and one that is not safe to repeat (INCR: 170 extra in 20 drops under 20 loops) ran
    twice."""
    servers = redis_sentinel
    hosts = ",".join(f"{h}:{p}" for h, p in servers.sentinel_addresses)
    ((node, _),) = await nodes(f"redis+sentinel://{hosts}/{servers.master_name}", n=1)
    backend = node.node.backend
    client = backend.client
    acked = 0
    stop = asyncio.Event()

    async def count() -> None:
        nonlocal acked
        while not stop.is_set():
            await client.incr("watched")
            acked += 1

    loops = [asyncio.create_task(count()) for _ in range(20)]
    try:
        for _ in range(20):
            await asyncio.sleep(0.05)
            backend._master = ("127.0.0.1", 1)  # as if the master had been elsewhere
            await backend.follow_master()
    finally:
        stop.set()
        await asyncio.gather(*loops)
    assert int(await client.get("watched")) == acked


async def test_a_pooled_connection_to_a_server_no_longer_the_master_is_not_handed_out(
    redis_sentinel: SentinelServers, nodes: Any
) -> None:
    """A connection the pool made while it still named another server (the master
    that stopped, before the failover) and that escaped the master watch's sweep is
    not used once the pool names the new master: it is dropped when handed out, and
    the command runs on the master. In CI one such connection read the nodes' leases
    on the old master (back, and not converted yet) after its copy had expired: every
    node lapsed."""
    servers = redis_sentinel
    hosts = ",".join(f"{h}:{p}" for h, p in servers.sentinel_addresses)
    ((node, _),) = await nodes(f"redis+sentinel://{hosts}/{servers.master_name}", n=1)
    client = node.node.backend.client
    pool = client.connection_pool
    master = servers.master_address()
    (other,) = [d for d in servers.data_nodes if (HOST, d.port) != master]
    assert (await client.execute_command("ROLE"))[0] == b"master"
    # A connection made while the pool named the other server, back in the pool.
    stale = pool.get_available_connection()
    await stale.disconnect()
    pool.master_address = (HOST, other.port)
    await stale.connect_to((HOST, other.port))
    pool.master_address = master  # the pool hears of the master again
    await pool.release(stale)
    assert (stale.host, stale.port) == (HOST, other.port) and stale.is_connected
    for _ in range(3):
        assert (await client.execute_command("ROLE"))[0] == b"master"
    assert (stale.host, stale.port) == master


async def test_the_lease_keeper_renews_where_the_master_watch_says_the_master_is(
    redis_sentinel: SentinelServers, nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Sentinels name another master while this node still reaches the old one (cut
    off from the Sentinels, not from it): the master watch moves the pool, the lane and
    the subscription, and the lease keeper's next renewal goes to the new master too.
    Its connection to the old one answered, so it was never dropped: the renewals went
    on there while the lease expired on the new master, and every registration the
    node made on the new master was refused by the keeper's next renewal on the old.
    (Here "the new master" is the replica: the renewal it refuses, READONLY, shows
    where it went.)"""
    servers = redis_sentinel
    hosts = ",".join(f"{h}:{p}" for h, p in servers.sentinel_addresses)
    ((node, _),) = await nodes(f"redis+sentinel://{hosts}/{servers.master_name}", n=1)
    backend, membership = node.node.backend, node.node.membership
    assert await membership.renew_now()
    master = servers.master_address()
    (other,) = [d for d in servers.data_nodes if (HOST, d.port) != master]
    elsewhere = (HOST, other.port)

    async def located() -> tuple[str, int]:
        return elsewhere

    keeper = backend._keeper.connection_pool
    monkeypatch.setattr(backend, "locate", located)
    monkeypatch.setattr(keeper.sentinel_manager, "discover_master", lambda name: elsewhere)
    await backend.follow_master()
    assert await membership.renew_now() is False  # refused by the replica: READONLY
