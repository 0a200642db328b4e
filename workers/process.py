"""An agent worker process: what makes it one (the node's end of it is
``coordinator/agentworker.py``).

The node starts ``python -m workers.process`` with one end of a Unix socket pair (the
channel, ``workers/channel.py``) and the write end of a pipe for stall reports; the
process loads the agent, sets its own limits (CPUs, memory, the OOM killer's choice)
and serves the channel with an ``AgentHost`` (``workers/host.py``). The stall reporter
thread tells the node whose task holds a blocked event loop, so only that action is
blamed. The process exits when the node closes the channel (the node is gone), says STOP
or dies (the parent-death signal), and takes its process group with it: what its agents
started, which no node is left to end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time

from . import heap, logformat
from .channel import FATAL, STALLED, frame
from .host import AgentHost, LoopTask, task_factory
from .loader import load_agent
from .parent import die_with_parent
from .protocol import AgentFactory

log = logging.getLogger("workers.process")

OOM_SCORE_ADJ = 500  # of -1000..1000; the node keeps its own (0 by default)
NODE_DIED = signal.SIGHUP  # the parent-death signal ("hang-up": its controlling process)


class StallReporter:
    """Notices that the event loop has not turned for ``after`` seconds and writes, once
    per stall, which agent instance's task holds it (a STALLED frame) to ``fd``.

    A thread: it runs while the loop is blocked (in ``time.sleep``, I/O, or pure-Python
    code, which yields the GIL every few milliseconds; not in C code that holds it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, after: float) -> None:
        self._loop = loop
        self._fd = fd
        self._after = after
        self._tick = time.monotonic()
        self._reported = False

    def start(self) -> None:
        self._turn()
        threading.Thread(target=self._watch, name="stall-reporter", daemon=True).start()

    def _turn(self) -> None:
        self._tick = time.monotonic()
        self._reported = False
        self._loop.call_later(self._after / 4, self._turn)

    def _watch(self) -> None:
        while True:
            time.sleep(self._after / 4)
            if self._reported or time.monotonic() - self._tick < self._after:
                continue
            task = asyncio.current_task(self._loop)
            lid = task.lid if isinstance(task, LoopTask) else 0
            try:
                os.write(self._fd, frame([STALLED, lid]))
            except OSError:
                return  # the node is gone
            self._reported = True


async def _serve(host_args: argparse.Namespace, factory: AgentFactory, sock: socket.socket) -> bool:
    loop = asyncio.get_running_loop()
    loop.set_task_factory(task_factory)
    speculative = bool(getattr(factory, "speculative", False))
    host = AgentHost(factory, speculative, host_args.max_containers or None)
    await loop.create_unix_connection(lambda: host, sock=sock)
    StallReporter(loop, host_args.report_fd, host_args.stall_after).start()
    return await host.finished


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers.process")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--report-fd", type=int, required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--stall-after", type=float, default=2.5)
    parser.add_argument("--memory-limit", type=int, default=0)
    parser.add_argument(
        "--max-containers", type=int, default=0, help="maps and arrays in one event (0: any)"
    )
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--log-format", default="text", choices=logformat.FORMATS)
    parser.add_argument("--node", default="", help="the node's id (in JSON log lines)")
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to run on")
    parser.add_argument(
        "--trim-every", type=float, default=heap.TRIM_EVERY, help="seconds between heap trims"
    )
    return parser.parse_args(argv)


def _left_to_the_node(signum: int, frame: object) -> None:
    """A stop signal sent to the whole process group: the node stops this worker."""


def _end_group() -> None:
    """SIGKILL this process and every process its agents started (its process group,
    when it leads one, as the node starts it: never a group it merely joined). The last
    step of any end of a worker: with the node gone, nobody else would end them (a node
    kills the group of a worker it kills or reaps)."""
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)


def _node_died(node: int, worker: int, signum: int, frame: object) -> None:
    """The parent-death signal: the node died without a word (a SIGKILL, a crash). From
    anyone else while the node lives, or in a process an agent forked (which inherits
    this handler), the signal is ignored."""
    if os.getpid() == worker and os.getppid() != node:
        _end_group()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # A signal to the whole process group (Ctrl-C in a terminal, systemd's stop) is the
    # node's to act on: it drains, then stops its workers (STOP, then SIGKILL). Should
    # the node die, NODE_DIED ends its worker and what the worker's agents started,
    # which a SIGKILL of the worker alone would leave running (orphans of no node):
    # between two bytecodes, so not while an agent holds the GIL in C code for good.
    # Not SIG_IGN: the processes an agent starts would inherit it across exec (and then
    # ignore the SIGTERM their agent sends them); a handler is reset to the default.
    node = os.getppid()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _left_to_the_node)
    signal.signal(NODE_DIED, functools.partial(_node_died, node, os.getpid()))
    die_with_parent(NODE_DIED)
    if os.getppid() != node:  # the node died before that was set
        return 1
    logformat.configure(
        args.log_level,
        args.log_format,
        f"%(asctime)s %(levelname)s %(name)s [agent worker {os.getpid()}]: %(message)s",
        args.node,
        os.getpid(),
    )
    sock = socket.socket(fileno=args.channel_fd)
    if args.cpus:  # before any thread starts: they run there too
        try:
            os.sched_setaffinity(0, {int(cpu) for cpu in args.cpus.split(",")})
        except OSError as exc:  # the CPUs this process may use changed meanwhile
            log.warning(
                "cannot run on CPUs %s (%s); running where the kernel puts it", args.cpus, exc
            )
    # When memory runs out, the kernel's OOM killer takes a worker before its node: a
    # worker is replaced, a node's loops would all move (Linux; raising it needs no rights).
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as adj:
        adj.write(str(OOM_SCORE_ADJ))
    if args.memory_limit:
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
    try:
        factory = load_agent(args.agent)
    except Exception as exc:
        sock.sendall(frame([FATAL, str(exc)]))
        return 2
    except BaseException as exc:  # a KeyboardInterrupt: the module's own (SIGINT: above)
        failed = f"agent {args.agent!r} failed on import: {type(exc).__name__}: {exc}"
        sock.sendall(frame([FATAL, failed]))
        return 2
    heap.keep_trimming(args.trim_every)
    # Not asyncio.run: its clean-up would wait for agents' leftover tasks.
    asyncio.new_event_loop().run_until_complete(_serve(args, factory, sock))
    return 0


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stderr.flush()
    # Not a normal interpreter exit: agents' leftover tasks and threads must not keep a
    # worker whose node is gone alive, nor print on the way out; nor may the processes
    # they started (the status is then SIGKILL's: the node reads none).
    _end_group()
    os._exit(code)
