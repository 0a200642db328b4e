"""Cluster-wide queries, attach refcounts, event ids and the bounded log."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from coordinator.errors import StoreBehind
from tests.helpers import wait_until


async def test_queries_give_the_same_cluster_answer_on_every_node(make_nodes) -> None:
    a, b, c = await make_nodes(3, max_concurrent_conversations=10)
    await a.join_conversation("alice-1", "ca1", {}, "alice")
    await b.join_conversation("alice-1", "cb1", {}, "alice")
    await b.join_conversation("alice-2", "cb2", {}, "alice")
    await c.join_conversation("bob-1", "cc1", {}, "bob")
    await c.maybe_start_agent_loop("bob-2", {}, "bob")

    expected_loops = {
        (None, None): {"alice-1", "alice-2", "bob-1", "bob-2"},
        ("alice", None): {"alice-1", "alice-2"},
        ("bob", None): {"bob-1", "bob-2"},
        (None, frozenset({"alice-2", "bob-2", "nope"})): {"alice-2", "bob-2"},
        ("alice", frozenset({"alice-2", "bob-2"})): {"alice-2"},
    }
    expected_conns = {
        (None, None): {"ca1": "alice-1", "cb1": "alice-1", "cb2": "alice-2", "cc1": "bob-1"},
        ("alice", None): {"ca1": "alice-1", "cb1": "alice-1", "cb2": "alice-2"},
        ("bob", None): {"cc1": "bob-1"},
        (None, frozenset({"alice-1"})): {"ca1": "alice-1", "cb1": "alice-1"},
        ("bob", frozenset({"alice-1", "bob-1"})): {"cc1": "bob-1"},
    }
    for node in (a, b, c):
        for (user, sids), want in expected_loops.items():
            got = await node.get_running_agent_loops(user, set(sids) if sids else None)
            assert got == want, (node.node_id, user, sids)
        for (user, sids), want in expected_conns.items():
            got = await node.get_connections(user, set(sids) if sids else None)
            assert got == want, (node.node_id, user, sids)
        assert await node.is_agent_loop_running("bob-2")
        assert not await node.is_agent_loop_running("never-started")

    await b.disconnect_from_session("cb1")
    await c.close_session("alice-2", "alice")  # its connections close, on every node
    for node in (a, b, c):

        async def closed(node: Any = node) -> bool:
            return await node.get_connections("alice") == {"ca1": "alice-1"}

        await wait_until(closed, what="alice-2's connection closed")
        assert await node.get_running_agent_loops("alice") == {"alice-1"}
        assert not await node.is_agent_loop_running("alice-2")


async def test_attach_refcounts_across_nodes_and_release_after_close_delay(make_nodes) -> None:
    a, b = await make_nodes(2, close_delay=1.0)
    await a.maybe_start_agent_loop("att", {}, "carol")
    ha = await a.attach_to_conversation("att", "carol")
    hb = await b.attach_to_conversation("att", "carol")
    ha2 = await a.attach_to_conversation("att", "carol")
    assert ha2 is ha
    assert await a.attached_count("att") == 3
    assert await b.attached_count("att") == 3

    await a.detach_from_conversation(ha)
    assert await b.attached_count("att") == 2
    assert not ha.released
    await a.detach_from_conversation(ha)
    assert await b.attached_count("att") == 1
    loop = asyncio.get_running_loop()
    detached_at = loop.time()
    # Not released before close_delay ...
    while loop.time() - detached_at < 0.8:
        assert not ha.released
        await asyncio.sleep(0.05)
    # ... and released once it has passed.
    await wait_until(lambda: ha.released, timeout=3.0, what="handle released")
    assert ha.released_at is not None
    assert not hb.released

    # Re-attaching within close_delay reuses the detached handle.
    await b.detach_from_conversation(hb)
    hb2 = await b.attach_to_conversation("att", "carol")
    assert hb2 is hb and not hb.released
    assert await a.attached_count("att") == 1


async def test_attaches_a_caller_cannot_detach_are_not_counted_for_good(make_nodes) -> None:
    """An attach cancelled before it returned (its caller has no handle to detach), and
    the handles a node still held when it stopped: each was counted for good."""
    a, b = await make_nodes(2)
    await a.maybe_start_agent_loop("att", {}, "carol")
    for _ in range(3):
        attaching = asyncio.ensure_future(b.attach_to_conversation("att", "carol"))
        await asyncio.sleep(0)  # under way: its count is on its way to Redis
        attaching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await attaching
        assert attaching.cancelled()
    await asyncio.sleep(0.2)  # a count that landed after its cancel is taken back
    assert await a.attached_count("att") == 0
    await b.attach_to_conversation("att", "carol")
    await b.attach_to_conversation("att", "carol")
    assert await a.attached_count("att") == 2
    await b.aclose()
    assert await a.attached_count("att") == 0


async def test_event_ids_increase_by_one_and_the_log_is_bounded(make_nodes) -> None:
    (a,) = await make_nodes(1, log_window_events=100)
    await a.join_conversation("ids", "c", {}, "dave")
    for i in range(300):
        action = {"action": "message", "args": {"content": str(i)}}
        while True:  # the event store may lag 100 events: then an action is refused
            try:
                await a.send_to_event_stream("c", action)
                break
            except StoreBehind:
                await asyncio.sleep(0.01)
    sink = make_nodes.sinks["node1"]
    await wait_until(lambda: len(sink.events["c"]) >= 600, what="600 events")
    assert sink.ids("c") == list(range(1, 601))
    users = [e["args"]["content"] for e in sink.events["c"] if e["source"] == "user"]
    replies = [e["args"]["content"] for e in sink.events["c"] if e["source"] == "agent"]
    assert users == replies == [str(i) for i in range(300)]  # once each, in order

    # Once the store holds every event, Redis keeps exactly the window.
    async def stored_all() -> bool:
        return await a.state.redis.hget(a.keys.conv("ids"), "stored") == b"600"

    await wait_until(stored_all, what="the store holds all 600 events")
    assert await a.state.redis.xlen(a.keys.events("ids")) == 100
    inbox = await a.state.redis.xlen(a.keys.inbox("ids"))
    assert inbox == 0  # every action processed and trimmed from the inbox
    meta = await a.conversation("ids")
    last_action = max(e["id"] for e in sink.events["c"] if e["source"] == "user")
    assert meta["seq"] == "600" and int(meta["applied"]) == last_action
