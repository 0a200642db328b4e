"""A local demo cluster: one embedded Redis and N ``coordinator serve`` processes.

The demo survives what it demonstrates: a node that dies (``kill -9 PID``) stays down and
the others carry on; ``restart N`` typed on the cluster's stdin, or SIGUSR1 (every dead
node), starts it again on its port with its node id. The commands it prints name the
venv's own ``coordinator``, so they run as printed from any shell.

Shutdown in named steps: SIGTERM every node (each drains and deregisters), wait up to
``STOP_TIMEOUT``, kill what is left, then stop Redis last so the nodes can still reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from workers.parent import die_with_parent

from .auth import issue_token
from .embedded import EmbeddedRedis, free_port
from .errors import CoordinatorError

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


@dataclass
class NodeProcess:
    node_id: str
    url: str
    port: int
    proc: asyncio.subprocess.Process
    forwarder: asyncio.Task[None] | None = field(default=None)


def coordinator_command() -> list[str]:
    """How to run ``coordinator`` from any shell: the script next to this Python (the
    venv's), else this Python with ``-m coordinator``; absolute either way."""
    script = Path(sys.executable).parent / "coordinator"
    if os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "coordinator"]


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


def instructions(
    nodes: list[NodeProcess], redis_url: str, secret: str, secret_file: str | None = None
) -> str:
    """What the cluster prints once ready. The chat commands read the secret from
    ``secret_file`` (a command line's arguments are visible in ``ps``), unless it cannot
    hold it (a secret with a line break: the file's first line is the secret)."""
    first = nodes[0].url
    other = nodes[1].url if len(nodes) > 1 else first
    token = issue_token("demo", secret)
    admin = issue_token("admin", secret, claims={"role": "admin"})
    coordinator = shlex.join(coordinator_command())
    urls = " ".join(f"--url {n.url}" for n in nodes)
    if secret_file is not None and not set(secret) & {"\n", "\r"}:
        given = f"--secret-file {shlex.quote(secret_file)}"
    else:
        given = f"--secret={shlex.quote(secret)}"  # "=": a secret may start with "-"
    lines = [f"cluster ready: {len(nodes)} node(s) sharing Redis at {redis_url}"]
    lines += [f"  {n.node_id}  {n.url}  (pid {n.proc.pid})" for n in nodes]
    lines += [
        "",
        f"secret: {secret}",
        f'token for user "demo": {token}',
        f"admin token: {admin}",
        "",
        "in a browser (the token stays in the URL fragment, never sent to a server):",
        f"  chat       {first}/ui/chat.html#token={token}&conversation=demo1",
        f"  dashboard  {other}/ui/dashboard.html#token={admin}",
        "chat in a terminal (type a line, Enter sends it; Ctrl-D or Ctrl-C quits):",
        f"  {coordinator} chat {urls} --conversation demo1 {given}",
        "a second terminal joins the same conversation through another node first:",
        f"  {coordinator} chat --url {other} --conversation demo1 {given}",
        "REST, e.g.:",
        f'  curl -H "Authorization: Bearer {token}" {first}/api/dashboard',
        "",
        "Kill a node (kill -9 PID): the others carry on. Type 'restart N' (or send this "
        "process SIGUSR1 to restart every dead node) to start it again; 'status' lists them.",
        "Press Ctrl-C to stop the cluster.",
    ]
    return "\n".join(lines)


def _keep_secret(directory: str, secret: str) -> str:
    """The secret in a file only its user reads, in the run's private directory (gone
    with it), for the printed chat commands' ``--secret-file``."""
    path = os.path.join(directory, "secret")
    with open(
        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8"
    ) as f:
        f.write(secret + "\n")
    return path


def _read_lines(queue: asyncio.Queue[str | None], stdin: TextIO) -> None:
    """Feed stdin lines into ``queue`` from a daemon thread (None at end of input)."""
    loop = asyncio.get_running_loop()

    def pump() -> None:
        try:
            for line in stdin:
                loop.call_soon_threadsafe(queue.put_nowait, line.strip())
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="cluster-stdin", daemon=True).start()


PER_NODE_VARIABLES = (
    "COORDINATOR_AGENT_CPUS",
    "COORDINATOR_METRICS_PORT",
    "COORDINATOR_PUBLIC_URL",
)
# Signals that stop the cluster, its nodes and its Redis: a terminal closed (SIGHUP) too.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class LocalCluster:
    """The node processes of one demo cluster: started, watched, restarted, stopped."""

    def __init__(
        self, redis_url: str, host: str, secret: str, node_args: list[str], out: TextIO
    ) -> None:
        self.redis_url = redis_url
        self.host = host
        self.node_args = node_args
        self.out = out
        self.env = dict(os.environ, COORDINATOR_SECRET=secret, PYTHONUNBUFFERED="1")
        # What is one node's, not every node's on this machine: one CPU list for all
        # would pin every node's event loop to the same CPU (cpus.py), one metrics port
        # or public URL would be taken or advertised by all.
        for name in PER_NODE_VARIABLES:
            if self.env.pop(name, ""):
                print(f"{name} is not passed to the local cluster's nodes", file=out)
        self.nodes: list[NodeProcess] = []

    async def spawn(self, node_id: str, port: int) -> NodeProcess:
        # Each node gets its own session: a terminal's Ctrl-C reaches only this
        # supervisor, which then stops the nodes in order.
        proc = await asyncio.create_subprocess_exec(
            *coordinator_command(),
            "serve",
            "--host", self.host,
            "--port", str(port),
            "--redis-url", self.redis_url,
            "--node-id", node_id,
            *self.node_args,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
            # A supervisor killed (kill -9) takes its nodes along: they drain on SIGTERM.
            preexec_fn=die_with_parent,
        )  # fmt: skip
        url_host = f"[{self.host}]" if ":" in self.host else self.host
        return NodeProcess(node_id, f"http://{url_host}:{port}", port, proc)

    def forward(self, node: NodeProcess) -> None:
        node.forwarder = asyncio.create_task(_forward(node, self.out), name=node.node_id)

    def find(self, word: str) -> NodeProcess | None:
        """The node named ``word`` (``2`` or ``node2``)."""
        name = word if word.startswith("node") else f"node{word}"
        return next((n for n in self.nodes if n.node_id == name), None)

    async def restart(self, node: NodeProcess, say: TextIO) -> None:
        if node.proc.returncode is None:
            print(f"{node.node_id} is running (pid {node.proc.pid})", file=say, flush=True)
            return
        fresh = await self.spawn(node.node_id, node.port)
        self.nodes[self.nodes.index(node)] = fresh
        try:
            await _wait_ready(fresh, asyncio.get_running_loop().time() + READY_TIMEOUT)
        except CoordinatorError as exc:
            print(f"{node.node_id} did not restart: {exc}", file=say, flush=True)
            return
        self.forward(fresh)
        print(f"{fresh.node_id} restarted at {fresh.url} (pid {fresh.proc.pid})", file=say)
        say.flush()

    def status(self) -> str:
        return "\n".join(
            f"  {n.node_id}  {n.url}  "
            + (f"running (pid {n.proc.pid})" if n.proc.returncode is None else "down")
            for n in self.nodes
        )


async def _redis_lost(proc: subprocess.Popen[bytes], stop: asyncio.Event, err: TextIO) -> None:
    """The cluster's Redis ended under it (killed, out of memory): no node can serve
    without it, so the cluster stops, saying why."""
    code = await asyncio.to_thread(proc.wait)
    if not stop.is_set():
        print(f"the cluster's Redis exited with code {code}; stopping", file=err, flush=True)
        stop.set()


async def supervise(cluster: LocalCluster, stop: asyncio.Event, err: TextIO) -> None:
    """Until ``stop``: report nodes that exit, obey stdin commands and SIGUSR1."""
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str | None] = asyncio.Queue()
    _read_lines(commands, sys.stdin)
    loop.add_signal_handler(signal.SIGUSR1, commands.put_nowait, "restart all")
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    reading: asyncio.Future[Any] | None = None
    try:
        while not stop.is_set():
            exits: dict[asyncio.Future[Any], NodeProcess] = {
                asyncio.ensure_future(n.proc.wait()): n for n in cluster.nodes
            }
            live = [e for e, n in exits.items() if n.proc.returncode is None]
            if reading is None:
                reading = asyncio.ensure_future(commands.get())
            done, _ = await asyncio.wait(
                {stopped, reading, *live}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in exits:
                task.cancel()
            for task in done & set(live):
                node = exits[task]
                print(
                    f"{node.node_id} exited with code {node.proc.returncode}; the others carry "
                    f"on ('restart {node.node_id[4:]}' starts it again)",
                    file=err,
                    flush=True,
                )
            if reading.done():
                line, reading = reading.result(), None
                if line is None:  # no more input: commands only by SIGUSR1 now
                    reading = asyncio.get_running_loop().create_future()
                elif line:  # a restart may take a while: Ctrl-C does not wait for it
                    obeying = asyncio.ensure_future(obey(cluster, line, err))
                    await asyncio.wait({obeying, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    if not obeying.done():
                        obeying.cancel()  # the node it started is in cluster.nodes: stopped
                        with contextlib.suppress(asyncio.CancelledError):
                            await obeying
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        stopped.cancel()
        if reading is not None:
            reading.cancel()


async def obey(cluster: LocalCluster, line: str, err: TextIO) -> None:
    words = line.split()
    if words[0] == "status":
        print(cluster.status(), file=err, flush=True)
    elif words[0] == "restart" and len(words) == 2:
        targets = (
            [n for n in cluster.nodes if n.proc.returncode is not None]
            if words[1] == "all"
            else [node for node in [cluster.find(words[1])] if node is not None]
        )
        if not targets:
            print(f"nothing to restart for {words[1]!r}", file=err, flush=True)
        for node in targets:
            await cluster.restart(node, err)
    else:
        print("commands: status | restart N | restart all", file=err, flush=True)


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
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    redis = EmbeddedRedis(free_port(avoid=range(base_port, base_port + n)))
    cluster: LocalCluster | None = None
    try:
        # From this (the main) thread: the kernel ties "die with the parent" to the thread
        # that started it, and a supervisor killed must not leave its Redis running.
        redis.start()
        node_args = ["--log-level", log_level, *(extra_args or [])]
        if not os.environ.get("COORDINATOR_EVENT_STORE"):
            # The history beside the run's private Redis, gone with it: two demo clusters
            # on one machine must not write one store (each would take the other's logs).
            node_args += ["--event-store", f"file://{redis.dir}/events"]
        cluster = LocalCluster(redis.url, host, secret, node_args, out)
        for i in range(n):
            if stop.is_set():
                break  # stopped before it was ready: below
            cluster.nodes.append(await cluster.spawn(f"node{i + 1}", base_port + i))
        deadline = loop.time() + READY_TIMEOUT
        waits = (_wait_ready(x, deadline) for x in cluster.nodes)
        ready: asyncio.Future[Any] = asyncio.gather(*waits)
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            stopped.cancel()
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
        for node in cluster.nodes:
            cluster.forward(node)
        secret_file = _keep_secret(redis.dir, secret)
        print(instructions(cluster.nodes, redis.url, secret, secret_file), file=out)
        out.flush()
        assert redis.proc is not None
        lost = asyncio.ensure_future(_redis_lost(redis.proc, stop, err))
        try:
            await supervise(cluster, stop, err)
        finally:
            lost.cancel()
        print("stopping the cluster...", file=err, flush=True)
        return 1 if lost.done() and not lost.cancelled() else 0
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        if cluster is not None:
            await _stop_nodes(cluster.nodes, STOP_TIMEOUT)
        await asyncio.to_thread(redis.cleanup)
