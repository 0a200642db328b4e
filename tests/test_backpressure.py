"""Backpressure: join bursts and a lost node's conversations are worked through a bounded
number at a time, so an overloaded node slows down instead of falling behind its lease."""

from __future__ import annotations

import asyncio
from typing import Any

from coordinator import NodeBusy
from coordinator.catchup import BUFFERED, BUFFERED_BYTES, REPLAY_PAGE_BYTES
from coordinator.links import Endpoint
from coordinator.subscriptions import Subscriptions
from tests.helpers import Heard, InFlight, listening, wait_until
from tests.server_fixtures import ServerCluster


def stall(sink: Any, connection_id: str) -> asyncio.Event:
    """Hold ``sink``'s events for ``connection_id`` until the gate returned is set: a
    client that stopped reading."""
    gate, deliver = asyncio.Event(), sink.deliver

    async def stalled(cid: str, event: dict[str, Any]) -> None:
        if cid == connection_id:
            await gate.wait()
        await deliver(cid, event)

    sink.deliver = stalled
    return gate


async def test_joins_beyond_the_limit_wait_then_are_refused_as_busy_changing_nothing(
    make_nodes,
) -> None:
    (a,) = await make_nodes(1, max_concurrent_joins=2, join_wait=0.3)
    starts = InFlight(a.node.loops, delay=0.6)  # each join holds its slot for 0.6 s
    results = await asyncio.gather(
        *(a.join_conversation(f"busy-{i}", f"c{i}", {}, f"user{i}") for i in range(5)),
        return_exceptions=True,
    )
    assert starts.peak == 2
    refused = [i for i, r in enumerate(results) if isinstance(r, NodeBusy)]
    assert len(refused) == 3, results
    assert all("busy" in str(results[i]) for i in refused)
    for i in refused:  # a refused join left nothing behind
        assert not await a.state.redis.exists(a.keys.conv(f"busy-{i}"))
        assert f"c{i}" not in a.local_connections()
    assert sorted(a.local_loops()) == sorted(f"busy-{i}" for i in range(5) if i not in refused)

    # Joins that fit in the wait get through once slots free up.
    (b,) = await make_nodes(1, max_concurrent_joins=1, join_wait=5.0)
    starts_b = InFlight(b.node.loops, delay=0.2)
    await asyncio.gather(
        *(b.join_conversation(f"queued-{i}", f"q{i}", {}, "una") for i in range(3))
    )
    assert starts_b.peak == 1 and starts_b.calls == 3
    assert {f"q{i}" for i in range(3)} <= set(b.local_connections())


async def test_a_lost_nodes_conversations_restart_a_bounded_number_at_a_time(make_nodes) -> None:
    a, b = await make_nodes(2, max_concurrent_restarts=2)
    sids = [f"storm-{i}" for i in range(10)]
    for i, sid in enumerate(sids):
        await a.join_conversation(sid, f"ca{i}", {}, f"u{i}")  # loops on a
        await b.join_conversation(sid, f"cb{i}", {}, f"u{i}")  # clients on b too
    restarts = InFlight(b.node.loops, delay=0.1)
    # a goes silent like a killed process: no heartbeats, no pub/sub; its lease expires
    # and b reaps it.
    await a.node.halt()
    await wait_until(
        lambda: set(sids) <= b.local_loops(), timeout=20, what="every loop restarted on b"
    )
    assert restarts.peak <= 2
    # Each conversation answers on its new owner, once.
    for i in range(len(sids)):
        await b.send_to_event_stream(f"cb{i}", {"action": "message", "args": {"content": "hi"}})
    sink = make_nodes.sinks["node2"]
    for i in range(len(sids)):
        await wait_until(
            lambda i=i: [
                e for e in sink.events[f"cb{i}"] if e.get("args", {}).get("content") == "hi"
            ][1:],
            what=f"reply in {sids[i]}",
        )
        ids = [e["id"] for e in sink.events[f"cb{i}"]]
        assert ids == list(range(1, len(ids) + 1))


async def test_a_subscription_that_delivers_is_not_declared_silent(redis_url, redis_client) -> None:
    """A busy node may read its own probe late, behind other traffic: any message proves
    the link works. Only a link on which nothing arrives is reconnected."""
    probes = {"lost": False}

    async def publish(channel: str, data: bytes) -> int:
        return 0 if probes["lost"] else await redis_client.publish(channel, data)

    subs = Subscriptions(Endpoint.from_url(redis_url), publish, "probe:t", probe_interval=0.1)
    listener = Heard()
    async with listening(subs, listener):
        await subs.add("traffic")
        probes["lost"] = True
        for _ in range(25):  # 1.25 s of traffic and no probe: over 3 probe intervals
            await redis_client.publish("traffic", b"x")
            await asyncio.sleep(0.05)
        assert len(listener.heard) == 25 and subs.reconnects == 0
        await wait_until(lambda: subs.reconnects >= 1, timeout=5, what="silent link replaced")


async def test_a_listener_that_falls_behind_stops_the_reading_and_misses_nothing(
    redis_url, redis_client
) -> None:
    """The subscription reads messages as they arrive; a listener that handles them
    slower than they come holds at most HIGH of them here (the rest wait in the socket
    and in Redis' buffer for the subscriber), and gets every one, in order, once it
    catches up."""
    from coordinator.subscriptions import HIGH

    heard: list[bytes] = []
    gate = asyncio.Event()

    class Stuck:
        async def message(self, channel: str, data: bytes) -> None:
            await gate.wait()
            heard.append(data)

        async def reconnected(self) -> None:
            raise AssertionError("the link is not lost, only slow to be read")

    subs = Subscriptions(Endpoint.from_url(redis_url), redis_client.publish, "probe:b")
    count = 3 * HIGH
    async with listening(subs, Stuck()):
        await subs.add("flood")
        pipe = redis_client.pipeline(transaction=False)
        for i in range(count):
            pipe.publish("flood", str(i))
        assert sum(await pipe.execute()) == count  # every one went to the subscriber
        await asyncio.sleep(0.5)  # let it read what it will
        assert HIGH - 1 <= subs.backlog <= HIGH  # held there (one is in the listener)
        assert subs.messages < count  # the rest waits outside the process
        gate.set()
        await wait_until(lambda: len(heard) == count, timeout=20, what="every message")
        assert heard == [str(i).encode() for i in range(count)]
        assert subs.reconnects == 0 and subs.messages == count


async def test_renewals_go_on_while_a_slow_re_registration_runs(make_nodes) -> None:
    """Re-registering after a lapse re-asserts every connection and releases every loop
    the old incarnation held (thousands on a loaded node); the lease of the new
    incarnation must be renewed meanwhile, or it lapses too and the node never recovers."""
    (a,) = await make_nodes(1)  # node_ttl 3 s, heartbeat 0.5 s, margin 0.75 s
    await a.join_conversation("slow-rotation", "c1", {}, "rhea")
    add_connections = a.state.add_connections

    async def slow_add_connections(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(4.0)  # longer than node_ttl
        await add_connections(*args, **kwargs)

    a.state.add_connections = slow_add_connections  # type: ignore[method-assign]
    first = a.inc
    a.membership.lapse("test: event loop fell behind")
    await wait_until(lambda: a.inc != first, timeout=5, what="a new incarnation registered")
    second = a.inc
    await asyncio.sleep(5.0)  # the re-registration finishes in the middle of this
    assert a.inc == second and not a.membership.lapsed
    assert await a.state.redis.get(a.keys.node_lease(a.node_id)) == second.encode()
    assert (await a.state.redis.hget(a.keys.conv_conns("slow-rotation"), "c1")) == second.encode()


async def test_a_start_cut_by_a_lease_lapse_is_retried_not_reported_as_an_eviction(
    make_nodes,
) -> None:
    """A node re-registers while one of its starts waits for admission: the start's claim
    was dropped with the old incarnation, which must not read as 'evicted by the cap'
    (clients told TOO_MANY_CONVERSATIONS, the pending action stranded)."""
    (a,) = await make_nodes(1)
    await a.join_conversation("straddle", "c1", {}, "sam")
    await a.node.loops.stop("straddle", None)  # no loop now; the next action restarts it
    admit = a.state.admit
    slowed: list[bool] = []

    async def slow_first_admit(*args: Any, **kwargs: Any) -> Any:
        if not slowed:
            slowed.append(True)
            await asyncio.sleep(1.0)
        return await admit(*args, **kwargs)

    a.state.admit = slow_first_admit  # type: ignore[method-assign]
    first = a.inc
    eid = await a.send_to_event_stream("c1", {"action": "message", "args": {"content": "hi"}})
    await asyncio.sleep(0.2)  # the restart is waiting in admission
    a.membership.lapse("test: event loop fell behind")
    sink = make_nodes.sinks["node1"]
    await wait_until(
        lambda: [e for e in sink.events["c1"] if e.get("source") == "agent" and e["id"] > eid],
        timeout=10,
        what="the pending action answered after re-registering",
    )
    assert a.inc != first and "straddle" in a.local_loops()
    assert not [e for e in sink.events["c1"] if "TOO_MANY" in str(e.get("args", {}))]


async def test_a_mass_leave_takes_a_bounded_share_of_the_redis_pool_and_defers_nothing(
    make_nodes,
) -> None:
    """Hundreds of clients leaving at once: their removals go a bounded number at a time
    (a quarter of the Redis pool), so none waits out the pool's timeout and the node's
    other work keeps connections; every one is gone from Redis afterwards."""
    # One user's 200 connections: over the default cap of connections per user.
    (a,) = await make_nodes(1, redis_max_connections=8, max_connections_per_user=0)
    for i in range(200):
        await a.join_conversation(f"leave-{i % 2}", f"c{i}", {}, "lars")
    removals = InFlight(a.state, attr="remove_connections")
    await asyncio.gather(*(a.disconnect_from_session(f"c{i}") for i in range(200)))
    assert removals.calls == 200 and removals.peak <= 2, (removals.calls, removals.peak)
    assert a.node.sessions.deferred == []
    assert await a.get_connections() == {}
    for sid in ("leave-0", "leave-1"):
        assert not await a.state.redis.exists(a.keys.conv_conns(sid))


async def test_a_socketio_client_refused_as_busy_gets_the_reason_and_changes_nothing(
    servers: ServerCluster,
) -> None:
    (a,) = await servers.start(1, max_concurrent_joins=1, join_wait=0.3)
    joins = InFlight(a.manager.node.loops, delay=1.0)  # the one join slot stays taken for a second
    token = servers.token("bea")
    first = asyncio.create_task(servers.client("first").connect(a.url, "busy-1", token))
    await wait_until(lambda: joins.now == 1, timeout=10, what="the first join holds the slot")
    why = await servers.client("second").refused(a.url, "busy-2", token)
    assert "busy" in why and "try again" in why, why
    await first
    # Counted by reason for the operators: a storm beyond what the node takes shows here.
    status, text = await servers.request("GET", a, "/metrics")
    assert status == 200
    assert 'coordinator_joins_refused_total{node="n1",reason="busy"} 1\n' in text, text
    assert set((await a.manager.get_connections(user_id="bea")).values()) == {"busy-1"}
    status, _ = await servers.request("GET", a, "/api/conversations/busy-2", user="bea")
    assert status == 404
    # Once the burst is over the same client gets in.
    again = await servers.join(a, "busy-2", "bea")
    assert again.connected


async def test_a_client_that_stops_reading_in_its_replay_holds_a_bounded_buffer(
    make_nodes: Any,
) -> None:
    """A connection catching up whose client stops taking events (the first one replayed
    to it does not return) while the conversation goes on: the node keeps at most
    ``BUFFERED`` of the live events for it, not all of them, and once the client reads
    again it gets every event once, in order (those left out, from the log)."""
    (node,) = await make_nodes(1)
    sink = make_nodes.sinks["node1"]
    await node.join_conversation("busy", "w", {}, "alice")

    async def say(text: str) -> None:
        await node.send_to_event_stream("w", {"action": "message", "args": {"content": text}})

    for i in range(3):
        await say(f"before {i}")
    await wait_until(lambda: len(sink.events["w"]) == 6, what="the first answers")
    gate = stall(sink, "slow")
    joining = asyncio.create_task(node.join_conversation("busy", "slow", {}, "alice"))
    conn = await wait_until(lambda: node.node.delivery.connections.get("slow"))
    for i in range(2 * BUFFERED):
        await say(f"during {i}")
    await wait_until(lambda: len(sink.events["w"]) == 6 + 4 * BUFFERED, what="the answers")
    assert conn.replaying and conn.stale
    assert len(conn.buffer) == BUFFERED, len(conn.buffer)
    gate.set()
    await joining
    everything = list(range(1, 6 + 4 * BUFFERED + 1))
    assert sink.ids("w") == everything
    await wait_until(lambda: sink.ids("slow") == everything, what="the slow client's events")
    await say("after")
    await wait_until(lambda: sink.ids("slow")[-1] == everything[-1] + 2, what="live again")
    assert sink.ids("slow") == list(range(1, everything[-1] + 3))


def _said(text: str) -> dict[str, Any]:
    return {"action": "message", "source": "user", "args": {"content": text}}


async def test_a_gap_filled_within_a_few_loop_steps_is_not_read_from_the_log(
    make_nodes: Any,
) -> None:
    """An event offered one ahead of another (another node's action whose message is
    read after this node's own reply to a later one): the connection gets both, in
    order, from the buffer, without reading the log. A gap a pub/sub reconnect comes
    during is read from the log all the same (messages may have been lost that no gap
    shows)."""
    (node,) = await make_nodes(1)
    sink = make_nodes.sinks["node1"]
    await node.join_conversation("gaps", "x", {}, "alice")
    connections = node.node.delivery.connections
    before = connections.catch_ups
    await connections.offer("gaps", 2, _said("two"))
    await connections.offer("gaps", 1, _said("one"))
    await wait_until(lambda: sink.ids("x") == [1, 2], what="both, in order")
    await asyncio.sleep(0.1)
    assert connections.catch_ups == before, "the log was read"
    await connections.offer("gaps", 4, _said("four"))
    connections.catch_up_all()  # a pub/sub reconnect
    await connections.offer("gaps", 3, _said("three"))
    await wait_until(lambda: connections.catch_ups == before + 1, what="the log read")
    await wait_until(lambda: sink.ids("x") == [1, 2, 3, 4], what="all four, in order")
    assert not connections.get("x").replaying  # type: ignore[union-attr]


async def test_a_replay_reads_the_log_in_pages_bounded_in_bytes(make_nodes: Any) -> None:
    """A client joining with ``latest_event_id`` 0 a conversation whose large events come
    after small ones: each read of its replay holds about ``REPLAY_PAGE_BYTES`` (one
    large event past it at most), the first too. Before, the first page was 32 events
    whatever their size, and a page after small events was sized by them: hundreds of
    events, up to 500 of the largest an agent may emit (1 MiB by default) for one client.
    Every event still arrives once, in order."""
    size = 96 * 1024
    (node,) = await make_nodes(1, max_action_bytes=size + 1024, log_window_bytes=64 * size)
    sink = make_nodes.sinks["node1"]
    await node.join_conversation("big", "writer", {}, "alice")
    for i in range(24):
        text = f"{i:03}" + ("x" * size if i % 8 == 7 or i >= 16 else "")
        await node.send_to_event_stream("writer", {"action": "message", "args": {"content": text}})
    await wait_until(lambda: len(sink.events["writer"]) == 48, what="the answers")
    state, reads = node.state, []
    join_and_read, after_sized = state.join_and_read, state.events_after_sized

    async def counted_join(*args: Any) -> Any:
        last, rows, got, held = await join_and_read(*args)
        reads.append((len(rows), got))
        return last, rows, got, held

    async def counted_after(*args: Any, **kwargs: Any) -> Any:
        rows, got, last = await after_sized(*args, **kwargs)
        reads.append((len(rows), got))
        return rows, got, last

    state.join_and_read = counted_join  # type: ignore[method-assign]
    state.events_after_sized = counted_after  # type: ignore[method-assign]
    await node.join_conversation("big", "reader", {}, "alice", latest_event_id=0)
    assert sink.ids("reader") == list(range(1, 49))
    assert sum(n for n, _ in reads) == 48, reads
    # A read stops at the first event that reaches the bound: two large ones at most.
    assert max(got for _, got in reads) < REPLAY_PAGE_BYTES + 2 * size, reads
    assert reads[0][0] > 8, reads  # small events still come many to a page


async def test_a_join_after_redis_forgot_its_scripts_loads_them_and_replays(
    make_nodes: Any,
) -> None:
    """A join's first read is a script (``scripts.READ``) sent with the registration:
    after Redis lost its script cache (a restart, a failover, SCRIPT FLUSH) the join
    loads the scripts again and replays, instead of failing on NOSCRIPT."""
    (node,) = await make_nodes(1)
    sink = make_nodes.sinks["node1"]
    await node.join_conversation("flushed", "writer", {}, "alice")
    await node.send_to_event_stream("writer", {"action": "message", "args": {"content": "hi"}})
    await wait_until(lambda: len(sink.events["writer"]) == 2, what="the answer")
    await node.state.redis.script_flush()
    await node.join_conversation("flushed", "reader", {}, "alice", latest_event_id=0)
    assert sink.ids("reader") == [1, 2]


async def test_a_replay_reads_what_it_knows_the_size_of_with_xrange_and_the_rest_bounded(
    make_nodes: Any,
) -> None:
    """A replay learns the conversation's largest event with its first read: its later
    pages of events logged before that read are plain XRANGEs (a script's read costs
    Redis about 7 times as much per entry) whose count bounds their bytes; events logged
    after it (here large ones, while the client was not reading) are read by the script,
    bounded in bytes. Every event arrives once, in order."""
    size = 96 * 1024
    (node,) = await make_nodes(1, max_action_bytes=size + 1024, log_window_bytes=64 * size)
    sink = make_nodes.sinks["node1"]
    await node.join_conversation("mixed", "writer", {}, "alice")

    async def say(text: str) -> None:
        await node.send_to_event_stream("writer", {"action": "message", "args": {"content": text}})

    for i in range(300):
        await say(f"small {i}")
    await wait_until(lambda: len(sink.events["writer"]) == 600, what="the answers")
    state, reads, batches = node.state, [], []
    after_sized, commands = state.events_after_sized, state._commands

    async def counted_after(*args: Any, **kwargs: Any) -> Any:
        rows, got, last = await after_sized(*args, **kwargs)
        reads.append((len(rows), got))
        return rows, got, last

    async def recorded(batch: Any, **kwargs: Any) -> Any:
        batches.append([command[0] for command in batch])
        return await commands(batch, **kwargs)

    state.events_after_sized = counted_after  # type: ignore[method-assign]
    state._commands = recorded  # type: ignore[method-assign]
    gate = stall(sink, "reader")
    joining = asyncio.create_task(
        node.join_conversation("mixed", "reader", {}, "alice", latest_event_id=0)
    )
    await wait_until(lambda: node.node.delivery.connections.get("reader"))
    for i in range(6):
        await say(f"large {i} " + "x" * size)
    await wait_until(lambda: len(sink.events["writer"]) == 612, what="the large answers")
    gate.set()
    await joining
    await wait_until(lambda: len(sink.ids("reader")) == 612, what="the replay")
    assert sink.ids("reader") == list(range(1, 613))
    assert any(b == ["HMGET", "XRANGE"] for b in batches), batches  # the plain read
    assert max(got for _, got in reads) < REPLAY_PAGE_BYTES + 2 * size, reads


async def test_the_live_events_kept_for_a_replaying_client_are_bounded_in_bytes(
    make_nodes: Any,
) -> None:
    """While a client's replay waits for it, the live events kept for after it are at
    most ``BUFFERED_BYTES`` (packed), not ``BUFFERED`` events of any size (64 of an
    agent's 1 MiB events); the rest is read from the log, and every event arrives once,
    in order."""
    size = 300 * 1024
    (node,) = await make_nodes(1, max_action_bytes=size + 1024, log_window_bytes=64 * size)
    sink = make_nodes.sinks["node1"]
    await node.join_conversation("heavy", "w", {}, "alice")

    async def say(text: str) -> None:
        await node.send_to_event_stream("w", {"action": "message", "args": {"content": text}})

    await say("before")
    await wait_until(lambda: len(sink.events["w"]) == 2, what="the first answer")
    gate = stall(sink, "slow")
    joining = asyncio.create_task(node.join_conversation("heavy", "slow", {}, "alice"))
    conn = await wait_until(lambda: node.node.delivery.connections.get("slow"))
    for i in range(6):
        await say(f"{i}" + "x" * size)
    await wait_until(lambda: len(sink.events["w"]) == 14, what="the answers")
    assert conn.replaying and conn.stale
    assert 0 < conn.held <= BUFFERED_BYTES and len(conn.buffer) <= 3, (conn.held, conn.buffer)
    gate.set()
    await joining
    await wait_until(lambda: sink.ids("slow") == list(range(1, 15)), what="every event")
