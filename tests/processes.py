"""Coordinator nodes as real OS processes (`python -m coordinator serve`).

For end-to-end, load-balancer and chaos tests. Each node logs to its own file; readiness
is `GET /healthz` answering 200 within a deadline (no fixed sleeps); stopping is SIGTERM,
then SIGKILL after a timeout. ``pid``, ``pause()``, ``resume()`` and ``kill()`` are there for
fault injection.

Use the ``process_cluster`` fixture (registered in conftest.py), or build a
``ProcessCluster`` directly when a test needs its own Redis (e.g. one it restarts)::

    cluster = ProcessCluster(redis.url, log_dir=tmp_path)
    a, b = cluster.start(2)
    token = cluster.token("alice")
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pytest

from coordinator.cliflags import NO_LIMIT_FLAGS
from coordinator.embedded import free_port

REPO = Path(__file__).resolve().parent.parent
COORDINATOR = [sys.executable, "-m", "coordinator"]
DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 20.0
_POLL = 0.05


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a coordinator child: ours without COORDINATOR_* settings.

    A developer's exported COORDINATOR_* variables must not change what a test starts;
    everything a test wants is given as flags or in ``extra``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def make_token(user: str, secret: str, timeout: float = 30.0) -> str:
    """A token for ``user`` signed with ``secret``, from `coordinator token` (the CLI)."""
    done = subprocess.run(
        [*COORDINATOR, "token", user, "--secret", secret],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=child_env(),
    )
    if done.returncode != 0:
        raise AssertionError(
            f"`coordinator token {user}` failed with code {done.returncode}:\n{done.stderr}"
        )
    token = done.stdout.strip()
    if not token or len(token.split()) != 1:
        raise AssertionError(f"`coordinator token` printed {done.stdout!r}, not one token")
    return token


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class NodeProcess:
    """One `coordinator serve` child process on 127.0.0.1:``port``."""

    def __init__(
        self,
        node_id: str,
        port: int,
        redis_url: str,
        secret: str,
        log_dir: Path,
        *,
        agent: str | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.node_id = node_id
        self.port = port
        self.redis_url = redis_url
        self.secret = secret
        self.agent = agent
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.log_path = Path(log_dir) / f"{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited({self.returncode})"
        return f"<NodeProcess {self.node_id} :{self.port} pid={self.pid} {state}>"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"node {self.node_id} was not started")
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def command(self) -> list[str]:
        # No client limits: the tests flood nodes on purpose (tests/test_limits.py and
        # bench/attacks.py hold nodes to them).
        cmd = [
            *COORDINATOR, "serve",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--redis-url", self.redis_url,
            "--node-id", self.node_id,
            "--secret", self.secret,
            *NO_LIMIT_FLAGS,
        ]  # fmt: skip
        if self.agent is not None:
            cmd += ["--agent", self.agent]
        return cmd + self.extra_args

    def start(self) -> NodeProcess:
        """Spawn the process (and return at once); a restart appends to the same log."""
        if self.alive:
            raise RuntimeError(f"node {self.node_id} is already running")
        self._close_log()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child's life)
        self._log.write(f"=== start: {' '.join(self.command())}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=child_env(self.env),
        )
        return self

    def health(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The /healthz JSON if it answers 200, else None."""
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=timeout) as resp:
                if resp.status != 200:
                    return None
                body: dict[str, Any] = json.loads(resp.read())
                return body
        except (OSError, ValueError):  # refused, reset, timeout, HTTP error, bad JSON
            return None

    def _check_ready(self, deadline: float, timeout: float) -> bool:
        if self.proc is None:
            raise RuntimeError(f"node {self.node_id} was not started")
        if self.proc.poll() is not None:
            raise AssertionError(
                f"node {self.node_id} exited with code {self.proc.returncode} before it was "
                f"ready; log {self.log_path}:\n{self.log_tail()}"
            )
        if self.health() is not None:
            return True
        if time.monotonic() > deadline:
            raise AssertionError(
                f"node {self.node_id} did not answer GET /healthz with 200 within {timeout}s; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )
        return False

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> NodeProcess:
        deadline = time.monotonic() + timeout
        while not self._check_ready(deadline, timeout):
            time.sleep(_POLL)
        return self

    async def async_wait_ready(self, within: float = DEFAULT_READY_TIMEOUT) -> NodeProcess:
        """As ``wait_ready``, without blocking the event loop (clients keep running)."""
        deadline = time.monotonic() + within
        # Polling is the only readiness signal another process offers.
        while not await asyncio.to_thread(self._check_ready, deadline, within):  # noqa: ASYNC110
            await asyncio.sleep(_POLL)
        return self

    def send_signal(self, sig: signal.Signals) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: the process stays, silent (missed heartbeats, stale leases)."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.send_signal(signal.SIGCONT)

    def kill(self) -> int | None:
        """SIGKILL and reap; returns the exit code."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        self._close_log()
        return self.returncode

    def terminate(self) -> None:
        """SIGTERM without waiting (graceful drain); see ``wait_exit``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused node could not act on SIGTERM
            self.proc.terminate()

    def wait_exit(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int | None:
        """Wait for exit; SIGKILL if it has not exited after ``timeout``. Returns the code."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._note(f"did not exit {timeout:.1f}s after SIGTERM; SIGKILL")
            self.proc.kill()
            self.proc.wait()
        self._close_log()
        return self.returncode

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``. Returns the exit code."""
        self.terminate()
        return self.wait_exit(timeout)

    async def async_stop(self, within: float = DEFAULT_STOP_TIMEOUT) -> int | None:
        return await asyncio.to_thread(self.stop, within)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def _note(self, message: str) -> None:
        if self._log is not None and not self._log.closed:
            self._log.write(f"=== {message}\n".encode())
            self._log.flush()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class ProcessCluster:
    """Nodes ``node1``, ``node2``, ... as processes against one Redis, with one secret."""

    def __init__(
        self,
        redis_url: str,
        log_dir: Path,
        *,
        secret: str | None = None,
        agent: str | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.log_dir = Path(log_dir)
        self.secret = secret or f"test-{secrets.token_hex(16)}"
        self.agent = agent
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.nodes: list[NodeProcess] = []

    def __iter__(self) -> Iterator[NodeProcess]:
        return iter(self.nodes)

    def __getitem__(self, index: int) -> NodeProcess:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    def add(
        self,
        node_id: str | None = None,
        port: int | None = None,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> NodeProcess:
        """A new node (not started) with the cluster's settings plus ``extra_args``/``env``."""
        node = NodeProcess(
            node_id or f"node{len(self.nodes) + 1}",
            port or free_port(),
            self.redis_url,
            self.secret,
            self.log_dir,
            agent=self.agent,
            extra_args=[*self.extra_args, *extra_args],
            env={**self.env, **(env or {})},
        )
        self.nodes.append(node)
        return node

    def start(self, n: int, timeout: float = DEFAULT_READY_TIMEOUT) -> list[NodeProcess]:
        """Add and start ``n`` nodes together; return once all are ready."""
        started = [self.add().start() for _ in range(n)]
        deadline = time.monotonic() + timeout
        for node in started:
            node.wait_ready(max(0.1, deadline - time.monotonic()))
        return started

    async def async_start(self, n: int, within: float = DEFAULT_READY_TIMEOUT) -> list[NodeProcess]:
        started = [self.add().start() for _ in range(n)]
        await asyncio.gather(*(node.async_wait_ready(within) for node in started))
        return started

    def token(self, user: str) -> str:
        return make_token(user, self.secret)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> dict[str, int | None]:
        """Stop all nodes in parallel (SIGTERM, then SIGKILL after ``timeout``)."""
        for node in self.nodes:
            node.terminate()
        deadline = time.monotonic() + timeout
        return {
            node.node_id: node.wait_exit(max(0.1, deadline - time.monotonic()))
            for node in self.nodes
        }

    async def async_stop(self, within: float = DEFAULT_STOP_TIMEOUT) -> dict[str, int | None]:
        return await asyncio.to_thread(self.stop, within)

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"----- {node.node_id} ({node.log_path}) -----\n{node.log_tail(lines)}"
            for node in self.nodes
        )

    def __enter__(self) -> ProcessCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            if exc is not None:
                print(self.log_tails())


@pytest.fixture
def process_cluster(redis_url: str, tmp_path: Path) -> Iterator[ProcessCluster]:
    """A ``ProcessCluster`` on the suite's (flushed) Redis; nodes stop at teardown.

    The nodes' log tails are printed at teardown; pytest shows them only when the test
    failed.
    """
    cluster = ProcessCluster(redis_url, tmp_path / "nodes")
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            if cluster.nodes:
                print(cluster.log_tails())
