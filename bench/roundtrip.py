"""Round trip: oh_user_action in, the echo agent's oh_event out, at a fixed offered rate.

Six systems run side by side, all as real uvicorn processes on one private Redis, with
the load generator in a separate process (raw engine.io over websockets):

- ``standalone``: the seed's design (bench/baselines/standalone.py), no Redis on the path;
- ``plain-redis``: python-socketio + AsyncRedisManager whose handler emits back (it emits
  to its own clients first and publishes for the other nodes after: no Redis round trip
  before a same-node client has its event);
- ``plain-durable``: the same, appending the action to a Redis stream before the emit
  (the one dependent round trip that durability before acting costs);
- ``coord-same``: coordinator, client and loop on node A (speculative dispatch, the
  default: the accept and the agent's commit travel together, one dependent round trip);
- ``coord-same-nospec``: the same on node C, started with ``--speculative-dispatch off``
  (the agent waits for the accept: two dependent round trips);
- ``coord-cross``: coordinator, client on node B, loop on node A (a client on A created
  the conversation first, so its loop started there, then left).

A server's CPU is its process tree's (a node's agent worker processes included). Windows
of the six are interleaved in a shuffled order per round, so machine noise hits all of
them alike; ratios are computed from the pooled samples (and per round).
"""

from __future__ import annotations

import random
from typing import Any

from bench.common import (
    Mode,
    baseline_proc,
    cpu_seconds,
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
    tree_cpu_seconds,
    url_of,
)
from bench.driver import LoadGenProcess
from coordinator.auth import issue_token

VARIANTS = (
    "standalone",
    "plain-redis",
    "plain-durable",
    "coord-same",
    "coord-same-nospec",
    "coord-cross",
)


def summarize(lat: list[float]) -> dict[str, float]:
    return {
        "n": len(lat),
        "p50": percentile(lat, 50),
        "p90": percentile(lat, 90),
        "p99": percentile(lat, 99),
        "max": max(lat) if lat else float("nan"),
        "mean": sum(lat) / len(lat) if lat else float("nan"),
    }


async def run(mode: Mode) -> dict[str, Any]:
    conversations = mode.pick(20, 40)
    rates = mode.pick([100], [50, 200])
    rounds = mode.pick(3, 5)
    duration = mode.pick(4.0, 8.0)
    secret = new_secret()
    logs = log_dir("roundtrip")
    with private_redis() as redis:
        a = node_proc("node-a", redis.url, secret, logs)
        b = node_proc("node-b", redis.url, secret, logs)
        c = node_proc("node-c", redis.url, secret, logs, extra=["--speculative-dispatch", "off"])
        standalone = baseline_proc(
            "standalone", "bench.baselines.standalone", logs, ["--secret", secret]
        )
        plain = baseline_proc(
            "plain-redis",
            "bench.baselines.redis_emit",
            logs,
            ["--secret", secret, "--redis-url", redis.url],
        )
        durable = baseline_proc(
            "plain-durable",
            "bench.baselines.redis_emit",
            logs,
            ["--secret", secret, "--redis-url", redis.url, "--durable"],
        )
        procs = [a, b, c, standalone, plain, durable]
        gen = LoadGenProcess()
        try:
            start_all(procs)
            await gen.start()
            # variant -> (node the client joins, node that starts the loop first, servers)
            layout: dict[str, tuple[Any, Any, list[int]]] = {
                "standalone": (standalone, None, [standalone.pid]),
                "plain-redis": (plain, None, [plain.pid]),
                "plain-durable": (durable, None, [durable.pid]),
                "coord-same": (a, None, [a.pid, b.pid]),
                "coord-same-nospec": (c, None, [c.pid]),
                "coord-cross": (b, a, [a.pid, b.pid]),
            }
            servers = {v: pids for v, (_, _, pids) in layout.items()}
            assert redis.proc is not None
            redis_pid = redis.proc.pid

            def conns(variant: str) -> list[dict[str, Any]]:
                out = []
                for i in range(conversations):
                    auth = {"token": issue_token(f"u{i}", secret)}
                    query = {"conversation_id": f"rt{VARIANTS.index(variant)}-{i}"}
                    joins, setup, _ = layout[variant]
                    spec: dict[str, Any] = {"query": query, "auth": auth, "url": url_of(joins)}
                    if setup is not None:
                        spec["setup_url"] = url_of(setup)
                    out.append(spec)
                return out

            for variant in VARIANTS:
                r = await gen.request(
                    {"cmd": "connect", "group": variant, "conns": conns(variant), "concurrency": 10}
                )
                if r["failed"]:
                    raise RuntimeError(f"{variant}: {r['failed']} joins failed: {r['errors']}")
            # Warm up every path (first actions start caches, JIT-free but allocations).
            for variant in VARIANTS:
                await gen.request(
                    {"cmd": "run", "group": variant, "rate": 50, "duration": 1, "drain": 3}
                )
            rng = random.Random(5)
            results: dict[str, Any] = {}
            for rate in rates:
                lat: dict[str, list[float]] = {v: [] for v in VARIANTS}
                acks: dict[str, list[float]] = {v: [] for v in VARIANTS}
                cpu: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
                redis_cpu: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
                sent: dict[str, int] = dict.fromkeys(VARIANTS, 0)
                lost: dict[str, int] = dict.fromkeys(VARIANTS, 0)
                per_round: list[dict[str, float]] = []
                slow: dict[str, list[Any]] = {v: [] for v in VARIANTS}
                for _ in range(rounds):
                    order = list(VARIANTS)
                    rng.shuffle(order)
                    round_p50: dict[str, float] = {}
                    for variant in order:
                        c0 = sum(tree_cpu_seconds(p) for p in servers[variant])
                        r0 = cpu_seconds(redis_pid)
                        r = await gen.request(
                            {
                                "cmd": "run",
                                "group": variant,
                                "rate": rate,
                                "duration": duration,
                                "drain": 3,
                            }
                        )
                        cpu[variant] += sum(tree_cpu_seconds(p) for p in servers[variant]) - c0
                        redis_cpu[variant] += cpu_seconds(redis_pid) - r0
                        lat[variant] += r["lat_ms"]
                        acks[variant] += r["ack_ms"]
                        sent[variant] += r["sent"]
                        lost[variant] += r["lost"]
                        round_p50[variant] = percentile(r["lat_ms"], 50)
                        slow[variant] += r["slow"]
                    per_round.append(round_p50)
                results[str(rate)] = {
                    v: {
                        "latency_ms": summarize(lat[v]),
                        "ack_ms": summarize(acks[v]),
                        "sent": sent[v],
                        "lost": lost[v],
                        "server_cpu_ms_per_action": 1000 * cpu[v] / max(1, sent[v]),
                        "redis_cpu_ms_per_action": 1000 * redis_cpu[v] / max(1, sent[v]),
                        "samples_ms": lat[v],
                        "slow": slow[v],
                    }
                    for v in VARIANTS
                }
                results[str(rate)]["per_round_p50_ms"] = per_round
        finally:
            await gen.aclose()
            stop_all(procs)
    return report(results, rates, conversations, rounds, duration)


def report(
    results: dict[str, Any], rates: list[int], conversations: int, rounds: int, duration: float
) -> dict[str, Any]:
    tables = []
    ratios: dict[str, Any] = {}
    for rate in rates:
        res = results[str(rate)]
        rows = []
        for v in VARIANTS:
            s, ack = res[v]["latency_ms"], res[v]["ack_ms"]
            rows.append(
                [
                    v,
                    s["n"],
                    res[v]["lost"],
                    s["p50"],
                    s["p90"],
                    s["p99"],
                    s["max"],
                    ack["p50"],
                    res[v]["server_cpu_ms_per_action"],
                    res[v]["redis_cpu_ms_per_action"],
                ]
            )
        tables.append(
            table(
                f"Round trip at {rate} actions/s over {conversations} conversations "
                f"({rounds} interleaved rounds x {duration:.0f} s per system)",
                [
                    "system",
                    "answered",
                    "lost",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "max ms",
                    "ack p50 ms",
                    "server CPU ms/action",
                    "Redis CPU ms/action",
                ],
                rows,
            )
        )

        def q(v: str, key: str, res: dict[str, Any] = res) -> float:
            return float(res[v]["latency_ms"][key])

        per_round = res["per_round_p50_ms"]
        r = {
            "cross/same p50": ratio(q("coord-cross", "p50"), q("coord-same", "p50")),
            "cross/same p99": ratio(q("coord-cross", "p99"), q("coord-same", "p99")),
            "same/plain-redis p50": ratio(q("coord-same", "p50"), q("plain-redis", "p50")),
            "same/plain-redis p99": ratio(q("coord-same", "p99"), q("plain-redis", "p99")),
            "same/plain-durable p50": ratio(q("coord-same", "p50"), q("plain-durable", "p50")),
            "same-nospec/plain-redis p50": ratio(
                q("coord-same-nospec", "p50"), q("plain-redis", "p50")
            ),
            "same-nospec/same p50": ratio(q("coord-same-nospec", "p50"), q("coord-same", "p50")),
            "plain-durable/plain-redis p50": ratio(
                q("plain-durable", "p50"), q("plain-redis", "p50")
            ),
            "same/standalone p50": ratio(q("coord-same", "p50"), q("standalone", "p50")),
            "same/standalone p99": ratio(q("coord-same", "p99"), q("standalone", "p99")),
            "cross/same p50, median of rounds": median(
                [ratio(p["coord-cross"], p["coord-same"]) for p in per_round]
            ),
            "same/plain-redis p50, median of rounds": median(
                [ratio(p["coord-same"], p["plain-redis"]) for p in per_round]
            ),
        }
        ratios[str(rate)] = r
        targets = {
            "cross/same p50": 1.5,
            "cross/same p99": 2.0,
            "same/plain-redis p50": 1.5,
        }
        tables.append(
            table(
                f"Ratios at {rate} actions/s",
                ["ratio", "value", "target", "met"],
                [
                    [
                        k,
                        val,
                        targets.get(k, "-"),
                        ("yes" if val <= targets[k] else "NO") if k in targets else "-",
                    ]
                    for k, val in r.items()
                ],
            )
        )
    return {
        "tables": tables,
        "json": {
            "settings": {
                "rates": rates,
                "conversations": conversations,
                "rounds": rounds,
                "window_s": duration,
            },
            "results": results,
            "ratios": ratios,
        },
    }
