"""One Redis server (and a Unix socket or TLS to it): the simplest deployment."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry as SyncRetry

from ..config import ManagerConfig
from ..keys import KeySchema
from ..lane import ScriptLane
from ..state import LeaseRenewer
from ..state.core import Lane
from ..subscriptions import Subscription
from .base import Backend


class StandaloneBackend(Backend):
    """``lane_url`` sends the lane elsewhere than the pool (a test that holds the lane's
    replies at a TCP proxy); ``lane=False`` sends accept and commit through the pool."""

    mode = "standalone"

    def __init__(
        self, config: ManagerConfig, *, lane_url: str | None = None, lane: bool = True
    ) -> None:
        super().__init__(config)
        self._lane_url = lane_url or config.redis_url
        self._use_lane = lane
        pool = aioredis.BlockingConnectionPool.from_url(
            config.redis_url,
            max_connections=config.redis_max_connections,
            timeout=config.redis_timeout,
            socket_connect_timeout=config.connect_timeout,
            socket_timeout=config.redis_timeout,
            retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), 2),
            health_check_interval=10,
        )
        # Its own pool, closed with it (a client given a pool leaves it open: its
        # connections stayed until the garbage collector came, after every stop).
        self._client = aioredis.Redis.from_pool(pool)
        self._owned.append(self._client)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    def _make_lane(self) -> Lane | None:
        if not self._use_lane:
            return None
        return ScriptLane(
            self._lane_url,
            timeout=self.config.redis_timeout,
            connect_timeout=self.config.connect_timeout,
        )

    def _own_client(self) -> Any:
        cfg = self.config
        client = aioredis.Redis.from_url(
            cfg.redis_url,
            socket_connect_timeout=cfg.connect_timeout,
            socket_timeout=cfg.redis_timeout,
            single_connection_client=True,
        )
        self._owned.append(client)
        return client

    def subscriptions(self, keys: KeySchema, probe_interval: float) -> Subscription:
        return self._one_subscription(self.config.redis_url, keys, probe_interval)

    def lease_renewer(self, keys: KeySchema) -> LeaseRenewer:
        interval = self.config.heartbeat_interval
        client = redis.Redis.from_url(
            self.config.redis_url,
            socket_timeout=interval,
            socket_connect_timeout=interval,
            # A connection Redis closed (a restart) fails once; retry on a fresh one.
            retry=SyncRetry(NoBackoff(), 1),
        )
        return LeaseRenewer(client, keys)
