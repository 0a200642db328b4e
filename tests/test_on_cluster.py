"""The core guarantees again, on a real Redis Cluster (3 masters, tests/redis_topologies.py).

The tests below are the same functions as on one Redis server, imported from their
modules: here ``redis_url`` points at a node of the cluster (every master flushed before
each test) and ``redis_client`` is redis-py's cluster client, so the nodes they start
detect cluster mode, reach Redis through the cluster backend (a lane connection per
shard, sharded pub/sub) and must keep every guarantee: single activation, the exact cap,
cross-node order and replay, fencing, idle sweeps, speculation, token revocation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from tests.redis_topologies import RedisClusterServers
from tests.test_activation_and_cap import (  # noqa: F401  (collected again, on the cluster)
    test_an_evicted_loop_answers_what_it_acknowledged_before_it_stops,
    test_cap_holds_when_one_node_starts_many_at_once,
    test_cap_is_exact_across_nodes_and_evicts_least_recently_updated,
    test_single_activation_3_nodes_x_20_concurrent_starts_100_times,
)
from tests.test_cleanup import (  # noqa: F401
    test_idle_loops_are_closed_by_their_owner_unless_connected_or_running,
)
from tests.test_fencing import (  # noqa: F401
    test_a_former_owner_that_believes_it_still_owns_cannot_append,
    test_actions_accepted_while_the_lease_lapsed_are_answered_once_back,
    test_node_whose_renewals_stop_fences_itself_before_takeover,
)
from tests.test_revoke import (  # noqa: F401
    test_a_revoked_user_is_logged_out_everywhere_and_signs_in_again,
    test_revocations_older_than_the_tokens_longest_lifetime_are_pruned,
)
from tests.test_routing import (  # noqa: F401
    test_action_accepted_while_the_owner_is_gone_waits_for_the_successor,
    test_events_reach_only_interested_nodes,
)
from tests.test_server import (  # noqa: F401
    test_reconnect_to_another_node_replays_exactly_the_missed_events,
    test_two_nodes_one_conversation_every_event_in_order,
)
from tests.test_state_queries import (  # noqa: F401
    test_event_ids_increase_by_one_and_the_log_is_bounded,
    test_queries_give_the_same_cluster_answer_on_every_node,
)


@pytest.fixture
async def redis_url(redis_cluster: RedisClusterServers) -> AsyncIterator[str]:
    client = RedisCluster.from_url(redis_cluster.url)
    await client.flushall()
    await client.aclose()
    yield redis_cluster.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_url)
    yield client
    await client.aclose()


async def test_how_full_redis_is_is_the_fullest_masters(
    redis_cluster: RedisClusterServers, redis_client: RedisCluster, make_nodes: Any
) -> None:
    """/healthz's "Redis is full" and the memory gauges read every master, not only the
    one redis-py sends INFO to (its default node): there a bound set on another master
    was not seen."""
    (a,) = await make_nodes(1)
    await redis_client.initialize()
    default = redis_client.get_default_node()
    others = [m for m in redis_cluster.masters() if m.address != (default.host, default.port)]
    assert others
    bounded = others[0]
    used = int(bounded.info("memory")["used_memory"])
    with bounded.client() as c:
        c.config_set("maxmemory", used * 2)
    try:
        got = await a.node.directory.redis_memory()
        assert got is not None and got[1] == used * 2, got
        with bounded.client() as c:
            c.config_set("maxmemory", 1)
        assert "Redis is full" in await a.node.directory.redis_full()
    finally:
        with bounded.client() as c:
            c.config_set("maxmemory", 0)
