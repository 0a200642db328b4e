"""Reconnect storm: a node holding a third of the connections dies (or drains), and all of
its clients reconnect to the survivors at once (``python -m bench.run --only storm``).

3 ``coordinator serve`` processes on a private Redis (``--node-ttl 3``); 1,500
conversations with 2 connections each, spread so that each node runs a third of the
loops and holds a third of the connections (conversation i: its loop and first client on
node i % 3, its second client on node (i + 1) % 3). Every conversation gets an action
first. Then node A gets SIGKILL (or SIGTERM: a drain). Each of its clients reconnects to
a survivor after a jitter uniform in 0-1 s (as socket.io clients do) with the id of the
last event it saw, retries with backoff when refused, and once connected sends an action
and waits for its answer: then it is *caught up*. Measured per displaced client: its
reconnect (join) latency, refusals, the time from its first reconnect attempt to caught
up; and for every client, whether the ids it saw are gap-free and without duplicates, and
whether any action of its conversation was answered twice (two agent events for it).
Lease lapses are counted in the survivors' logs. ``tests/test_storm.py`` runs the same
scenario on 60 conversations and asserts it: nothing lost, doubled or refused for good,
no lease lapse.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    Mode,
    Proc,
    log_dir,
    new_secret,
    node_proc,
    percentile,
    private_redis,
    start_all,
    stop_all,
    table,
    url_of,
)
from bench.eio import EioClient
from coordinator.auth import issue_token

JITTER = 1.0  # seconds: reconnects spread uniformly over this
CAUGHT_UP_WITHIN = 5.0  # target, seconds from the first reconnect attempt


@dataclass
class StormClient:
    """One client: its conversation, the node it is on, every event id it saw."""

    sid: str
    token: str
    node: int
    ids: list[int] = field(default_factory=list)
    answers: dict[str, asyncio.Future[float]] = field(default_factory=dict)
    answer_ids: dict[str, set[int]] = field(default_factory=dict)  # action -> its answers
    client: EioClient | None = None
    displaced: bool = False
    first_attempt: float = 0.0
    join_ms: list[float] = field(default_factory=list)
    refused: int = 0
    caught_up_s: float | None = None
    errors: list[str] = field(default_factory=list)

    def on_event(self, name: str, data: Any) -> None:
        if name != "oh_event" or not isinstance(data, dict):
            return
        if isinstance(data.get("id"), int):
            self.ids.append(data["id"])
        if data.get("source") == "agent":
            key = data.get("args", {}).get("content")
            self.answer_ids.setdefault(str(key), set()).add(data.get("id"))
            fut = self.answers.get(key)
            if fut is not None and not fut.done():
                fut.set_result(time.perf_counter())

    async def connect(self, url: str) -> None:
        self.client = EioClient(self.on_event)
        query: dict[str, Any] = {"conversation_id": self.sid}
        if self.ids:
            query["latest_event_id"] = max(self.ids)
        t0 = time.perf_counter()
        await self.client.connect(url, query, {"token": self.token}, within=30)
        self.join_ms.append((time.perf_counter() - t0) * 1000)

    async def ask(self, key: str, within: float = 30.0) -> float:
        assert self.client is not None
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.answers[key] = fut
        try:
            ack = await self.client.call(
                "oh_user_action",
                {"action": "message", "args": {"content": key}, "client_action_id": key},
                within,
            )
        except TimeoutError:
            raise TimeoutError(f"{key}: no ack within {within:g} s") from None
        if not (isinstance(ack, dict) and ack.get("ok")):
            raise RuntimeError(f"action refused: {ack}")
        try:
            async with asyncio.timeout(within):
                return await fut
        except TimeoutError:
            late = f"{key}: acknowledged ({ack}), no answer within {within:g} s"
            raise TimeoutError(late) from None

    def gaps_and_duplicates(self) -> tuple[int, int, int]:
        """Ids missing between the first and the last seen, ids seen twice, and answers
        beyond one per action (an action the agent answered twice, under two ids)."""
        seen = sorted(self.ids)
        dups = len(seen) - len(set(seen))
        unique = sorted(set(seen))
        gaps = sum(b - a - 1 for a, b in itertools.pairwise(unique) if b > a + 1)
        doubled = sum(len(ids) - 1 for ids in self.answer_ids.values())
        return gaps, dups, doubled


async def _rejoin(c: StormClient, survivors: list[str], rng: random.Random) -> None:
    # As a socket.io client: it reconnects once its connection is gone (a killed node
    # drops it; a draining one tells it to reconnect and closes it).
    assert c.client is not None
    await c.client.closed.wait()
    await asyncio.sleep(rng.uniform(0, JITTER))
    c.first_attempt = time.perf_counter()
    delay = 0.25
    while True:
        try:
            await c.connect(rng.choice(survivors))
            break
        except Exception as exc:
            c.refused += 1
            if len(c.errors) < 3:
                c.errors.append(f"{type(exc).__name__}: {exc}")
            if time.perf_counter() - c.first_attempt > 60:
                return  # refused for good
            await asyncio.sleep(rng.uniform(delay / 2, delay))
            delay = min(delay * 2, 2.0)
    try:
        answered = await c.ask(f"{c.sid}-after")
        c.caught_up_s = answered - c.first_attempt
    except Exception as exc:
        c.errors.append(f"{type(exc).__name__}: {exc}")


async def storm(kind: str, conversations: int, logs: Path | None = None) -> dict[str, Any]:
    """The scenario once: ``kind`` "kill" or "drain", over ``conversations`` (two
    connections each); the nodes' logs and event store in ``logs`` (default: a new
    temporary directory)."""
    secret = new_secret()
    logs = logs or log_dir(f"storm-{kind}")
    flags = ["--node-ttl", "3", "--heartbeat-interval", "0.5", "--lease-margin", "0.75"]
    rng = random.Random(11)
    with private_redis() as redis:
        nodes: list[Proc] = [
            node_proc(f"st{i}", redis.url, secret, logs, extra=flags) for i in range(3)
        ]
        urls = [url_of(n) for n in nodes]
        clients: list[StormClient] = []
        try:
            start_all(nodes)
            sem = asyncio.Semaphore(64)

            async def place(c: StormClient) -> None:
                async with sem:
                    await c.connect(urls[c.node])

            first = []
            for i in range(conversations):
                token = issue_token(f"u{i}", secret)
                first.append(StormClient(f"s{i}", token, i % 3))
                clients.append(StormClient(f"s{i}", token, (i + 1) % 3))
            await asyncio.gather(*(place(c) for c in first))  # loops start on node i % 3
            await asyncio.gather(*(place(c) for c in clients))
            clients = first + clients
            await asyncio.gather(
                *(c.ask(f"{c.sid}-before") for c in first), return_exceptions=False
            )
            victim = nodes[0]
            displaced = [c for c in clients if c.node == 0]
            for c in displaced:
                c.displaced = True
            t0 = time.perf_counter()
            if kind == "kill":
                victim.kill()
            else:
                assert victim.proc is not None
                victim.proc.terminate()
            await asyncio.gather(*(_rejoin(c, urls[1:], rng) for c in displaced))
            all_done = time.perf_counter() - t0
            if kind != "kill":
                victim.stop()
            lapses = sum(
                n.log_path.read_text(errors="replace").count("lease lapsed") for n in nodes[1:]
            )
        finally:
            for c in clients:
                if c.client is not None:
                    await c.client.close()
            stop_all(nodes)
    caught = [c.caught_up_s for c in displaced if c.caught_up_s is not None]
    joins = [ms for c in displaced for ms in c.join_ms]
    gaps = dups = doubled = 0
    for c in clients:
        g, d, twice = c.gaps_and_duplicates()
        gaps += g
        dups += d
        doubled += twice
    return {
        "kind": kind,
        "conversations": conversations,
        "connections": len(clients),
        "displaced": len(displaced),
        "rejoined_caught_up": len(caught),
        "never": len(displaced) - len(caught),
        "all_done_s": all_done,
        "caught_up_p50_s": percentile(caught, 50),
        "caught_up_max_s": max(caught) if caught else float("nan"),
        "within_target": sum(1 for s in caught if s <= CAUGHT_UP_WITHIN),
        "join_p50_ms": percentile(joins, 50),
        "join_p99_ms": percentile(joins, 99),
        "refused": sum(c.refused for c in displaced),
        "clients_refused": sum(1 for c in displaced if c.refused),
        "lease_lapses": lapses,
        "gaps": gaps,
        "duplicates": dups,
        "answered_twice": doubled,
        "errors": [e for c in displaced for e in c.errors][:5],
    }


async def run(mode: Mode) -> dict[str, Any]:
    conversations = mode.pick(600, 1_500)
    results = [await storm("kill", conversations), await storm("drain", conversations)]
    t = table(
        f"Reconnect storm: 3 nodes, {results[0]['connections']:,} connections over "
        f"{results[0]['conversations']:,} conversations; the node holding a third dies "
        f"(kill -9) or drains (SIGTERM); its clients reconnect to the survivors, jittered "
        f"over {JITTER:g} s",
        [
            "fault",
            "displaced",
            "caught up",
            f"within {CAUGHT_UP_WITHIN:g} s",
            "caught up p50 / max s",
            "all done s",
            "rejoin p50 / p99 ms",
            "refusals (clients)",
            "lease lapses",
            "gaps",
            "duplicates",
            "answered twice",
        ],
        [
            [
                r["kind"],
                r["displaced"],
                r["rejoined_caught_up"],
                r["within_target"],
                f"{r['caught_up_p50_s']:.2f} / {r['caught_up_max_s']:.2f}",
                r["all_done_s"],
                f"{r['join_p50_ms']:.0f} / {r['join_p99_ms']:.0f}",
                f"{r['refused']} ({r['clients_refused']})",
                r["lease_lapses"],
                r["gaps"],
                r["duplicates"],
                r["answered_twice"],
            ]
            for r in results
        ],
    )
    return {"tables": [t], "json": {"runs": results}}
