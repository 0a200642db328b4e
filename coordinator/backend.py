"""One place that makes every Redis connection a node uses, from one configuration.

A node talks to Redis over four kinds of connection, each for a reason:

- the shared pool (``redis-py``), bounded, that callers wait on instead of failing;
- the script lane (``lane.py``): one pipelined connection for the two scripts of every
  action, accept and commit, so a commit sent behind its accept runs after it;
- the registration client: a connection of its own for (re-)registering the node, so a
  pool exhausted by a burst of joins cannot hold up a node whose lease lapsed;
- the pub/sub client: the subscription and its probe, likewise apart from the pool;
- the lease keeper's blocking client, used from the keeper's thread (``membership.py``).

All of them are built here from the URL (user, password, database, TLS parameters) and
the timeouts in ``ManagerConfig``; a second kind of deployment (Redis Cluster, Sentinel)
changes this module and nothing else.
"""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry as SyncRetry

from .config import ManagerConfig, redact_url
from .errors import RedisUnavailable
from .keys import KeySchema
from .lane import ScriptLane
from .state import LeaseRenewer, RedisState


class RedisBackend:
    """The connections of one node to one Redis server (standalone).

    ``lane_url`` sends the lane elsewhere than the pool (a test that holds the lane's
    replies at a TCP proxy); ``lane=False`` sends accept and commit through the pool.
    """

    mode = "standalone"

    def __init__(
        self, config: ManagerConfig, *, lane_url: str | None = None, lane: bool = True
    ) -> None:
        self.config = config
        self.url = config.redis_url
        self._lane_url = lane_url or self.url
        self._use_lane = lane
        self._owned: list[aioredis.Redis] = []
        self._lane: ScriptLane | None = None
        self.client = self._pool_client()

    def describe(self) -> str:
        """The deployment, for logs and errors (no password)."""
        return f"{self.mode} Redis at {redact_url(self.url)}"

    def _pool_client(self) -> aioredis.Redis:
        cfg = self.config
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=cfg.redis_max_connections,
            timeout=cfg.redis_timeout,
            socket_connect_timeout=cfg.connect_timeout,
            socket_timeout=cfg.redis_timeout,
            retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), 2),
            health_check_interval=10,
        )
        client = aioredis.Redis(connection_pool=pool)
        self._owned.append(client)
        return client

    def _own_client(self, *, single_connection: bool = False) -> aioredis.Redis:
        cfg = self.config
        client = aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=cfg.connect_timeout,
            socket_timeout=cfg.redis_timeout,
            single_connection_client=single_connection,
        )
        self._owned.append(client)
        return client

    async def check(self) -> None:
        """Raise RedisUnavailable (naming the deployment, never its password) unless
        Redis answers within the connect timeout."""
        try:
            async with asyncio.timeout(self.config.connect_timeout + 1):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            reason = redact_url(str(exc)) if str(exc) else type(exc).__name__
            raise RedisUnavailable(redact_url(self.url), reason) from None

    def state(self, keys: KeySchema) -> RedisState:
        """The state layer on the shared pool, with the lane for accept and commit."""
        if self._use_lane and self._lane is None:
            self._lane = ScriptLane(
                self._lane_url,
                timeout=self.config.redis_timeout,
                connect_timeout=self.config.connect_timeout,
            )
        return RedisState(self.client, keys, self._lane)

    def registration_state(self, keys: KeySchema) -> RedisState:
        """The state layer on a connection of its own, for (re-)registering."""
        return RedisState(self._own_client(single_connection=True), keys)

    def pubsub_client(self) -> aioredis.Redis:
        """A client for the subscription and its probe, apart from the pool."""
        return self._own_client()

    def lease_renewer(self, keys: KeySchema) -> LeaseRenewer:
        """The lease keeper thread's blocking client (closed by the keeper)."""
        interval = self.config.heartbeat_interval
        client = redis.Redis.from_url(
            self.url,
            socket_timeout=interval,
            socket_connect_timeout=interval,
            # A connection Redis closed (a restart) fails once; retry on a fresh one.
            retry=SyncRetry(NoBackoff(), 1),
        )
        return LeaseRenewer(client, keys)

    async def aclose(self) -> None:
        if self._lane is not None:
            await self._lane.aclose()
            self._lane = None
        clients, self._owned = self._owned, []
        for client in clients:
            await client.aclose()
