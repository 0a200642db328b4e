"""Redis Cluster: redis-py's cluster client for everything but the hot path, a lane with
a pipelined connection per shard (``cluster_lane.py``) and sharded pub/sub
(``sharded.py``).

Any node of the cluster will do as ``--redis-url``, or several
(``redis://HOST:PORT,HOST:PORT/0``): the start asks them all at once and leaves out of
the clients one that is down, hangs or serves no slot (said); the clients read the slot
map from any of the others, then from the masters it names. Every
key of the schema carries a hash tag and every script touches one tag, so each call goes
to one shard; redis-py follows ``MOVED``/``ASK`` and retries ``TRYAGAIN``/
``CLUSTERDOWN`` and lost connections for the state layer's other calls.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.cluster
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry as SyncRetry

from ..cluster_lane import ClusterLane
from ..config import ManagerConfig
from ..errors import RedisUnavailable
from ..keys import KeySchema
from ..links import Endpoint
from ..redact import redact_url
from ..redisurl import address_of, seed_urls, shown_address, with_address
from ..sharded import ShardedSubscriptions
from ..slots import Address, SlotMap
from ..state import LeaseRenewer
from ..state.core import Lane
from ..subscriptions import PUBSUB_NAME, Subscription
from .base import Backend, ask_nodes, memory_policy, pick, trouble

log = logging.getLogger(__name__)

# A failover takes the cluster's node timeout plus an election (a few seconds): the
# clients retry that long, with backoff, before a call fails.
RETRIES = 20


class ClusterBackend(Backend):
    mode = "cluster"
    sharded = True

    def __init__(self, config: ManagerConfig) -> None:
        super().__init__(config)
        self._seeds = seed_urls(config.redis_url)
        self._client = self._cluster_client()
        self._cluster_lane: ClusterLane | None = None

    def _cluster_client(self) -> RedisCluster:
        cfg = self.config
        client = RedisCluster.from_url(
            self._seeds[0],
            startup_nodes=[ClusterNode(*address_of(url)) for url in self._seeds[1:]],
            max_connections=cfg.redis_max_connections,
            socket_connect_timeout=cfg.connect_timeout,
            socket_timeout=cfg.redis_timeout,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), RETRIES),
            # Other shards keep serving while one fails over (cluster-require-full-coverage
            # no on the servers): so does the client.
            require_full_coverage=False,
        )
        self._owned.append(client)
        return client

    @property
    def client(self) -> RedisCluster:
        return self._client

    async def check(self) -> None:
        """As ``Backend.check``; first, that a node listed serves slots: the cluster
        client fails on one with none (nodes started but never made a cluster) with an
        IndexError from deep inside redis-py. Seeds passed over (down, hung, serving no
        slot) are said, and left out of the clients: redis-py tries its seeds in a
        random order, and one that hangs outlasted the start's bound."""
        answers = await ask_nodes(self.config, "CLUSTER INFO")
        pick(self.config, answers, _no_slots)  # one will do, or why none
        if len(answers) == 1 and _no_slots(answers[0][1]):
            raise RedisUnavailable(
                redact_url(self.config.redis_url),
                "it is a Redis Cluster node with no slots assigned (was the cluster created? "
                "redis-cli --cluster create, or deploy/redis-cluster-create.sh; or was this "
                "node removed from it? give --redis-url a node that serves slots)",
            )
        serving = []
        for url, reply in answers:
            if why := _no_slots(reply):
                log.warning("Redis Cluster seed passed over: %s: %s", shown_address(url), why)
            else:
                serving.append(url)
        if len(serving) < len(self._seeds):
            old, self._seeds = self._client, serving
            self._client = self._cluster_client()
            self._owned.remove(old)
            await old.aclose()
        await super().check()

    async def memory_policies(self) -> dict[str, tuple[int, str]]:
        infos = _per_node(await self._client.info("memory", target_nodes=RedisCluster.PRIMARIES))
        return {address: memory_policy(info) for address, info in infos.items()}

    async def replica_counts(self) -> dict[str, int]:
        infos = _per_node(
            await self._client.info("replication", target_nodes=RedisCluster.PRIMARIES)
        )
        return {a: int(info.get("connected_slaves", 0) or 0) for a, info in infos.items()}

    def _make_lane(self) -> Lane | None:
        self._cluster_lane = ClusterLane(
            [Endpoint.from_url(url, "coordinator-lane") for url in self._seeds],
            timeout=self.config.redis_timeout,
            connect_timeout=self.config.connect_timeout,
        )
        return self._cluster_lane

    async def slot_map(self) -> SlotMap:
        """The slot map as the lane read it last (it reads it again)."""
        self.lane()
        assert self._cluster_lane is not None
        return await self._cluster_lane.refresh()

    def _own_client(self) -> Any:
        return self._cluster_client()

    def _shard_endpoint(self, address: Address) -> Endpoint:
        """Where one master's subscription connects."""
        return Endpoint.from_url(with_address(self._seeds[0], *address), PUBSUB_NAME)

    def subscriptions(self, keys: KeySchema, probe_interval: float) -> Subscription:
        return ShardedSubscriptions(
            read_map=self.slot_map,
            connect=self._shard_endpoint,
            publish=self._client.spublish,
            probe_stem=self.config.node_id,
            prefix=keys.prefix,
            probe_interval=probe_interval,
        )

    def lease_renewer(self, keys: KeySchema) -> LeaseRenewer:
        # A renewal must stay short while a master is failing over (the lease clock
        # runs): one retry on a fresh connection, each attempt bounded.
        timeout = min(0.5, self.config.heartbeat_interval)
        client = redis.cluster.RedisCluster.from_url(
            self._seeds[0],
            startup_nodes=[
                redis.cluster.ClusterNode(*address_of(url))  # type: ignore[no-untyped-call]
                for url in self._seeds[1:]
            ],
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=SyncRetry(NoBackoff(), 1),
            require_full_coverage=False,
        )
        return LeaseRenewer(client, keys)


def _cluster_info(reply: Any) -> dict[str, Any]:
    """CLUSTER INFO as a dict (redis-py parses it into one; a raw reply is parsed here)."""
    if isinstance(reply, dict):
        return reply
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _no_slots(reply: Any) -> str:
    """Why a node's CLUSTER INFO (or what asking raised) will not do: it is no cluster's,
    or the cluster has no slots assigned (a node never made part of one, or removed from
    it); '' when it serves."""
    if isinstance(reply, Exception):
        return trouble(reply)
    if str(_cluster_info(reply).get("cluster_slots_assigned", "0")) == "0":
        return "serves no slot (was the cluster created? was this node removed from it?)"
    return ""


def _per_node(infos: Any) -> dict[str, Any]:
    """INFO of every master, by address: redis-py answers one master's (a cluster of
    one) as that INFO itself."""
    if isinstance(infos, dict) and infos and not all(isinstance(v, dict) for v in infos.values()):
        return {"the master": infos}
    return dict(infos)
