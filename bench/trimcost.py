"""Redis's cost of keeping a conversation's window while an agent writes large events
(``python -m bench.run --only trimcost``).

One ``coordinator serve`` node (the default 16 MiB window) on a private Redis, the
scripted agent answering one message with ~24 MB of events of one size; a first message
fills the window, the second is measured: Redis's CPU (INFO cpu), its scripts' time per
call (INFO commandstats, EVALSHA: the mover's store-and-trim among them) and the slowest
command (SLOWLOG), while the events are logged, stored and trimmed. Every script blocks
Redis for everyone while it runs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis

from bench.common import (
    Mode,
    log_dir,
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

BURST = 24_000_000  # bytes of agent events per message


def _cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"] + info["used_cpu_user"])


async def _burst(client: EioClient, answered: asyncio.Event) -> None:
    answered.clear()
    await client.call("oh_user_action", {"action": "message", "args": {"content": "go"}})
    async with asyncio.timeout(300):
        await answered.wait()


async def run(mode: Mode) -> dict[str, Any]:
    sizes = mode.pick([20_000, 200_000, 1_000_000], [20_000, 100_000, 200_000, 500_000, 1_000_000])
    secret = new_secret()
    rows, results = [], []
    with private_redis() as server:
        flags = ["--agent", "workers.scripted:ScriptedAgent"]
        node = node_proc("trimmed", server.url, secret, log_dir("trimcost"), extra=flags)
        start_all([node])
        r = redis.Redis.from_url(server.url)
        try:
            for size in sizes:
                n = BURST // size
                seen = [0]
                answered = asyncio.Event()

                def on(
                    name: str,
                    event: Any,
                    n: int = n,
                    seen: list[int] = seen,
                    answered: asyncio.Event = answered,
                ) -> None:
                    if event.get("args", {}).get("part") is not None:
                        seen[0] += 1
                        if seen[0] % n == 0:
                            answered.set()

                client = EioClient(on)
                settings = {"think_time": 0, "reply_size": size, "replies": n}
                token = issue_token(f"u{size}", secret)
                await client.connect(
                    url_of(node),
                    {"conversation_id": f"s{size}"},
                    {"token": token, "settings": settings},
                )
                await _burst(client, answered)  # fills the window
                await asyncio.sleep(2.0)
                r.config_resetstat()
                r.slowlog_reset()
                cpu, started = _cpu(r), time.monotonic()
                await _burst(client, answered)
                await asyncio.sleep(3.0)  # the mover stores and trims the rest
                took, cpu = time.monotonic() - started, _cpu(r) - cpu
                scripts = r.info("commandstats").get("cmdstat_evalsha", {})
                slowest = max((e["duration"] for e in r.slowlog_get(128)), default=0) / 1000
                per_call = scripts.get("usec_per_call", 0) / 1000
                await client.close()
                results.append({
                    "event_bytes": size, "events": n, "seconds": took, "redis_cpu_s": cpu,
                    "scripts": scripts.get("calls", 0), "ms_per_script": per_call,
                    "slowest_ms": slowest,
                })  # fmt: skip
                rows.append([f"{size:,}", n, took, cpu, scripts.get("calls", 0), per_call, slowest])
        finally:
            r.close()
            stop_all([node])
    title = (
        f"Redis while an agent writes {BURST / 1e6:.0f} MB of events of one size (16 MiB window)"
    )
    headers = ["event bytes", "events", "s", "Redis CPU s", "scripts", "ms/script", "slowest ms"]
    return {"tables": [table(title, headers, rows)], "json": {"sizes": results}}
