"""Which deployment ``--redis-url`` points at (``--redis-mode auto``), or a clear error
when it is not the one ``--redis-mode`` names."""

from __future__ import annotations

from typing import Any

from ..config import ManagerConfig
from ..errors import ConfigError, RedisRefused, RedisUnavailable
from ..redact import redact_url
from ..redisurl import SENTINEL_SCHEMES, seed_urls
from .base import Backend, ask_nodes, pick
from .cluster import ClusterBackend
from .sentinel import SentinelBackend
from .standalone import StandaloneBackend


async def cluster_enabled(config: ManagerConfig) -> bool:
    """Ask the node at ``redis_url`` whether it is a Redis Cluster node (of several
    listed, the first in order that answers as one, if any)."""
    answers = await ask_nodes(config, "INFO", "cluster")
    try:
        info, _ = pick(config, answers, _not_clustered)
    except RedisRefused:
        raise
    except RedisUnavailable:
        if any(not isinstance(reply, Exception) for _, reply in answers):
            return False  # some answered, none a cluster node: the caller says so
        raise
    return not _not_clustered(info)


def _not_clustered(info: Any) -> str:
    if int(info.get("cluster_enabled", 0)):
        return ""
    return "not a Redis Cluster node (cluster_enabled:0)"


async def open_backend(config: ManagerConfig) -> Backend:
    """The backend for ``config`` (whose URL ``ManagerConfig`` checked: ``check_redis_url``);
    checks the deployment is what ``redis_mode`` says."""
    mode, url = config.redis_mode, config.redis_url
    if url.startswith(SENTINEL_SCHEMES):
        return SentinelBackend(config)  # the config checked the mode
    if url.startswith("unix://") and mode in ("auto", "standalone"):
        return StandaloneBackend(config)
    clustered = await cluster_enabled(config)
    where = redact_url(url)
    if mode == "standalone" and clustered:
        raise ConfigError(
            f"Redis at {where} is a Redis Cluster node (cluster_enabled:1) but redis_mode is "
            "standalone: use --redis-mode cluster or auto"
        )
    if not clustered and len(seed_urls(url)) > 1:
        raise ConfigError(
            f"redis_url {where} lists several nodes, the seeds of a Redis Cluster, but the "
            "nodes that answered are not Redis Cluster nodes (cluster_enabled:0): give one "
            "node's URL (for Sentinel: redis+sentinel://)"
        )
    if mode == "cluster" and not clustered:
        raise ConfigError(
            f"Redis at {where} is not a Redis Cluster node (cluster_enabled:0) but "
            "redis_mode is cluster: use --redis-mode standalone or auto"
        )
    return ClusterBackend(config) if clustered else StandaloneBackend(config)
