"""Replays of large events: the node's memory while clients replay a conversation whose
agent's events are large (``python -m bench.run --only replaymem``).

One ``coordinator serve`` node on a private Redis, ``--agent workers.scripted:ScriptedAgent``
answering each message with two events of ``SIZE`` bytes: 40 messages make a history of
small events (the messages, the agent's state notes) among 80 large ones. Then 1, 3 and
6 clients (bench/eio.py) join it at ``latest_event_id`` 0 at once and read it to the end;
the node's RSS is sampled every 5 ms. Measured per round: the peak over the RSS before,
the time until every client had every event, the ids checked gap-free. A replay reads
the log in pages of about 256 KiB (``catchup.REPLAY_PAGE_BYTES``, bounded where they are
read): before cba37b8 a page after a few small events was sized by them and read every
large event after it at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from bench.common import (
    Mode,
    log_dir,
    new_secret,
    node_proc,
    private_redis,
    rss_bytes,
    start_all,
    stop_all,
    table,
    url_of,
)
from bench.eio import EioClient
from coordinator.auth import issue_token

SIZE = 1_000_000  # bytes of content per agent event (the default limit is 1 MiB)
MESSAGES = 40
MB = 1e6


class Peak:
    """A process's largest RSS while it is watched (a thread polling /proc)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.005)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def replay(url: str, token: str, clients: int, events: int) -> tuple[float, bool]:
    """``clients`` joining at 0 at once, each reading to event ``events``: the seconds
    until all had all, and whether every one got ids 1..events in order."""
    seen: list[list[int]] = [[] for _ in range(clients)]
    everything = asyncio.Event()

    def on(k: int) -> Any:
        def event(name: str, event: Any) -> None:
            seen[k].append(int(event["id"]))
            if min(len(s) for s in seen) >= events:
                everything.set()

        return event

    readers = [EioClient(on(k)) for k in range(clients)]
    started = time.monotonic()
    query = {"conversation_id": "big", "latest_event_id": "0"}
    try:
        await asyncio.gather(*(c.connect(url, query, {"token": token}) for c in readers))
        async with asyncio.timeout(120):
            await everything.wait()
    finally:
        await asyncio.gather(*(c.close() for c in readers))
    took = time.monotonic() - started
    return took, all(s == list(range(1, events + 1)) for s in seen)


async def run(mode: Mode) -> dict[str, Any]:
    rounds = mode.pick([1, 3, 6], [1, 3, 6, 12])
    secret = new_secret()
    rows, results = [], []
    with private_redis() as redis:
        flags = ["--agent", "workers.scripted:ScriptedAgent", "--log-window-bytes", "1G"]
        node = node_proc("replayed", redis.url, secret, log_dir("replaymem"), extra=flags)
        start_all([node])
        try:
            token = issue_token("alice", secret)
            ids: list[int] = []
            writer = EioClient(lambda name, event: ids.append(int(event["id"])))
            settings = {"think_time": 0, "reply_size": SIZE, "replies": 2}
            await writer.connect(
                url_of(node), {"conversation_id": "big"}, {"token": token, "settings": settings}
            )
            for i in range(MESSAGES):
                action = {"action": "message", "args": {"content": f"message {i}"}}
                await writer.call("oh_user_action", action, within=30)
            await asyncio.sleep(2.0)  # the answers to the last message, the mover
            await writer.close()
            events = max(ids)
            for clients in rounds:
                await asyncio.sleep(1.0)
                with Peak(node.pid) as peak:
                    took, ordered = await replay(url_of(node), token, clients, events)
                grew = (peak.peak - peak.base) / MB
                results.append({
                    "clients": clients, "events": events, "seconds": took,
                    "rss_before_mb": peak.base / MB, "rss_peak_mb": peak.peak / MB,
                    "grew_mb": grew, "in_order": ordered,
                })  # fmt: skip
                rows.append([clients, events, took, peak.base / MB, peak.peak / MB, grew, ordered])
        finally:
            stop_all([node])
    title = (
        f"Replays from id 0 of {MESSAGES} messages answered with 2 events of {SIZE:,} bytes "
        "each, several clients at once"
    )
    headers = ["clients", "events each", "s", "RSS before MB", "peak MB", "grew MB", "all in order"]
    return {"tables": [table(title, headers, rows)], "json": {"rounds": results}}
