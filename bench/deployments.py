"""Redis deployments: one server vs a Redis Cluster, replica-acknowledged writes, the
load spread over shards, and a master failover (``python -m bench.run --only deployments``).

Every deployment is real and local: a private ``redis-server``, a 3-master Redis Cluster
and one with a replica per master (tests/redis_topologies.py, the configuration files in
deploy/ that docker-compose.yml's ``cluster`` profile runs). Nodes are ``coordinator
serve`` processes; clients are the load generator's (as in ``bench.roundtrip``).

1. Round trip, same-node and cross-node, on one server and on the cluster, in shuffled
   rounds of one run.
2. ``--ack-replicas 1`` against 0 on the replicated cluster, in one run: the round trip,
   then joins (second connections to running conversations, whose first page waits for
   a replica with ``--ack-replicas 1``), rate and latency.
3. Load spread: 300 conversations on the cluster each get actions; each master's share of
   the commands (INFO commandstats), and every shard channel a master carries must be in
   its own slots (PUBSUB SHARDCHANNELS).
4. Failover: the master holding a watched conversation gets SIGKILL while a client acts
   every 50 ms; kill to the first answer of an action sent after the kill. The old master
   comes back as a replica before the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterator
from typing import Any

from bench.common import (
    Mode,
    Proc,
    log_dir,
    median,
    new_secret,
    node_proc,
    percentile,
    private_redis,
    ratio,
    start_all,
    stop_all,
    table,
    url_of,
)
from bench.driver import LoadGenProcess, join_group
from bench.failover import Watcher
from coordinator.auth import issue_token
from coordinator.keys import KeySchema
from coordinator.slots import slot_of
from tests.redis_topologies import RedisClusterServers

INTERVAL = 0.05


@contextlib.contextmanager
def _cluster(replicas: int) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(replicas=replicas)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def _round_trips(
    deployments: dict[str, tuple[str, list[str]]], rounds: int, seconds: float, rate: int
) -> dict[str, list[float]]:
    """deployment -> (redis url, serve flags): same-node and cross-node latencies each."""
    secret = new_secret()
    logs = log_dir("deployments")
    procs: list[Proc] = []
    groups: dict[str, tuple[Proc, Proc | None]] = {}
    for name, (url, flags) in deployments.items():
        node_id = name.replace(" ", "")
        a = node_proc(f"{node_id}-a", url, secret, logs, extra=flags)
        b = node_proc(f"{node_id}-b", url, secret, logs, extra=flags)
        procs += [a, b]
        groups[f"{name} same"] = (a, None)
        groups[f"{name} cross"] = (b, a)
    gen = LoadGenProcess()
    lat: dict[str, list[float]] = {g: [] for g in groups}
    try:
        start_all(procs)
        await gen.start()
        for n, (group, (joins, setup)) in enumerate(groups.items()):
            setup_url = url_of(setup) if setup is not None else None
            await join_group(gen, group, url_of(joins), secret, f"d{n}", setup_url=setup_url)
        rng = random.Random(3)
        for _ in range(rounds):
            order = list(groups)
            rng.shuffle(order)
            for group in order:
                r = await gen.request(
                    {"cmd": "run", "group": group, "rate": rate, "duration": seconds}
                )
                lat[group] += r["lat_ms"]
    finally:
        await gen.aclose()
        stop_all(procs)
    return lat


async def _joins(deployments: dict[str, tuple[str, list[str]]], count: int) -> dict[str, Any]:
    """deployment -> (redis url, serve flags): ``count`` second connections to running
    conversations on a node of each, 20 in flight; joins/s and their latencies."""
    secret = new_secret()
    logs = log_dir("deployments")
    out: dict[str, Any] = {}
    for name, (url, flags) in deployments.items():
        node = node_proc(name.replace(" ", "") + "-joins", url, secret, logs, extra=flags)
        gen = LoadGenProcess()
        try:
            start_all([node])
            await gen.start()
            conns = [
                {
                    "url": url_of(node),
                    "query": {"conversation_id": f"j-{name.replace(' ', '')}-{i}"},
                    "auth": {"token": issue_token(f"u{i}", secret)},  # under the user cap
                }
                for i in range(count)
            ]
            first = {"cmd": "connect", "group": "first", "conns": conns, "concurrency": 20}
            await gen.request(first)
            t0 = time.perf_counter()
            reply = await gen.request({**first, "group": "second", "return_joins": True})
            seconds = time.perf_counter() - t0
        finally:
            await gen.aclose()
            stop_all([node])
        joins = reply["join_ms"]
        out[name] = {
            "joins_per_s": (count - reply["failed"]) / seconds,
            "failed": reply["failed"],
            "p50_ms": percentile(joins, 50),
            "p99_ms": percentile(joins, 99),
        }
    return out


def _latency_rows(lat: dict[str, list[float]]) -> list[list[Any]]:
    return [
        [g, len(v), percentile(v, 50), percentile(v, 90), percentile(v, 99)] for g, v in lat.items()
    ]


async def _spread(cluster: RedisClusterServers, conversations: int) -> dict[str, Any]:
    secret = new_secret()
    logs = log_dir("spread")
    node = node_proc("spread-a", cluster.url, secret, logs)
    gen = LoadGenProcess()
    masters = cluster.masters()

    def calls() -> list[int]:
        out = []
        for m in masters:
            with m.client() as c:
                stats = c.info("commandstats")
            out.append(sum(int(v["calls"]) for v in stats.values()))
        return out

    try:
        start_all([node])
        await gen.start()
        await join_group(gen, "spread", url_of(node), secret, "sp", count=conversations)
        before = calls()
        await gen.request({"cmd": "run", "group": "spread", "rate": 300, "duration": 5})
        after = calls()
        stray = 0
        for m in masters:
            with m.client() as c:
                channels = c.execute_command("PUBSUB", "SHARDCHANNELS")
            ranges = [(r.start, r.end) for r in cluster.slot_map() if r.master == m.address]
            stray += sum(1 for ch in channels if not any(a <= slot_of(ch) <= b for a, b in ranges))
    finally:
        await gen.aclose()
        stop_all([node])
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta)
    return {
        "conversations": conversations,
        "commands_per_master": delta,
        "share_per_master": [d / total for d in delta],
        "stray_shard_channels": stray,
    }


async def _failover_run(
    cluster: RedisClusterServers, node: Proc, secret: str, run: int
) -> dict[str, Any]:
    sid = f"fo-{run}"
    w = Watcher()
    auth = {"token": issue_token(f"fo-u{run}", secret)}
    await w.client.connect(url_of(node), {"conversation_id": sid}, auth)
    for i in range(5):
        w.act(f"warm-{i}")
        await asyncio.sleep(INTERVAL)
    key = KeySchema().conv(sid)
    victim = cluster.master_of(key)
    cluster.kill(victim)
    t_kill = time.perf_counter()
    promoted = asyncio.create_task(_promoted(cluster, key, victim))
    n = 0
    answered_at = None
    while time.perf_counter() - t_kill < 30:
        w.act(f"a-{n}")
        n += 1
        after = [t for k, t in w.answered.items() if w.sent[k] > t_kill]
        if after:
            answered_at = min(after)
            break
        await asyncio.sleep(INTERVAL)
    await asyncio.sleep(1.0)
    acked, answered = set(w.acked), set(w.answered)
    await w.client.close()
    await cluster.async_wait_failover(victim)
    promoted_at = await promoted
    await cluster.async_restart(victim)  # back as a replica, for the next run
    return {
        "promoted_s": promoted_at - t_kill,
        "served_again_s": (answered_at - t_kill) if answered_at else float("nan"),
        "acked": len(acked),
        "unanswered": len(acked - answered),
    }


async def _promoted(cluster: RedisClusterServers, key: str, victim: Any) -> float:
    """When the cluster itself had moved ``key``'s slot to a new master (polled)."""
    while True:
        try:
            master = await asyncio.to_thread(cluster.master_of, key)
            if master is not victim:
                return time.perf_counter()
        except Exception:  # a node that died meanwhile: ask again
            pass
        await asyncio.sleep(0.02)


async def _failovers(runs: int, ack_replicas: int) -> dict[str, Any]:
    """With --ack-replicas 1 each master has two replicas: after a failover the shard
    still has one to acknowledge writes (with one, nothing is acknowledged until a
    replica is back: the guarantee holds, the service waits)."""
    secret = new_secret()
    logs = log_dir("redis-failover")
    rows = []
    with _cluster(2 if ack_replicas else 1) as cluster:
        flags = ["--ack-replicas", str(ack_replicas), "--node-ttl", "10", "--lease-margin", "2"]
        node = node_proc("fo-a", cluster.url, secret, logs, extra=flags)
        try:
            start_all([node])
            for k in range(runs):
                rows.append(await _failover_run(cluster, node, secret, k))
        finally:
            stop_all([node])
        timeout_ms = cluster.settings.node_timeout_ms
    served = [r["served_again_s"] for r in rows]
    return {
        "promoted_s_median": median([r["promoted_s"] for r in rows]),
        "ack_replicas": ack_replicas,
        "node_timeout_s": timeout_ms / 1000,
        "runs": rows,
        "served_again_s_median": median(served),
        "served_again_s_max": max(served),
        "acked": sum(r["acked"] for r in rows),
        "unanswered": sum(r["unanswered"] for r in rows),
    }


async def run(mode: Mode) -> dict[str, Any]:
    rounds = mode.pick(3, 8)
    seconds = mode.pick(3.0, 4.0)
    rate = 100
    tables = []
    out: dict[str, Any] = {}
    with private_redis() as single, _cluster(0) as cluster:
        lat = await _round_trips(
            {"standalone": (single.url, []), "cluster": (cluster.url, [])}, rounds, seconds, rate
        )
        out["round_trip"] = lat
        p50 = {g: percentile(v, 50) for g, v in lat.items()}
        rows = _latency_rows(lat)
        for row in rows:
            base = p50["standalone same" if row[0].endswith("same") else "standalone cross"]
            row.append(ratio(row[2], base))
        tables.append(
            table(
                f"Round trip at {rate} actions/s, one Redis server vs a 3-master Redis Cluster "
                f"({rounds} shuffled rounds x {seconds:g} s; 20 conversations per group)",
                ["group", "answered", "p50 ms", "p90 ms", "p99 ms", "p50 x standalone"],
                rows,
            )
        )
        spread = await _spread(cluster, mode.pick(300, 300))
        out["spread"] = spread
        tables.append(
            table(
                f"Load spread: {spread['conversations']} conversations on 3 shards, actions "
                "at 300/s for 5 s",
                ["master", "commands", "share", "target (<= 40%)"],
                [
                    [i + 1, c, f"{s:.1%}", "yes" if s <= 0.40 else "NO"]
                    for i, (c, s) in enumerate(
                        zip(spread["commands_per_master"], spread["share_per_master"], strict=True)
                    )
                ],
            )
            + f"\nshard channels on a master that does not hold their slot: "
            f"{spread['stray_shard_channels']}"
        )
    with _cluster(1) as replicated:
        acks = {
            "ack-replicas 0": (replicated.url, ["--ack-replicas", "0"]),
            "ack-replicas 1": (replicated.url, ["--ack-replicas", "1"]),
        }
        lat = await _round_trips(acks, rounds, seconds, rate)
        joined = await _joins(acks, mode.pick(300, 1000))
    out["ack_replicas"] = lat
    out["ack_replicas_joins"] = joined
    tables.append(
        table(
            f"Round trip at {rate} actions/s on a cluster with a replica per master, "
            f"--ack-replicas 0 vs 1 ({rounds} shuffled rounds x {seconds:g} s)",
            ["group", "answered", "p50 ms", "p90 ms", "p99 ms"],
            _latency_rows(lat),
        )
    )
    tables.append(
        table(
            "Second connections to running conversations on the same cluster (a join's "
            "first page waits for a replica with --ack-replicas 1), 20 in flight",
            ["group", "joins/s", "failed", "p50 ms", "p99 ms"],
            [
                [g, r["joins_per_s"], r["failed"], r["p50_ms"], r["p99_ms"]]
                for g, r in joined.items()
            ],
        )
    )
    runs = mode.pick(3, 10)
    fo = [await _failovers(runs, 0), await _failovers(runs, 1)]
    out["failover"] = fo
    tables.append(
        table(
            f"Redis master failover (SIGKILL of the master holding the conversation; {runs} "
            "runs each; an action every 50 ms)",
            [
                "--ack-replicas",
                "cluster promoted median s",
                "served again median s",
                "max s",
                "target (node timeout + 2 s)",
                "met",
                "acked",
                "acked, unanswered",
            ],
            [
                [
                    r["ack_replicas"],
                    r["promoted_s_median"],
                    r["served_again_s_median"],
                    r["served_again_s_max"],
                    r["node_timeout_s"] + 2,
                    "yes" if r["served_again_s_median"] <= r["node_timeout_s"] + 2 else "NO",
                    r["acked"],
                    r["unanswered"],
                ]
                for r in fo
            ],
        )
    )
    return {"tables": tables, "json": out}
