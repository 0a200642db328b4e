"""Guarantee 13 with real ``coordinator serve`` processes: a bad agent behind a served
node, socket.io clients, ``/metrics`` and the node's registration in Redis."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from coordinator.keys import KeySchema
from tests.helpers import wait_until
from tests.processes import NodeProcess, ProcessCluster
from tests.server_fixtures import SioClient

ARGS = [
    *("--agent-workers", "2", "--agent-stall-timeout", "1"),
    *("--node-ttl", "3", "--heartbeat-interval", "0.5", "--max-concurrent-conversations", "5"),
]


def _answers(client: SioClient) -> list[str]:
    return [e["args"]["content"] for e in client.events if e["source"] == "agent"]


def _errors(client: SioClient) -> list[dict[str, Any]]:
    return [e for e in client.events if e.get("observation") == "error"]


async def _round_trip(client: SioClient, text: str) -> None:
    await client.say(text)
    await client.wait_for(lambda: text in _answers(client), f"{text} answered", within=5)


async def _metrics(node: NodeProcess) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"{node.url}/metrics") as resp:
        text = await resp.text()
    return {
        s.name + "".join(f"[{v}]" for k, v in s.labels.items() if k != "node"): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, waiting for its reaper, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _workers(node: NodeProcess) -> list[int]:
    """The node's child processes (its agent workers)."""
    path = Path(f"/proc/{node.pid}/task/{node.pid}/children")
    return [int(p) for p in path.read_text().split()]


async def test_a_served_node_keeps_its_lease_and_clients_while_an_agent_blocks(
    redis_url: str, tmp_path: Path
) -> None:
    keys = KeySchema("coord")
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    cluster = ProcessCluster(redis_url, tmp_path, agent="tests.agents:BadAgent", extra_args=ARGS)
    bad, good = SioClient("bad"), SioClient("good")
    try:
        (node,) = await cluster.async_start(1)
        token = cluster.token("alice")
        await bad.connect(node.url, "bad", token)
        await good.connect(node.url, "good", token)
        incarnation = await redis.hget(keys.registry(), "node1")

        blocked = await bad.say("block 8")
        await bad.say("queued")
        rounds = 0
        while not _errors(bad):
            await _round_trip(good, f"good-{rounds}")
            rounds += 1
        print(f"{rounds} round trips of the other conversation while the agent blocked")
        assert rounds >= 5, "the other conversation was answered while the agent blocked"
        assert _errors(bad)[0]["extras"] == {"action_id": blocked, "reason": "stalled"}
        await bad.wait_for(lambda: "queued" in _answers(bad), "queued answered")
        await _round_trip(bad, "after")

        got = await _metrics(node)
        assert got["coordinator_agent_worker_stalls_total"] == 2
        assert got["coordinator_agent_poison_actions_total"] == 1
        assert got["coordinator_lease_valid"] == 1
        # No lapse: the node never had to register again.
        assert await redis.hget(keys.registry(), "node1") == incarnation
        assert good.connected and bad.connected
    finally:
        await bad.close()
        await good.close()
        await cluster.async_stop()
        await redis.aclose()


async def test_a_worker_killed_from_outside_is_replaced_and_its_loops_go_on(
    redis_url: str, tmp_path: Path
) -> None:
    cluster = ProcessCluster(redis_url, tmp_path, extra_args=ARGS)
    clients = [SioClient(f"c{i}") for i in range(4)]
    try:
        (node,) = await cluster.async_start(1)
        token = cluster.token("alice")
        for i, client in enumerate(clients):
            await client.connect(node.url, f"conv-{i}", token)
            await _round_trip(client, "before")
        workers = _workers(node)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)

        async def replaced() -> bool:
            return (await _metrics(node))["coordinator_agent_worker_restarts_total"] == 1

        await wait_until(replaced, what="a fresh worker in its place")
        for client in clients:
            await _round_trip(client, "after")
            assert _errors(client) == []
        assert len(_workers(node)) == 2
        assert (await _metrics(node))["coordinator_agent_workers"] == 2
    finally:
        for client in clients:
            await client.close()
        await cluster.async_stop()


async def test_processes_an_agent_started_end_when_its_node_is_killed(
    redis_url: str, tmp_path: Path
) -> None:
    """A node killed with SIGKILL: its workers end, and so do the program and the fork
    an agent started (in its worker's process group). Before, the worker was killed by
    its parent-death signal, with no chance to end them, and both outlived it."""
    cluster = ProcessCluster(redis_url, tmp_path, agent="tests.agents:BadAgent", extra_args=ARGS)
    client = SioClient("spawns")
    pids: list[int] = []
    try:
        (node,) = await cluster.async_start(1)
        await client.connect(node.url, "spawns", cluster.token("alice"))
        await client.say("spawn")
        await client.wait_for(lambda: _answers(client), "spawn answered")
        pids = [int(p) for p in _answers(client)[0].split()]
        workers = _workers(node)
        assert all(map(_running, pids + workers))
        node.kill()
        await wait_until(
            lambda: not any(map(_running, pids + workers)),
            timeout=5,
            what="the workers and what their agent started ended with the node",
        )
    finally:
        for pid in pids:  # not left behind when the test fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await client.close()
        await cluster.async_stop()


async def test_an_agent_sees_none_of_its_nodes_settings_and_its_log_lines_are_redacted(
    redis_url: str, tmp_path: Path
) -> None:
    """Agents are users' code: the node's COORDINATOR_ variables (the token secret, the
    Redis and store passwords) stay out of its workers' environment, and what an agent
    logs loses credentials as the node's own lines do (it was written as given)."""
    cluster = ProcessCluster(
        redis_url, tmp_path, agent="tests.agents:TellingAgent", extra_args=ARGS
    )
    cluster.env["COORDINATOR_SECRET"] = cluster.secret
    client = SioClient("c")
    try:
        (node,) = await cluster.async_start(1)
        await client.connect(node.url, "conv", cluster.token("alice"))
        await client.say("hi")
        await client.wait_for(lambda: _answers(client), "the answer")
        assert _answers(client) == ["none"]
        await wait_until(lambda: "telling" in node.log_tail(), what="the agent's line")
        line = next(x for x in node.log_tail().splitlines() if "telling" in x)
        assert "S3cretPw" not in line and "t0k3nvalue" not in line, line
        assert "redis://:***@db:6379/0" in line, line
    finally:
        await client.close()
        await cluster.async_stop()
