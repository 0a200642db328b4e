"""Chaos tests: real node processes, a private AOF Redis, a TCP proxy per node, clients
acting throughout, one fault per scenario, then every invariant checked.

Invariants (see tests/chaos/checks.py): (a) no acknowledged action lost, (b) none answered
or logged twice, (c) every client's event ids 1..N after its reconnects, and a fresh
replay equal to the log, (d) never one conversation's loop on two nodes in one observer
round, (e) never more loops per user than the cap; also in-order replies and fencing epochs
that never go back. Figures per scenario go to bench/results/chaos.json and a table.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from coordinator.codec import NODE_LOST
from tests.chaos.cluster import READY_WITHIN, now
from tests.chaos.scenario import Scenario

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(150)]

VICTIM = 0
AFTER = 2.0  # seconds of load once the cluster recovered
PAUSE = 5.0  # SIGSTOP: past the 3 s lease
CUT = 5.0  # link to Redis cut
REDIS_DOWN = 1.0  # Redis killed, then started again after this
DETECT_BOUND = 10.0  # design: a lost node is detected in under 10 s by default (6 s TTL)


def assert_moved(s: Scenario) -> None:
    """The victim's clients reconnected to live nodes (and replayed what they missed)."""
    stranded = [c.name for c in s.workload.clients if c.home == VICTIM and c.node == VICTIM]
    assert not stranded, f"clients still on the stopped node: {stranded}"


async def test_kill_9_of_the_node_owning_busy_conversations(tmp_path: Path) -> None:
    async with Scenario("kill -9", tmp_path) as s:
        await s.fault(VICTIM)
        s.cluster.kill(VICTIM)
        await s.wait_served()
        await asyncio.sleep(AFTER)  # load runs on
        result = await s.finish()
    assert result.passed, "\n".join(result.problems)
    assert_moved(s)
    assert result.detect_s is not None and result.detect_s < DETECT_BOUND, result.detect_s


async def test_sigstop_past_the_lease_then_sigcont(tmp_path: Path) -> None:
    async with Scenario("SIGSTOP 5 s", tmp_path) as s:
        await s.fault(VICTIM)
        s.cluster.pause(VICTIM)
        await asyncio.sleep(PAUSE)  # the fault lasts this long
        s.cluster.resume(VICTIM)
        back = await s.wait_for(lambda: s.cluster.healthy(VICTIM), 30, "node back and healthy")
        s.details["healthy_again_s"] = round(back, 3)
        await s.wait_served()
        await asyncio.sleep(AFTER)
        result = await s.finish()
    assert result.passed, "\n".join(result.problems)


async def test_cut_one_nodes_link_to_redis(tmp_path: Path) -> None:
    async with Scenario("link cut 5 s", tmp_path) as s:
        await s.fault(VICTIM)
        await s.cluster.cut(VICTIM, blackhole=True)
        await asyncio.sleep(CUT)  # the partition lasts this long
        await s.cluster.restore(VICTIM)
        back = await s.wait_for(lambda: s.cluster.healthy(VICTIM), 30, "node back and healthy")
        s.details["healthy_again_s"] = round(back, 3)
        await s.wait_served()
        await asyncio.sleep(AFTER)
        result = await s.finish()
    assert result.passed, "\n".join(result.problems)


async def test_redis_restart_with_aof(tmp_path: Path) -> None:
    async with Scenario("Redis restart", tmp_path) as s:
        await s.fault(None)
        await s.cluster.stop_redis()
        await asyncio.sleep(REDIS_DOWN)  # the outage lasts this long
        await s.cluster.start_redis()
        s.details["outage_s"] = round(s.elapsed(), 3)
        detect = await s.wait_for(s.cluster.all_healthy, 30, "every node healthy again")
        await s.wait_served()
        await asyncio.sleep(AFTER)
        result = await s.finish(detect_s=detect)
    assert result.passed, "\n".join(result.problems)


async def test_sigterm_drain_under_load(tmp_path: Path) -> None:
    async with Scenario("SIGTERM drain", tmp_path) as s:
        await s.fault(VICTIM)
        s.cluster.terminate(VICTIM)
        code = await s.cluster.wait_exit(VICTIM, 40)
        s.details["exit_code"] = code
        s.details["exited_s"] = round(s.elapsed(), 3)
        await s.wait_served()
        await asyncio.sleep(AFTER)
        result = await s.finish()
    assert result.passed, "\n".join(result.problems)
    assert_moved(s)
    assert code == 0, f"the drained node exited with {code}"


async def test_rolling_restart_of_every_node_under_load(tmp_path: Path) -> None:
    """A deploy: each node in turn drained with SIGTERM and, once it exited, started
    again with the same id, ready before the next one goes. Clients move off each node
    as it drains (some more than once); every conversation answers after the last node
    is back, nothing acknowledged is lost or doubled, and no client is told of a node
    lost (before, a start under way at a drain was reaped as lost)."""
    async with Scenario("rolling restart", tmp_path) as s:
        await s.fault(None)
        for i in range(s.cluster.size):
            s.cluster.terminate(i)
            code = await s.cluster.wait_exit(i, 40)
            assert code == 0, f"node {i} exited with {code} when drained"
            s.cluster.nodes[i].start()
            await s.cluster.nodes[i].async_wait_ready(READY_WITHIN)
            s.details[f"node_{i}_back_s"] = round(s.elapsed(), 3)
        deployed = now()
        await s.wait_served(since=deployed)
        s.details["served_after_deploy_s"] = round(now() - deployed, 3)
        await asyncio.sleep(AFTER)
        result = await s.finish()
    assert result.passed, "\n".join(result.problems)
    # A deploy is no node loss: every loop was handed off, none left for a reaper.
    assert result.details["status_events"][NODE_LOST] == 0, result.details["status_events"]
