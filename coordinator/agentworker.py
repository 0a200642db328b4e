"""One agent worker process as its node sees it: the process, its channel, its health.

The node end of ``workers/channel.py``: frames are read in ``data_received`` and handed
to the agent instance they name (``RemoteAgent.received``) or, for PONG and STALLED,
noted here; the node never waits on a worker anywhere but in a task of the instance
that asked. The pool (``agentpool.py``) decides when a worker has failed and replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from workers.channel import (
    DONE,
    EMIT,
    FAILED,
    FATAL,
    HELLO,
    MAX_FRAME,
    PING,
    PONG,
    READ,
    REFUSE,
    SAVE,
    STALLED,
    STOP,
    ChannelError,
    FrameReader,
    frame,
)

from .errors import AgentFailed, ConfigError

if TYPE_CHECKING:
    from .remoteagent import RemoteAgent

log = logging.getLogger(__name__)


# Bytes the node may hold for a worker that reads nothing of its channel: a frame of the
# largest size, and then some.
UNREAD_LIMIT = 2 * MAX_FRAME


def _queued(fd: int) -> int:
    """Bytes waiting to be read on socket ``fd``."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])


class AgentWorker(asyncio.Protocol):
    """A worker process in slot ``slot`` of the pool. ``loops``: the agent instances it
    holds (lid -> the node's proxy); ``failed``: why it is no longer used ('' while it
    is); ``on_lost`` is told once when its channel closes. A frame it sends holding more
    than ``max_containers`` maps and arrays is a bad frame (it is killed)."""

    def __init__(
        self, slot: int, on_lost: Callable[[AgentWorker], None], max_containers: int
    ) -> None:
        self.slot = slot
        self.pid = 0
        self.loops: dict[int, RemoteAgent] = {}
        self.hosted = 0  # agent instances it has held, the ones gone included
        self.failed = ""
        self.speculative = False
        self.ready = False
        self.ping_sent: float | None = None  # loop time of the PING not answered yet
        self.last_pong = 0.0
        self.up_since = 0.0  # loop time of its HELLO
        self.blocked_lid = 0  # the instance whose task holds its loop, as reported
        self._on_lost = on_lost
        self._hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._proc: asyncio.subprocess.Process | None = None
        self._exit: asyncio.Future[int] | None = None  # the process's end, once reaped
        self._transport: asyncio.Transport | None = None
        self._reports: asyncio.BaseTransport | None = None
        self._reader = FrameReader(max_containers)
        self._next_rid = 0
        self._seq = 0
        self._unread = False  # killed for reading nothing of its channel

    def __repr__(self) -> str:
        return f"<AgentWorker {self.slot} pid={self.pid} {self.failed or 'ok'}>"

    @property
    def usable(self) -> bool:
        return self.ready and not self.failed

    # -- life ------------------------------------------------------------------------
    async def spawn(self, args: Sequence[str], env: dict[str, str], within: float) -> None:
        """Start the process and wait for its HELLO; ConfigError if the agent does not
        load, AgentFailed if the process does not come up within ``within`` s."""
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair()
        report_r, report_w = os.pipe()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                # -P: not the working directory first, which could hold other packages of
                # these names (another revision's): the node's own path (PYTHONPATH).
                "-P",
                "-m",
                "workers.process",
                "--channel-fd",
                str(child.fileno()),
                "--report-fd",
                str(report_w),
                *args,
                stdin=subprocess.DEVNULL,
                pass_fds=(child.fileno(), report_w),
                env=env,
                # A group of its own: what its agents start is killed with it (killpg).
                # It still dies with its node (workers/parent.py), ending its group too,
                # and a signal to the node's group is the node's to act on either way
                # (workers/process.py).
                start_new_session=True,
            )
        except BaseException:
            parent.close()
            os.close(report_r)
            raise
        finally:
            child.close()
            os.close(report_w)
        self.pid = self._proc.pid
        await loop.create_unix_connection(lambda: self, sock=parent)
        self._reports, _ = await loop.connect_read_pipe(
            lambda: _Reports(self), os.fdopen(report_r, "rb", buffering=0)
        )
        self._exit = asyncio.ensure_future(self._proc.wait())
        self._exit.add_done_callback(self._exited)
        try:
            async with asyncio.timeout(within):
                await asyncio.shield(self._hello)
        except TimeoutError:
            self.kill()
            raise AgentFailed(f"agent worker {self.pid} did not start within {within}s") from None
        self.ready = True
        self.last_pong = self.up_since = loop.time()

    def kill(self) -> None:
        """SIGKILL to the process and every process its agents started (its end then
        reports it lost)."""
        if self._proc is not None and self._proc.returncode is None:
            # Not Process.kill: it polls first, reaping an exited child under asyncio's
            # child watcher, which then warns of an unknown child (a zombie ignores it).
            # Its group: its id is the process's, not reaped yet, so it is still ours.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    def _end_group(self) -> None:
        """SIGKILL what the process's agents started and left behind. Called just as it
        is reaped: while a member of its group lives, the group's id is not reused."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def _exited(self, ended: asyncio.Future[int]) -> None:
        """The process ended (whatever ended it): what its agents started ends too, and
        the channel is closed, which reports it lost. Not left to the channel's EOF: a
        process an agent forked holds the channel open, and the node would only notice
        at the stall timeout, blaming the action in flight for a stall."""
        if ended.cancelled():
            return
        self._end_group()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):  # what it wrote before it ended, in order
            # What is queued now, no more: a process its agent started and left holding
            # the channel (in a session of its own, out of the group's reach) could
            # write on for good, and this loop would never end (the node froze).
            queued = _queued(sock.fileno())
            while queued > 0 and (data := os.read(sock.fileno(), min(queued, 1 << 16))):
                queued -= len(data)
                self.data_received(data)
        transport.close()

    async def stop(self, within: float) -> None:
        """Ask the process to close its agents and exit; kill it after ``within`` s."""
        if self._proc is None:
            return
        self.send([STOP])
        try:
            async with asyncio.timeout(within):
                await self._proc.wait()
        except TimeoutError:
            self.kill()
            await self._proc.wait()
        self._end_group()
        self.close_channel()

    def close_channel(self) -> None:
        if self._exit is not None:
            self._exit.cancel()  # its group was killed with it (kill) or after it (stop)
        for transport in (self._transport, self._reports):
            if transport is not None:
                transport.close()

    # -- the channel -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._hello.done():
            self._hello.set_exception(AgentFailed(f"agent worker {self.pid} exited at start"))
            self._hello.exception()  # retrieved: spawn raises it, or nobody waits
        if self._reports is not None:
            self._reports.close()
        self._on_lost(self)

    def send(self, message: list[Any]) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(frame(message))
            if transport.get_write_buffer_size() > UNREAD_LIMIT and not self._unread:
                self._unread = True  # said and killed once (its end follows)
                # A worker that reads nothing of its channel (its loop held while its
                # threads flood requests) would grow the node's buffer without bound.
                log.error(
                    "agent worker %s reads nothing of its channel (%d bytes wait); killing it",
                    self.pid,
                    transport.get_write_buffer_size(),
                )
                self.kill()

    def request(self, kind: int, lid: int, args: Sequence[Any]) -> int:
        """Send a request for instance ``lid``; its request id."""
        self._next_rid += 1
        self.send([kind, self._next_rid, lid, *args])
        return self._next_rid

    def ping(self, now: float) -> None:
        self._seq += 1
        self.ping_sent = now
        self.send([PING, self._seq])

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except ChannelError as exc:
            self._bad_frame(str(exc))
            return
        for m in messages:
            kind = m[0]
            if kind in (EMIT, DONE, FAILED, READ, SAVE):
                if len(m) < 3 or type(m[1]) is not int or type(m[2]) is not int:
                    self._bad_frame(f"a request without its ids: {m[:3]!r}")
                    return
                agent = self.loops.get(m[2])
                if agent is not None:
                    agent.received(self, m)
                elif kind != DONE and kind != FAILED:  # an instance closed or moved: stop
                    self.send([REFUSE, m[1], "Fenced", ["", 0, -1]])
            elif kind == PONG:
                if self.ping_sent is None or len(m) < 2 or m[1] != self._seq:
                    continue  # not the answer to the PING out (a forged or stale one)
                self.ping_sent = None
                self.last_pong = asyncio.get_running_loop().time()
                self.blocked_lid = 0
            elif kind == HELLO:
                self.speculative = bool(m[2])
                if not self._hello.done():
                    self._hello.set_result(None)
            elif kind == FATAL:
                if not self._hello.done():
                    self._hello.set_exception(ConfigError(str(m[1])))
            else:
                log.warning("agent worker %s sent an unknown frame kind %r", self.pid, kind)

    def _bad_frame(self, why: str) -> None:
        log.error("agent worker %s sent a bad frame (%s); killing it", self.pid, why)
        self.kill()


class Ward:
    """Suspect dispatches that go again together, in one probation worker process
    (``AgentPool.probation`` starts it for the first to enter and stops it once the last
    has left)."""

    __slots__ = ("lock", "unstartable", "users", "worker")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.worker: AgentWorker | None = None  # the one the next to enter joins
        self.users: dict[AgentWorker, int] = {}  # dispatches in each of its workers
        self.unstartable: AgentFailed | None = None  # no worker started for it in time


class WorkerLost(Exception):
    """The worker holding an agent instance failed (``reason``). ``ward``: a dispatch or
    start of this instance was running there and may be why (a suspect): it goes again
    in that ward (None: it only shared the worker). ``blamed``: the failure counts
    against its action (``max_dispatch_attempts``)."""

    def __init__(
        self, reason: str, worker: AgentWorker, ward: Ward | None = None, blamed: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.worker = worker
        self.ward = ward
        self.blamed = blamed

    @property
    def suspect(self) -> bool:
        return self.ward is not None


class _Reports(asyncio.Protocol):
    """The one-way pipe of a worker's stall reporter thread."""

    def __init__(self, worker: AgentWorker) -> None:
        self._worker = worker
        self._reader = FrameReader(max_containers=4)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except ChannelError:
            return
        for m in messages:
            if m[0] == STALLED and len(m) > 1 and type(m[1]) is int:
                self._worker.blocked_lid = m[1]
