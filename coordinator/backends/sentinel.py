"""Behind Sentinel: every connection asks the Sentinels where the master is.

``--redis-url redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]``
(``rediss+sentinel://`` for TLS to the data nodes; ``sentinel_password`` and
``sentinel_username`` parameters when the Sentinels have credentials of their own).
redis-py's Sentinel pools find the master on connect and drop a connection that reaches
a demoted one (``READONLY``); the lane does the same (``lane.ScriptLane(locate=...)``),
and the lease keeper's client too.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
import redis.sentinel
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry as SyncRetry

from ..config import ManagerConfig
from ..keys import KeySchema
from ..lane import ScriptLane
from ..redisurl import SentinelURL, parse_sentinel_url
from ..state import LeaseRenewer
from ..state.core import Lane
from ..subscriptions import Subscription
from .base import Backend

# A failover takes Sentinel's down-after plus an election: calls retry, with backoff,
# about that long before they fail.
RETRIES = 20


class SentinelBackend(Backend):
    mode = "sentinel"

    def __init__(self, config: ManagerConfig) -> None:
        super().__init__(config)
        self.url: SentinelURL = parse_sentinel_url(config.redis_url)
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            list(self.url.sentinels),
            sentinel_kwargs=self._sentinel_kwargs(),
            **self._node_kwargs(),
        )
        self._client = self._master_client(RETRIES)

    def _sentinel_kwargs(self) -> dict[str, Any]:
        cfg, u = self.config, self.url
        return {
            "username": u.sentinel_username or None,
            "password": u.sentinel_password or None,
            "socket_connect_timeout": cfg.connect_timeout,
            "socket_timeout": cfg.connect_timeout,
        }

    def _node_kwargs(self) -> dict[str, Any]:
        cfg, u = self.config, self.url
        options: dict[str, Any] = {
            "username": u.username or None,
            "password": u.password or None,
            "db": u.db,
            "socket_connect_timeout": cfg.connect_timeout,
            "socket_timeout": cfg.redis_timeout,
        }
        if u.tls:
            options["ssl"] = True
            options.update(dict(u.query))
        return options

    def _master_client(self, retries: int) -> aioredis.Redis:
        client: aioredis.Redis = self._sentinel.master_for(
            self.url.master,
            redis_class=aioredis.Redis,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries),
        )
        self._owned.append(client)
        return client

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def locate(self) -> tuple[str, int]:
        """The master's address, as the Sentinels say now."""
        host, port = await self._sentinel.discover_master(self.url.master)
        return str(host), int(port)

    def _make_lane(self) -> Lane | None:
        first = self.url.sentinels[0]
        return ScriptLane(
            self.url.node_url(*first),  # credentials, db and TLS; the address is located
            timeout=self.config.redis_timeout,
            connect_timeout=self.config.connect_timeout,
            locate=self.locate,
        )

    def _own_client(self) -> Any:
        return self._master_client(RETRIES)

    def subscriptions(self, keys: KeySchema, probe_interval: float) -> Subscription:
        # A subscription that fails reconnects to the master the Sentinels name then.
        url = self.url.node_url(*self.url.sentinels[0])  # credentials, db, TLS
        return self._one_subscription(url, keys, probe_interval, self.locate)

    def lease_renewer(self, keys: KeySchema) -> LeaseRenewer:
        timeout = min(0.5, self.config.heartbeat_interval)
        u = self.url
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            list(u.sentinels),
            sentinel_kwargs={
                "username": u.sentinel_username or None,
                "password": u.sentinel_password or None,
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
            },
            **{**self._node_kwargs(), "socket_timeout": timeout, "socket_connect_timeout": timeout},
        )
        client = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
            u.master, retry=SyncRetry(NoBackoff(), 1)
        )
        return LeaseRenewer(client, keys)
