"""Scale: many conversations and connections over 3 node processes on this machine.

Phase 1 opens the first connection of every conversation (conversation i on node i % 3),
which creates it and starts its echo loop there; phase 2 opens a second connection to
every conversation on the next node (a cross-node watcher). Reported per phase: join rate
(connections per second, joins in flight bounded per load generator) and join latency,
the growth of Redis ``used_memory`` and of the nodes' RSS. Phase 2 adds connections
only (no loops), so its RSS growth per connection is a node's cost of one connection.
Load generators are separate processes (two when the connections would not fit one
process's open-files limit).
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

import redis

from bench.common import (
    Mode,
    cpu_seconds,
    log_dir,
    new_secret,
    node_proc,
    percentile,
    private_redis,
    start_all,
    stop_all,
    table,
    url_of,
)
from bench.driver import LoadGenProcess
from coordinator.auth import issue_token

NODES = 3


def _cpu(nodes: list[Any], gens: list[LoadGenProcess], server: Any) -> dict[str, float]:
    return {
        "nodes": sum(cpu_seconds(n.pid) for n in nodes),
        "load generators": sum(cpu_seconds(g.pid) for g in gens),
        "redis": cpu_seconds(server.proc.pid),
    }


def used_memory(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


async def run(mode: Mode) -> dict[str, Any]:
    conversations = mode.pick(1_500, 10_000)
    concurrency = 100
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per_gen = max(1, min(conversations, (soft_limit - 200) // 2))
    gens_needed = -(-2 * conversations // per_gen)
    secret = new_secret()
    logs = log_dir("scale")
    with private_redis() as redis_server:
        nodes = [
            node_proc(
                f"scale{i}",
                redis_server.url,
                secret,
                logs,
                extra=["--max-concurrent-conversations", "1000"],
            )
            for i in range(NODES)
        ]
        gens = [LoadGenProcess(f"loadgen{i}") for i in range(gens_needed)]
        try:
            start_all(nodes)
            for g in gens:
                await g.start()
            await asyncio.sleep(1.0)
            mem0 = used_memory(redis_server.url)
            rss0 = [n.rss_bytes() for n in nodes]
            tokens = [issue_token(f"s{i % 100}", secret) for i in range(100)]

            def spec(i: int, node: int) -> dict[str, Any]:
                return {
                    "url": url_of(nodes[node]),
                    "query": {"conversation_id": f"scale-{i}"},
                    "auth": {"token": tokens[i % 100]},
                }

            phases: list[dict[str, Any]] = []
            for phase, offset in (("1: new conversations", 0), ("2: second connections", 1)):
                specs = [spec(i, (i + offset) % NODES) for i in range(conversations)]
                parts = [specs[k :: len(gens)] for k in range(len(gens))]
                cpu0 = _cpu(nodes, gens, redis_server)
                t0 = time.perf_counter()
                replies = await asyncio.gather(
                    *(
                        g.request(
                            {
                                "cmd": "connect",
                                "group": f"phase{offset}",
                                "conns": part,
                                "concurrency": concurrency,
                                "return_joins": True,
                            }
                        )
                        for g, part in zip(gens, parts, strict=True)
                    )
                )
                seconds = time.perf_counter() - t0
                cpu = {k: v - cpu0[k] for k, v in _cpu(nodes, gens, redis_server).items()}
                await asyncio.sleep(1.0)
                joins = [ms for r in replies for ms in r["join_ms"]]
                failed = sum(r["failed"] for r in replies)
                phases.append(
                    {
                        "phase": phase,
                        "connections": len(specs) - failed,
                        "failed": failed,
                        "errors": [e for r in replies for e in r["errors"]][:5],
                        "seconds": seconds,
                        "joins_per_s": (len(specs) - failed) / seconds,
                        "join_ms_p50": percentile(joins, 50),
                        "join_ms_p99": percentile(joins, 99),
                        "redis_used_memory": used_memory(redis_server.url),
                        "node_rss": [n.rss_bytes() for n in nodes],
                        "cpu_s": cpu,
                    }
                )
        finally:
            for g in gens:
                await g.aclose()
            stop_all(nodes)
    p1, p2 = phases
    results = {
        "conversations": conversations,
        "connections": p1["connections"] + p2["connections"],
        "loadgens": len(gens),
        "join_concurrency_per_loadgen": concurrency,
        "phases": phases,
        "redis_bytes_per_conversation_phase1": (p1["redis_used_memory"] - mem0) / conversations,
        "redis_bytes_per_conversation_with_2_connections": (p2["redis_used_memory"] - mem0)
        / conversations,
        "redis_bytes_per_extra_connection": (p2["redis_used_memory"] - p1["redis_used_memory"])
        / max(1, p2["connections"]),
        "node_rss_bytes_per_conversation_with_loop_and_connection": (
            sum(p1["node_rss"]) - sum(rss0)
        )
        / max(1, p1["connections"]),
        "node_rss_bytes_per_connection": (sum(p2["node_rss"]) - sum(p1["node_rss"]))
        / max(1, p2["connections"]),
        "node_rss_total_mb": sum(p2["node_rss"]) / 2**20,
    }
    return report(results, mode)


def report(r: dict[str, Any], mode: Mode) -> dict[str, Any]:
    scaled = "" if mode.full else " (quick mode: scaled down from 10,000 / 20,000)"
    t1 = table(
        f"Scale: {r['conversations']:,} conversations, {r['connections']:,} connections over "
        f"{NODES} nodes{scaled}",
        [
            "phase",
            "connections",
            "failed",
            "seconds",
            "joins/s",
            "join p50 ms",
            "join p99 ms",
            "CPU s: nodes / loadgen / Redis",
        ],
        [
            [
                p["phase"],
                p["connections"],
                p["failed"],
                p["seconds"],
                p["joins_per_s"],
                p["join_ms_p50"],
                p["join_ms_p99"],
                " / ".join(f"{v:.1f}" for v in p["cpu_s"].values()),
            ]
            for p in r["phases"]
        ],
    )
    t2 = table(
        "Memory",
        ["measure", "value"],
        [
            [
                "Redis bytes per conversation (record, loop claim, 1 connection)",
                r["redis_bytes_per_conversation_phase1"],
            ],
            [
                "Redis bytes per conversation with 2 connections",
                r["redis_bytes_per_conversation_with_2_connections"],
            ],
            ["Redis bytes per extra connection", r["redis_bytes_per_extra_connection"]],
            [
                "node RSS bytes per conversation (loop + its first connection)",
                r["node_rss_bytes_per_conversation_with_loop_and_connection"],
            ],
            ["node RSS bytes per extra connection", r["node_rss_bytes_per_connection"]],
            ["node RSS total, MB (3 nodes)", r["node_rss_total_mb"]],
        ],
    )
    return {"tables": [t1, t2], "json": r}
