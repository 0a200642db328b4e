"""Saturation: how many actions per second one node sustains with p99 under 50 ms
(``python -m bench.run --only saturation``).

Plain python-socketio (``AsyncRedisManager``, its handler emitting the answer) and two
coordinator nodes on one private Redis; 200 clients per group, one conversation each:
``plain``, ``coord same-node`` (clients and loops on node A) and ``coord cross-node``
(clients on node B, loops on A), and where the machine has two CPUs or more the same
two on a third node, C, run with ``--agent-cpus auto`` (its agent workers on all CPUs but
the first, its event loop on the first): same-node clients on C, and cross-node clients
on B whose loops run on C. Each group runs a ladder of rates (open loop, the load
generator's own process), a few seconds per step, until its p99 reaches 50 ms or an
action goes unanswered; the sustained rate is the last step below. Measured at each step:
p50/p99, the servers' CPU per answered action, and the nodes' event-loop lag (the worst of
the step's last seconds, ``coordinator_event_loop_lag_seconds``); and each server's RSS
per connection (RSS with the clients connected minus RSS before, over the clients; and
over the second half of them alone, joined after the first: what one more connection
costs, without what the first ones set up once). A node's CPU and RSS are its process
tree's: its own and its agent worker processes'.

Past saturation: the same-node group at twice its sustained rate for a while, then until
every action is answered: lost or refused actions, the latency, the node's RSS and its
worst event-loop lag meanwhile (a node holds one message of a connection while it
handles the one before, and reads no further: the excess waits in the sockets).

Then one client at a time, sequential actions (send, wait for the agent's answer, send the
next): a client on node A whose loop runs on A (same node) and one on B whose loop runs on
A (cross node), their actions alternated so that the VM's drift falls on both; p50/p99
of send to answer, and the cross/same ratio of the p50s (issue #17's target: <= 1.25x).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from bench.common import (
    Mode,
    Proc,
    baseline_proc,
    log_dir,
    new_secret,
    node_metrics,
    node_proc,
    percentile,
    private_redis,
    start_all,
    stop_all,
    table,
    tree_cpu_seconds,
    tree_rss_bytes,
    url_of,
)
from bench.driver import LoadGenProcess, join_group
from bench.eio import EioClient

P99_LIMIT_MS = 50.0
CLIENTS = 200
PLAIN = "plain python-socketio"
PINNED = "coord same-node, --agent-cpus auto"
PINNED_CROSS = "coord cross-node, loops on a node with --agent-cpus auto"
CROSS_TARGET = 1.25  # cross-node p50 / same-node p50, one client, sequential actions


class Sequential:
    """One client sending an action, waiting for the agent's answer, sending the next."""

    def __init__(self) -> None:
        self.client = EioClient(self._on_event)
        self._answer: asyncio.Future[None] | None = None
        self._want = ""  # the content of the action waiting for its echo

    def _on_event(self, name: str, data: Any) -> None:
        answer, args = self._answer, (data.get("args") if isinstance(data, dict) else None)
        if answer is None or answer.done() or name != "oh_event" or not isinstance(args, dict):
            return
        if data.get("source") == "agent" and args.get("content") == self._want:
            answer.set_result(None)

    async def connect(self, url: str, sid: str, token: str) -> Sequential:
        await self.client.connect(url, {"conversation_id": sid}, {"token": token}, within=60)
        return self

    async def act(self, n: int) -> float:
        """Send action ``n``; ms until the agent answered it."""
        self._answer = asyncio.get_running_loop().create_future()
        self._want = f"s{n}"
        started = time.perf_counter()
        ack = await self.client.call(
            "oh_user_action",
            {"action": "message", "args": {"content": f"s{n}"}, "client_action_id": f"s{n}"},
        )
        if not (isinstance(ack, dict) and ack.get("ok")):
            raise RuntimeError(f"action refused: {ack}")
        async with asyncio.timeout(30):
            await self._answer
        return 1000 * (time.perf_counter() - started)


async def _sequential(a: Proc, b: Proc, secret: str, actions: int) -> dict[str, Any]:
    """Same node (client and loop on A) against cross node (client on B, loop on A)."""
    from coordinator.auth import issue_token

    token = issue_token("seq-user", secret)
    same = await Sequential().connect(url_of(a), "seq-same", token)
    starter = await Sequential().connect(url_of(a), "seq-cross", token)  # its loop on A
    cross = await Sequential().connect(url_of(b), "seq-cross", token)
    await starter.client.close()
    lat: dict[str, list[float]] = {"same node": [], "cross node": []}
    try:
        for n in range(20):  # warm-up, not counted
            await same.act(n)
            await cross.act(n)
        for n in range(20, 20 + actions):
            lat["same node"].append(await same.act(n))
            lat["cross node"].append(await cross.act(n))
    finally:
        await same.client.close()
        await cross.client.close()
    out: dict[str, Any] = {
        k: {"p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99), "n": len(v)}
        for k, v in lat.items()
    }
    out["ratio"] = out["cross node"]["p50_ms"] / out["same node"]["p50_ms"]
    return out


class Watch:
    """The nodes' worst event-loop lag and their peak RSS while a step runs (read every
    quarter second; the lag gauge covers the last second)."""

    def __init__(self, procs: list[Proc]) -> None:
        self.procs = procs
        self.lag: float | None = None  # seconds; None: no node among procs
        self.rss_peak = 0
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watch:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._done.set()
        if self._task is not None:
            await self._task

    async def _sample(self) -> None:
        while not self._done.is_set():
            self.rss_peak = max(self.rss_peak, sum(tree_rss_bytes(p.pid) for p in self.procs))
            for m in await asyncio.gather(
                *(asyncio.to_thread(node_metrics, p) for p in self.procs)
            ):
                if m:
                    lag = m["coordinator_event_loop_lag_seconds"]
                    self.lag = lag if self.lag is None else max(self.lag, lag)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await self._done.wait()


async def _ladder(
    gen: LoadGenProcess,
    group: str,
    procs: list[Proc],
    rates: list[int],
    seconds: float,
) -> list[dict[str, Any]]:
    pids = [p.pid for p in procs]
    steps = []
    for rate in rates:
        cpu0 = sum(tree_cpu_seconds(p) for p in pids)
        async with Watch(procs) as watch:
            r = await gen.request(
                {"cmd": "run", "group": group, "rate": rate, "duration": seconds, "drain": 3}
            )
        cpu = sum(tree_cpu_seconds(p) for p in pids) - cpu0
        lat = r["lat_ms"]
        step = {
            "rate": rate,
            "answered": r["answered"],
            "sent": r["sent"],
            "lost": r["lost"],
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
            "cpu_ms_per_action": 1000 * cpu / max(1, r["answered"]),
            "loop_lag_ms": None if watch.lag is None else 1000 * watch.lag,
            "schedule_lag_s": r["schedule_lag_s"],
        }
        steps.append(step)
        if step["lost"] or step["p99_ms"] >= P99_LIMIT_MS or r["schedule_lag_s"] > 0.5:
            break
    return steps


async def _past(
    gen: LoadGenProcess, group: str, node: Proc, rate: int, seconds: float
) -> dict[str, Any]:
    """``rate`` actions/s (past what the group sustains) for ``seconds``, then until all
    are answered: what the clients saw, and the node's RSS and event-loop lag meanwhile
    (sampled every quarter second)."""
    rss0 = tree_rss_bytes(node.pid)
    began = time.monotonic()
    async with Watch([node]) as watch:
        r = await gen.request(
            {"cmd": "run", "group": group, "rate": rate, "duration": seconds, "drain": 120}
        )
    lat = r["lat_ms"]
    return {
        "rate": rate,
        "seconds": seconds,
        "sent": r["sent"],
        "answered": r["answered"],
        "lost": r["lost"],
        "refused": r["ack_errors"],
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "answered_within_s": time.monotonic() - began,
        "rss_before": rss0,
        "rss_peak": watch.rss_peak,
        "rss_after": tree_rss_bytes(node.pid),
        "loop_lag_ms": 1000 * (watch.lag or 0.0),
    }


def _sustained(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [s for s in steps if not s["lost"] and s["p99_ms"] < P99_LIMIT_MS]
    return ok[-1] if ok else None


async def run(mode: Mode) -> dict[str, Any]:
    rates = mode.pick(
        [100, 200, 400, 600, 800, 1000], [100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500]
    )
    seconds = mode.pick(3.0, 5.0)
    secret = new_secret()
    logs = log_dir("saturation")
    out: dict[str, Any] = {}
    with private_redis() as redis:
        plain = baseline_proc(
            "plain",
            "bench.baselines.redis_emit",
            logs,
            ["--secret", secret, "--redis-url", redis.url],
        )
        a = node_proc("sat-a", redis.url, secret, logs)
        b = node_proc("sat-b", redis.url, secret, logs)
        procs: list[Proc] = [plain, a, b]
        pinned = None
        if len(os.sched_getaffinity(0)) >= 2:
            pinned = node_proc("sat-c", redis.url, secret, logs, extra=["--agent-cpus", "auto"])
            procs.append(pinned)
        gen = LoadGenProcess()
        try:
            start_all(procs)
            await gen.start()
            groups = {
                PLAIN: (plain, None, [plain]),
                "coord same-node": (a, None, [a]),
                "coord cross-node": (b, a, [a, b]),
            }
            if pinned is not None:
                groups[PINNED] = (pinned, None, [pinned])
                groups[PINNED_CROSS] = (b, pinned, [pinned, b])
            rss: dict[str, dict[str, float]] = {}
            for n, (name, (joins, setup, _)) in enumerate(groups.items()):
                # In two halves: the second half's growth is what one more connection
                # costs, without what the first ones set up once (buffers, caches).
                rss0, grown = tree_rss_bytes(joins.pid), []
                for half, count in (("a", CLIENTS // 2), ("b", CLIENTS - CLIENTS // 2)):
                    await join_group(
                        gen,
                        name,
                        url_of(joins),
                        secret,
                        f"sat{n}{half}",
                        count=count,
                        setup_url=url_of(setup) if setup is not None else None,
                    )
                    # Measured now, from just before this group's joins: a node that
                    # holds this group's clients may take a later group's loops (A, C)
                    # or clients (B).
                    grown.append(tree_rss_bytes(joins.pid) - rss0)
                rss[name] = {
                    "rss_bytes_per_connection": grown[1] / CLIENTS,
                    "rss_bytes_per_added_connection": (grown[1] - grown[0])
                    / (CLIENTS - CLIENTS // 2),
                }
            for name, (_, _, servers) in groups.items():
                steps = await _ladder(gen, name, servers, rates, seconds)
                out[name] = {"steps": steps, **rss[name]}
            same = _sustained(out["coord same-node"]["steps"])
            past = await _past(
                gen,
                "coord same-node",
                a,
                2 * (same or {"rate": rates[0]})["rate"],
                mode.pick(5.0, 15.0),
            )
            sequential = await _sequential(a, b, secret, mode.pick(200, 1000))
        finally:
            await gen.aclose()
            stop_all(procs)
    rows = []
    plain_rate = (_sustained(out[PLAIN]["steps"]) or {"rate": 0})["rate"]
    for name, r in out.items():
        best = _sustained(r["steps"])
        rows.append(
            [
                name,
                best["rate"] if best else 0,
                (best["rate"] / plain_rate) if best and plain_rate else float("nan"),
                best["p50_ms"] if best else float("nan"),
                best["p99_ms"] if best else float("nan"),
                best["cpu_ms_per_action"] if best else float("nan"),
                r["rss_bytes_per_connection"],
                r["rss_bytes_per_added_connection"],
                ", ".join(f"{s['rate']}: {s['p99_ms']:.0f}" for s in r["steps"]),
                ", ".join(
                    f"{s['rate']}: {s['loop_lag_ms']:.0f}"
                    for s in r["steps"]
                    if s["loop_lag_ms"] is not None
                )
                or "-",
            ]
        )
    t = table(
        f"Saturation: actions/s one node sustains with p99 < {P99_LIMIT_MS:.0f} ms "
        f"({CLIENTS} clients per group, {seconds:g} s per step)",
        [
            "group",
            "sustained actions/s",
            "x plain",
            "p50 ms",
            "p99 ms",
            "server CPU ms/action",
            f"RSS bytes per connection (all {CLIENTS})",
            f"RSS bytes per connection (the last {CLIENTS - CLIENTS // 2})",
            "p99 ms by rate",
            "loop lag ms by rate (worst, the nodes')",
        ],
        rows,
    )
    seq = table(
        f"One client, sequential actions ({sequential['same node']['n']} each, alternated): "
        f"cross node against same node (target: p50 <= {CROSS_TARGET:g}x)",
        ["path", "p50 ms", "p99 ms", "p50 x same node"],
        [
            [
                k,
                sequential[k]["p50_ms"],
                sequential[k]["p99_ms"],
                sequential[k]["p50_ms"] / sequential["same node"]["p50_ms"],
            ]
            for k in ("same node", "cross node")
        ],
    )
    mb = 1 / (1 << 20)
    over = table(
        f"Past saturation: the same-node clients at twice the rate they sustain, for "
        f"{past['seconds']:g} s, then until every action is answered",
        [
            "actions/s",
            "sent",
            "answered",
            "lost",
            "refused",
            "p50 ms",
            "p99 ms",
            "all answered after s",
            "node RSS MiB before / peak / after",
            "worst loop lag ms",
        ],
        [
            [
                past["rate"],
                past["sent"],
                past["answered"],
                past["lost"],
                past["refused"],
                past["p50_ms"],
                past["p99_ms"],
                past["answered_within_s"],
                f"{past['rss_before'] * mb:.0f} / {past['rss_peak'] * mb:.0f} / "
                f"{past['rss_after'] * mb:.0f}",
                past["loop_lag_ms"],
            ]
        ],
    )
    return {
        "tables": [t, over, seq],
        "json": {**out, "past_saturation": past, "sequential": sequential},
    }
