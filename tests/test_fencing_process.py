"""Fencing with real processes: an owner paused by SIGSTOP past its lease, and one that
dies while it re-registers after such a pause."""

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
        await _start_talking(ca, a.url, sid, token, "before")
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


async def test_a_node_killed_while_re_registering_leaves_nothing_of_its_old_incarnation(
    redis_url: str, tmp_path: Path
) -> None:
    """A lapsed node replaces its incarnation in the registry, then releases the old one.
    Killed in between, no registry entry names the old one any more: it stays on the
    retired list, and a reaper releases its conversation and connections."""
    keys = KeySchema("coord")
    sid = "rotating-1"
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    cluster = ProcessCluster(redis_url, tmp_path, extra_args=FAST)
    client = SioClient("on-a")
    try:
        a, _b = await cluster.async_start(2)
        token = cluster.token("rho")
        await _start_talking(client, a.url, sid, token, "hello")
        old = await redis.hget(keys.registry(), "node1")
        assert list((await redis.hgetall(keys.node_conns(old))).values()) == [sid]
        # Holding the reaper lock keeps node2 from reaping node1 while it is paused, and
        # holds node1's re-registration between its two steps, where it is killed.
        assert await redis.set(keys.reaper_lock(), "test", nx=True, px=60_000)
        a.pause()
        await wait_until(
            lambda: _missing(redis, keys.node_lease("node1")), timeout=10, what="a's lease gone"
        )
        a.resume()

        async def replaced() -> bool:
            return await redis.hget(keys.registry(), "node1") not in (None, old)

        await wait_until(replaced, timeout=10, what="node1 re-registered")
        a.kill()
        await redis.delete(keys.reaper_lock())

        left: dict[str, object] = {}  # what is not released yet, named in the failure

        async def released() -> bool:
            left.clear()
            # Released (no owner), or restarted by the live node (a reaper restarts a
            # released conversation whose inbox still lists an action).
            owner = (await redis.hgetall(keys.conv(sid))).get("inc")
            if owner not in ("", await redis.hget(keys.registry(), "node2")):
                left["conversation owner"] = owner
            for name, key in (
                ("conversation's connections", keys.conv_conns(sid)),
                ("user's connections", keys.user_conns("rho")),
                ("retired", keys.retired()),
            ):
                if found := await redis.hgetall(key):
                    left[name] = found
            if await redis.exists(keys.node_conns(old), keys.node_owned(old), keys.node_idle(old)):
                left["old incarnation's keys"] = old
            if (registry := await redis.hkeys(keys.registry())) != ["node2"]:
                left["registry"] = registry
            return not left

        try:
            await wait_until(released, timeout=20)
        except AssertionError:
            raise AssertionError(f"the old incarnation was not released: {left}") from None
    finally:
        await client.close()
        await cluster.async_stop()
        await redis.aclose()


async def _start_talking(client: SioClient, url: str, sid: str, token: str, text: str) -> None:
    """Join (starting the conversation's loop on that node) and get one echo."""
    await client.connect(url, sid, token)
    await client.say(text)
    await client.wait_for(lambda: len(client.events) >= 2, "the echo")


async def _missing(redis: aioredis.Redis, key: str) -> bool:
    return not await redis.exists(key)
