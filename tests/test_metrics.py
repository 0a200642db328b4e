"""/metrics on prometheus_client: counters, the latency histograms, one registry per node."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families

from coordinator.metrics import NodeMetrics
from tests.helpers import wait_until
from tests.server_fixtures import ServerCluster

HISTOGRAMS = (
    "coordinator_action_ack_seconds",
    "coordinator_action_answer_seconds",
    "coordinator_event_delivery_lag_seconds",
    "coordinator_join_seconds",
    "coordinator_failover_seconds",
    "coordinator_event_loop_delay_seconds",
)


NOT_NAMED = ("node", "le")


def samples(text: str, node: str) -> dict[str, float]:
    """Sample name (with its other labels, ``{reason=busy}``, and ``le`` for buckets) ->
    value, for one node's series."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.get("node") == node, s
            more = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in NOT_NAMED)
            name = s.name + (f"{{{more}}}" if more else "")
            name += f"[{s.labels['le']}]" if "le" in s.labels else ""
            out[name] = s.value
    return out


async def test_scrape_after_actions_counts_and_observes(servers: ServerCluster) -> None:
    (a,) = await servers.start(1)
    first = await servers.join(a, "conv", "alice")
    for i in range(3):
        await first.say(f"m{i}")
    await first.wait_ids(6)
    # A second connection replays the six events: delivered, but not delivery lag.
    second = await servers.join(a, "conv", "alice")
    await second.wait_ids(6)
    refused = await servers.client().refused(a.url, "conv", "not-a-token")
    assert "malformed token" in refused

    status, text = await servers.request("GET", a, "/metrics")
    assert status == 200
    got = samples(text, "n1")
    assert got["coordinator_actions_accepted_total"] == 3
    assert got["coordinator_events_delivered_total"] == 12
    assert got["coordinator_action_ack_seconds_count"] == 3
    assert got["coordinator_join_seconds_count"] == 3  # two joins and a refusal
    assert got["coordinator_joins_refused_total{reason=auth}"] == 1
    assert got["coordinator_event_delivery_lag_seconds_count"] == 6
    for name in ("coordinator_action_ack_seconds", "coordinator_join_seconds"):
        assert 0 < got[f"{name}_sum"] < 30
        assert got[f"{name}_bucket[+Inf]"] == got[f"{name}_count"]
    assert got["coordinator_redis_up"] == 1 and got["coordinator_lease_valid"] == 1
    assert got["coordinator_local_connections"] == 2
    # The core's histograms are exposed and fed: each action was answered once.
    for name in HISTOGRAMS:
        assert f"{name}_count" in got and f"# TYPE {name} histogram\n" in text
    assert got["coordinator_action_answer_seconds_count"] == 3
    assert 0 <= got["coordinator_lease_renewal_age_seconds"] < 10


async def test_a_lost_nodes_conversation_served_again_is_a_failover_observation(
    make_nodes,
) -> None:
    """The node that restarts a lost node's conversation observes how long after the
    loss was noticed (the reaper's NODE_LOST) it was served again."""
    a, b = await make_nodes(2)
    await a.join_conversation("lost", "ca", {}, "alice")
    await b.join_conversation("lost", "cb", {}, "alice")
    await a.node.halt()  # like kill -9: nothing released
    await wait_until(lambda: "lost" in b.local_loops(), timeout=20, what="restarted on b")

    def observed() -> dict[str, float]:
        return samples(b.metrics.render().decode(), "node2")

    # Observed once the restart returns, a step after the loop is listed (seen under load).
    await wait_until(lambda: observed()["coordinator_failover_seconds_count"] >= 1, timeout=5)
    got = observed()
    assert got["coordinator_failover_seconds_count"] == 1
    assert 0 <= got["coordinator_failover_seconds_sum"] < 20


async def test_the_event_loop_lag_shows_a_blocked_loop(servers: ServerCluster) -> None:
    (a,) = await servers.start(1)

    async def lag() -> float:
        _, text = await servers.request("GET", a, "/metrics")
        return samples(text, "n1")["coordinator_event_loop_lag_seconds"]

    await wait_until(lambda: a.manager.node.lag.worst() < 0.3, timeout=15)
    # The node's loop is this test's: its timers wait while the test blocks it.
    asyncio.get_running_loop().call_soon(time.sleep, 0.5)
    await asyncio.sleep(0.1)
    assert await lag() >= 0.4
    # One long callback is one late tick: it leaves the gauge once the ticks it covers
    # were on time.
    await wait_until(lambda: a.manager.node.lag.worst() < 0.3, timeout=20)
    assert await lag() < 0.45  # not the block's tick (a busy machine may add a little)
    # The histogram keeps every tick, the block's among them.
    _, text = await servers.request("GET", a, "/metrics")
    got = samples(text, "n1")
    ticks = got["coordinator_event_loop_delay_seconds_count"]
    assert ticks > 20 and ticks - got["coordinator_event_loop_delay_seconds_bucket[0.25]"] >= 1


async def test_nodes_in_one_process_keep_their_own_metrics(servers: ServerCluster) -> None:
    a, b = await servers.start(2)
    client = await servers.join(a, "conv", "alice")
    await client.say("hello")
    await client.wait_ids(2)
    _, text_a = await servers.request("GET", a, "/metrics")
    _, text_b = await servers.request("GET", b, "/metrics")
    assert samples(text_a, "n1")["coordinator_actions_accepted_total"] == 1
    assert samples(text_b, "n2")["coordinator_actions_accepted_total"] == 0
    assert a.manager.metrics.registry is not b.manager.metrics.registry


def test_core_hooks_show_up_in_the_exposition() -> None:
    metrics = NodeMetrics("n1")
    for seconds in (0.002, 0.3, 45):
        metrics.observe_answer(seconds)
    metrics.observe_failover(7.5)
    age: list[float | None] = [None]
    metrics.lease_age_from(lambda: age[0])
    got = samples(metrics.render().decode(), "n1")
    assert "coordinator_lease_renewal_age_seconds" not in got  # None: not renewed yet
    assert got["coordinator_action_answer_seconds_count"] == 3
    assert got["coordinator_action_answer_seconds_bucket[0.005]"] == 1
    assert got["coordinator_action_answer_seconds_bucket[60.0]"] == 3
    assert got["coordinator_failover_seconds_count"] == 1
    assert got["coordinator_failover_seconds_bucket[7.0]"] == 0
    assert got["coordinator_failover_seconds_bucket[8.0]"] == 1
    age[0] = 1.25
    assert samples(metrics.render().decode(), "n1")["coordinator_lease_renewal_age_seconds"] == 1.25


def test_readings_integers_and_a_broken_reading() -> None:
    metrics = NodeMetrics('n"1')
    count = [41]
    metrics.counter_from("coordinator_things", "Things.", lambda: count[0])
    metrics.gauge_from("coordinator_broken", "Raises.", lambda: 1 / 0)
    count[0] += 1
    text = metrics.render().decode()
    # Integral values are written as integers; label values are escaped.
    assert 'coordinator_things_total{node="n\\"1"} 42\n' in text
    assert "# TYPE coordinator_broken gauge\n" in text
    assert "coordinator_broken{" not in text
    assert 'coordinator_action_ack_seconds_sum{node="n\\"1"} 0\n' in text


async def test_actions_sent_back_to_back_reach_the_clients_without_a_catch_up(
    servers: ServerCluster,
) -> None:
    """A client sends actions ten at a time, without waiting for their answers, through
    the node that runs the loop, whose agent answers from a worker process: the events
    reach the connections in id order as they are logged, never one ahead of another
    (which would send every connection of the conversation to read the log)."""
    (a,) = await servers.start(1)
    first = await servers.join(a, "conv", "alice")
    watcher = await servers.join(a, "conv", "alice")
    for i in range(10):
        await asyncio.gather(*(first.say(f"m{i}-{j}") for j in range(10)))
    await first.wait_ids(200)
    await watcher.wait_ids(200)
    assert first.ids == watcher.ids == list(range(1, 201))
    _, text = await servers.request("GET", a, "/metrics")
    assert samples(text, "n1")["coordinator_connection_catch_ups_total"] == 0


def test_redis_memory_is_absent_until_read_and_once_redis_does_not_answer() -> None:
    """A 0 there means "no bound", and a reading kept past Redis' loss would be stale:
    the two series are shown only while a reading is fresh."""
    metrics = NodeMetrics("n1")
    names = ("coordinator_redis_memory_used_bytes", "coordinator_redis_maxmemory_bytes")

    def shown() -> dict[str, float]:
        got = samples(metrics.render().decode(), "n1")
        return {name: got[name] for name in names if name in got}

    assert shown() == {}
    metrics.show_redis_memory((950, 1000))
    assert shown() == dict(zip(names, (950, 1000), strict=True))
    metrics.show_redis_memory(None)
    assert shown() == {}
    metrics.show_redis_memory(None)  # twice: nothing to take out
    assert shown() == {}
