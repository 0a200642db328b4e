"""The benchmarks' side of the load generator: a child process spoken to in JSON lines."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from bench.common import PY, REPO, child_env


class LoadGenProcess:
    """``python -m bench.loadgen`` as a child; ``await request({...})`` per command."""

    def __init__(self, name: str = "loadgen") -> None:
        self.name = name
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> LoadGenProcess:
        self.proc = await asyncio.create_subprocess_exec(
            PY,
            "-m",
            "bench.loadgen",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
            env=child_env(),
            limit=1 << 30,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def request(self, payload: dict[str, Any], within: float = 600.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        async with self._lock:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode())
            await self.proc.stdin.drain()
            async with asyncio.timeout(within):
                line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited (code {self.proc.returncode})")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.name}: {payload['cmd']} failed: {reply.get('error')}")
        return reply

    async def aclose(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                await self.proc.stdin.drain()
                async with asyncio.timeout(30):
                    await self.proc.wait()
            except (TimeoutError, ConnectionError, BrokenPipeError):
                self.proc.kill()
                await self.proc.wait()


async def join_group(
    gen: LoadGenProcess,
    group: str,
    url: str,
    secret: str,
    prefix: str,
    count: int = 20,
    setup_url: str | None = None,
    issue: Callable[[list[str]], list[str]] | None = None,
) -> None:
    """Connect ``count`` clients to ``url``, one conversation and user each (ids start
    with ``prefix``), and warm the path up with a second of actions at 50/s. With
    ``setup_url`` each conversation is started there first (its loop runs there).
    ``issue`` makes the users' tokens (default: this checkout's ``issue_token``)."""
    from coordinator.auth import issue_token

    users = [f"{prefix}-u{i}" for i in range(count)]
    tokens = issue(users) if issue else [issue_token(u, secret) for u in users]
    conns = [
        {
            "query": {"conversation_id": f"{prefix}-{i}"},
            "auth": {"token": tokens[i]},
            "url": url,
            **({"setup_url": setup_url} if setup_url else {}),
        }
        for i in range(count)
    ]
    r = await gen.request({"cmd": "connect", "group": group, "conns": conns})
    if r["failed"]:
        raise RuntimeError(f"{group}: {r['failed']} joins failed: {r['errors']}")
    await gen.request({"cmd": "run", "group": group, "rate": 50, "duration": 1})
