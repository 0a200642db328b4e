"""The load generator: a separate process driven by JSON lines on stdin.

Commands (one JSON object per line; one JSON reply per command on stdout):

- ``{"cmd": "connect", "group": G, "conns": [{"url", "query", "auth", "setup_url"?}],
  "concurrency": N}``: open the connections (at most N joins in flight). With
  ``setup_url``, a first client joins the conversation there (so its loop starts on that
  node), then the measured client joins at ``url``, then the first one leaves.
- ``{"cmd": "run", "group": G, "rate": R, "duration": D, "drain": S}``: open loop: send
  ``oh_user_action`` at R per second round-robin over the group's connections for D
  seconds, then wait up to S seconds for the answers. Replies with the round-trip
  latencies (send to the agent's ``oh_event``) and ack latencies in milliseconds.
- ``{"cmd": "close", "group": G, "concurrency": N}``: close the group's connections, N at
  a time (default 200). ``{"cmd": "quit"}``.

Run: ``python -m bench.loadgen`` (started by the benchmarks, not by hand).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

from bench.common import raise_nofile
from bench.eio import EioClient


class Group:
    def __init__(self, name: str) -> None:
        self.name = name
        self.clients: list[EioClient] = []
        self.pending: dict[str, float] = {}
        self.answered_all = asyncio.Event()  # set when nothing is pending
        self.latencies: list[float] = []
        self.slow: list[tuple[str, float]] = []  # (key, ms) of answers slower than 20 ms
        self.events = 0

    def on_event(self, name: str, data: Any) -> None:
        if name != "oh_event" or not isinstance(data, dict):
            return
        self.events += 1
        if data.get("source") != "agent":
            return
        args = data.get("args")
        key = args.get("content") if isinstance(args, dict) else None
        sent = self.pending.pop(key, None) if isinstance(key, str) else None
        if sent is not None:
            if not self.pending:
                self.answered_all.set()
            ms = (time.perf_counter() - sent) * 1000
            self.latencies.append(ms)
            if ms > 20 and len(self.slow) < 200:
                self.slow.append((key, ms))


class LoadGen:
    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}

    async def connect(self, p: dict[str, Any]) -> dict[str, Any]:
        group = self.groups.setdefault(p["group"], Group(p["group"]))
        sem = asyncio.Semaphore(int(p.get("concurrency", 50)))
        failures: list[str] = []
        joins: list[float] = []

        async def one(spec: dict[str, Any]) -> None:
            async with sem:
                setup = None
                try:
                    if spec.get("setup_url"):
                        setup = EioClient()
                        await setup.connect(spec["setup_url"], spec["query"], spec["auth"])
                    client = EioClient(group.on_event)
                    t0 = time.perf_counter()
                    await client.connect(spec["url"], spec["query"], spec["auth"])
                    joins.append((time.perf_counter() - t0) * 1000)
                    group.clients.append(client)
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                finally:
                    if setup is not None:
                        await setup.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(spec) for spec in p["conns"]))
        seconds = time.perf_counter() - t0
        return {
            "connected": len(p["conns"]) - len(failures),
            "failed": len(failures),
            "errors": failures[:5],
            "seconds": seconds,
            "join_ms": joins if p.get("return_joins") else [],
        }

    async def run(self, p: dict[str, Any]) -> dict[str, Any]:
        group = self.groups[p["group"]]
        clients = [c for c in group.clients if not c.closed.is_set()]
        rate, duration = float(p["rate"]), float(p["duration"])
        group.latencies = []
        group.slow = []
        group.pending = {}
        acks: list[float] = []
        ack_errors = 0
        loop = asyncio.get_running_loop()
        interval = 1.0 / rate
        total = int(rate * duration)
        ack_futs: list[asyncio.Future[Any]] = []

        def on_ack(sent: float, fut: asyncio.Future[Any]) -> None:
            nonlocal ack_errors
            if fut.cancelled() or fut.exception() is not None:
                ack_errors += 1
                return
            reply = fut.result()
            if isinstance(reply, dict) and reply.get("ok"):
                acks.append((time.perf_counter() - sent) * 1000)
            else:
                ack_errors += 1

        start = loop.time() + 0.05
        for n in range(total):
            delay = start + n * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            client = clients[n % len(clients)]
            key = f"{group.name}|{n}"
            sent = time.perf_counter()
            group.pending[key] = sent
            fut = client.emit_with_ack(
                "oh_user_action", {"action": "message", "args": {"content": key}}
            )
            fut.add_done_callback(lambda f, s=sent: on_ack(s, f))
            ack_futs.append(fut)
        late = loop.time() - (start + (total - 1) * interval)
        if group.pending:
            group.answered_all.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(float(p.get("drain", 3.0))):
                    await group.answered_all.wait()
        for fut in ack_futs:
            if not fut.done():
                fut.cancel()
        lost = len(group.pending)
        group.pending = {}
        return {
            "sent": total,
            "answered": len(group.latencies),
            "lost": lost,
            "ack_errors": ack_errors,
            "lat_ms": group.latencies,
            "ack_ms": acks,
            "schedule_lag_s": max(0.0, late),
            "slow": group.slow,
            "connections": len(clients),
        }

    async def close(self, p: dict[str, Any]) -> dict[str, Any]:
        group = self.groups.pop(p["group"], None)
        if group is not None:
            sem = asyncio.Semaphore(int(p.get("concurrency", 200)))

            async def one(c: EioClient) -> None:
                async with sem:
                    await c.close()

            await asyncio.gather(*(one(c) for c in group.clients))
        return {"closed": True}


async def main() -> None:
    raise_nofile()
    gen = LoadGen()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    while True:
        line = await reader.readline()
        if not line:
            break
        p = json.loads(line)
        cmd = p["cmd"]
        if cmd == "quit":
            break
        try:
            result = await getattr(gen, cmd)(p)
            reply = {"ok": True, **result}
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    for name in list(gen.groups):
        await gen.close({"group": name})


if __name__ == "__main__":
    asyncio.run(main())
