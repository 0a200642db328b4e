"""Attacks: one node process with its default limits, each attack of the hostile-client
trial in turn (``bench/attackers.py``, a process of its own), and a canary user doing one
action a second on the attacked node throughout.

Per attack: the canary's ack latency (p50, p99, max), the node's CPU (share of one core)
and resident memory (before, peak, after), the bytes its log grew by, and what the
attacker achieved. Afterwards, every action the node acknowledged (the canary's and the
flooder's) must be in the conversation's log and answered: nothing acknowledged is lost.
Targets (issue #15): the canary's p99 under 50 ms and the node under 300 MB throughout.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from bench.attackers import ATTACKS, describe
from bench.common import (
    PY,
    REPO,
    Mode,
    child_env,
    cpu_seconds,
    log_dir,
    new_secret,
    node_proc,
    percentile,
    private_redis,
    rss_bytes,
    stop_all,
    table,
    url_of,
)
from bench.eio import EioClient
from coordinator.auth import issue_token
from coordinator.codec import unpack

SAMPLE_EVERY = 0.25
MB = 1024 * 1024


@dataclass
class Canary:
    """A user acting once a second on the attacked node; latencies by send time."""

    client: EioClient = field(default_factory=EioClient)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (sent at, ms)
    failures: list[tuple[float, str]] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)

    async def run(self) -> None:
        n = 0
        while True:
            n += 1
            sent = time.monotonic()
            action = {"action": "message", "args": {"content": f"canary-{n}"}}
            try:
                ack = await self.client.call("oh_user_action", action, within=10)
            except Exception as exc:
                self.failures.append((sent, type(exc).__name__))
            else:
                if isinstance(ack, dict) and ack.get("ok"):
                    self.samples.append((sent, (time.monotonic() - sent) * 1000))
                    self.acked.append(int(ack["id"]))
                else:
                    self.failures.append((sent, str(ack)))
            await asyncio.sleep(max(0.0, sent + 1.0 - time.monotonic()))

    def window(self, start: float, end: float) -> tuple[list[float], int]:
        ms = [m for t, m in self.samples if start <= t < end]
        return ms, sum(1 for t, _ in self.failures if start <= t < end)


class Sampler:
    """The node process's RSS and CPU (and Redis's CPU), sampled while an attack runs."""

    def __init__(self, pid: int, redis_pid: int) -> None:
        self.pid = pid
        self.redis_pid = redis_pid
        self.peak = 0

    async def during(self, done: asyncio.Future[Any]) -> tuple[float, float, int]:
        """(node CPU, Redis CPU, as shares of one core; peak node RSS) until ``done``."""
        cpu0, redis0, t0 = cpu_seconds(self.pid), cpu_seconds(self.redis_pid), time.monotonic()
        self.peak = rss_bytes(self.pid)
        while not done.done():
            await asyncio.wait([done], timeout=SAMPLE_EVERY)
            self.peak = max(self.peak, rss_bytes(self.pid))
        wall = time.monotonic() - t0
        node = (cpu_seconds(self.pid) - cpu0) / wall
        return node, (cpu_seconds(self.redis_pid) - redis0) / wall, self.peak


async def attack(name: str, url: str, token: str, seconds: float) -> dict[str, Any]:
    """Run one attacker process; what it reported."""
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "bench.attackers", name, url, token, str(seconds),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=child_env(),
        preexec_fn=_attacker_cpu,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"attacker {name} failed ({proc.returncode}): {err.decode()[-2000:]}")
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


def _attacker_cpu() -> None:
    # At the lowest priority: an attacker's CPU is its own machine's, not the node's (on
    # this one box it would otherwise take the cores the node and the canary need).
    os.nice(19)


def achieved(stats: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(stats.items(), key=lambda kv: -kv[1]))


def unanswered(store: redis.Redis, sid: str, acked: list[int]) -> list[int]:
    """Acknowledged actions of ``sid`` missing from its log, or without an answer."""
    rows = store.xrange(f"coord:{{c:{sid}}}:events", count=1_000_000)
    sources: dict[int, tuple[str, str]] = {}
    for entry_id, fields in rows:
        event = unpack(fields[b"d"])
        content = str(event.get("args", {}).get("content", ""))
        sources[int(entry_id.split(b"-")[0])] = (event.get("source", ""), content)
    answers = {content for source, content in sources.values() if source == "agent"}
    return [
        i
        for i in acked
        if i not in sources or sources[i][0] != "user" or sources[i][1] not in answers
    ]


async def run(mode: Mode) -> dict[str, Any]:
    seconds = mode.pick(15.0, 40.0)
    secret = new_secret()
    logs = log_dir("attacks")
    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    with private_redis() as server:
        node = node_proc(
            "attacked", server.url, secret, logs, extra=["--log-level", "info"], limits=True
        )
        node.start().wait_ready()
        canary = Canary()
        await canary.client.connect(
            url_of(node), {"conversation_id": "canary"}, {"token": issue_token("alice", secret)}
        )
        canary_task = asyncio.ensure_future(canary.run())
        store = redis.Redis.from_url(server.url)
        flood_acked: list[int] = []
        try:
            for name in ["none", *ATTACKS]:
                log_before = node.log_path.stat().st_size
                rss_before = rss_bytes(node.pid)
                start = time.monotonic()
                if name == "none":
                    done: asyncio.Future[Any] = asyncio.ensure_future(asyncio.sleep(seconds))
                else:
                    token = issue_token("mallory", secret)
                    done = asyncio.ensure_future(attack(name, url_of(node), token, seconds))
                assert server.proc is not None
                cpu, redis_cpu, peak = await Sampler(node.pid, server.proc.pid).during(done)
                report = done.result() or {"stats": {}, "acked": []}
                end = time.monotonic()
                await asyncio.sleep(2.0)  # what the attack left goes (closes, timeouts)
                rss_after = rss_bytes(node.pid)
                ms, failed = canary.window(start, end)
                if name == "action-flood":
                    flood_acked = report["acked"]
                results[name] = {
                    "canary_ms": ms,
                    "canary_failures": failed,
                    "cpu": cpu,
                    "redis_cpu": redis_cpu,
                    "rss_before": rss_before,
                    "rss_peak": peak,
                    "rss_after": rss_after,
                    "log_bytes": node.log_path.stat().st_size - log_before,
                    "attacker": report["stats"],
                }
                rows.append(
                    [
                        name,
                        len(ms),
                        percentile(ms, 50),
                        percentile(ms, 99),
                        max(ms, default=float("nan")),
                        failed,
                        f"{100 * cpu:.0f}% / {100 * redis_cpu:.0f}%",
                        f"{rss_before / MB:.0f} / {peak / MB:.0f} / {rss_after / MB:.0f}",
                        results[name]["log_bytes"],
                        achieved(report["stats"]),
                    ]
                )
                print(f"  {name}: canary p99 {percentile(ms, 99):.1f} ms", flush=True)
        finally:
            canary_task.cancel()
            await asyncio.gather(canary_task, return_exceptions=True)
            await canary.client.close()
            lost = unanswered(store, "canary", canary.acked)
            lost_flood = unanswered(store, "flood", flood_acked)
            store.close()
            stop_all([node])
    worst_p99 = max(percentile(r["canary_ms"], 99) for r in results.values())
    worst_rss = max(r["rss_peak"] for r in results.values())
    summary = (
        f"canary: {len(canary.acked)} actions acknowledged, {len(lost)} lost; flooder: "
        f"{len(flood_acked)} acknowledged, {len(lost_flood)} lost; worst canary p99 "
        f"{worst_p99:.1f} ms (target < 50), node peak RSS {worst_rss / MB:.0f} MB (< 300)"
    )
    headers = [
        "attack", "canary n", "p50 ms", "p99 ms", "max ms", "failed", "CPU node / Redis",
        "RSS MB before/peak/after", "log bytes", "the attacker achieved",
    ]  # fmt: skip
    legend = "\n".join(f"- `{name}`: {describe(name)}" for name in ATTACKS)
    return {
        "tables": [
            table(f"Attacks on one node, {seconds:.0f} s each ({mode.name})", headers, rows),
            "\n" + legend + "\n\n" + summary,
        ],
        "json": {
            "seconds": seconds,
            "results": results,
            "canary_acked": len(canary.acked),
            "canary_lost": lost,
            "flood_acked": len(flood_acked),
            "flood_lost": lost_flood,
            "summary": summary,
        },
    }
