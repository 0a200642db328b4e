"""Fencing: a node whose lease was taken over cannot write and stops its loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from coordinator import Fenced, codec
from coordinator.recovery import reap_incarnation, reaper_lock
from coordinator.state import Lease, RedisState
from tests.helpers import wait_until


async def _stop_heartbeats(node) -> None:
    await node.node.tasks.cancel(node.node.tasks.named("heartbeat"))


async def _epochs(node, sid: str) -> list[tuple[int, int | None]]:
    rows = await node.state.redis.xrange(node.keys.events(sid))
    out = []
    for entry_id, fields in rows:
        epoch = fields.get(b"e")
        out.append((int(entry_id.decode().split("-")[0]), int(epoch) if epoch else None))
    return out


async def test_node_whose_renewals_stop_fences_itself_before_takeover(make_nodes) -> None:
    a, b = await make_nodes(2)
    await a.join_conversation("fence-1", "ca", {}, "frank")
    await b.join_conversation("fence-1", "cb", {}, "frank")
    runner = a.runner("fence-1")
    both_seen = False
    stop = asyncio.Event()

    async def observe() -> None:
        nonlocal both_seen
        while not stop.is_set():
            if "fence-1" in a.local_loops() and "fence-1" in b.local_loops():
                both_seen = True
            await asyncio.sleep(0.005)

    observer = asyncio.create_task(observe())
    await _stop_heartbeats(a)
    # Node a stops its loop by its own clock, before its lease can expire in Redis ...
    await wait_until(lambda: "fence-1" not in a.local_loops(), timeout=5, what="a fenced")
    assert await a.state.redis.exists(a.keys.node_lease("node1"))
    # ... and the next action, accepted on b, makes b the successor once it expired.
    await b.send_to_event_stream("cb", {"action": "message", "args": {"content": "after"}})
    await wait_until(lambda: "fence-1" in b.local_loops(), timeout=10, what="b took over")
    stop.set()
    await observer
    assert not both_seen
    with pytest.raises(Fenced):
        await runner.emit({"action": "message", "args": {"content": "late"}})
    sink = make_nodes.sinks["node2"]
    await wait_until(
        lambda: any(
            e.get("source") == "agent" and e["args"]["content"] == "after"
            for e in sink.events["cb"]
        ),
        what="successor answered the action",
    )
    meta = await b.conversation("fence-1")
    assert meta["epoch"] == "2" and meta["owner"] == "node2"


async def test_a_former_owner_that_believes_it_still_owns_cannot_append(make_nodes) -> None:
    a, b = await make_nodes(2)
    await a.join_conversation("fence-2", "ca", {}, "gina")
    await b.join_conversation("fence-2", "cb", {}, "gina")
    old = a.runner("fence-2")
    # b takes over below by itself. Its reaper would also release the conversation and
    # publish NODE_LOST, which a (its clock patched to trust its lease) would answer by
    # restarting the loop: a race this test is not about.
    await b.node.tasks.cancel(b.node.tasks.named("housekeeping"))
    # Simulate a paused process: no renewals, no housekeeping (whose refresh would see
    # its lease gone), and its own clock never noticed.
    await _stop_heartbeats(a)
    await a.node.tasks.cancel(a.node.tasks.named("housekeeping"))
    a.membership.stop()
    a.membership.lease_valid = lambda: True  # type: ignore[method-assign]
    a.membership.check = lambda: True  # type: ignore[method-assign]
    old._lease_valid = lambda: True
    await wait_until(lambda: _gone(b, "node1"), timeout=10, what="a's lease expired in Redis")
    await b.maybe_start_agent_loop("fence-2", {}, "gina")
    assert "fence-2" in b.local_loops() and "fence-2" in a.local_loops()  # a still believes
    takeover_at = int((await b.conversation("fence-2"))["seq"])

    # An action sent through the old owner reaches both loops (the old owner applies it
    # locally, the new one hears it on the channel); the old owner's reply is rejected by
    # the epoch and it stops. The old owner's loop is idle and has seen every event, so
    # it gets the action speculatively: its commit carries the accept's token, and the
    # epoch still refuses it.
    speculated = a.metrics.speculative_dispatches
    await a.send_to_event_stream("ca", {"action": "message", "args": {"content": "x"}})
    await wait_until(lambda: "fence-2" not in a.local_loops(), what="old owner stopped")
    assert a.metrics.speculative_dispatches == speculated + 1
    assert old.fenced
    with pytest.raises(Fenced):
        await old.emit({"action": "message", "args": {"content": "late"}})
    sink = make_nodes.sinks["node2"]
    await wait_until(
        lambda: [e for e in sink.events["cb"] if e.get("source") == "agent"],
        what="one reply",
    )
    epochs = await _epochs(b, "fence-2")
    assert all(epoch in (None, 2) for n, epoch in epochs if n > takeover_at), epochs
    replies = [e for e in sink.events["cb"] if e.get("source") == "agent"]
    assert len(replies) == 1


async def _gone(node, node_id: str) -> bool:
    return not await node.state.redis.exists(node.keys.node_lease(node_id))


async def test_actions_accepted_while_the_lease_lapsed_are_answered_once_back(make_nodes) -> None:
    a, b = await make_nodes(2)
    await a.join_conversation("lapsed", "ca", {}, "lena")
    await _stop_heartbeats(a)
    await wait_until(lambda: _gone(b, "node1"), timeout=10, what="a's lease expired")
    await wait_until(lambda: _unowned(b, "lapsed"), timeout=10, what="b's reaper released it")
    # a still holds the client; it accepts the action but may not start loops now.
    eid = await a.send_to_event_stream("ca", {"action": "message", "args": {"content": "x"}})
    a.node.tasks.spawn(a.membership.tick_loop(), "heartbeat")  # back in touch with Redis
    sink = make_nodes.sinks["node1"]
    await wait_until(
        lambda: [e for e in sink.events["ca"] if e.get("source") == "agent"],
        timeout=10,
        what="the action answered after a re-registered",
    )
    replies = [e for e in sink.events["ca"] if e.get("source") == "agent"]
    assert len(replies) == 1 and eid < replies[0]["id"]


async def test_a_start_that_fails_after_taking_ownership_does_not_strand_actions(
    make_nodes,
) -> None:
    (a,) = await make_nodes(1)
    await a.join_conversation("flaky", "ca", {}, "max")
    await a.node.loops.stop("flaky", None)  # no loop; the connection stays
    real_admit = a.state.admit
    failures = 0

    async def failing_admit(*args, **kwargs):
        nonlocal failures
        if failures < 1:
            failures += 1
            raise ConnectionError("Redis went away")
        return await real_admit(*args, **kwargs)

    a.state.admit = failing_admit  # type: ignore[method-assign]
    await a.send_to_event_stream("ca", {"action": "message", "args": {"content": "y"}})
    sink = make_nodes.sinks["node1"]
    await wait_until(
        lambda: [e for e in sink.events["ca"] if e.get("source") == "agent"],
        timeout=10,
        what="the action answered after the failed start",
    )
    assert failures == 1 and "flaky" in a.local_loops()


async def _unowned(node, sid: str) -> bool:
    return (await node.conversation(sid)).get("inc") == ""


async def test_a_reaper_that_saw_the_old_incarnation_dead_keeps_re_registered_connections(
    make_nodes,
) -> None:
    """A reaper reads a dead incarnation's connections, then deletes them. If the node
    (its lease lapsed) re-registered those connections in between, they must survive:
    re-registration waits for the reaper (the cluster's reaper lock)."""
    (a,) = await make_nodes(1)
    await a.join_conversation("reaped-late", "ca", {}, "rita")
    old = a.inc
    reaper_redis = aioredis.Redis.from_url(make_nodes.url)
    hgetall = reaper_redis.hgetall
    read = asyncio.Event()

    async def slow_hgetall(name: str) -> Any:
        rows = await hgetall(name)
        if name == a.keys.node_conns(old):
            read.set()
            await asyncio.sleep(1.5)  # a slow reaper: it read them, deletes them later
        return rows

    reaper_redis.hgetall = slow_hgetall  # type: ignore[method-assign]
    reaper_state = RedisState(reaper_redis, a.keys)
    await reaper_state.load_scripts()

    async def reap() -> None:  # what reap_dead_nodes does for the old incarnation
        async with reaper_lock(reaper_state, "reaper", 30_000, wait=0) as held:
            assert held
            await reap_incarnation(
                reaper_state, old, keep_connections=False, floor=lambda _: 0, retention_ms=0
            )

    reaper = asyncio.create_task(reap())
    try:
        async with asyncio.timeout(10):
            await read.wait()  # the reaper holds the lock and has read the connections
        a.membership.lapse("test: event loop fell behind")
        await reaper
    finally:
        await reaper_redis.aclose()

    async def registered() -> bool:
        return await a.state.redis.hget(a.keys.conv_conns("reaped-late"), "ca") == a.inc.encode()

    await wait_until(registered, timeout=10, what="the connection registered again")
    assert a.inc != old
    assert await a.get_connections(user_id="rita") == {"ca": "reaped-late"}
    assert await a.get_connections(filter_to_sids={"reaped-late"}) == {"ca": "reaped-late"}
    assert await a.get_connections() == {"ca": "reaped-late"}


async def test_an_owner_whose_lease_expired_is_seen_dead_without_waiting_for_a_refresh(
    make_nodes,
) -> None:
    """A node knows another is alive until that node's lease expiry as it last read it,
    then reads again: an action for a dead owner's conversation restarts it as soon as
    the lease is gone, even if no heartbeat refreshed the node's view since."""
    a, b = await make_nodes(2)
    await a.join_conversation("expiring", "ca", {}, "erin")
    await b.join_conversation("expiring", "cb", {}, "erin")
    assert "expiring" in a.local_loops()
    assert await b.directory.alive(a.inc)
    # From now on b refreshes nothing and reaps nothing ...
    await b.node.tasks.cancel(b.node.tasks.named("housekeeping"))
    # ... and a goes silent like a killed process.
    await a.node.halt()
    await wait_until(lambda: _gone(b, "node1"), timeout=10, what="a's lease expired")
    await b.send_to_event_stream("cb", {"action": "message", "args": {"content": "z"}})
    await wait_until(lambda: "expiring" in b.local_loops(), timeout=10, what="b restarted it")
    sink = make_nodes.sinks["node2"]
    await wait_until(
        lambda: [e for e in sink.events["cb"] if e.get("source") == "agent"],
        what="the action answered",
    )


async def test_a_dead_node_is_reaped_at_the_first_heartbeat_that_sees_it_dead(make_nodes) -> None:
    """Reaping waits for no round of its own (every ``node_ttl / 2``): the heartbeat whose
    refresh finds a registered node without its lease reaps it. With a 60 s lease and
    heartbeats of 0.25 s, that round comes every 120 heartbeats."""
    a, b = await make_nodes(2, node_ttl=60.0, heartbeat_interval=0.25)
    await a.join_conversation("seen-dead", "ca", {}, "dora")
    await b.join_conversation("seen-dead", "cb", {}, "dora")
    await a.node.halt()
    await a.state.redis.delete(a.keys.node_lease("node1"))  # its lease expired
    # Released: unowned in Redis, and b's client told (then b restarts it).
    await wait_until(
        lambda: any(
            e.get("extras", {}).get("reason") == "STATUS$NODE_LOST"
            for e in make_nodes.sinks["node2"].events["cb"]
        ),
        timeout=3,
        what="the dead node reaped",
    )


async def test_a_node_that_finds_its_own_lease_gone_stops_before_taking_over(make_nodes) -> None:
    """After a failover to a replica that lagged, Redis may hold no node's lease while
    every node's clock still counts its own valid (renewals stuck on the old master, as
    in CI). The heartbeat whose refresh finds the node's own lease gone lapses it and
    registers it afresh, before it takes a conversation from a node just as dead: the
    two nodes' clients acting in turn restart its loop once or twice, not once per
    action (11 times in these 2 s before; 56 times in one CI run)."""
    a, b = await make_nodes(2, node_ttl=60.0, heartbeat_interval=0.25)
    await a.join_conversation("gone", "ca", {}, "erin")
    await b.join_conversation("gone", "cb", {}, "erin")
    old = (a.membership.inc, b.membership.inc)

    def stuck(*_: object) -> bool:
        raise TimeoutError("the old master does not answer")

    for node in (a, b):
        node.membership._keeper._renewer.renew = stuck  # type: ignore[union-attr]
    await a.state.redis.delete(a.keys.node_lease("node1"), a.keys.node_lease("node2"))
    acked = 0
    for i in range(40):  # 2 s, each client in turn
        node, cid = (a, "ca") if i % 2 == 0 else (b, "cb")
        action = {"action": "message", "args": {"content": f"m{i}"}}
        try:
            await node.send_to_event_stream(cid, action)
            acked += 1
        except Exception:  # refused while its node registers again
            pass
        await asyncio.sleep(0.05)
    assert a.membership.inc != old[0] and b.membership.inc != old[1], "never registered again"
    epoch = int(await a.state.redis.hget(a.keys.conv("gone"), "epoch"))
    assert epoch <= 4, f"the loop was taken over {epoch - 1} times"
    assert acked >= 30


async def test_a_failed_start_left_owned_is_given_up_after_the_start_unwinds(make_nodes) -> None:
    """A start that failed while Redis was down leaves its ownership to be given up at a
    later heartbeat. A heartbeat that finds a start of that conversation still under way
    on the node (the failed one, unwinding, or a later one) keeps the lease for the next
    heartbeat. Dropped, as it was, the conversation stayed owned by this live node, which
    ran no loop for it, and no node would start it again (seen in the chaos suite's Redis
    restart: an acknowledged action never answered)."""
    (a,) = await make_nodes(1)
    await a.join_conversation("unwound", "c", {}, "ivy")
    await a.node.loops.stop("unwound", None)  # no loop; the connection stays
    own = await a.state.acquire("unwound", "node1", a.membership.inc, "ivy", create=False)
    assert own.status == "ok"  # this node owns it, running no loop
    owners = a.node.loops.owners
    owners.abandon(Lease("unwound", "ivy", a.membership.inc, own.epoch))
    a.node.loops.starting["unwound"] = asyncio.get_running_loop().create_future()
    try:
        assert await owners.retry_abandoned() == []  # the start is still unwinding
    finally:
        del a.node.loops.starting["unwound"]
    assert (await a.conversation("unwound"))["inc"] == a.membership.inc
    assert await owners.retry_abandoned() == [("unwound", "ivy")]
    assert (await a.conversation("unwound"))["inc"] == "", "still owned, by no loop"


async def test_a_loop_fenced_while_stopping_gives_its_channel_back_once(make_nodes) -> None:
    """Stopping a loop whose ownership was taken meanwhile fences it on the way (its
    closing notice is refused); the channel reference it held is given back once, so a
    connection still watching the conversation stays subscribed to its events."""
    (a,) = await make_nodes(1)
    await a.join_conversation("fence-stop", "ca", {}, "frank")
    runner = a.runner("fence-stop")
    assert runner is not None
    channel = a.keys.conv_channel("fence-stop")
    # Another incarnation takes the conversation over (as a node that found this one
    # dead would), bumping the epoch: this loop's next write is refused.
    await a.state.acquire(
        "fence-stop", "other", "other/x", "frank", create=False, dead_inc=runner.lease.inc
    )
    assert await a.node.loops.stop("fence-stop", codec.closed_event())
    assert runner.fenced
    await asyncio.sleep(0.2)  # the fenced loop's tidying up (a task) has run
    assert channel in a.node.subscriptions.channels  # the connection's reference


async def test_a_second_node_with_a_live_nodes_id_is_refused_and_leaves_nothing(
    redis_url: str,
) -> None:
    """Two nodes started with one id: the second waits out the first's lease, then is
    refused with a CoordinatorError that says what to do (it was a RuntimeError); and
    once the first stops too, no connection of either is left open in Redis (the shared
    pool's stayed open, each failed start's and each stopped node's, until the garbage
    collector came)."""
    from coordinator import ConversationManager
    from coordinator.errors import NodeIdInUse
    from tests.helpers import fast_config

    def named(name: str) -> ConversationManager:  # its connections carry the name
        return ConversationManager(fast_config(f"{redis_url}?client_name={name}", "dup"))

    first, twin = named("first"), named("twin")
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await first.start()
        with pytest.raises(NodeIdInUse, match="node id 'dup' is in use by dup/"):
            await twin.start()
        assert await first.is_agent_loop_running("nothing") is False  # unharmed
        names = {c["name"] for c in await redis.client_list()}
        assert "first" in names and "twin" not in names, names
        await first.aclose()
        names = {c["name"] for c in await redis.client_list()}
        assert not names & {"first", "twin"}, names
    finally:
        await first.aclose()
        await redis.aclose()
