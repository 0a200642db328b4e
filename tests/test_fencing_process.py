"""Fencing with real processes: an owner paused by SIGSTOP past its lease."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from coordinator.keys import KeySchema
from tests.helpers import wait_until
from tests.processes import ProcessCluster
from tests.server_fixtures import SioClient

FAST = ["--node-ttl", "3", "--heartbeat-interval", "0.5"]


async def _local_loops(url: str, token: str) -> list[str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/api/node", headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    return list(body["loops"])


async def test_sigstopped_owner_is_replaced_and_cannot_write_after_sigcont(
    redis_url: str, tmp_path: Path
) -> None:
    keys = KeySchema("coord")
    sid = "paused-1"
    redis = aioredis.Redis.from_url(redis_url)
    cluster = ProcessCluster(redis_url, tmp_path, extra_args=FAST)
    ca, cb = SioClient("on-a"), SioClient("on-b")
    try:
        a, b = await cluster.async_start(2)
        token = cluster.token("pat")
        await ca.connect(a.url, sid, token)
        await ca.say("before")
        await ca.wait_for(lambda: len(ca.events) >= 2, "first echo")
        await cb.connect(b.url, sid, token)
        assert await _local_loops(a.url, token) == [sid]

        a.pause()
        await wait_until(
            lambda: _missing(redis, keys.node_lease("node1")), timeout=10, what="a's lease gone"
        )
        # The action is accepted by b, which finds the owner dead and takes over.
        await cb.say("during")
        await cb.wait_for(
            lambda: any(
                e.get("source") == "agent" and e["args"]["content"] == "during" for e in cb.events
            ),
            "the successor's reply",
        )
        assert await _local_loops(b.url, token) == [sid]
        meta = {k.decode(): v.decode() for k, v in (await redis.hgetall(keys.conv(sid))).items()}
        assert meta["owner"] == "node2" and meta["epoch"] == "2"
        takeover_seq = int(meta["seq"])

        a.resume()
        # Its own clock tells it the lease lapsed: its loop is gone before it serves anything.
        assert await _local_loops(a.url, token) == []
        await cb.say("after")
        await cb.wait_for(
            lambda: any(
                e.get("source") == "agent" and e["args"]["content"] == "after" for e in cb.events
            ),
            "reply after resume",
        )
        rows = await redis.xrange(keys.events(sid))
        late = [
            entry_id
            for entry_id, fields in rows
            if int(entry_id.decode().split("-")[0]) > takeover_seq and fields.get(b"e") == b"1"
        ]
        assert late == [], "the paused owner wrote after it was replaced"
        replies = [e["args"]["content"] for e in cb.events if e.get("source") == "agent"]
        assert replies.count("during") == 1 and replies.count("after") == 1
    finally:
        await ca.close()
        await cb.close()
        await cluster.async_stop()
        await redis.aclose()


async def _missing(redis: aioredis.Redis, key: str) -> bool:
    return not await redis.exists(key)
