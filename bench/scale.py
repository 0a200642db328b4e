"""Scale: many conversations and connections over 3 node processes on this machine.

Phase 1 opens the first connection of every conversation (conversation i on node i % 3),
which creates it and starts its echo loop there; phase 2 opens a second connection to
every conversation on the next node (a cross-node watcher). Reported per phase: join rate
(connections per second, joins in flight bounded per load generator) and join latency,
the growth of Redis ``used_memory_dataset`` and of the nodes' RSS. Phase 2 adds connections
only (no loops), so its RSS growth per connection is a node's cost of one connection. A
node's CPU and RSS are its process tree's: its own and its agent worker processes'.
Load generators are separate processes (several when the connections would not fit one
process's open-files limit). The same first-connection joins run first against the
single-process baselines (the seed's standalone design and plain python-socketio with
AsyncRedisManager), for what a join costs without the coordinator. The nodes log when
their membership lease lapses; the tables count those lines per phase.

Phase 3 is a mass leave: every second connection closes at once (all closes in flight
together). Reported: how long the clients' closes took, how long until Redis no longer
lists any of them (the nodes' removals), how many removals a node had to defer (its log's
"removal deferred" lines; housekeeping retries them) and the lease lapses meanwhile.
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

import redis

from bench.common import (
    Mode,
    baseline_proc,
    cpu_seconds,
    log_dir,
    new_secret,
    node_metrics,
    node_proc,
    percentile,
    private_redis,
    start_all,
    stop_all,
    table,
    tree_cpu_seconds,
    tree_rss_bytes,
    url_of,
)
from bench.driver import LoadGenProcess
from coordinator.auth import issue_token
from coordinator.keys import KeySchema

NODES = 3
IN_FLIGHT = 96
USERS = 100


def _cpu(servers: list[Any], gens: list[LoadGenProcess], redis_server: Any) -> dict[str, float]:
    return {
        "servers": sum(tree_cpu_seconds(n.pid) for n in servers),
        "load generators": sum(cpu_seconds(g.pid) for g in gens),
        "redis": cpu_seconds(redis_server.proc.pid),
    }


def used_memory(url: str) -> int:
    """Redis ``used_memory_dataset``: used_memory less the server's and clients' overhead
    (client buffers move with pub/sub traffic and would blur the per-key cost)."""
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory_dataset"])
    finally:
        client.close()


async def run(mode: Mode) -> dict[str, Any]:
    conversations = mode.pick(1_500, 10_000)
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per_gen = max(1, min(conversations, (soft_limit - 200) // 2))
    gens_needed = -(-2 * conversations // per_gen)
    # Joins in flight, cluster-wide: about 32 per node. Far more (300 in flight) starves
    # the nodes' heartbeats and their leases lapse (see BENCHMARKS.md).
    concurrency = max(8, IN_FLIGHT // gens_needed)
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
        baselines = [
            baseline_proc("standalone", "bench.baselines.standalone", logs, ["--secret", secret]),
            baseline_proc(
                "plain-redis",
                "bench.baselines.redis_emit",
                logs,
                ["--secret", secret, "--redis-url", redis_server.url],
            ),
        ]
        try:
            start_all(nodes + baselines)
            for g in gens:
                await g.start()
            tokens = [issue_token(f"s{u}", secret) for u in range(USERS)]

            def spec(i: int, node: int) -> dict[str, Any]:
                return {
                    "url": url_of(nodes[node]),
                    "query": {"conversation_id": f"scale-{i}"},
                    "auth": {"token": tokens[i % USERS]},
                }

            # The single-process baselines first, on a quiet machine: what a join costs
            # without the coordinator (socket.io handshake, room, session). Each is
            # stopped before the next, so idle connections cost nothing later.
            baseline_phases: list[dict[str, Any]] = []
            for base in baselines:
                specs = [{**spec(i, 0), "url": url_of(base)} for i in range(conversations)]
                baseline_phases.append(
                    await _phase(
                        f"baseline {base.name}: new conversations",
                        base.name,
                        specs,
                        gens,
                        [base],
                        redis_server,
                        concurrency,
                    )
                )
                for g in gens:
                    await g.request({"cmd": "close", "group": base.name})
                stop_all([base])
            await asyncio.sleep(1.0)
            mem0 = used_memory(redis_server.url)
            phases: list[dict[str, Any]] = []
            for phase, offset in (("1: new conversations", 0), ("2: second connections", 1)):
                specs = [spec(i, (i + offset) % NODES) for i in range(conversations)]
                phases.append(
                    await _phase(
                        phase, f"phase{offset}", specs, gens, nodes, redis_server, concurrency
                    )
                )
            leave = await _leave(gens, "phase1", nodes, redis_server, phases[0]["connections"])
            phases += baseline_phases
        finally:
            for g in gens:
                await g.aclose()
            stop_all(nodes + baselines)
    p1, p2 = phases[0], phases[1]
    results = {
        "conversations": conversations,
        "connections": p1["connections"] + p2["connections"],
        "loadgens": len(gens),
        "leave": leave,
        "join_concurrency_per_loadgen": concurrency,
        "phases": phases,
        "redis_bytes_per_conversation_phase1": (p1["redis_used_memory"] - mem0) / conversations,
        "redis_bytes_per_conversation_with_2_connections": (p2["redis_used_memory"] - mem0)
        / conversations,
        "redis_bytes_per_extra_connection": (p2["redis_used_memory"] - p1["redis_used_memory"])
        / max(1, p2["connections"]),
        "node_rss_bytes_per_conversation_with_loop_and_connection": p1["rss_growth"]
        / max(1, p1["connections"]),
        "node_rss_bytes_per_connection": p2["rss_growth"] / max(1, p2["connections"]),
        "node_rss_total_mb": sum(p2["node_rss"]) / 2**20,
        "baseline_rss_bytes_per_connection": {
            p["phase"]: p["rss_growth"] / max(1, p["connections"]) for p in phases[2:]
        },
    }
    return report(results, mode)


def _gc(servers: list[Any]) -> tuple[float, float] | None:
    """The servers' cyclic-GC full collections and pause seconds so far, from their
    /metrics (None for the baselines, which have none)."""
    full = seconds = 0.0
    for server in servers:
        found = node_metrics(server)
        if not found or "coordinator_gc_full_collections_total" not in found:
            return None
        full += found["coordinator_gc_full_collections_total"]
        seconds += found["coordinator_gc_pause_seconds_total"]
    return full, seconds


async def _phase(
    phase: str,
    group: str,
    specs: list[dict[str, Any]],
    gens: list[LoadGenProcess],
    servers: list[Any],
    redis_server: Any,
    concurrency: int,
) -> dict[str, Any]:
    parts = [specs[k :: len(gens)] for k in range(len(gens))]
    rss0 = [tree_rss_bytes(n.pid) for n in servers]
    lapses0 = _lapses(servers)
    cpu0 = _cpu(servers, gens, redis_server)
    gc0 = _gc(servers)
    t0 = time.perf_counter()
    replies = await asyncio.gather(
        *(
            g.request(
                {
                    "cmd": "connect",
                    "group": group,
                    "conns": part,
                    "concurrency": concurrency,
                    "return_joins": True,
                }
            )
            for g, part in zip(gens, parts, strict=True)
        )
    )
    seconds = time.perf_counter() - t0
    cpu = {k: v - cpu0[k] for k, v in _cpu(servers, gens, redis_server).items()}
    gc1 = _gc(servers)
    await asyncio.sleep(1.0)
    joins = [ms for r in replies for ms in r["join_ms"]]
    failed = sum(r["failed"] for r in replies)
    rss = [tree_rss_bytes(n.pid) for n in servers]
    connected = len(specs) - failed
    return {
        "phase": phase,
        "connections": connected,
        "failed": failed,
        "errors": [e for r in replies for e in r["errors"]][:5],
        "seconds": seconds,
        "joins_per_s": connected / seconds,
        "join_ms_p50": percentile(joins, 50),
        "join_ms_p99": percentile(joins, 99),
        "redis_used_memory": used_memory(redis_server.url),
        "node_rss": rss,
        "rss_growth": sum(rss) - sum(rss0),
        "cpu_s": cpu,
        "server_cpu_ms_per_join": 1000 * cpu["servers"] / max(1, connected),
        # The servers' cyclic GC during the phase: full collections, and pause ms per join.
        "gc_full_collections": None if gc0 is None or gc1 is None else gc1[0] - gc0[0],
        "gc_ms_per_join": None
        if gc0 is None or gc1 is None
        else 1000 * (gc1[1] - gc0[1]) / max(1, connected),
        "lease_lapses": _lapses(servers) - lapses0,
    }


async def _leave(
    gens: list[LoadGenProcess], group: str, nodes: list[Any], redis_server: Any, remain: int
) -> dict[str, Any]:
    """Close every connection of ``group`` at once; time the closes and the removals."""
    client = redis.Redis.from_url(redis_server.url)
    keys = KeySchema()

    def registered() -> int:
        pipe = client.pipeline(transaction=False)
        for u in range(USERS):
            pipe.hlen(keys.user_conns(f"s{u}"))
        return sum(pipe.execute())

    try:
        before = registered()
        deferred0, lapses0 = _log_count(nodes, "removal deferred"), _lapses(nodes)
        t0 = time.perf_counter()
        await asyncio.gather(
            *(g.request({"cmd": "close", "group": group, "concurrency": 100_000}) for g in gens)
        )
        closed = time.perf_counter() - t0
        left = registered()
        while left > remain and time.perf_counter() - t0 < 60:
            await asyncio.sleep(0.05)
            left = registered()
        return {
            "connections": before - remain,
            "all_closed_after_s": closed,
            "redis_clean_after_s": time.perf_counter() - t0,
            "still_registered": left - remain,
            "removals_deferred": _log_count(nodes, "removal deferred") - deferred0,
            "lease_lapses": _lapses(nodes) - lapses0,
        }
    finally:
        client.close()


def _log_count(servers: list[Any], needle: str) -> int:
    return sum(
        p.log_path.read_text(errors="replace").count(needle) for p in servers if p.log_path.exists()
    )


def _lapses(servers: list[Any]) -> int:
    """How often the nodes logged that their membership lease lapsed."""
    return _log_count(servers, "lease lapsed")


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
            "CPU s: servers / loadgen / Redis",
            "server CPU ms/join",
            "GC: full collections / ms per join",
            "lease lapses",
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
                p["server_cpu_ms_per_join"],
                "-"
                if p["gc_ms_per_join"] is None
                else f"{p['gc_full_collections']:.0f} / {p['gc_ms_per_join']:.2f}",
                p["lease_lapses"],
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
            *(
                [f"{name}: RSS bytes per connection", v]
                for name, v in r["baseline_rss_bytes_per_connection"].items()
            ),
        ],
    )
    lv = r["leave"]
    t3 = table(
        f"Mass leave: {lv['connections']:,} connections (one per conversation) close at once",
        ["measure", "value"],
        [
            ["clients' closes done after, s", lv["all_closed_after_s"]],
            ["Redis lists none of them after, s", lv["redis_clean_after_s"]],
            ["still listed after 60 s", lv["still_registered"]],
            ["removals deferred (retried by housekeeping)", lv["removals_deferred"]],
            ["lease lapses", lv["lease_lapses"]],
        ],
    )
    return {"tables": [t1, t2, t3], "json": r}
