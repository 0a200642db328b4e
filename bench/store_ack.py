"""The action's acknowledgement with the event store's mover running and without it: the
store's writes are off the ack path, so its round trip should not change.

One in-process node (agents in the node's event loop, the echo agent) on a private
Redis, one conversation; ACTIONS actions are sent one after another, each timed from
send to acknowledgement, in windows alternating between the mover running (its events
moved to the store as they come) and stopped (``Archiver.run`` cancelled; the events
wait in Redis, the window is large enough for all). Prints p50/p90 per mode, writes JSON.

    .venv/bin/python -m bench.store_ack --actions 4000
    .venv/bin/python -m bench.store_ack --event-store postgresql://USER:PW@HOST/DB
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

from coordinator import ConversationManager
from coordinator.config import ManagerConfig
from coordinator.embedded import EmbeddedRedis

WINDOW = 200  # actions per window; modes alternate window by window


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(actions: int, store_url: str) -> dict[str, dict[str, float]]:
    redis = EmbeddedRedis().start()
    config = ManagerConfig(
        redis_url=redis.url,
        node_id="bench",
        agent_isolation="none",
        event_store=store_url,
        log_window_events=4 * actions,
        log_window_bytes=1 << 30,
    )
    manager = ConversationManager(config)
    await manager.start()
    node = manager.node
    samples: dict[str, list[float]] = {"store on": [], "store off": []}
    try:
        await manager.join_conversation("ack", "c", {}, "bench")
        action = {"action": "message", "args": {"content": "x" * 200}}
        for window in range(actions // WINDOW):
            mode = "store on" if window % 2 == 0 else "store off"
            mover = node.tasks.named("event-store")
            if mode == "store off" and mover:
                await node.tasks.cancel(mover)
            elif mode == "store on" and not mover:
                node.tasks.spawn(node.archiver.run(), "event-store")
                node.archiver.logged("ack")
            for _ in range(WINDOW):
                started = time.perf_counter()
                await manager.send_to_event_stream("c", action)
                samples[mode].append((time.perf_counter() - started) * 1000)
    finally:
        await manager.aclose()
        redis.cleanup()
    return {
        mode: {"n": len(v), "p50_ms": percentile(v, 0.5), "p90_ms": percentile(v, 0.9)}
        for mode, v in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=4000)
    parser.add_argument("--event-store", default="", help="default: file:// in a temp dir")
    parser.add_argument("--json", default="bench-store-ack.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.event_store or f"file://{tmp}/events"
        result = asyncio.run(run(args.actions, url))
    print(f"{'mode':<10} {'actions':>8} {'p50 ms':>8} {'p90 ms':>8}")
    for mode, r in result.items():
        print(f"{mode:<10} {r['n']:>8} {r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f}")
    with open(args.json, "w") as out:
        json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
