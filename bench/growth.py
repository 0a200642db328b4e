"""Growth: idle-sweep time and Redis commands with 1k, 10k (and 100k) live conversations.

One in-process node with quiet background settings (as tests/test_cleanup.py) starts N
echo loops on a private Redis; then, repeatedly, 10 of them are backdated two hours (and
flushed to the idle index) and ``sweep_idle()`` closes exactly those 10. Reported: the
sweep's wall time (median of the repetitions), its Redis commands (INFO commandstats
delta, scripts' inner commands included), and the part of the sweep spent in
``flush_activity`` (which the sweep calls first). A sweep with nothing expired is timed
too. Should stay flat in N: a sweep costs O(expired), not O(total).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from bench.common import (
    QUIET_NODE,
    Mode,
    cluster_store,
    log_dir,
    median,
    private_redis,
    ratio,
    table,
)
from coordinator import ConversationManager, ManagerConfig
from coordinator.manager import NullSink

EXPIRED = 10


async def _commands(client: aioredis.Redis) -> Counter[str]:
    stats = await client.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})


async def measure(live: int, reps: int) -> dict[str, Any]:
    with private_redis() as redis:
        probe = aioredis.Redis.from_url(redis.url)
        cfg = ManagerConfig(
            redis_url=redis.url,
            event_store=cluster_store(redis.url, log_dir("growth")),
            node_id="growth",
            max_concurrent_conversations=live,
            **QUIET_NODE,
        )
        node = ConversationManager(cfg, sink=NullSink())
        await node.start()
        try:
            sids = [f"live-{i}" for i in range(live)]
            t0 = time.perf_counter()
            batch = 250
            for start in range(0, live, batch):
                await asyncio.gather(
                    *(
                        node.maybe_start_agent_loop(s, {}, f"user{i % 50}")
                        for i, s in enumerate(sids[start : start + batch], start)
                    )
                )
            started_s = time.perf_counter() - t0
            assert len(node.local_loops()) == live
            await node.flush_activity()
            empty_times = []
            for _ in range(reps):
                t = time.perf_counter()
                closed = await node.sweep_idle()
                empty_times.append(time.perf_counter() - t)
                assert not closed
            sweep_times, flush_times, commands = [], [], []
            by_name: Counter[str] = Counter()
            for rep in range(reps):
                victims = sids[rep * EXPIRED : (rep + 1) * EXPIRED]
                for sid in victims:
                    runner = node.node.runners[sid]
                    runner.touch(runner.last_active - 2 * QUIET_NODE["close_delay"])
                await node.flush_activity()
                t = time.perf_counter()
                await node.flush_activity()  # nothing dirty: the scan alone
                flush_times.append(time.perf_counter() - t)
                before = await _commands(probe)
                t = time.perf_counter()
                closed = await node.sweep_idle()
                sweep_times.append(time.perf_counter() - t)
                after = await _commands(probe)
                delta = after - before
                delta.pop("info", None)
                commands.append(sum(delta.values()))
                by_name += delta
                if sorted(closed) != sorted(victims):
                    raise AssertionError(f"sweep closed {closed}, expected {victims}")
            info = await probe.info("memory")
            return {
                "live": live,
                "start_loops_s": started_s,
                "starts_per_s": live / started_s,
                "sweep_ms_median": 1000 * median(sweep_times),
                "sweep_ms_all": [1000 * x for x in sweep_times],
                "sweep_nothing_expired_ms_median": 1000 * median(empty_times),
                "flush_scan_ms_median": 1000 * median(flush_times),
                "commands_per_sweep": commands,
                "commands_by_name_per_sweep": {k: v / reps for k, v in sorted(by_name.items())},
                "redis_used_memory": int(info["used_memory"]),
            }
        finally:
            await _fast_close(node)
            await probe.aclose()


async def _fast_close(node: ConversationManager) -> None:
    """Drop the loops without releasing each in Redis (the private Redis goes away)."""
    node.membership.lapse("benchmark teardown")  # every loop stops, writing nothing
    with contextlib.suppress(Exception):
        await node.state.redis.delete(node.keys.node_owned(node.inc))
    await node.aclose()


async def run(mode: Mode) -> dict[str, Any]:
    sizes = mode.pick([1_000, 10_000], [1_000, 10_000, 100_000])
    reps = mode.pick(5, 9)
    rows = [await measure(n, reps) for n in sizes]
    base = rows[0]
    out = []
    for r in rows:
        out.append(
            [
                r["live"],
                r["sweep_ms_median"],
                ratio(r["sweep_ms_median"], base["sweep_ms_median"]),
                r["flush_scan_ms_median"],
                r["sweep_nothing_expired_ms_median"],
                median(r["commands_per_sweep"]),
                ratio(median(r["commands_per_sweep"]), median(base["commands_per_sweep"])),
                r["starts_per_s"],
            ]
        )
    t = table(
        f"Idle sweep with {EXPIRED} expired loops, by live conversations "
        f"(median of {reps} sweeps; one node, in-process)",
        [
            "live",
            "sweep ms",
            "x 1k",
            "of which flush scan ms",
            "sweep, 0 expired, ms",
            "commands",
            "x 1k",
            "loop starts/s (setup)",
        ],
        out,
    )
    return {"tables": [t], "json": {"expired": EXPIRED, "reps": reps, "rows": rows}}
