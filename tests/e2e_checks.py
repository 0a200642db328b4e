"""Checks shared by the end-to-end tests that run real processes (JS client, nginx)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from tests.server_fixtures import SioClient


def brief(event: dict[str, Any]) -> dict[str, Any]:
    """The fields tests/js/client.mjs keeps of an event in its summary."""
    args = event.get("args")
    return {
        "id": event.get("id"),
        "source": event.get("source"),
        "action": event["action"] if event.get("action") is not None else event.get("observation"),
        "content": args.get("content") if isinstance(args, dict) else None,
    }


def agent_contents(client: SioClient) -> set[str]:
    return {
        e["args"]["content"]
        for e in client.events
        if e.get("source") == "agent" and e.get("action") == "message"
    }


async def wait_echoed(client: SioClient, contents: list[str], within: float = 20.0) -> None:
    """Wait until the agent has answered every message in ``contents``."""
    wanted = set(contents)
    await client.wait_for(lambda: wanted <= agent_contents(client), "echoed", within)


def assert_gap_free(ids: list[int], first: int | None = None, what: str = "events") -> None:
    """Ids go up by one (from ``first`` when given): no gap, no duplicate."""
    assert ids, f"{what}: no events"
    start = ids[0] if first is None else first
    assert ids == list(range(start, start + len(ids))), f"{what}: ids not gap-free: {ids}"


class LineReader:
    """A process's stdout (with its stderr, when sent there) as lines, read on demand."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._next = 0  # the first line after the last one ``expect`` matched

    async def expect(self, pattern: str, within: float = 30.0) -> str:
        """The next line matching ``pattern`` after the last one matched (reading more
        lines as needed)."""
        for i in range(self._next, len(self.lines)):
            if re.search(pattern, self.lines[i]):
                self._next = i + 1
                return self.lines[i]
        self._next = len(self.lines)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + within
        while True:
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    raw = await self.proc.stdout.readline()
            except TimeoutError:
                lines = "\n".join(self.lines)
                raise AssertionError(f"no line matching {pattern!r}:\n{lines}") from None
            if not raw:
                raise AssertionError(
                    f"the process exited before {pattern!r}:\n" + "\n".join(self.lines)
                )
            line = raw.decode().rstrip("\n")
            self.lines.append(line)
            if re.search(pattern, line):
                self._next = len(self.lines)
                return line

    async def write(self, text: str) -> None:
        """One line to the process's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    def index(self, pattern: str) -> int:
        return next(i for i, line in enumerate(self.lines) if re.search(pattern, line))
