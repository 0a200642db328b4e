"""Where an action's time goes inside a server: timestamps along one action's path.

A coordinator node with its agents in worker processes (the default), one with its
agents in its own event loop (``--agent-isolation none``), one with ``--agent-cpus
auto`` (its workers off its event loop's CPU; where there are two CPUs or more) --
client and loop on the node in each -- and the plain python-socketio server run as real
processes with probes installed (``python -m bench.timeline probe ...`` wraps
``coordinator serve`` or the baseline); the probes live here, the servers' code is
unchanged. They record ``time.perf_counter()`` (CLOCK_MONOTONIC) at: each socket read
and write (split into client sockets, Redis sockets and other sockets, such as a
worker's channel, by the peer), engine.io's receive of a packet, the socket.io handler,
and each packet queued to engine.io for a client. For every action (a client frame read
followed by engine.io's receive) the steps until the next one are its path; the table
gives the most common path and each step's median time from the frame's read, at a low
rate (each action alone on the machine). A last table gives how long each write call
took, per peer: a write to a process that sleeps wakes it inside the call, which on a VM
whose other vCPU idles costs the writer far more than the copy.

Probes cost a few microseconds each, so the absolute figures are a little high; compare
the servers' steps, not milliseconds with the round-trip benchmark.
"""

from __future__ import annotations

import asyncio
import json
import os
import runpy
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    Mode,
    baseline_proc,
    log_dir,
    new_secret,
    node_proc,
    percentile,
    private_redis,
    run_under,
    start_all,
    stop_all,
    table,
    url_of,
)
from bench.driver import LoadGenProcess, join_group

STEP_NAMES = {
    "eio.recv": "engine.io has the packet",
    "handler": "socket.io calls the handler",
    "redis.w": "write to Redis",
    "redis.r": "read from Redis",
    "eio.send": "packet queued for the client",
    "client.w": "write to the client",
    "other.r": "read from another socket (an agent worker's channel)",
    "other.w": "write to another socket (an agent worker's channel)",
}


# -- the probed server (child process) ---------------------------------------------------
def _install_probes(redis_port: int, out: Path) -> None:
    import asyncio.selector_events as se

    import engineio
    import socketio
    from engineio import async_socket

    records: list[tuple[str, float]] = []
    writes: list[tuple[str, float]] = []  # (peer, seconds inside the write)
    recording = [False]
    clock = time.perf_counter

    def note(label: str) -> None:
        if recording[0]:
            records.append((label, clock()))

    def side(transport: Any) -> str:
        try:
            return "redis" if transport._sock.getpeername()[1] == redis_port else "client"
        except (OSError, AttributeError, IndexError):
            return "other"

    read, write = (
        se._SelectorSocketTransport._read_ready__data_received,
        se._SelectorSocketTransport.write,
    )

    def probed_read(self: Any) -> None:
        note(side(self) + ".r")
        read(self)

    def probed_write(self: Any, data: Any) -> None:
        if not recording[0]:
            write(self, data)
            return
        peer = side(self)
        began = clock()
        records.append((peer + ".w", began))
        write(self, data)
        writes.append((peer, clock() - began))

    se._SelectorSocketTransport._read_ready__data_received = probed_read  # type: ignore[method-assign]
    se._SelectorSocketTransport.write = probed_write  # type: ignore[method-assign]

    def wrap(cls: Any, name: str, label: str) -> None:
        inner = getattr(cls, name)

        async def probed(*args: Any, **kwargs: Any) -> Any:
            note(label)
            return await inner(*args, **kwargs)

        setattr(cls, name, probed)

    wrap(socketio.AsyncServer, "_trigger_event", "handler")
    wrap(async_socket.AsyncSocket, "receive", "eio.recv")
    wrap(async_socket.AsyncSocket, "send", "eio.send")
    del engineio

    def start(*_: Any) -> None:
        records.clear()
        writes.clear()
        recording[0] = True

    def stop(*_: Any) -> None:
        recording[0] = False
        out.write_text(json.dumps({"records": records, "writes": writes}))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


def probe_main(argv: list[str]) -> None:
    """``probe REDIS_PORT OUT (coordinator|plain) ARGS...``: serve with probes."""
    redis_port, out, kind, *rest = argv
    _install_probes(int(redis_port), Path(out))
    if kind == "coordinator":
        from coordinator.cli import main

        sys.exit(main(rest))
    sys.argv = ["redis_emit", *rest]
    runpy.run_module("bench.baselines.redis_emit", run_name="__main__")


# -- the benchmark -----------------------------------------------------------------------
def _paths(records: list[list[Any]]) -> list[list[tuple[str, float]]]:
    starts = [
        i
        for i, (label, _) in enumerate(records[:-1])
        if label == "client.r" and records[i + 1][0] == "eio.recv"
    ]
    paths: list[list[tuple[str, float]]] = []
    if not starts:
        return paths
    for a, b in zip(starts, [*starts[1:], len(records)], strict=True):
        t0 = records[a][1]
        paths.append([(label, (t - t0) * 1e6) for label, t in records[a + 1 : b] if t - t0 < 0.02])
    return paths


def _write_times(writes: list[list[Any]]) -> dict[str, dict[str, float]]:
    """Per peer: how long the server spent inside its socket writes (a write to a peer
    that sleeps includes waking it, which a VM's idle vCPU makes costly)."""
    by_peer: dict[str, list[float]] = {}
    for peer, seconds in writes:
        by_peer.setdefault(peer, []).append(seconds * 1e6)
    return {
        peer: {"writes": len(us), "p50_us": percentile(us, 50), "p90_us": percentile(us, 90)}
        for peer, us in sorted(by_peer.items())
    }


def summarize(probed: dict[str, Any]) -> dict[str, Any]:
    paths = _paths(probed["records"])
    writes = _write_times(probed["writes"])
    shapes = Counter(tuple(label for label, _ in p) for p in paths)
    if not shapes:
        return {"actions": 0, "typical": 0, "steps": [], "writes": writes}
    shape, count = shapes.most_common(1)[0]
    typical = [p for p in paths if tuple(label for label, _ in p) == shape]
    steps = [
        {"step": label, "median_us": statistics.median(p[i][1] for p in typical)}
        for i, label in enumerate(shape)
    ]
    return {"actions": len(paths), "typical": count, "steps": steps, "writes": writes}


async def run(mode: Mode) -> dict[str, Any]:
    rate, seconds = 50, mode.pick(4.0, 8.0)
    secret = new_secret()
    logs = log_dir("timeline")
    tmp = Path(tempfile.mkdtemp(prefix="bench-timeline-"))
    with private_redis() as redis:
        port = int(redis.url.rsplit(":", 1)[1].split("/")[0])
        probe = ("bench.timeline", "probe", str(port))
        # Coordinator nodes by the flags that set them apart.
        nodes = {"coord-same": [], "coord-none": ["--agent-isolation", "none"]}
        if len(os.sched_getaffinity(0)) > 1:
            nodes["coord-pinned"] = ["--agent-cpus", "auto"]
        systems = {
            name: run_under(
                node_proc(f"node-{n}", redis.url, secret, logs, extra=flags),
                *probe,
                str(tmp / f"{name}.json"),
                "coordinator",
            )
            for n, (name, flags) in enumerate(nodes.items())
        }
        systems["plain-redis"] = run_under(
            baseline_proc(
                "plain-redis",
                "bench.baselines.redis_emit",
                logs,
                ["--secret", secret, "--redis-url", redis.url],
            ),
            *probe, str(tmp / "plain-redis.json"), "plain",
        )  # fmt: skip
        gen = LoadGenProcess()
        try:
            start_all(list(systems.values()))
            await gen.start()
            results: dict[str, Any] = {}
            for n, (name, proc) in enumerate(systems.items()):
                await join_group(gen, name, url_of(proc), secret, f"tl{n}")
                out = tmp / f"{name}.json"
                proc.proc.send_signal(signal.SIGUSR1)
                r = await gen.request(
                    {"cmd": "run", "group": name, "rate": rate, "duration": seconds, "drain": 3}
                )
                proc.proc.send_signal(signal.SIGUSR2)
                for _ in range(100):
                    if out.exists():
                        break
                    await asyncio.sleep(0.05)
                summary = summarize(json.loads(out.read_text()))
                summary["client_p50_ms"] = percentile(r["lat_ms"], 50)
                results[name] = summary
        finally:
            await gen.aclose()
            stop_all(list(systems.values()))
    tables = [
        table(
            f"Steps of one action inside {name} at {rate} actions/s, microseconds from the "
            f"socket read of the client's frame (median of the {res['typical']} of "
            f"{res['actions']} actions that took the most common path; client round trip "
            f"p50 {res.get('client_p50_ms', float('nan')):.2f} ms)",
            ["step", "what", "us"],
            [[s["step"], STEP_NAMES.get(s["step"], ""), s["median_us"]] for s in res["steps"]],
        )
        for name, res in results.items()
    ]
    tables.append(
        table(
            "Time inside each socket write, microseconds (the write call returns after the "
            "kernel has queued the data and woken the reader)",
            ["server", "peer", "writes", "p50 us", "p90 us"],
            [
                [name, peer, w["writes"], w["p50_us"], w["p90_us"]]
                for name, res in results.items()
                for peer, w in res["writes"].items()
            ],
        )
    )
    return {"tables": tables, "json": {"rate": rate, "seconds": seconds, "results": results}}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        probe_main(sys.argv[2:])
    else:
        print("run it through the benchmarks: python -m bench.run --only timeline")
        os._exit(2)
