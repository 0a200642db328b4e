"""Failover: kill -9 of the node running a conversation's loop, while a client acts.

3 node processes on a private Redis. Each run: a client on the owner creates the
conversation (its loop starts there) and leaves; a client on another node sends an
action every 50 ms. Then the owner gets SIGKILL. Measured from the kill:

- ``ack``: the first acknowledgement of an action sent after the kill (actions are
  accepted durably into the inbox even while the owner is dead);
- ``answer``: the first agent reply to an action sent after the kill, i.e. the time until
  a successor runs the loop and works through the inbox.

Afterwards every acknowledged action must have been answered (``lost`` counts those not
answered 5 s after the first answer). The killed node is replaced by a new process
before the next run. Median over the runs, for each (node_ttl, heartbeat) setting.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.common import (
    Mode,
    log_dir,
    median,
    new_secret,
    node_proc,
    private_redis,
    start_all,
    stop_all,
    table,
    url_of,
)
from bench.eio import EioClient
from coordinator.auth import issue_token

INTERVAL = 0.05


class Watcher:
    """The acting client: records send, ack and answer times per action."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.acked: dict[str, float] = {}
        self.answered: dict[str, float] = {}
        self.client = EioClient(self._on_event)
        self.got_answer = asyncio.Event()

    def _on_event(self, name: str, data: Any) -> None:
        if name == "oh_event" and isinstance(data, dict) and data.get("source") == "agent":
            key = data.get("args", {}).get("content")
            if key in self.sent and key not in self.answered:
                self.answered[key] = time.perf_counter()
                self.got_answer.set()

    def act(self, key: str) -> None:
        self.sent[key] = time.perf_counter()
        fut = self.client.emit_with_ack(
            "oh_user_action", {"action": "message", "args": {"content": key}}
        )
        fut.add_done_callback(lambda f: self._on_ack(key, f))

    def _on_ack(self, key: str, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            reply = fut.result()
            if isinstance(reply, dict) and reply.get("ok"):
                self.acked[key] = time.perf_counter()


async def one_run(
    run_id: str, owner: Any, watcher_node: Any, secret: str, deadline_s: float
) -> dict[str, Any]:
    auth = {"token": issue_token(f"fo-{run_id}", secret)}
    query = {"conversation_id": f"fo-{run_id}"}
    setup = EioClient()
    await setup.connect(url_of(owner), query, auth)
    w = Watcher()
    await w.client.connect(url_of(watcher_node), query, auth)
    await setup.close()
    # Steady state first: answered actions through the owner.
    for i in range(5):
        w.act(f"warm-{i}")
        await asyncio.sleep(INTERVAL)
    async with asyncio.timeout(10):
        await _answered(w, [f"warm-{i}" for i in range(5)])
    n = 0
    t_kill = 0.0
    killed = False
    stop_at = None
    while True:
        w.act(f"a-{n}")
        n += 1
        if n == 6 and not killed:
            owner.kill()  # SIGKILL and reap
            t_kill = time.perf_counter()
            killed = True
        if killed:
            after = [k for k, t in w.answered.items() if t > t_kill and w.sent[k] > t_kill]
            if after and stop_at is None:
                stop_at = time.perf_counter() + 1.0
            if stop_at is not None and time.perf_counter() > stop_at:
                break
            if time.perf_counter() - t_kill > deadline_s:
                break
        await asyncio.sleep(INTERVAL)
    # Every acknowledged action must be answered, by the old owner or the successor.
    acked = set(w.acked)
    end = time.perf_counter() + 5.0
    while not acked <= set(w.answered) and time.perf_counter() < end:
        w.got_answer.clear()
        try:
            async with asyncio.timeout(end - time.perf_counter()):
                await w.got_answer.wait()
        except TimeoutError:
            break
    await w.client.close()
    acks_after = [w.acked[k] - t_kill for k in w.acked if w.sent[k] > t_kill]
    answers_after = [w.answered[k] - t_kill for k in w.answered if w.sent[k] > t_kill]
    return {
        "ack_s": min(acks_after) if acks_after else float("nan"),
        "answer_s": min(answers_after) if answers_after else float("nan"),
        "actions": len(w.sent),
        "acked": len(acked),
        "lost": len(acked - set(w.answered)),
    }


async def _answered(w: Watcher, keys: list[str]) -> None:
    while not all(k in w.answered for k in keys):
        w.got_answer.clear()
        await w.got_answer.wait()


async def setting(node_ttl: float, heartbeat: float, runs: int) -> dict[str, Any]:
    secret = new_secret()
    logs = log_dir("failover")
    extra = ["--node-ttl", str(node_ttl), "--heartbeat-interval", str(heartbeat)]
    with private_redis() as redis:
        nodes = [node_proc(f"fo{i}", redis.url, secret, logs, extra=extra) for i in range(3)]
        rows = []
        try:
            start_all(nodes)
            for k in range(runs):
                owner_i = k % 3
                owner, watcher = nodes[owner_i], nodes[(owner_i + 1) % 3]
                row = await one_run(f"{node_ttl:g}-{k}", owner, watcher, secret, 6 * node_ttl)
                rows.append(row)
                replacement = node_proc(f"fo{owner_i}r{k}", redis.url, secret, logs, extra=extra)
                start_all([replacement])
                nodes[owner_i] = replacement
        finally:
            stop_all(nodes)
    return {
        "node_ttl": node_ttl,
        "heartbeat_interval": heartbeat,
        "runs": rows,
        "ack_s_median": median([r["ack_s"] for r in rows]),
        "answer_s_median": median([r["answer_s"] for r in rows]),
        "answer_s_max": max(r["answer_s"] for r in rows),
        "answer_s_min": min(r["answer_s"] for r in rows),
        "lost": sum(r["lost"] for r in rows),
        "acked": sum(r["acked"] for r in rows),
    }


async def run(mode: Mode) -> dict[str, Any]:
    settings = mode.pick([(3.0, 0.5)], [(3.0, 0.5), (6.0, 1.5)])
    runs = mode.pick(5, 15)
    results = [await setting(ttl, hb, runs) for ttl, hb in settings]
    t = table(
        f"Failover after kill -9 of the owner ({runs} runs per setting; action every "
        f"{1000 * INTERVAL:.0f} ms from a client on another node)",
        [
            "node_ttl s",
            "heartbeat s",
            "ack median s",
            "answer median s",
            "answer min-max s",
            "target (ttl + 1 s)",
            "met",
            "acked",
            "lost",
        ],
        [
            [
                r["node_ttl"],
                r["heartbeat_interval"],
                r["ack_s_median"],
                r["answer_s_median"],
                f"{r['answer_s_min']:.2f}-{r['answer_s_max']:.2f}",
                r["node_ttl"] + 1,
                "yes" if r["answer_s_median"] < r["node_ttl"] + 1 else "NO",
                r["acked"],
                r["lost"],
            ]
            for r in results
        ],
    )
    return {"tables": [t], "json": {"action_interval_s": INTERVAL, "settings": results}}
