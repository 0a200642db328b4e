"""Where a node's time goes: py-spy samples of a node process under load.

Three loads on one coordinator node (a process; Redis private; load generator separate):

- ``roundtrip``: actions at a fixed rate over many conversations, client and loop on the
  node (the same-node round trip);
- ``join``: new conversations joined as fast as the node takes them (create, admit,
  start the loop, subscribe, register the connection);
- ``second``: a second connection to each of those conversations, their loops running
  on the node and their first clients connected (verify, find the owner, register the
  connection, read the first page).

py-spy samples the node (only busy samples; ``--nonblocking``: the process runs on while
it is read, so some stacks come out partial) for the length of the load; the collapsed
stacks go to ``bench/results/profile-LOAD-MODE.txt`` (flamegraph.pl input). The tables:
the samples by phase (the deepest frame matching a known function), self time by
package, the top functions by self time, and the inclusive time of the node's own
functions and of the libraries' entry points.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    Mode,
    cpu_seconds,
    log_dir,
    new_secret,
    node_proc,
    private_redis,
    start_all,
    stop_all,
    table,
    url_of,
)
from bench.driver import LoadGenProcess
from coordinator.auth import issue_token

FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")
PACKAGES = (
    "coordinator",
    "workers",
    "socketio",
    "engineio",
    "uvicorn",
    "websockets",
    "wsproto",
    "h11",
    "redis",
    "msgpack",
    "asyncio",
    "json",
)


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(__file__).resolve().parents[1] / ".venv/bin/py-spy")
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed (pip install py-spy, the bench extra)")
    return found


def package_of(path: str) -> str:
    parts = Path(path).parts
    for name in PACKAGES:
        if name in parts:
            return name
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    return "stdlib/other"


# Where a sample's time goes: the deepest frame (nearest the leaf) matching a marker.
PHASES: tuple[tuple[str, str], ...] = (
    ("EpollSelector.select", "event loop: waiting in epoll (select)"),
    ("SocketSink.deliver", "deliver: socket.io emit of an event to a client"),
    ("LoopRunner._commit", "agent loop: commit script (fenced append)"),
    ("LoopRunner._read_inbox", "agent loop: read inbox (start)"),
    ("LoopRunner._dispatch", "agent loop: dispatch to the agent"),
    ("ConversationManager._on_message", "pub/sub: route an event to runner and connections"),
    ("Subscriptions._handle", "pub/sub: decode a message"),
    ("Subscriptions.run", "pub/sub: read from Redis"),
    ("Subscriptions.add", "pub/sub: subscribe"),
    ("RedisState.accept", "action: accept script (log + inbox + publish)"),
    ("SocketHandlers.oh_user_action", "action: handler (validate, pack)"),
    ("ConversationManager._start", "join: start a loop (acquire, admit, subscribe)"),
    (
        "ConversationManager.maybe_start_agent_loop",
        "join: start a loop (acquire, admit, subscribe)",
    ),
    ("ConversationManager.join_conversation", "join: register connection, replay"),
    ("TokenVerifier.verify", "join: verify token"),
    ("SocketHandlers._join", "join: connect handler"),
    ("SocketHandlers.connect", "join: connect handler"),
    ("_heartbeat_loop", "background: heartbeat"),
    ("_flush_loop", "background: activity flush"),
    ("_cleanup_loop", "background: idle sweep"),
    ("AsyncSocket._websocket_handler", "engine.io: websocket frames (read, write, ping)"),
    ("AsyncServer._handle_eio_message", "socket.io: packet decode and dispatch"),
    ("AsyncServer._handle_connect", "engine.io/socket.io: handshake"),
    ("run_asgi", "uvicorn: ASGI websocket protocol"),
    ("_read_ready", "asyncio: socket reads"),
    ("_run_once", "event loop: scheduling"),
)
# py-spy cannot always walk a coroutine's stack to its root; such partial stacks are
# placed by the library function they start in.
LIBRARY: tuple[tuple[str, str], ...] = (
    ("WebSocketsSansIOProtocol.send", "partial: uvicorn websocket send"),
    ("PubSub.", "partial: redis-py pub/sub read"),
    ("AsyncScript.__call__", "partial: redis-py script call"),
    ("Redis.execute_command", "partial: redis-py command"),
    ("call_with_retry", "partial: redis-py command"),
    ("read_response", "partial: redis-py reply parsing"),
    ("Pipeline.", "partial: redis-py pipeline"),
    ("_SelectorSocketTransport.write", "partial: socket writes"),
    ("Protocol.parse", "partial: websocket frame parsing"),
    ("JSONDecoder.decode", "partial: json"),
    ("JSONEncoder.encode", "partial: json"),
)


def phase_of(funcs: list[str]) -> str:
    for table_ in (PHASES, LIBRARY):
        for func in reversed(funcs):
            for marker, label in table_:
                if func.endswith(marker) or (marker.endswith(".") and marker in func):
                    return label
    return "other (partial stack)"


def parse(raw: str) -> tuple[int, Counter[str], Counter[str], Counter[str], Counter[str]]:
    """Total samples; self by package, self by function, inclusive by function, by phase."""
    total = 0
    by_phase: Counter[str] = Counter()
    by_pkg: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [FRAME.match(f) for f in stack.split(";")]
        names = []
        for m in frames:
            if m is None:
                continue
            names.append((m["func"], package_of(m["path"]), Path(m["path"]).name))
        if not names:
            continue
        by_phase[phase_of([f for f, _, _ in names])] += count
        func, pkg, fname = names[-1]
        by_pkg[pkg] += count
        self_fn[f"{pkg}: {func} ({fname})"] += count
        for label in {f"{p}: {f} ({n})" for f, p, n in names}:
            incl_fn[label] += count
    return total, by_pkg, self_fn, incl_fn, by_phase


async def load_roundtrip(gen: LoadGenProcess, node: Any, secret: str, mode: Mode) -> dict[str, Any]:
    conns = [
        {
            "url": url_of(node),
            "query": {"conversation_id": f"prof-{i}"},
            "auth": {"token": issue_token(f"p{i}", secret)},
        }
        for i in range(40)
    ]
    await gen.request({"cmd": "connect", "group": "rt", "conns": conns, "concurrency": 10})
    await gen.request({"cmd": "run", "group": "rt", "rate": 100, "duration": 2, "drain": 3})
    seconds = mode.pick(10.0, 20.0)
    return {"cmd": "run", "group": "rt", "rate": 200, "duration": seconds, "drain": 3}


async def profile_load(kind: str, mode: Mode) -> dict[str, Any]:
    secret = new_secret()
    logs = log_dir("profile")
    out = RESULTS / f"profile-{kind}-{mode.name}.txt"
    RESULTS.mkdir(parents=True, exist_ok=True)
    with private_redis() as redis:
        node = node_proc(
            "prof", redis.url, secret, logs, extra=["--max-concurrent-conversations", "1000"]
        )
        gen = LoadGenProcess()
        try:
            start_all([node])
            await gen.start()
            if kind == "roundtrip":
                command = await load_roundtrip(gen, node, secret, mode)
                seconds = float(command["duration"])
                work = f"{int(command['rate'] * seconds)} actions"
            else:
                n = mode.pick(1_000, 3_000)
                conns = [
                    {
                        "url": url_of(node),
                        "query": {"conversation_id": f"pj-{i}"},
                        "auth": {"token": issue_token(f"j{i % 100}", secret)},
                    }
                    for i in range(n)
                ]
                if kind == "second":  # their loops running on the node, first clients on
                    first = {"cmd": "connect", "group": "first", "conns": conns}
                    await gen.request({**first, "concurrency": 50})
                command = {"cmd": "connect", "group": "joins", "conns": conns, "concurrency": 50}
                seconds = mode.pick(8.0, 20.0)
                work = (
                    f"joins of {n} new conversations"
                    if kind == "join"
                    else f"second connections to {n} running conversations"
                )
            spy = await asyncio.create_subprocess_exec(
                py_spy(),
                "record",
                "--pid",
                str(node.pid),
                "--rate",
                "200",
                "--nonblocking",
                "--format",
                "raw",
                "--duration",
                str(int(seconds)),
                "--output",
                str(out),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(0.5)  # py-spy attaches
            cpu0 = cpu_seconds(node.pid)
            reply = await gen.request(command)
            cpu = cpu_seconds(node.pid) - cpu0
            async with asyncio.timeout(60):
                _, err = await spy.communicate()
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed: {err.decode()}")
        finally:
            await gen.aclose()
            stop_all([node])
    total, by_pkg, self_fn, incl_fn, by_phase = parse(out.read_text())
    units = reply.get("sent") or reply.get("connected") or 1
    return {
        "load": kind,
        "work": work,
        "samples": total,
        "node_cpu_s": cpu,
        "cpu_ms_per_unit": 1000 * cpu / units,
        "by_phase": dict(by_phase.most_common()),
        "self_by_package": dict(by_pkg.most_common()),
        "self_by_function": dict(self_fn.most_common(40)),
        "inclusive_by_function": dict(incl_fn.most_common(120)),
        "raw_stacks": str(out),
    }


def _pct(n: int, total: int) -> float:
    return 100.0 * n / total if total else 0.0


OWN = ("coordinator:", "workers:")
ENTRY = (
    "socketio: _handle_event_internal",
    "socketio: _handle_connect",
    "socketio: emit",
    "engineio: _websocket_handler",
    "engineio: _trigger_event",
    "engineio: send",
    "uvicorn: run_asgi",
    "redis: execute_command",
    "redis: execute",
    "redis: get_message",
    "redis: read_response",
    "redis: send_packed_command",
    "msgpack:",
    "json:",
)


def report(results: list[dict[str, Any]]) -> dict[str, Any]:
    tables = []
    for r in results:
        total = r["samples"]
        title = (
            f"Profile, {r['load']} load ({r['work']}): {total:,} busy samples; node CPU "
            f"{r['cpu_ms_per_unit']:.2f} ms per "
            f"{'action' if r['load'] == 'roundtrip' else 'join'}"
        )
        tables.append(
            table(
                title + " -- where the time goes (deepest matching frame)",
                ["phase", "% of samples"],
                [[p, _pct(n, total)] for p, n in r["by_phase"].items()],
            )
        )
        pkgs = sorted(r["self_by_package"].items(), key=lambda kv: -kv[1])
        tables.append(
            table(
                "Self time by package",
                ["package", "% of busy samples"],
                [[p, _pct(n, total)] for p, n in pkgs[:12]],
            )
        )
        tables.append(
            table(
                "Top functions by self time",
                ["function", "%"],
                [[f, _pct(n, total)] for f, n in list(r["self_by_function"].items())[:15]],
            )
        )
        incl = r["inclusive_by_function"]
        own = [(f, n) for f, n in incl.items() if f.startswith(OWN)][:18]
        libs = [(f, n) for f, n in incl.items() if f.startswith(ENTRY)][:12]
        tables.append(
            table(
                "Inclusive time: the coordinator's functions, then library entry points",
                ["function", "% incl."],
                [[f, _pct(n, total)] for f, n in own + libs],
            )
        )
    return {"tables": tables, "json": {"profiles": results}}


async def run(mode: Mode) -> dict[str, Any]:
    results = [await profile_load(kind, mode) for kind in ("roundtrip", "join", "second")]
    return report(results)
