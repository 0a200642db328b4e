"""Idle cleanup: who gets closed, who is kept, and what a sweep costs in Redis commands."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from coordinator import node as node_module
from coordinator.actionqueue import ActionQueue
from coordinator.errors import Fenced
from coordinator.memory import LoopMemory
from coordinator.runner import LoopRunner
from coordinator.statenotes import StateNotes
from tests.conftest import NodeFactory
from tests.helpers import wait_until
from tests.test_archive import send
from workers.echo import EchoAgent
from workers.protocol import AgentContext, AgentState, EmitFn

QUIET = dict(  # no background Redis traffic while commands are counted
    node_ttl=120.0,
    heartbeat_interval=30.0,
    lease_margin=5.0,
    idle_flush_interval=600.0,
    cleanup_interval=3600.0,
    store_sweep_interval=3600.0,  # its one read could land in the measured window
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


async def test_sweep_cost_is_bounded_by_expired_not_total(
    make_nodes, redis_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The revoked tokens' read, once a second, landed in the measured window (CI: one
    # ZRANGEBYSCORE more with 2,000 live loops, whose sweep takes longer).
    monkeypatch.setattr(node_module, "REVOCATIONS_REFRESH", 3600.0)
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


@pytest.mark.parametrize("isolation", ["none", "process"])
async def test_a_stopped_loop_leaves_no_reference_cycle(
    make_nodes: NodeFactory, isolation: str
) -> None:
    """A loop that stops is freed as it stops, not by a full collection of the cyclic GC
    (which a node runs rarely: ``cli.FULL_COLLECTION_AFTER``): its runner held its
    agent, which kept the runner's emit; its memory's ownership check held the runner,
    which held the memory through its agents' contexts; its state notes read the agent
    through the runner. Each made every stopped loop about 28 objects of cyclic garbage
    (its agent, memory, action queue with them) until the next full collection."""
    (a,) = await make_nodes(1, agent_isolation=isolation, agent_state_events=True)
    sink = make_nodes.sinks["node1"]

    async def one_loop(sid: str) -> None:
        await a.join_conversation(sid, f"c-{sid}", {}, "bob")
        await send(a, f"c-{sid}", "hi")
        await wait_until(lambda: len(sink.events[f"c-{sid}"]) >= 3, what=f"{sid} answered")
        await a.disconnect_from_session(f"c-{sid}")
        assert await a.close_session(sid, "bob")

    await one_loop("warm")  # what a first loop makes once (a worker's channel, scripts)
    await asyncio.sleep(0.5)
    gc.collect()
    gc.disable()
    try:
        for i in range(3):
            await one_loop(f"loop-{i}")
        await asyncio.sleep(1)  # the mover's round, the stops' tasks
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kinds = (LoopRunner, LoopMemory, ActionQueue, StateNotes, AgentContext)
        cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, kinds)]
        assert cyclic == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


class KeepsItsEmit(EchoAgent):
    """An echo agent whose emit outlives it (as an agent's forgotten background task's)."""

    kept: list[EmitFn] = []

    async def start(self, emit: EmitFn) -> None:
        KeepsItsEmit.kept.append(emit)
        await super().start(emit)


async def test_an_emit_kept_past_its_loop_is_refused(make_nodes: NodeFactory) -> None:
    """The emit an agent keeps no longer keeps its loop alive; called once the loop is
    gone, it is refused as any write after its loop stopped (Fenced) and writes nothing."""
    KeepsItsEmit.kept.clear()
    (a,) = await make_nodes(1, agent_isolation="none", agent="tests.test_cleanup:KeepsItsEmit")
    await a.join_conversation("kept", "c1", {}, "bob")
    await send(a, "c1", "hi")
    await wait_until(lambda: len(make_nodes.sinks["node1"].events["c1"]) >= 2, what="answer")
    await a.disconnect_from_session("c1")
    assert await a.close_session("kept", "bob")
    before = await a.conversation("kept")
    gc.collect()
    with pytest.raises(Fenced):
        await KeepsItsEmit.kept[0]({"action": "message", "args": {"content": "late"}})
    assert await a.conversation("kept") == before


async def test_a_flush_waits_for_one_already_writing(make_nodes, redis_client) -> None:
    # A flush returns once what was touched before it is in Redis, even when the
    # periodic flush took those marks and its write is still on the way.
    (node,) = await make_nodes(1, max_concurrent_conversations=5, **QUIET)
    await node.maybe_start_agent_loop("touched", {}, "carol")
    key = node.keys.user_claims("carol")
    before = await redis_client.zscore(key, "touched")
    node.runner("touched").touch(time.time() + 1000)
    await redis_client.execute_command("CLIENT", "PAUSE", 500, "WRITE")
    periodic = asyncio.create_task(node.flush_activity())
    await asyncio.sleep(0.05)  # it took the marks; its write waits out the pause
    await node.flush_activity()
    assert await redis_client.zscore(key, "touched") > before
    await periodic
