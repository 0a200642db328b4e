"""A node's drain (SIGTERM, a deploy): the starts under way when it begins are let end
before the node deregisters, so nothing it held is left for a reaper (in-process nodes
on real Redis)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator.auth import issue_token
from coordinator.codec import NODE_DRAINING, NODE_LOST, notice_code
from coordinator.embedded import free_port
from coordinator.manager import ConversationManager
from coordinator.server import NodeServer
from tests.helpers import RecordingSink, fast_config, wait_until
from tests.redisproc import RedisProcess, redis_args
from tests.server_fixtures import SECRET, SioClient
from tests.test_archive import wait_stored

BAD = "tests.agents:BadAgent"


async def test_a_drain_lets_a_start_under_way_end_and_hands_it_off(
    make_nodes, caplog: pytest.LogCaptureFixture
) -> None:
    """A user at the cap (1) joins a second conversation while the first is busy with a
    2 s action: the start waits for the first's eviction, and the node drains meanwhile.
    The drain waits for that start, then hands its loop off like the others (told
    NODE_DRAINING, released; a join on another node starts it at once). Before, the
    drain went on without it: its reap released the conversation as lost (NODE_LOST, as
    after a kill -9), and the start, ending on closed connections, logged 'giving up
    ... deferred: the lane is closed'."""
    caplog.set_level(logging.INFO)
    a, b = await make_nodes(2, agent=BAD, max_concurrent_conversations=1, start_timeout=10.0)
    await a.join_conversation("old", "c0", {}, "bob")
    await a.send_to_event_stream("c0", {"action": "message", "args": {"content": "slow 2"}})
    old = a.runner("old")
    assert old is not None
    await wait_until(lambda: old.dispatched == 1, what="the first busy")
    joining = asyncio.ensure_future(a.join_conversation("new", "c1", {}, "bob"))
    await wait_until(lambda: "new" in a.node.loops.starting, what="the start under way")
    await asyncio.sleep(0.2)  # waiting for the eviction of "old"
    assert "new" in a.node.loops.starting
    await a.drain()
    await asyncio.gather(joining, return_exceptions=True)
    notices = [notice_code(e) for e in await b.events("new")]
    assert NODE_LOST not in notices and NODE_DRAINING in notices, notices
    assert (await b.state.meta("new")).get("owner", "") == ""
    assert "deferred" not in caplog.text
    info = await b.join_conversation("new", "c2", {}, "bob")
    assert info.running and b.local_loops() == {"new"}


@pytest.mark.parametrize("isolation", ["process", "none"])
async def test_an_agent_writing_while_its_loop_stops_does_not_fence_it(
    make_nodes, caplog: pytest.LogCaptureFixture, isolation: str
) -> None:
    """An agent that emits from its ``aclose`` (a last message) while its loop is handed
    off: the write is refused, and that is all. Before, the refusal took the loop for
    fenced ('loop X fenced (node lease lapsed)' at WARNING): its stop then skipped the
    release, the store flush and the clients' notice, and the conversation stayed owned
    by the stopped node, in none of its indexes, for no reaper to find."""
    a, b = await make_nodes(2, agent=BAD, agent_isolation=isolation)
    await a.join_conversation("bye", "c1", {"close_emits": True}, "bob")
    await a.send_to_event_stream("c1", {"action": "message", "args": {"content": "hi"}})
    await wait_until(
        lambda: any(e.get("source") == "agent" for e in make_nodes.sinks["node1"].events["c1"])
    )
    await a.drain()
    assert "fenced" not in caplog.text
    events = await b.events("bye")
    assert NODE_DRAINING in [notice_code(e) for e in events]
    assert "goodbye" not in [e.get("args", {}).get("content") for e in events]
    assert (await b.state.meta("bye")).get("owner", "") == ""


async def test_a_conversation_a_drain_hands_off_retires_once_its_last_client_left(
    make_nodes,
) -> None:
    """A drain stops its loops before it says goodbye to its clients: a conversation
    watched only from the drained node is released with its connection still
    registered, so it could not retire then. The farewell removed the connection and
    nothing retired it: record, log window and index entry stayed in Redis for good
    (a probe: 40 conversations left per drain of 40 clients that did not come back).
    Now the last connection's leave retires it: gone from Redis after the retention,
    listed from the event store."""
    a, b = await make_nodes(2, redis_retention=1.0)
    await a.join_conversation("left", "c1", {}, "bob")
    await a.send_to_event_stream("c1", {"action": "message", "args": {"content": "hi"}})
    await wait_until(lambda: len(make_nodes.sinks["node1"].events["c1"]) >= 2, what="answer")
    await a.drain()
    await assert_retired(b, "left", "bob", within=10)


async def assert_retired(node: Any, sid: str, user: str, within: float) -> None:
    """``sid`` retires: gone from Redis (its retention is short) and from its user's
    index there, listed from the event store, stopped."""
    state = node.state

    async def gone() -> bool:
        return await state.redis.exists(*state.conversation_keys(sid)) == 0

    await wait_until(gone, timeout=within, what=f"{sid}'s Redis state expired")
    assert await state.redis.zscore(state.keys.user_convs(user), sid) is None
    listed, _, _ = await node.directory.list_conversations(user)
    assert [(c["conversation_id"], c["state"]) for c in listed] == [(sid, "stopped")]


async def test_a_conversation_whose_last_client_was_on_a_lost_node_retires_after_the_reap(
    make_nodes,
) -> None:
    """As above, through the reaper: a node killed while it ran a conversation and held
    its only client. The reaper releases the conversation (nobody watches it, nothing
    waits in its inbox: no node restarts it) and removes the connection, which retires
    it: gone from Redis after the retention, listed from the event store."""
    a, b = await make_nodes(2, redis_retention=1.0)
    await b.join_conversation("orphan", "c1", {}, "bob")
    await b.send_to_event_stream("c1", {"action": "message", "args": {"content": "hi"}})
    await wait_until(lambda: len(make_nodes.sinks["node2"].events["c1"]) >= 2, what="answer")
    await wait_stored(b, "orphan", 2)
    await b.node.halt()  # a kill -9: nothing released, the connection left registered
    await assert_retired(a, "orphan", "bob", within=20)  # reaped first


async def test_a_drain_lets_a_join_under_way_end_before_it_says_goodbye(make_nodes) -> None:
    """A join still waiting for its conversation's agent to start when the node drains:
    the drain lets it end (its start handed off with the others) before it tells its
    clients goodbye and deregisters, so the connection it registers is removed with the
    rest, not left in Redis for a reaper and its client not left on a node that is
    gone."""
    a, b = await make_nodes(2, agent=BAD, agent_start_timeout=10.0)
    joining = asyncio.ensure_future(a.join_conversation("slow", "c1", {"start_delay": 1.0}, "bob"))
    await wait_until(lambda: "slow" in a.node.loops.starting, what="the start under way")
    await a.drain()
    assert joining.done()  # ended, one way or the other, before the drain did
    assert await b.state.redis.hgetall(b.keys.conv_conns("slow")) == {}
    assert await b.get_connections(user_id="bob") == {}


async def test_a_drained_loop_starts_again_where_its_clients_watch_it_at_once(
    make_nodes,
) -> None:
    """A node whose clients watch a conversation the drained node ran starts it again
    without waiting for an action: the drained node writes its notice before it lets
    the loop go (it stores the rest first), and that node found it still running there
    and left it until the next action (three runs of a probe out of three)."""
    a, b = await make_nodes(2)
    await a.join_conversation("moving", "ca", {}, "bob")
    await b.join_conversation("moving", "cb", {}, "bob")
    await b.send_to_event_stream("cb", {"action": "message", "args": {"content": "hi"}})
    sink = make_nodes.sinks["node2"]
    await wait_until(lambda: len(sink.events["cb"]) >= 2, what="the answer on node2")
    assert a.runner("moving") is not None and b.runner("moving") is None
    await a.drain()
    notices = [e for e in sink.events["cb"] if notice_code(e) == NODE_DRAINING]
    assert notices, sink.events["cb"]
    await wait_until(lambda: b.runner("moving") is not None, timeout=10, what="running on node2")
    assert await b.is_agent_loop_running("moving")


async def test_a_moved_loop_another_node_already_took_is_left_to_it(make_nodes) -> None:
    """A draining owner's notice names it: a watching node that finds another node
    already running the conversation (it won the restart) stops there. It polled the
    winner until HANDOFF_WAIT ran out (a dozen starts tried over 5 s per watched
    conversation, on every watching node, in a drain of thousands)."""
    a, b = await make_nodes(2)
    await a.join_conversation("taken", "ca", {}, "bob")
    await b.join_conversation("taken", "cb", {}, "bob")
    assert a.runner("taken") is not None
    tries: list[str] = []
    ensure_running = b.node.loops.ensure_running

    async def counted(sid: str, *args: Any) -> Any:
        tries.append(sid)
        return await ensure_running(sid, *args)

    b.node.loops.ensure_running = counted  # type: ignore[method-assign]
    b.node.restarts.owner_gone("taken", "bob", None, moving_from="a-drained-node")
    await wait_until(lambda: tries, what="the restart's first start")
    await wait_until(lambda: "taken" not in b.node.restarts._running, what="the restart's end")
    assert tries == ["taken"]
    assert a.runner("taken") is not None and b.runner("taken") is None


async def test_a_stop_while_redis_hangs_ends_by_its_deadline_and_leaves_the_rest_to_reapers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stops answering (SIGSTOP: hung, or cut off by a partition) and the node is
    stopped: each of its writes waited redis_timeout and its retries, one after the
    other (83 s for one loop and one connection at the defaults; the node never exited
    in time for a deploy). Its writes now end at drain_timeout, its loops stop writing
    nothing, and once Redis answers again another node's reaper releases what it held."""
    port = free_port()
    server = RedisProcess(redis_args(port, tmp_path), redis.Redis(port=port).ping, tmp_path).start()
    url = f"redis://127.0.0.1:{port}/0"
    hung = ConversationManager(
        fast_config(url, "hung", drain_timeout=1.0, redis_timeout=2.0), sink=RecordingSink()
    )
    reaper = ConversationManager(fast_config(url, "reaper"), sink=RecordingSink())
    try:
        await hung.start()
        await reaper.start()
        for i in range(3):
            await hung.join_conversation(f"hung{i}", f"c{i}", {}, "alice")
        assert await reaper.get_running_agent_loops("alice") == {"hung0", "hung1", "hung2"}
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            # Far past drain_timeout, far short of what the writes took one by one.
            await asyncio.wait_for(hung.aclose(), 30)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert "Redis did not answer in time while it closed" in caplog.text
        assert not hung.started

        async def released() -> bool:
            loops = await reaper.get_running_agent_loops("alice")
            return not loops and not await reaper.get_connections(user_id="alice")

        await wait_until(released, timeout=30, what="the reaper releasing what it held")
    finally:
        await reaper.aclose()
        if hung.started:
            await hung.aclose()
        server.stop()


async def test_a_server_stopped_while_redis_hangs_exits_without_waiting_on_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGTERM'd server whose Redis hangs: withdrawing its advertisement waited out
    redis-py's retries before the drain began (15 s at the defaults), and a node whose
    lease had lapsed meanwhile still tried each of its stop's writes in turn (45 s from
    SIGTERM to exit with three loops). Now the withdrawal gives up after redis_timeout
    and a lapsed node leaves its Redis state to the reapers at once."""
    port = free_port()
    server = RedisProcess(redis_args(port, tmp_path), redis.Redis(port=port).ping, tmp_path).start()
    url = f"redis://127.0.0.1:{port}/0"
    node = NodeServer(fast_config(url, "hung", redis_timeout=1.0), SECRET, port=0)
    client = SioClient("alice")
    try:
        await node.start()
        await client.connect(node.url, "hanging", issue_token("alice", SECRET))
        assert node.manager.runner("hanging") is not None
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            await wait_until(lambda: node.manager.node.membership.lapsed, what="the lease lapse")
            await asyncio.wait_for(node.aclose(), 30)  # drain_timeout is 30 s
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert "could not withdraw the advertisement of hung" in caplog.text
        assert "hung: its lease lapsed; what it holds in Redis is left to the reapers" in (
            caplog.text
        )
    finally:
        await client.close()
        await node.aclose()
        server.stop()
