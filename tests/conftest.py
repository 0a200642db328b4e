"""Real-Redis fixtures: a private redis-server per session, flushed before every test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from coordinator import ConversationManager
from coordinator.embedded import EmbeddedRedis
from tests.helpers import RecordingSink, fast_config

# Real-process nodes: the `process_cluster` fixture; Redis Cluster and Sentinel
# deployments: `redis_cluster`, `redis_cluster_replicated`, `redis_sentinel`; a private
# PostgreSQL: `postgres_dsn`.
pytest_plugins = ["tests.processes", "tests.redis_topologies", "tests.postgres"]


@pytest.fixture(scope="session", autouse=True)
def session_event_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Nodes made by module- and session-scoped fixtures (set up before any test's own
    directory) keep their event store in a temporary directory too, never the machine's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("session-data")))
        yield


@pytest.fixture(autouse=True)
def private_event_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: Any) -> str:
    """Each test's nodes (in-process and child processes) keep their event store's
    default directory in a fresh temporary one, never the user's: Redis is flushed per
    test, and a store left from another test would hold other conversations of the same
    ids. Returns the directory."""
    data = tmp_path_factory.mktemp("data")
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    return str(data / "coordinator" / "events")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL of the Redis the suite uses: REDIS_URL if set, else a private server."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = EmbeddedRedis().start()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture
async def redis_url(redis_server: str) -> AsyncIterator[str]:
    client = aioredis.Redis.from_url(redis_server)
    await client.flushdb()
    await client.aclose()
    yield redis_server


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


class NodeFactory:
    """Makes in-process nodes (managers with their own id and Redis connection)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.nodes: list[ConversationManager] = []
        self.sinks: dict[str, RecordingSink] = {}

    async def __call__(self, n: int = 1, **overrides: Any) -> list[ConversationManager]:
        made = []
        for _ in range(n):
            node_id = f"node{len(self.nodes) + 1}"
            sink = RecordingSink()
            manager = ConversationManager(fast_config(self.url, node_id, **overrides), sink=sink)
            await manager.start()
            self.nodes.append(manager)
            self.sinks[node_id] = sink
            made.append(manager)
        return made

    async def aclose(self) -> None:
        for node in reversed(self.nodes):
            if node.started:
                await node.aclose()


@pytest.fixture
async def make_nodes(redis_url: str) -> AsyncIterator[NodeFactory]:
    factory = NodeFactory(redis_url)
    yield factory
    await factory.aclose()


@pytest.fixture
async def servers(redis_url: str) -> AsyncIterator[Any]:
    """Nodes serving socket.io and REST in this process (see tests/server_fixtures.py)."""
    from tests.server_fixtures import ServerCluster

    cluster = ServerCluster(redis_url)
    yield cluster
    await cluster.aclose()
