"""Idle cleanup: who gets closed, who is kept, and what a sweep costs in Redis commands."""

from __future__ import annotations

import asyncio
import time

from tests.helpers import wait_until
from workers.protocol import AgentState

QUIET = dict(  # no background Redis traffic while commands are counted
    node_ttl=120.0,
    heartbeat_interval=30.0,
    lease_margin=5.0,
    idle_flush_interval=600.0,
    cleanup_interval=3600.0,
)


async def test_idle_loops_are_closed_by_their_owner_unless_connected_or_running(
    make_nodes,
) -> None:
    a, b = await make_nodes(
        2,
        close_delay=0.5,
        cleanup_interval=0.2,
        agent="workers.scripted:ScriptedAgent",
        max_concurrent_conversations=10,
    )
    await a.maybe_start_agent_loop("idle-x", {"think_time": 0}, "erin")
    await a.maybe_start_agent_loop("idle-y", {"think_time": 0}, "erin")
    await b.join_conversation("idle-y", "watcher", {}, "erin")
    await a.maybe_start_agent_loop(
        "busy-z",
        {"think_time": 2.5},
        "erin",
        initial_user_msg={"action": "message", "args": {"content": "work"}},
    )
    await wait_until(lambda: a.runner("busy-z").agent_state == AgentState.RUNNING, what="z running")
    await wait_until(lambda: "idle-x" not in a.local_loops(), what="idle loop closed")
    await wait_until(lambda: _not(b.is_agent_loop_running("idle-x")), what="released in Redis")
    # Give the sweeper several more rounds: the connected and the running loop stay.
    sweeps_after = time.monotonic() + 1.0
    while time.monotonic() < sweeps_after:
        assert {"idle-y", "busy-z"} <= a.local_loops()
        await asyncio.sleep(0.05)
    # Once z finished its work and was idle for close_delay, it is closed too.
    await wait_until(lambda: "busy-z" not in a.local_loops(), timeout=8, what="z closed")
    assert "idle-y" in a.local_loops()
    await b.disconnect_from_session("watcher")
    await wait_until(lambda: "idle-y" not in a.local_loops(), what="y closed once unwatched")


async def _not(aw) -> bool:
    return not await aw


async def _commands(redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def _sweep_cost(make_nodes, redis_client, live: int, expired: int) -> tuple[int, list[str]]:
    (node,) = await make_nodes(1, close_delay=60.0, max_concurrent_conversations=live, **QUIET)
    sids = [f"live-{i}" for i in range(live)]
    for start in range(0, live, 250):
        await asyncio.gather(
            *(
                node.maybe_start_agent_loop(s, {}, f"user{i % 50}")
                for i, s in enumerate(sids[start : start + 250], start)
            )
        )
    assert len(node.local_loops()) == live
    for sid in sids[:expired]:  # these were last active an hour ago
        node.runner(sid).touch(node.runner(sid).last_active - 3600)
    await node.flush_activity()
    before = await _commands(redis_client)
    closed = await node.sweep_idle()
    after = await _commands(redis_client)
    # Minus the INFO we sent, and the handshakes (HELLO, PING) of pool connections opened
    # for the sweep's concurrent closes: a pool keeps them, they are no cost per sweep.
    setup = sum(after.get(c, 0) - before.get(c, 0) for c in ("hello", "ping"))
    calls = sum(after.values()) - sum(before.values()) - 1 - setup
    print({k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)})
    return calls, closed


async def test_sweep_cost_is_bounded_by_expired_not_total(make_nodes, redis_client) -> None:
    small, closed_small = await _sweep_cost(make_nodes, redis_client, live=100, expired=10)
    await make_nodes.aclose()
    await redis_client.flushdb()
    large, closed_large = await _sweep_cost(make_nodes, redis_client, live=2_000, expired=10)
    assert sorted(closed_large) == sorted(f"live-{i}" for i in range(10))
    assert sorted(closed_small) == sorted(closed_large)
    # Counted by Redis itself (INFO commandstats, commands run inside scripts included):
    # one range query, one pipelined count per candidate and a fixed number of commands
    # per closed loop (11 to stop it, 7 more to let its Redis state expire after
    # --redis-retention) -- nothing that grows with the 1,990 others (20 times as many).
    assert large <= 3 + 19 * 10, large
    assert large == small, (small, large)
    print(f"sweep, 10 expired: {small} commands with 100 live, {large} with 2,000 live")
