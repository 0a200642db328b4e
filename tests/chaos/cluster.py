"""The chaos cluster: a private Redis with AOF, node processes that each reach it through
their own TCP proxy, and the fault injections.

The proxies run on an event loop of their own, in a thread: a busy test loop (clients,
observer, checks) must never delay a node's Redis traffic and so cause a fault of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis

from coordinator.embedded import EmbeddedRedis
from coordinator.keys import KeySchema
from coordinator.state import text
from tests.processes import NodeProcess, ProcessCluster
from tests.tcpproxy import TcpProxy

T = TypeVar("T")

NODES = 3
NODE_TTL = 3.0
HEARTBEAT_INTERVAL = 0.5
CAP = 2  # --max-concurrent-conversations
NODE_ARGS = (
    "--node-ttl", str(NODE_TTL),
    "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
    "--max-concurrent-conversations", str(CAP),
)  # fmt: skip
READY_WITHIN = 60.0


class ProxyLoop:
    """An event loop in a daemon thread that runs the proxies."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxies", daemon=True)
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def call(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return await self.run(call())

    async def aclose(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 5)
        if not self._thread.is_alive():
            self._loop.close()


class ChaosCluster:
    """``NODES`` nodes against a private AOF Redis, node i through ``proxies[i]``."""

    def __init__(self, workdir: Path, *, nodes: int = NODES) -> None:
        self.workdir = workdir
        redis_dir = workdir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        self.redis = EmbeddedRedis(appendonly=True, dir=str(redis_dir))
        self.size = nodes
        self.processes = ProcessCluster(self.redis.url, workdir / "nodes", extra_args=NODE_ARGS)
        self.proxies: list[TcpProxy] = []
        self.keys = KeySchema()
        self.paused: set[int] = set()
        self.tokens: dict[str, str] = {}
        self._proxy_loop: ProxyLoop | None = None
        self._direct: aioredis.Redis | None = None

    @property
    def nodes(self) -> list[NodeProcess]:
        return self.processes.nodes

    @property
    def direct(self) -> aioredis.Redis:
        """A client of Redis itself (not through a proxy), for the test's own reads."""
        assert self._direct is not None, "the cluster is not started"
        return self._direct

    def url(self, i: int) -> str:
        return self.nodes[i].url

    def usable(self, i: int) -> bool:
        """Whether a client could connect to node ``i`` now (it runs and is not paused)."""
        return self.nodes[i].alive and i not in self.paused

    async def start(self, users: list[str]) -> None:
        await asyncio.to_thread(self.redis.start)
        self._direct = aioredis.Redis.from_url(
            self.redis.url, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        self._proxy_loop = ProxyLoop()
        for _ in range(self.size):
            proxy = await self._proxy_loop.run(TcpProxy(self.redis.port).start())
            self.proxies.append(proxy)
            node = self.processes.add()
            node.redis_url = proxy.url
            node.start()
        names = [*users, "observer"]
        tokens = await asyncio.gather(
            *(asyncio.to_thread(self.processes.token, name) for name in names)
        )
        self.tokens = dict(zip(names, tokens, strict=True))
        await asyncio.gather(*(node.async_wait_ready(READY_WITHIN) for node in self.nodes))

    async def aclose(self) -> None:
        for i in list(self.paused):
            self.nodes[i].resume()
        self.paused.clear()
        try:
            await self.processes.async_stop(20)
        finally:
            if self._proxy_loop is not None:
                for proxy in self.proxies:
                    await self._proxy_loop.run(proxy.aclose())
                await self._proxy_loop.aclose()
            if self._direct is not None:
                await self._direct.aclose()
            await asyncio.to_thread(self.redis.cleanup)

    # -- faults ----------------------------------------------------------------------
    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def pause(self, i: int) -> None:
        self.paused.add(i)
        self.nodes[i].pause()

    def resume(self, i: int) -> None:
        self.nodes[i].resume()
        self.paused.discard(i)

    def terminate(self, i: int) -> None:
        self.nodes[i].terminate()

    async def wait_exit(self, i: int, within: float) -> int | None:
        return await asyncio.to_thread(self.nodes[i].wait_exit, within)

    async def cut(self, i: int, *, blackhole: bool = False) -> None:
        assert self._proxy_loop is not None
        proxy = self.proxies[i]
        await self._proxy_loop.call(lambda: proxy.cut(blackhole=blackhole))

    async def restore(self, i: int) -> None:
        assert self._proxy_loop is not None
        await self._proxy_loop.call(self.proxies[i].restore)

    async def stop_redis(self) -> None:
        """SIGKILL: with appendfsync always, every write Redis answered is in the AOF."""
        await asyncio.to_thread(self.redis.stop, True)

    async def start_redis(self) -> None:
        """Start Redis again on the same port and directory; it loads its AOF."""
        await asyncio.to_thread(self.redis.start)

    # -- state -----------------------------------------------------------------------
    async def healthy(self, i: int) -> bool:
        return await asyncio.to_thread(self.nodes[i].health, 1.0) is not None

    async def all_healthy(self) -> bool:
        live = [i for i in range(self.size) if self.usable(i)]
        return all(await asyncio.gather(*(self.healthy(i) for i in live)))

    async def incarnation(self, i: int) -> str:
        raw = await self.direct.hget(self.keys.registry(), self.nodes[i].node_id)
        return text(raw)

    def log_tails(self, lines: int = 60) -> str:
        return self.processes.log_tails(lines)


def now() -> float:
    """Wall-clock time: event timestamps come from the nodes' wall clocks (same host)."""
    return time.time()
