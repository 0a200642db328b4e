"""Reading a conversation's history through the event store: how fast a replay from id 0
goes when nearly all of it is below the Redis window (``coordinator/history.py``).

One in-process node on a private Redis, the file store in a temporary directory (or
``--event-store URL``): EVENTS events of about 200 bytes are logged (commits of 100),
moved to the store by the archiver (timed: events/s moved), then read back from id 0 a
page at a time as a replay does (timed: events/s read). Prints a table, writes JSON.

    .venv/bin/python -m bench.history --events 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

from coordinator import ConversationManager
from coordinator.codec import pack
from coordinator.config import ManagerConfig
from coordinator.delivery import PAGE
from coordinator.embedded import EmbeddedRedis
from coordinator.state import Lease


async def run(events: int, window: int, store_url: str) -> dict[str, float]:
    redis = EmbeddedRedis().start()
    config = ManagerConfig(
        redis_url=redis.url,
        node_id="bench",
        agent_isolation="none",
        event_store=store_url,
        log_window_events=window,
    )
    manager = ConversationManager(config)
    await manager.start()
    try:
        state, sid = manager.state, "history"
        own = await state.acquire(sid, "bench", manager.inc, "bench", create=True)
        body = {"source": "agent", "observation": "x", "content": "y" * 160}
        for first in range(0, events, 100):
            batch = [pack({**body, "n": first + i}) for i in range(min(100, events - first))]
            await state.commit(sid, manager.inc, own.epoch, batch)
        lease = Lease(sid, "bench", manager.inc, own.epoch)
        started = time.perf_counter()
        await manager.node.archiver.move(lease)
        moved = time.perf_counter() - started
        started, after, read = time.perf_counter(), 0, 0
        while rows := (await manager.node.history.after(sid, after, PAGE))[0]:
            assert rows[0][0] == after + 1, (after, rows[0][0])
            after, read = rows[-1][0], read + len(rows)
        replayed = time.perf_counter() - started
        assert read == events
        in_redis = await state.redis.xlen(manager.keys.events(sid))
        return {
            "events": events,
            "window": window,
            "in_redis": in_redis,
            "moved_per_s": events / moved,
            "replayed_per_s": events / replayed,
        }
    finally:
        await manager.aclose()
        redis.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=10_000)
    parser.add_argument("--event-store", default="", help="default: file:// in a temp dir")
    parser.add_argument("--json", default="bench-history.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.event_store or f"file://{tmp}/events"
        result = asyncio.run(run(args.events, args.window, url))
    print(f"{'events':>8} {'window':>8} {'in Redis':>9} {'moved/s':>10} {'replayed/s':>11}")
    print(
        f"{result['events']:>8} {result['window']:>8} {result['in_redis']:>9} "
        f"{result['moved_per_s']:>10.0f} {result['replayed_per_s']:>11.0f}"
    )
    with open(args.json, "w") as out:
        json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
