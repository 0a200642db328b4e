"""Fan-out: the share of the cluster's events each of 4 nodes receives from Redis pub/sub.

4 coordinator nodes (in-process ``NodeServer``s on real sockets; the load generator is a
separate process) each hold a quarter of the connections. Each node counts the pub/sub
messages it receives (``manager.node.subscriptions.messages``); the cluster's events are
the growth of every conversation's event sequence. Two placements:

- ``affinity``: a conversation's connection is on one node (conversations spread evenly),
  so its loop starts there too: what a conversation-affine load balancer gives;
- ``spread``: every conversation has 2 connections on 2 different nodes, the loop on the
  first: the worst case for interest-based routing with 2 watchers per conversation.

The broadcast design in the same run: 4 python-socketio servers with
``AsyncRedisManager`` (the handler emits to the conversation's room) on their own
private Redis, with the same placements; each node counts the messages it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis
import uvicorn

from bench.baselines.redis_emit import CountingRedisManager, create_app
from bench.common import Mode, cluster_store, log_dir, new_secret, private_redis, ratio, table
from bench.driver import LoadGenProcess
from coordinator import ManagerConfig
from coordinator.auth import issue_token
from coordinator.embedded import free_port
from coordinator.server import NodeServer
from coordinator.serverconfig import NO_LIMITS, ServerConfig

NODES = 4


class _Server(uvicorn.Server):  # type: ignore[misc]
    """uvicorn with a readiness event."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


class Broadcast:
    """One AsyncRedisManager socket.io server under uvicorn in this process."""

    def __init__(self, redis_url: str, secret: str) -> None:
        self.app, self.manager = create_app(redis_url, secret)
        self.port = free_port()
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self.server = _Server(config)
        self.task: asyncio.Task[Any] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve())
        await self.server.ready.wait()

    async def aclose(self) -> None:
        listener = getattr(self.manager, "thread", None)  # the pub/sub listener task
        if listener is not None:
            listener.cancel()
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await self.task


def placement(kind: str, conversations: int) -> list[tuple[int, list[int]]]:
    """(conversation, [node index of each connection]); the first connection starts it."""
    if kind == "affinity":
        return [(i, [i % NODES]) for i in range(conversations)]
    return [(i, [i % NODES, (i + 1 + (i // NODES) % 3) % NODES]) for i in range(conversations)]


async def run(mode: Mode) -> dict[str, Any]:
    conversations = mode.pick(40, 200)
    rate = mode.pick(100, 200)
    duration = mode.pick(5.0, 15.0)
    secret = new_secret()
    results: dict[str, Any] = {}
    gen = await LoadGenProcess().start()
    try:
        with private_redis() as redis_c, private_redis() as redis_b:
            store = cluster_store(redis_c.url, log_dir("fanout"))
            coord = [
                NodeServer(
                    ManagerConfig(
                        redis_url=redis_c.url,
                        event_store=store,
                        node_id=f"fan{i}",
                        max_connections_per_user=0,
                    ),
                    secret,
                    port=0,
                    server_config=ServerConfig(**NO_LIMITS),
                )
                for i in range(NODES)
            ]
            bcast = [Broadcast(redis_b.url, secret) for _ in range(NODES)]
            probe = aioredis.Redis.from_url(redis_c.url)
            try:
                for node in coord:
                    await node.start()
                for b in bcast:
                    await b.start()
                for kind in ("affinity", "spread"):
                    layout = placement(kind, conversations)
                    for system in ("coordinator", "broadcast"):
                        urls = [n.url for n in (coord if system == "coordinator" else bcast)]
                        group = f"{system}-{kind}"
                        # The first connection of each conversation joins first (its loop
                        # starts on that node), then the others.
                        firsts: list[dict[str, Any]] = []
                        rest: list[dict[str, Any]] = []
                        for conv, where in layout:
                            for k, node in enumerate(where):
                                (rest if k else firsts).append(
                                    {
                                        "url": urls[node],
                                        "query": {"conversation_id": f"fan-{kind}-{conv}"},
                                        "auth": {"token": issue_token(f"f{conv}", secret)},
                                    }
                                )
                        conns = firsts + rest
                        await gen.request(
                            {"cmd": "connect", "group": group, "conns": firsts, "concurrency": 1}
                        )
                        if rest:
                            await gen.request(
                                {"cmd": "connect", "group": group, "conns": rest, "concurrency": 10}
                            )
                        sids = [f"fan-{kind}-{conv}" for conv, _ in layout]
                        if system == "coordinator":
                            seq0 = await _seqs(probe, sids)
                            before = [n.manager.node.subscriptions.messages for n in coord]  # type: ignore[union-attr]
                        else:
                            before = [b.manager.messages for b in bcast]
                            pub0 = await _publishes(redis_b.url)
                        r = await gen.request(
                            {
                                "cmd": "run",
                                "group": group,
                                "rate": rate,
                                "duration": duration,
                                "drain": 5,
                            }
                        )
                        await asyncio.sleep(0.5)
                        if system == "coordinator":
                            total = await _seqs(probe, sids) - seq0
                            got = [n.manager.node.subscriptions.messages for n in coord]  # type: ignore[union-attr]
                        else:
                            total = await _publishes(redis_b.url) - pub0
                            got = [b.manager.messages for b in bcast]
                        received = [g - b0 for g, b0 in zip(got, before, strict=True)]
                        results[group] = {
                            "events": total,
                            "received_by_node": received,
                            "share_by_node": [ratio(x, total) for x in received],
                            "actions": r["sent"],
                            "answered": r["answered"],
                            "connections": len(conns),
                        }
                        await gen.request({"cmd": "close", "group": group})
            finally:
                await probe.aclose()
                for node in coord:
                    await node.aclose()
                for b in bcast:
                    await b.aclose()
    finally:
        await gen.aclose()
    return report(results, conversations, rate, duration)


async def _seqs(probe: aioredis.Redis, sids: list[str]) -> int:
    async with probe.pipeline(transaction=False) as pipe:
        for sid in sids:
            pipe.hget(f"coord:{{c:{sid}}}:meta", "seq")
        values = await pipe.execute()
    return sum(int(v or 0) for v in values)


async def _publishes(url: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_publish", {}).get("calls", 0))
    finally:
        await client.aclose()


def report(
    results: dict[str, Any], conversations: int, rate: int, duration: float
) -> dict[str, Any]:
    rows = []
    for group, r in results.items():
        shares = r["share_by_node"]
        rows.append(
            [
                group,
                r["connections"],
                r["events"],
                " / ".join(f"{100 * s:.0f}%" for s in shares),
                100 * max(shares),
                "yes" if max(shares) <= 0.30 else "NO",
            ]
        )
    t = table(
        f"Fan-out over {NODES} nodes: share of the cluster's events each node receives "
        f"({conversations} conversations, {rate} actions/s for {duration:.0f} s)",
        ["system-placement", "connections", "events", "share per node", "max %", "<= 30%"],
        rows,
    )
    return {
        "tables": [t],
        "json": {
            "settings": {"conversations": conversations, "rate": rate, "duration_s": duration},
            "results": results,
        },
    }


__all__ = ["CountingRedisManager", "run"]
