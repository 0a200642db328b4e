"""A local demo cluster: one embedded Redis and N ``coordinator serve`` processes.

Shutdown in named steps: SIGTERM every node (each drains and deregisters), wait up to
``stop_timeout``, kill what is left, then stop Redis last so the nodes can still reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp

from .auth import issue_token
from .embedded import EmbeddedRedis
from .errors import CoordinatorError

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


@dataclass
class NodeProcess:
    node_id: str
    url: str
    proc: asyncio.subprocess.Process
    forwarder: asyncio.Task[None] | None = field(default=None)


async def _forward(node: NodeProcess, out: TextIO) -> None:
    """Copy the node's stdout to ours, prefixed with its id."""
    assert node.proc.stdout is not None
    while line := await node.proc.stdout.readline():
        print(f"[{node.node_id}] {line.decode(errors='replace').rstrip()}", file=out, flush=True)


async def _wait_ready(node: NodeProcess, deadline: float) -> None:
    """Wait for the node's "serving on" line, then for its /healthz to answer 200."""
    loop = asyncio.get_running_loop()
    assert node.proc.stdout is not None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise CoordinatorError(f"{node.node_id} did not start within {READY_TIMEOUT}s")
        try:
            async with asyncio.timeout(remaining):
                line = await node.proc.stdout.readline()
        except TimeoutError:
            continue
        if not line:
            code = await node.proc.wait()
            raise CoordinatorError(f"{node.node_id} exited with code {code} while starting")
        if b" serving on " in line:
            break
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        delay = 0.05
        while True:
            try:
                async with session.get(node.url + "/healthz") as resp:
                    if resp.status == 200:
                        return
                    why = f"HTTP {resp.status}: {await resp.text()}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                why = str(exc) or type(exc).__name__
            if loop.time() > deadline:
                raise CoordinatorError(f"{node.node_id} is not healthy: {why}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


async def _stop_nodes(nodes: list[NodeProcess], grace: float) -> None:
    for node in nodes:
        if node.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                node.proc.terminate()
    waits = [asyncio.ensure_future(n.proc.wait()) for n in nodes]
    if waits:
        await asyncio.wait(waits, timeout=grace)
    for node in nodes:
        if node.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                node.proc.kill()
            await node.proc.wait()
        if node.forwarder is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(2):
                    await node.forwarder


def instructions(urls: list[tuple[str, str]], redis_url: str, secret: str) -> str:
    first = urls[0][1]
    other = urls[1][1] if len(urls) > 1 else first
    token = issue_token("demo", secret)
    lines = [f"cluster ready: {len(urls)} node(s) sharing Redis at {redis_url}"]
    lines += [f"  {node_id}  {url}" for node_id, url in urls]
    lines += [
        "",
        f"secret: {secret}",
        f'token for user "demo": {token}',
        "",
        "chat (type a line, Enter sends it; Ctrl-D or Ctrl-C quits):",
        f"  coordinator chat --url {first} --conversation demo1 --secret {secret}",
        "a second terminal on another node joins the same conversation and sees every event:",
        f"  coordinator chat --url {other} --conversation demo1 --secret {secret}",
        "REST, e.g.:",
        f'  curl -H "Authorization: Bearer {token}" {first}/api/cluster',
        "",
        "Press Ctrl-C to stop the cluster.",
    ]
    return "\n".join(lines)


async def run_cluster(
    n: int,
    host: str,
    base_port: int,
    secret: str,
    *,
    log_level: str = "warning",
    extra_args: list[str] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    redis = EmbeddedRedis()
    nodes: list[NodeProcess] = []
    try:
        await asyncio.to_thread(redis.start)
        env = dict(os.environ, COORDINATOR_SECRET=secret, PYTHONUNBUFFERED="1")
        for i in range(n):
            node_id, port = f"node{i + 1}", base_port + i
            # Each node gets its own session: a terminal's Ctrl-C reaches only this
            # supervisor, which then stops the nodes in order.
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "coordinator",
                "serve",
                "--host",
                host,
                "--port",
                str(port),
                "--redis-url",
                redis.url,
                "--node-id",
                node_id,
                "--log-level",
                log_level,
                *(extra_args or []),
                env=env,
                stdout=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
            url_host = f"[{host}]" if ":" in host else host
            nodes.append(NodeProcess(node_id, f"http://{url_host}:{port}", proc))
        deadline = loop.time() + READY_TIMEOUT
        ready: asyncio.Future[Any] = asyncio.gather(*(_wait_ready(x, deadline) for x in nodes))
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError, CoordinatorError):
                await ready
            print("stopping before the cluster was ready", file=err, flush=True)
            return 130
        stopped.cancel()
        try:
            ready.result()
        except CoordinatorError as exc:
            print(f"error: {exc}", file=err, flush=True)
            return 1
        for node in nodes:
            node.forwarder = asyncio.create_task(_forward(node, out))
        print(instructions([(x.node_id, x.url) for x in nodes], redis.url, secret), file=out)
        out.flush()
        exits: dict[asyncio.Future[Any], NodeProcess] = {
            asyncio.ensure_future(x.proc.wait()): x for x in nodes
        }
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({stopped, *exits}, return_when=asyncio.FIRST_COMPLETED)
        for task in exits:
            if task in done:
                node = exits[task]
                print(f"{node.node_id} exited with code {task.result()}", file=err, flush=True)
        print("stopping the cluster...", file=err, flush=True)
        return 0 if stopped in done else 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await _stop_nodes(nodes, STOP_TIMEOUT)
        await asyncio.to_thread(redis.cleanup)
