"""Churn: does a node leak under client churn? (``python -m bench.run --only churn``).

One ``coordinator serve`` node (agents in worker processes, the echo agent, a file event
store in a temporary directory, ``--close-delay 1`` and every other setting at its
default) on a private Redis. Load generator processes keep cycling clients at a fixed
schedule (each starts a batch every second, staggered): a batch joins (about half of the
joins start a new conversation, the others join one used in the last few seconds, whose
loop may still run or may have been closed by the idle sweep), sends a few actions per
client, waits for their answers and disconnects. The offered load is fixed and well under
what a node sustains (bench/saturation.py), so the run measures leaks, not overload;
cycles that started late are counted. Conversations are spread over enough users that
none reaches the per-user cap of running loops (no evictions).

Sampled every 5 s (quick: 2 s), from before the load to its end: the node process's RSS
and its agent workers' (its process tree without it), the node's open file descriptors,
its live loops and connections (``/metrics``: ``coordinator_local_loops``, the workers'
``coordinator_agent_worker_loops`` summed, ``coordinator_open_connections``), Redis
``used_memory`` and ``DBSIZE``, the store directory's size, and the joins' and answers'
latency in each interval. After the load, once the idle sweep has closed every loop, one
more sample (*settled*) and Redis's keys by kind (ids replaced by ``*``).

Summary per measure: the value after warm-up (the first sample at 20% of the run), at the
end, the least-squares slope over the second half of the run (per minute) and settled.
Not leaks, by design: a stopped conversation's Redis state stays ``--redis-retention``
(default 3600 s) and the store keeps every event, so Redis keys and memory and the store
grow with the conversations and events of a run shorter than that (the keys-by-kind
table says which kinds grow). ``BENCH_CHURN_SECONDS`` sets the load's duration (default:
quick 60 s, full 600 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
import shutil
import signal
import time
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    Mode,
    Proc,
    cluster_store,
    log_dir,
    new_secret,
    node_proc,
    percentile,
    private_redis,
    process_tree,
    rss_bytes,
    start_all,
    stop_all,
    table,
    tree_cpu_seconds,
    url_of,
)
from bench.driver import LoadGenProcess
from coordinator.auth import issue_token
from coordinator.config import ManagerConfig

CLOSE_DELAY = 1.0  # seconds: --close-delay (the idle sweep closes a loop after it)
LOADGENS = 2  # load generator processes, each starting a batch every PERIOD
PERIOD = 1.0  # seconds between one load generator's batches
BATCH = 32  # clients per batch: LOADGENS * BATCH / PERIOD joins per second
ACTIONS = 3  # actions per client
SEND_WITHIN = 0.5  # seconds over which a batch's actions are sent
DRAIN = 10.0  # seconds a batch waits for its answers before counting the rest lost
NEW_SHARE = 0.5  # joins that start a new conversation
RECENT = 600  # the others pick among the conversations of the last RECENT joins
USERS = 1_000  # conversation i belongs to user i % USERS
WARMUP = 0.2  # share of the run before the "after warm-up" value
MB = 1 / (1 << 20)
_METRIC = re.compile(rb"^([a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", re.M)
_IDS = re.compile(r"churn-(?:u)?\d+")


def _duration(mode: Mode) -> float:
    return float(os.environ.get("BENCH_CHURN_SECONDS") or mode.pick(60, 600))


class Conversations:
    """Which conversation each join goes to: a new one or one of the last joins'."""

    def __init__(self, secret: str, url: str) -> None:
        self.url = url
        self.tokens = [issue_token(f"churn-u{u}", secret) for u in range(USERS)]
        self.created = 0
        self.recent: deque[int] = deque(maxlen=RECENT)
        self.rng = random.Random(5)

    def pick(self) -> tuple[dict[str, Any], bool]:
        """A connection spec for the load generator, and whether it starts a conversation."""
        new = not self.recent or self.rng.random() < NEW_SHARE
        if new:
            i, self.created = self.created, self.created + 1
        else:
            i = self.rng.choice(self.recent)
        self.recent.append(i)
        spec = {
            "url": self.url,
            "query": {"conversation_id": f"churn-{i}"},
            "auth": {"token": self.tokens[i % USERS]},
        }
        return spec, new


@dataclass
class Traffic:
    """What the batches did so far; ``window_*`` since the last sample."""

    joins: int = 0
    joins_failed: int = 0
    joins_new: int = 0
    joins_recent: int = 0
    sent: int = 0
    answered: int = 0
    lost: int = 0
    refused: int = 0
    batches: int = 0
    late: int = 0
    join_ms: list[float] = field(default_factory=list)
    answer_ms: list[float] = field(default_factory=list)
    window_join_ms: list[float] = field(default_factory=list)
    window_answer_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def _batches(
    gen: LoadGenProcess,
    convs: Conversations,
    traffic: Traffic,
    start: float,
    end: float,
) -> None:
    """One load generator's batches, one every PERIOD from ``start`` until ``end`` (a batch
    that starts late starts the schedule again from now: no catching up in a burst)."""
    loop = asyncio.get_running_loop()
    at, k = start, 0
    while at < end:
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif -delay > PERIOD / 10:
            traffic.late += 1
        at = max(at + PERIOD, loop.time())
        group, k = f"{gen.name}-{k}", k + 1
        picked = [convs.pick() for _ in range(BATCH)]
        traffic.joins_new += sum(new for _, new in picked)
        traffic.joins_recent += sum(not new for _, new in picked)
        r = await gen.request(
            {
                "cmd": "connect",
                "group": group,
                "conns": [spec for spec, _ in picked],
                "concurrency": BATCH,
                "return_joins": True,
            }
        )
        traffic.joins += r["connected"]
        traffic.joins_failed += r["failed"]
        traffic.errors += r["errors"][: max(0, 5 - len(traffic.errors))]
        traffic.join_ms += r["join_ms"]
        traffic.window_join_ms += r["join_ms"]
        if r["connected"]:
            a = await gen.request(
                {
                    "cmd": "run",
                    "group": group,
                    "rate": BATCH * ACTIONS / SEND_WITHIN,
                    "duration": SEND_WITHIN,
                    "drain": DRAIN,
                }
            )
            traffic.sent += a["sent"]
            traffic.answered += a["answered"]
            traffic.lost += a["lost"]
            traffic.refused += a["ack_errors"]
            traffic.answer_ms += a["lat_ms"]
            traffic.window_answer_ms += a["lat_ms"]
        await gen.request({"cmd": "close", "group": group})
        traffic.batches += 1


def _metrics(node: Proc) -> dict[str, float]:
    """The node's /metrics, sample name -> value summed over its labelled series (the
    workers' loops are one series per worker); empty when it does not answer."""
    try:
        with urllib.request.urlopen(f"{url_of(node)}/metrics", timeout=5) as resp:
            text = resp.read()
    except OSError:
        return {}
    sums: Counter[str] = Counter()
    for name, value in _METRIC.findall(text):
        sums[name.decode()] += float(value)
    return dict(sums)


def _dir_size(path: Path) -> tuple[int, int]:
    """Bytes and files under ``path``."""
    size = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                size += os.stat(os.path.join(root, name)).st_size
                files += 1
    return size, files


class Sampler:
    """Reads the node, its workers, Redis and the store; remembers the workers seen."""

    def __init__(self, node: Proc, redis_url: str, store: Path, traffic: Traffic) -> None:
        self.node = node
        self.redis = redis.Redis.from_url(redis_url)
        self.store = store
        self.traffic = traffic
        self.workers: dict[int, bytes] = {}  # pid -> its command line, for the cleanup
        self.samples: list[dict[str, Any]] = []
        self._cpu: tuple[float, float] | None = None  # (when, node tree CPU s) last read

    def _processes(self) -> dict[str, Any]:
        pid = self.node.pid
        workers = process_tree(pid)[1:]
        rss = 0
        for w in workers:
            with contextlib.suppress(OSError):
                rss += rss_bytes(w)
                if w not in self.workers:
                    self.workers[w] = Path(f"/proc/{w}/cmdline").read_bytes()
        now, cpu = time.monotonic(), tree_cpu_seconds(pid)
        last, self._cpu = self._cpu, (now, cpu)
        return {
            "node_rss": rss_bytes(pid),
            "workers_rss": rss,
            "workers": len(workers),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            # since the last sample: the node's and its workers' CPU time over wall time
            "node_cpu_pct": math.nan if last is None else 100 * (cpu - last[1]) / (now - last[0]),
        }

    def _redis(self) -> dict[str, Any]:
        info = self.redis.info()
        return {
            "redis_used_memory": int(info["used_memory"]),
            "redis_keys": int(self.redis.dbsize()),
            "redis_clients": int(info["connected_clients"]),  # the node's pool, and ours
        }

    async def sample(self, t: float, label: str = "") -> dict[str, Any]:
        procs, m, r, (size, files) = await asyncio.gather(
            asyncio.to_thread(self._processes),
            asyncio.to_thread(_metrics, self.node),
            asyncio.to_thread(self._redis),
            asyncio.to_thread(_dir_size, self.store),
        )
        tr = self.traffic
        s = {
            "t_s": t,
            "label": label,
            **procs,
            "loops": m.get("coordinator_local_loops"),
            "worker_loops": m.get("coordinator_agent_worker_loops"),
            "open_connections": m.get("coordinator_open_connections"),
            "local_connections": m.get("coordinator_local_connections"),
            "worker_restarts": m.get("coordinator_agent_worker_restarts_total"),
            "loop_lag_ms": 1000 * m.get("coordinator_event_loop_lag_seconds", math.nan),
            "gc_full_collections": m.get("coordinator_gc_full_collections_total"),
            **r,
            "store_bytes": size,
            "store_files": files,
            "joins": tr.joins,
            "conversations_created": tr.joins_new,
            "answered": tr.answered,
            "join_p50_ms": percentile(tr.window_join_ms, 50),
            "answer_p50_ms": percentile(tr.window_answer_ms, 50),
            "answer_p99_ms": percentile(tr.window_answer_ms, 99),
        }
        tr.window_join_ms, tr.window_answer_ms = [], []
        self.samples.append(s)
        return s

    def keys_by_kind(self) -> Counter[str]:
        return Counter(_IDS.sub("*", k.decode()) for k in self.redis.scan_iter(count=1000))

    def close(self) -> None:
        self.redis.close()


def _end_workers(seen: dict[int, bytes]) -> int:
    """SIGKILL the node's workers still alive after the node stopped (the same pid with
    the same command line as when sampled); returns how many there were."""
    left = 0
    for pid, cmdline in seen.items():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:
                os.kill(pid, signal.SIGKILL)
                left += 1
    return left


def _slope(samples: list[dict[str, Any]], key: str) -> float:
    """Least-squares slope of ``key`` against time, per minute."""
    points = [(s["t_s"], s[key]) for s in samples if s[key] is not None]
    if len(points) < 2:
        return math.nan
    mt = sum(t for t, _ in points) / len(points)
    mv = sum(v for _, v in points) / len(points)
    var = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / var if var else math.nan


async def run(mode: Mode) -> dict[str, Any]:
    duration = _duration(mode)
    every = mode.pick(2.0, 5.0)
    secret = new_secret()
    logs = log_dir("churn")
    traffic = Traffic()
    settle_within = CLOSE_DELAY + ManagerConfig().cleanup_interval + 15.0
    try:
        with private_redis() as redis_server:
            store = Path(cluster_store(redis_server.url, logs).removeprefix("file://"))
            node = node_proc(
                "churn", redis_server.url, secret, logs, extra=["--close-delay", str(CLOSE_DELAY)]
            )
            gens = [LoadGenProcess(f"loadgen{i}") for i in range(LOADGENS)]
            sampler = Sampler(node, redis_server.url, store, traffic)
            finished = False
            try:
                start_all([node])
                for g in gens:
                    await g.start()
                convs = Conversations(secret, url_of(node))
                loop = asyncio.get_running_loop()
                await sampler.sample(0.0, "before")
                t0 = loop.time()
                end = t0 + duration
                load = asyncio.gather(
                    *(
                        _batches(g, convs, traffic, t0 + i * PERIOD / LOADGENS, end)
                        for i, g in enumerate(gens)
                    )
                )
                try:
                    k = 1
                    while k * every <= duration + 1e-9:
                        await asyncio.sleep(max(0.0, t0 + k * every - loop.time()))
                        if load.done():
                            load.result()  # a batch failed: raise it
                        if not node.alive:
                            raise RuntimeError(f"the node exited:\n{node.log_tail()}")
                        await sampler.sample(loop.time() - t0)
                        k += 1
                    await load
                except BaseException:
                    load.cancel()
                    with contextlib.suppress(BaseException):
                        await load
                    raise
                load_s = loop.time() - t0
                # Settled: once the idle sweep has closed every loop (or settle_within).
                while loop.time() - t0 - load_s < settle_within:
                    m = await asyncio.to_thread(_metrics, node)
                    if not m.get("coordinator_local_loops") and not m.get(
                        "coordinator_agent_worker_loops"
                    ):
                        break
                    await asyncio.sleep(0.5)
                await sampler.sample(loop.time() - t0, "settled")
                kinds = await asyncio.to_thread(sampler.keys_by_kind)
                if not node.alive:
                    raise RuntimeError(f"the node exited:\n{node.log_tail()}")
                node_log = node.log_tail(10)
                node_log_lines = len(node.log_path.read_text(errors="replace").splitlines())
                finished = True
            finally:
                for g in gens:  # the load generators are ours: on an error or Ctrl-C, kill
                    with contextlib.suppress(Exception):
                        if finished:
                            await g.aclose()
                        elif g.proc is not None and g.proc.returncode is None:
                            g.proc.kill()
                            await g.proc.wait()
                stop_all([node])
                stray = _end_workers(sampler.workers)
                sampler.close()
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return _report(
        mode,
        duration,
        every,
        load_s,
        sampler.samples,
        traffic,
        kinds,
        stray,
        (node_log_lines, node_log),
    )


def _report(
    mode: Mode,
    duration: float,
    every: float,
    load_s: float,
    samples: list[dict[str, Any]],
    tr: Traffic,
    kinds: Counter[str],
    stray: int,
    node_log: tuple[int, str],
) -> dict[str, Any]:
    during = [s for s in samples if s["label"] != "settled"]
    settled = samples[-1]
    warm = next(s for s in during if s["t_s"] >= WARMUP * duration - 1e-9)
    last = during[-1]
    second = [s for s in during if s["t_s"] >= duration / 2 - 1e-9]
    rate = f"{LOADGENS * BATCH / PERIOD:g} joins/s, {LOADGENS * BATCH * ACTIONS / PERIOD:g}"
    title = (
        f"Churn: one node under client churn for {duration:g} s ({rate} actions/s offered: "
        f"{LOADGENS} load generators, a batch of {BATCH} clients each every {PERIOD:g} s, "
        f"{ACTIONS} actions per client; {NEW_SHARE:.0%} of joins start a conversation; "
        f"--close-delay {CLOSE_DELAY:g})"
    )
    if not mode.full and "BENCH_CHURN_SECONDS" not in os.environ:
        title += " (quick mode: 60 s instead of 600 s)"
    shown = samples
    if mode.full:  # about 20 rows: every n-th sample, and the last two
        step = max(1, math.ceil(len(during) / 20))
        shown = [s for i, s in enumerate(during) if i % step == 0 or s is last] + [settled]

    def loops(s: dict[str, Any]) -> str:
        return f"{_int(s['loops'])} / {_int(s['worker_loops'])}"

    t1 = table(
        f"{title}: samples every {every:g} s",
        [
            "t s",
            "node RSS MiB",
            "workers RSS MiB (n)",
            "fds (Redis clients)",
            "loops node / workers",
            "connections",
            "node + workers CPU %",
            "Redis MiB",
            "Redis keys",
            "store MiB (files)",
            "joins",
            "answered",
            "join p50 ms",
            "answer p50 / p99 ms",
        ],
        [
            [
                f"{s['t_s']:.0f}" + (f" ({s['label']})" if s["label"] else ""),
                s["node_rss"] * MB,
                f"{s['workers_rss'] * MB:.1f} ({s['workers']})",
                f"{s['fds']} ({s['redis_clients']})",
                loops(s),
                _int(s["open_connections"]),
                s["node_cpu_pct"],
                s["redis_used_memory"] * MB,
                s["redis_keys"],
                f"{s['store_bytes'] * MB:.1f} ({s['store_files']:,})",
                s["joins"],
                s["answered"],
                s["join_p50_ms"],
                f"{_ms(s['answer_p50_ms'])} / {_ms(s['answer_p99_ms'])}",
            ]
            for s in shown
        ],
    )
    measures = [
        ("node RSS, MiB", "node_rss", MB),
        ("workers RSS, MiB", "workers_rss", MB),
        ("node open fds", "fds", 1),
        ("Redis connected clients", "redis_clients", 1),
        ("Redis used_memory, MiB", "redis_used_memory", MB),
        ("Redis keys", "redis_keys", 1),
        ("live loops (node)", "loops", 1),
        ("open connections", "open_connections", 1),
        ("store, MiB", "store_bytes", MB),
    ]
    summary = {
        key: {
            "before": samples[0][key],
            "after_warmup": warm[key],
            "end": last[key],
            "slope_per_min_second_half": _slope(second, key),
            "settled": settled[key],
        }
        for _, key, _ in measures
    }
    t2 = table(
        f"Leak check: after warm-up (t = {warm['t_s']:.0f} s), at the end of the load "
        f"(t = {last['t_s']:.0f} s), slope over the second half ({len(second)} samples), and "
        f"settled (t = {settled['t_s']:.0f} s: the load stopped, "
        f"{_int(settled['loops'])} loops left)",
        ["measure", "before load", "after warm-up", "end", "slope per min", "settled"],
        [
            [
                name,
                _scaled(summary[key]["before"], unit),
                _scaled(summary[key]["after_warmup"], unit),
                _scaled(summary[key]["end"], unit),
                _scaled(summary[key]["slope_per_min_second_half"], unit),
                _scaled(summary[key]["settled"], unit),
            ]
            for name, key, unit in measures
        ],
    )
    created = tr.joins_new
    t3 = table(
        f"Traffic ({load_s:.0f} s of load, {tr.batches} batches, {tr.late} started late)",
        ["measure", "value"],
        [
            ["joins (failed)", f"{tr.joins:,} ({tr.joins_failed})"],
            ["joins per s", tr.joins / load_s],
            ["joins to a new / a recent conversation", f"{created:,} / {tr.joins_recent:,}"],
            ["join p50 / p99 ms", _p50_p99(tr.join_ms)],
            ["actions sent", tr.sent],
            ["actions per s", tr.sent / load_s],
            ["answered", tr.answered],
            ["lost (no answer within DRAIN s)", tr.lost],
            ["refused (ack not ok)", tr.refused],
            ["answer p50 / p99 ms", _p50_p99(tr.answer_ms)],
            ["worker restarts", _int(last["worker_restarts"])],
            ["Redis keys per conversation created (settled)", settled["redis_keys"] / created],
            ["workers left alive after the node stopped", stray],
            ["node log lines (--log-level warning)", node_log[0]],
        ],
    )
    per = [[kind, n, n / created] for kind, n in kinds.most_common(15)]
    t4 = table(
        f"Redis keys by kind, settled ({sum(kinds.values()):,} keys; {created:,} "
        "conversations created, their ids and their users' as *)",
        ["key", "count", "per conversation created"],
        per,
    )
    if tr.errors:
        t3 += "\n\njoin errors (first ones): " + "; ".join(tr.errors)
    return {
        "tables": [t1, t2, t3, t4],
        "json": {
            "duration_s": duration,
            "load_s": load_s,
            "sample_every_s": every,
            "settings": {
                "loadgens": LOADGENS,
                "period_s": PERIOD,
                "batch": BATCH,
                "actions_per_client": ACTIONS,
                "new_share": NEW_SHARE,
                "recent": RECENT,
                "users": USERS,
                "close_delay_s": CLOSE_DELAY,
                "drain_s": DRAIN,
            },
            "summary": summary,
            "traffic": {
                k: v
                for k, v in vars(tr).items()
                if k not in ("join_ms", "answer_ms", "window_join_ms", "window_answer_ms")
            }
            | {
                "join_p50_ms": percentile(tr.join_ms, 50),
                "join_p99_ms": percentile(tr.join_ms, 99),
                "answer_p50_ms": percentile(tr.answer_ms, 50),
                "answer_p99_ms": percentile(tr.answer_ms, 99),
            },
            "samples": samples,
            "keys_by_kind": dict(kinds),
            "workers_left_alive": stray,
            "node_log_lines": node_log[0],
            "node_log_tail": node_log[1],
        },
    }


def _int(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _p50_p99(ms: list[float]) -> str:
    return f"{_ms(percentile(ms, 50))} / {_ms(percentile(ms, 99))}"


def _scaled(value: float | None, unit: float) -> float | int | str:
    """A value in MiB (``unit`` MB) or as counted (a whole count without decimals)."""
    if value is None:
        return "-"
    if unit != 1:
        return value * unit
    return int(value) if float(value).is_integer() else float(value)
