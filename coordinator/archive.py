"""The event store behind the Redis log: one store per cluster.

Every node of a cluster must read and write the same store (a conversation moves
between nodes; its history must not stay behind on one machine). Each node records the
identity of its store in Redis when it starts; the first one recorded is the cluster's,
and a node whose store is another refuses to start (``check_cluster_store``).
"""

from __future__ import annotations

import logging

from .config import ManagerConfig
from .eventstore import EventStore, StoreMismatch
from .state import RedisState

log = logging.getLogger(__name__)


async def check_cluster_store(
    state: RedisState, store: EventStore, config: ManagerConfig, shown: str
) -> None:
    """Record ``store`` (shown as ``shown``) as the cluster's, or raise StoreMismatch
    when the cluster already uses another one."""
    identity = store.identity()
    recorded, where, node = await state.claim_store(identity, shown, config.node_id)
    if recorded == identity:
        return
    raise StoreMismatch(
        f"this node's event store {shown} (identity {identity}) is not the cluster's: "
        f"the nodes sharing this Redis (key prefix {config.key_prefix!r}) use {where} "
        f"(identity {recorded}, first recorded by node {node}). Every node of a cluster "
        "must read and write one store, or conversations lose their history when they "
        f"move between nodes. Fix: start this node with --event-store {where} (the same "
        "directory, on a volume every node mounts, or the same PostgreSQL database; "
        "nodes on several machines need postgresql://...); or, for a separate cluster, "
        f"another --key-prefix or Redis. If the cluster really moved to a new store, "
        f"delete the Redis key {state.keys.event_store()} once every node uses it."
    )
