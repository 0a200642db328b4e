"""Redis deployments: one Redis server, Redis Cluster, or a master behind Sentinel.

``open_backend(config)`` picks one (``--redis-mode``, default auto); each makes every
Redis connection a node uses (``base.py`` lists them)."""

from .base import Backend
from .cluster import ClusterBackend
from .detect import open_backend
from .sentinel import SentinelBackend
from .standalone import StandaloneBackend

__all__ = ["Backend", "ClusterBackend", "SentinelBackend", "StandaloneBackend", "open_backend"]
