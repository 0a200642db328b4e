"""The floor under an agent worker's hop: one frame to another process and one back.

``python -m bench.ipc [--count N]``: two asyncio processes on a Unix socket pair, the
node's framing (``workers/channel.py``), the peer echoing each frame from
``data_received``; the round trip at several gaps between frames, with the two processes
placed as the OS chooses, pinned to one CPU, and pinned to two different CPUs (the last
two only where this process may run on two). With the gap long enough for the peer (and
its vCPU) to fall idle, waking it costs more, most of all when it sleeps on another
(virtual) CPU: that, not the framing, is most of what ``agent-isolation process`` adds
to an action's round trip. Prints a table; JSON in ``bench/results/ipc-full.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any

from bench.common import PY, REPO, Mode, by_gap, child_env, write_json
from workers.channel import FrameReader, frame

GAPS_MS = (0.0, 0.5, 2.0, 5.0, 20.0)
ACTION = {"action": "message", "args": {"content": "hello"}, "id": 1}


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.reader = FrameReader()

    def data_received(self, data: bytes) -> None:
        for message in self.reader.feed(data):
            self.transport.write(frame(message))


class _Client(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.reader = FrameReader()
        self.answer: asyncio.Future[Any] | None = None

    def data_received(self, data: bytes) -> None:
        for message in self.reader.feed(data):
            if self.answer is not None and not self.answer.done():
                self.answer.set_result(message)


async def _peer(fd: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_unix_connection(_Echo, sock=socket.socket(fileno=fd))
    await asyncio.Event().wait()


def placements() -> dict[str, tuple[set[int], set[int]] | None]:
    """Where to run (this process, the peer): None leaves it to the OS."""
    cpus = sorted(os.sched_getaffinity(0))
    chosen: dict[str, tuple[set[int], set[int]] | None] = {"as the OS places them": None}
    if len(cpus) >= 2:
        chosen["one CPU"] = ({cpus[0]}, {cpus[0]})
        chosen["two CPUs"] = ({cpus[0]}, {cpus[1]})
    return chosen


async def measure(count: int, pinned: tuple[set[int], set[int]] | None) -> dict[str, list[float]]:
    ours, theirs = socket.socketpair()
    peer = subprocess.Popen(  # noqa: ASYNC220 (returns once the child is forked)
        [PY, "-m", "bench.ipc", "--peer", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
        cwd=REPO,
        env=child_env(),
    )
    theirs.close()
    allowed = os.sched_getaffinity(0)
    try:
        if pinned is not None:
            os.sched_setaffinity(0, pinned[0])
            os.sched_setaffinity(peer.pid, pinned[1])
        loop = asyncio.get_running_loop()
        _, client = await loop.create_unix_connection(_Client, sock=ours)
        out: dict[str, list[float]] = {}
        for gap in GAPS_MS:
            samples = []
            for i in range(count + 20):
                client.answer = loop.create_future()
                t = time.perf_counter()
                client.transport.write(frame([2, i, 1, ACTION]))
                await client.answer
                if i >= 20:
                    samples.append((time.perf_counter() - t) * 1e6)
                await asyncio.sleep(gap / 1000)
            out[str(gap)] = samples
        return out
    finally:
        os.sched_setaffinity(0, allowed)
        peer.kill()
        peer.wait()


async def run_table(count: int) -> tuple[str, dict[str, Any]]:
    results = {name: await measure(count, pinned) for name, pinned in placements().items()}
    return by_gap(
        f"One frame to another process and back (asyncio, Unix socket pair), {count} per gap",
        "processes on",
        "gap between frames",
        results,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ipc", description=__doc__)
    parser.add_argument("--count", type=int, default=500, help="round trips per gap")
    parser.add_argument("--peer", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer is not None:
        asyncio.run(_peer(args.peer))
        return 0
    text, summary = asyncio.run(run_table(args.count))
    print(text)
    path = write_json("ipc", Mode("full"), {"count": args.count, "round_trip": summary})
    print(f"(JSON in {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
