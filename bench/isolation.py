"""Agent isolation (issue #18): what agent worker processes cost in memory, and how fast
a node replaces a dead one and resumes its loops.

- memory: one in-process node per isolation mode (each in a fresh process of its own, so
  neither reuses the other's freed memory) starts N echo loops (1,000; quick: 500), 250
  at a time; the RSS of the node's process and of its worker processes, before and
  after, per loop, the loops each worker holds, and what the starts took: loops started
  per second, CPU per start in the node's process and in its workers (a start's share
  of a new conversation's join: creating, admitting and opening it, no socket).
- replacement: a node with 1,000 loops (quick: 500) over 2 workers; one worker is killed
  (SIGKILL) while its loops are idle, several times; from the kill to: the node noticed
  (the worker's channel closed), a fresh worker in its place answered, every loop of the
  dead worker runs again in another worker (a fresh agent instance started, as after a
  failover), and an action sent to one of them once the loss was noticed was answered.
  A stalled worker takes ``agent_stall_timeout`` longer to notice, then the same.
- suspects: a node of 2 workers, 10 conversations (quick: 6) whose agents take 1 s per
  action (``workers.scripted``, ``think_time``); one worker is killed while every
  action runs: each action running there is a suspect and goes again alone, in a
  probation worker of its own, 2 at a time (``agent_workers``); seconds from the kill
  until each is answered (one at a time, the last would wait about their count x 1 s).

The round trip of both modes is ``python -m bench.compare HEAD@agent-isolation=none
HEAD@agent-isolation=process`` (node processes, socket.io clients, plain python-socketio
beside them).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    PY,
    QUIET_NODE,
    REPO,
    Mode,
    child_env,
    cluster_store,
    cpu_seconds,
    log_dir,
    median,
    private_redis,
    table,
)
from coordinator import ConversationManager, ManagerConfig, agentpool
from coordinator.manager import NullSink
from workers.protocol import Event

WORKERS = 2
BATCH = 250


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def _start_loops(node: ConversationManager, n: int, prefix: str = "c") -> list[str]:
    sids = [f"{prefix}{i}" for i in range(n)]
    for start in range(0, n, BATCH):
        await asyncio.gather(
            *(
                node.maybe_start_agent_loop(s, {}, f"user{i % 50}")
                for i, s in enumerate(sids[start : start + BATCH], start)
            )
        )
    return sids


def _config(url: str, isolation: str, n: int) -> ManagerConfig:
    return ManagerConfig(
        redis_url=url,
        event_store=cluster_store(url, log_dir("isolation")),
        node_id=f"iso-{isolation}",
        agent_isolation=isolation,
        agent_workers=WORKERS,
        max_concurrent_conversations=n + 10,
        **QUIET_NODE,
    )


async def memory(isolation: str, n: int) -> dict[str, Any]:
    """Run in a process of its own (``python -m bench.isolation memory MODE N``)."""
    with private_redis() as redis:
        node = ConversationManager(_config(redis.url, isolation, n), sink=NullSink())
        await node.start()
        try:
            pool = node.node.agents
            pids = [w.pid for w in pool.workers] if pool else []
            gc.collect()
            before = (_rss(os.getpid()), sum(_rss(p) for p in pids))
            cpu = (cpu_seconds(os.getpid()), sum(cpu_seconds(p) for p in pids))
            began = time.perf_counter()
            await _start_loops(node, n)
            took = time.perf_counter() - began
            cpu = (cpu_seconds(os.getpid()) - cpu[0], sum(cpu_seconds(p) for p in pids) - cpu[1])
            gc.collect()
            after = (_rss(os.getpid()), sum(_rss(p) for p in pids))
            per_worker = [len(w.loops) for w in pool.workers] if pool else []
        finally:
            await node.aclose()
    return {
        "isolation": isolation,
        "loops": n,
        "node_rss_before": before[0],
        "node_rss_after": after[0],
        "workers_rss_before": before[1],
        "workers_rss_after": after[1],
        "loops_per_worker": per_worker,
        "start_seconds": took,
        "node_cpu_seconds": cpu[0],
        "workers_cpu_seconds": cpu[1],
    }


class _Answers:
    """A sink that wakes a waiter on the next agent event."""

    def __init__(self) -> None:
        self.waiter: asyncio.Future[None] | None = None

    async def deliver(self, connection_id: str, event: Event) -> None:
        if event.get("source") == "agent" and self.waiter and not self.waiter.done():
            self.waiter.set_result(None)


async def _when(conditions: dict[str, Any], within: float = 30.0) -> dict[str, float]:
    """Poll every millisecond (a benchmark's clock) until each condition holds; the time
    each first held."""
    seen: dict[str, float] = {}
    deadline = time.perf_counter() + within
    while len(seen) < len(conditions):
        for name, holds in conditions.items():
            if name not in seen and holds():
                seen[name] = time.perf_counter()
        if time.perf_counter() > deadline:
            raise RuntimeError(f"not all of {list(conditions)} in time: {list(seen)}")
        await asyncio.sleep(0.001)
    return seen


async def replacement(n: int, reps: int) -> list[dict[str, float]]:
    # Its kills come seconds after the workers started: a worker failing that young is
    # replaced after a backoff (a crash loop's), which is not what is measured here.
    agentpool.STEADY_AFTER = 0.0
    with private_redis() as redis:
        sink = _Answers()
        node = ConversationManager(_config(redis.url, "process", n), sink=sink)
        await node.start()
        try:
            pool = node.node.agents
            assert pool is not None
            await _start_loops(node, n)
            runs = []
            for rep in range(reps):
                victim = pool.workers[rep % WORKERS]
                sids = [agent.sid for agent in victim.loops.values()]
                probe = sids[0]
                await node.join_conversation(probe, f"probe{rep}", {}, f"user{int(probe[1:]) % 50}")
                restarts = pool.restarts
                agents = [node.runner(s).agent for s in sids]  # type: ignore[union-attr]
                sink.waiter = asyncio.get_running_loop().create_future()
                t0 = time.perf_counter()
                os.kill(victim.pid, signal.SIGKILL)
                noticed = (await _when({"noticed": lambda v=victim: v.failed}))["noticed"]
                # Sent once the loss is known (sent before, it could be in flight there,
                # and a dispatch running in a worker that dies is a suspect: it goes again
                # alone, in the fresh worker), answered once its loop runs elsewhere.
                await node.send_to_event_stream(
                    f"probe{rep}", {"action": "message", "args": {"content": "after"}}
                )
                answer = sink.waiter
                seen = await _when(
                    {
                        "fresh": lambda r=restarts: pool.restarts > r,
                        "resumed": lambda v=victim, a=agents: all(
                            x.worker is not None and x.worker is not v and x.worker.usable
                            for x in a
                        ),
                        "answered": answer.done,
                    }
                )
                runs.append(
                    {
                        "loops": len(sids),
                        "noticed_ms": (noticed - t0) * 1000,
                        "fresh_worker_ms": (seen["fresh"] - t0) * 1000,
                        "loops_resumed_ms": (seen["resumed"] - t0) * 1000,
                        "action_answered_ms": (seen["answered"] - t0) * 1000,
                    }
                )
                await node.disconnect_from_session(f"probe{rep}")
        finally:
            await node.aclose()
    return runs


class _Answered:
    """A sink noting when each connection got its first agent event."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    async def deliver(self, connection_id: str, event: Event) -> None:
        if event.get("source") == "agent":
            self.at.setdefault(connection_id, time.perf_counter())


async def suspects(n: int, think: float) -> dict[str, Any]:
    with private_redis() as redis:
        sink = _Answered()
        config = _config(redis.url, "process", n).replace(agent="workers.scripted:ScriptedAgent")
        node = ConversationManager(config, sink=sink)
        await node.start()
        try:
            pool = node.node.agents
            assert pool is not None
            for i in range(n):
                await node.join_conversation(f"s{i}", f"k{i}", {"think_time": think}, f"u{i}")
            victim = pool.workers[0]
            on_victim = [f"k{agent.sid[1:]}" for agent in victim.loops.values()]
            for i in range(n):
                await node.send_to_event_stream(
                    f"k{i}", {"action": "message", "args": {"content": "think"}}
                )
            runners = [node.runner(f"s{i}") for i in range(n)]
            await _when({"running": lambda: all(r and r.agent.in_flight for r in runners)})
            t0 = time.perf_counter()
            os.kill(victim.pid, signal.SIGKILL)
            await _when({"answered": lambda: len(sink.at) == n}, within=60 + n * think * 2)
            waits = sorted(sink.at[c] - t0 for c in on_victim)
        finally:
            await node.aclose()
    return {"conversations": n, "think_s": think, "suspects": len(waits), "answered_s": waits}


def _memory_in_child(isolation: str, n: int) -> dict[str, Any]:
    out = subprocess.run(
        [PY, "-m", "bench.isolation", "memory", isolation, str(n)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def run(mode: Mode) -> dict[str, Any]:
    n = mode.pick(500, 1_000)
    reps = mode.pick(3, 6)
    mem = [_memory_in_child(iso, n) for iso in ("none", "process")]
    kib = 1024
    rows, starts = [], []
    for m in mem:
        node_per = (m["node_rss_after"] - m["node_rss_before"]) / n
        workers_per = (m["workers_rss_after"] - m["workers_rss_before"]) / n
        rows.append(
            [
                m["isolation"],
                n,
                m["node_rss_after"] / kib**2,
                m["workers_rss_after"] / kib**2,
                node_per / kib,
                workers_per / kib,
                (node_per + workers_per) / kib,
                " / ".join(str(x) for x in m["loops_per_worker"]) or "-",
            ]
        )
        starts.append(
            [
                m["isolation"],
                n / m["start_seconds"],
                m["node_cpu_seconds"] / n * 1e3,
                m["workers_cpu_seconds"] / n * 1e3,
                (m["node_cpu_seconds"] + m["workers_cpu_seconds"]) / n * 1e3,
            ]
        )
    runs = await replacement(n, reps)
    think = 1.0
    held = await suspects(mode.pick(6, 10), think)
    keys = ("noticed_ms", "fresh_worker_ms", "loops_resumed_ms", "action_answered_ms")
    tables = [
        table(
            f"Memory: {n} echo loops on one node ({WORKERS} workers in process mode)",
            [
                "isolation",
                "loops",
                "node RSS MB",
                "workers RSS MB",
                "node KB/loop",
                "workers KB/loop",
                "total KB/loop",
                "loops per worker",
            ],
            rows,
        ),
        table(
            f"Starting them: {n} loops, 250 at a time (create, admit, open; the node's "
            "process and its workers' CPU; Redis not counted)",
            ["isolation", "starts/s", "node CPU ms/start", "workers CPU ms/start", "total"],
            starts,
        ),
        table(
            f"A worker killed (SIGKILL) with its loops idle: {n} loops on {WORKERS} workers, "
            f"median of {reps} kills, ms after the kill",
            [
                "loops on it",
                "noticed",
                "fresh worker up",
                "its loops resumed",
                "an action answered",
            ],
            [[median([r["loops"] for r in runs]), *(median([r[k] for r in runs]) for k in keys)]],
        ),
        table(
            f"A worker killed while {held['conversations']} actions of {think:g} s run "
            f"({WORKERS} workers): its actions go again alone, {WORKERS} probation workers "
            "at a time; s after the kill",
            ["suspects", "first answered", "median", "last answered", "one at a time: about"],
            [
                [
                    held["suspects"],
                    held["answered_s"][0],
                    median(held["answered_s"]),
                    held["answered_s"][-1],
                    held["suspects"] * think,
                ]
            ],
        ),
    ]
    return {
        "tables": tables,
        "json": {"loops": n, "memory": mem, "replacement": runs, "suspects": held},
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["memory"]:
        print(json.dumps(asyncio.run(memory(sys.argv[2], int(sys.argv[3])))))
    else:
        from bench.run import main

        sys.exit(main(["--only", "isolation", *sys.argv[1:]]))
