"""Agents for tests that need one to misbehave (loaded by nodes with ``--agent``)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from workers.channel import EMIT, PONG, frame
from workers.echo import EchoAgent
from workers.protocol import AgentContext, AgentState, EmitFn, Event

LEAK_STEP = 16 << 20
LEAK_CAP = 8 << 30  # address space, not memory: calloc'd pages are never touched
HOARD: list[bytearray] = []  # what ``hoard`` keeps: beyond its instance's reach


def _raise(name: str) -> None:
    """Raise the exception ``name`` stands for, as an agent's own code would."""
    if name == "SystemExit":
        sys.exit(0)
    if name == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if name == "GeneratorExit":
        raise GeneratorExit
    if name == "CancelledError":
        raise asyncio.CancelledError("not cancelled by anyone")
    raise BaseException("an agent's own BaseException")


class SlowCloseAgent(EchoAgent):
    """Echoes, but takes two minutes to close: a graceful drain waits for it."""

    async def aclose(self) -> None:
        await asyncio.sleep(120)
        await super().aclose()


class BadAgent(EchoAgent):
    """Echoes, but a message starting with a command makes it misbehave first:
    ``block S`` holds its event loop for S seconds (``time.sleep``), ``exit`` ends its
    process (``os._exit``), ``linger D S`` starts a thread that ends its process in D
    seconds and answers after S seconds, ``hog D S A`` starts a thread that, D seconds
    on, holds the interpreter's lock in C for S seconds (200 ms at a time), and answers
    after A seconds, ``spin W C`` waits W seconds then computes for C seconds of its
    thread's CPU time (its task holds the loop), ``fragment N`` allocates N MiB in 1 KiB
    blocks, frees them all but the last and answers its process's RSS then, ``leak``
    allocates until memory runs out (and keeps it), ``raise`` raises, ``slow S`` awaits
    S seconds, ``checkpoint N`` saves a checkpoint of N bytes and answers "saved" or
    the error, ``throw NAME`` raises NAME (SystemExit,
    KeyboardInterrupt, GeneratorExit, CancelledError; anything else: a BaseException),
    ``hoard`` allocates until memory runs out, keeps it where dropping the instance does
    not free it, then raises, ``emit KIND`` emits an event that must be refused (``key``:
    a tuple key, ``set``, ``bytes``: a value JSON does not have, ``surrogate``: text
    UTF-8 cannot hold, ``user``: ``"source": "user"``) and answers what ``emit`` raised,
    ``spawn`` starts a program and forks itself, both sleeping, and answers their pids,
    ``flood S`` forks a process out of its group's reach that writes PONG frames on the
    channel for S seconds (its pid to the setting ``pid_file``) and ends its own,
    ``forge S`` holds its loop S seconds while a thread forges PONGs, ``spam S`` while
    one floods EMITs for an instance it does not hold,
    ``containers N`` emits an event of N empty maps and answers the outcome,
    ``rawcontainers N`` writes such an EMIT on the channel past ``emit``'s checks,
    ``shortframe`` writes an EMIT frame without its ids, ``gather N DIR`` leaves a mark in
    DIR and, once DIR holds ``go``, waits for the marks of N conversations from live
    processes (its own among them),
    ``resumed`` answers the last action its instance was started after, ``answer S``
    answers "answered first", then takes S seconds more.
    With settings ``{"fail_start": true}`` its ``start`` raises (``{"start_raises":
    NAME}``: NAME, as ``throw``; ``{"start_exit": true}`` ends its process); with
    ``{"start_delay": S}`` it takes S seconds, and with ``{"start_log": PATH}`` writes how
    its start ended there (started, cancelled). With ``{"close_emits": true}`` its
    ``aclose`` emits a last message (and swallows the refusal)."""

    def __init__(self, context: AgentContext) -> None:
        super().__init__(context)
        self.hoard: list[Any] = []

    async def start(self, emit: EmitFn) -> None:
        if self.context.settings.get("fail_start"):
            raise RuntimeError("this agent cannot start")
        if self.context.settings.get("start_raises"):
            _raise(str(self.context.settings["start_raises"]))
        if self.context.settings.get("start_exit"):
            os._exit(3)
        outcome = "started"
        try:
            await asyncio.sleep(float(self.context.settings.get("start_delay", 0)))
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            if self.context.settings.get("start_log"):
                Path(self.context.settings["start_log"]).write_text(outcome)  # noqa: ASYNC240 (a few bytes)
        await super().start(emit)

    async def aclose(self) -> None:
        if self.context.settings.get("close_emits") and self._emit is not None:
            with contextlib.suppress(Exception):
                await self._emit({"action": "message", "args": {"content": "goodbye"}})
        await super().aclose()

    async def dispatch(self, action: Event) -> None:
        word, _, arg = str(action.get("args", {}).get("content", "")).partition(" ")
        if word == "block":
            time.sleep(float(arg))  # noqa: ASYNC251 (what it is for)
        elif word == "exit":
            os._exit(3)
        elif word == "fragment":
            assert self._emit is not None
            await self._emit({"action": "message", "args": {"content": str(_fragment(int(arg)))}})
            return
        elif word == "hog":
            after, hold, answers = map(float, arg.split())
            threading.Thread(target=_hog, args=(after, hold), daemon=True).start()
            await asyncio.sleep(answers)
        elif word == "spin":
            wait, compute = map(float, arg.split())
            await asyncio.sleep(wait)
            until = time.thread_time() + compute  # its own CPU time, however long that takes
            while time.thread_time() < until:
                sum(range(1000))
        elif word == "linger":
            ends, answers = map(float, arg.split())
            threading.Timer(ends, os._exit, (3,)).start()
            await asyncio.sleep(answers)
        elif word == "leak":
            while len(self.hoard) * LEAK_STEP < LEAK_CAP:
                self.hoard.append(bytearray(LEAK_STEP))
            raise RuntimeError("no memory limit: stopped leaking at 8 GiB of address space")
        elif word == "raise":
            raise ValueError("this agent fails on purpose")
        elif word == "throw":
            _raise(arg)
        elif word == "spawn":  # a program and a fork of itself (holding its channel open)
            assert self._emit is not None
            program = subprocess.Popen(["sleep", "300"])  # noqa: ASYNC220 (what it is for)
            forked = os.fork()
            if forked == 0:
                time.sleep(300)  # noqa: ASYNC251 (in the forked child)
                os._exit(0)
            await self._emit({"action": "message", "args": {"content": f"{program.pid} {forked}"}})
            return
        elif word == "hoard":
            held = 0
            for size in (LEAK_STEP, 1 << 20, 64 << 10, 4 << 10, 256):
                with contextlib.suppress(MemoryError):
                    while held < LEAK_CAP:
                        HOARD.append(bytearray(size))
                        held += size
            raise RuntimeError("holding every byte it could get")
        elif word == "emit":
            assert self._emit is not None
            bad: dict[str, Any] = {"action": "message", "args": {"content": "forged"}}
            if arg == "key":
                bad["args"] = {(1, 2): "a tuple key"}
            elif arg == "set":
                bad = {"observation": "x", "content": {1, 2}}
            elif arg == "bytes":
                bad["args"] = {"content": "forged", "image_urls": [b"\x89PNG"]}
            elif arg == "surrogate":
                bad["args"] = {"content": "forged \udc80"}
            else:
                bad["source"] = "user"
            try:
                await self._emit(bad)
                outcome = "emitted"
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            await self._emit({"action": "message", "args": {"content": outcome}})
            return
        elif word == "slow":
            await asyncio.sleep(float(arg))
        elif word == "flood":  # a process of its own floods the channel; the worker ends
            _flood_channel(float(arg), str(self.context.settings.get("pid_file", "")))
            os._exit(3)
        elif word == "forge":  # its loop held S s, a thread forges PONGs meanwhile
            _while_held(float(arg), frame([PONG, 0]), 0.05)
        elif word == "spam":  # its loop held S s, a thread floods EMITs of no instance
            _while_held(float(arg), frame([EMIT, 1, 999_999_999]) * 2000, 0.001)
        elif word == "containers":  # an event of N maps (1 byte each on the channel)
            assert self._emit is not None
            try:
                await self._emit(
                    {"action": "message", "args": {"content": "x", "x": [{}] * int(arg)}}
                )
                outcome = "emitted"
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            await self._emit({"action": "message", "args": {"content": outcome}})
            return
        elif word == "shortframe":  # an EMIT frame without its request and instance ids
            _write_frame([EMIT])
            await asyncio.sleep(30)
        elif word == "rawcontainers":  # the same, written on the channel past emit's check
            _write_frame([EMIT, 1, 1, {"x": [{}] * int(arg)}, "running"])
            await asyncio.sleep(30)
        elif word == "gather":
            count, _, where = arg.partition(" ")
            await _gather(Path(where), int(count), self.context.conversation_id)
        elif word in ("resumed", "answer"):
            assert self._emit is not None
            said = f"resumed after {self.context.resumed_after}"
            await self._emit(
                {"action": "message", "args": {"content": "answered first" if arg else said}}
            )
            await asyncio.sleep(float(arg or 0))
            return
        elif word == "checkpoint":  # saves one of that many bytes; answers what happened
            assert self._emit is not None
            try:
                await self.context.save_checkpoint(b"x" * int(arg), int(action["id"]))
                outcome = "saved"
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            await self._emit({"action": "message", "args": {"content": outcome}})
            return
        await super().dispatch(action)


async def _gather(where: Path, count: int, sid: str) -> None:
    """Mark ``where`` with ``sid`` and this process's id; once ``where`` holds ``go``,
    wait until ``count`` conversations have marks there from live processes (this one
    among them: so all ran at once), then say so and wait until all have said so
    (none leaves before the others saw it). Polled: the others may be other processes.
    Run again after it said so (its process ended before it answered), it only waits
    for the others to say so: the ones it saw may be done and gone."""
    (where / f"{sid}.{os.getpid()}").touch()
    seen = where / f"{sid}.seen"
    while not seen.exists() and not _all_gathered(where, count):  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    seen.touch()
    while _seen(where) < count:  # noqa: ASYNC110 (other processes' marks, not events)
        await asyncio.sleep(0.02)


def _hog(after: float, hold: float) -> None:
    """In ``after`` seconds, hold the interpreter's lock in C for ``hold`` seconds, 200 ms
    at a time (``usleep`` called through ``PyDLL`` keeps it)."""
    time.sleep(after)
    usleep = ctypes.PyDLL(None).usleep
    until = time.monotonic() + hold
    while time.monotonic() < until:
        usleep(200_000)
        time.sleep(0.005)


FRAGMENTS: list[bytearray] = []  # the last block of each ``fragment``: the heap's top


def _fragment(mib: int) -> int:
    """Allocate ``mib`` MiB in 1 KiB blocks, keep the last (so the C allocator cannot
    give the rest back by shrinking its heap), free the others; this process's RSS."""
    blocks = [bytearray(1024) for _ in range(mib * 1024)]
    FRAGMENTS.append(blocks.pop())
    del blocks
    return rss()


def rss() -> int:
    """This process's resident memory, bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _seen(where: Path) -> int:
    return sum(mark.name.endswith(".seen") for mark in where.iterdir())


def _all_gathered(where: Path, count: int) -> bool:
    """Whether ``where`` holds ``go`` and marks of ``count`` conversations from live
    processes."""
    names = set()
    for mark in where.iterdir():
        name, _, pid = mark.name.rpartition(".")
        if pid.isdigit() and _alive(int(pid)):
            names.add(name)
    return (where / "go").exists() and len(names) >= count


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not reaped yet, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _channel_fd() -> int:
    """The worker's end of its channel to the node (``workers.process --channel-fd``)."""
    return int(sys.argv[sys.argv.index("--channel-fd") + 1])


def _write_frame(message: list[Any]) -> None:
    fd = _channel_fd()
    os.set_blocking(fd, True)
    os.write(fd, frame(message))


def _flood_channel(seconds: float, pid_file: str) -> None:
    """Fork a process in a session of its own (out of its worker group's reach) that
    writes PONG frames on the inherited channel for ``seconds``; its pid to ``pid_file``."""
    fd = _channel_fd()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.set_blocking(fd, True)
        chunk = frame([PONG, 1]) * 8000
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                os.write(fd, chunk)
        finally:
            os._exit(0)
    if pid_file:
        Path(pid_file).write_text(str(pid))
    time.sleep(0.3)


def _while_held(seconds: float, data: bytes, every: float) -> None:
    """Hold the worker's loop ``seconds`` (reading nothing of its channel) while a thread
    writes ``data`` on the channel every ``every`` seconds."""
    fd = _channel_fd()
    os.set_blocking(fd, True)
    stop = time.monotonic() + seconds

    def write() -> None:
        while time.monotonic() < stop:
            with contextlib.suppress(OSError):
                os.write(fd, data)
            time.sleep(every)

    threading.Thread(target=write, daemon=True).start()
    time.sleep(seconds)


class WrongInitAgent(EchoAgent):
    """Cannot be made the way a node makes agents (with the AgentContext)."""

    def __init__(self) -> None:
        super().__init__(AgentContext("never", None))


class StateThenEmitAgent(EchoAgent):
    """Answers a message three times, changing its state between the answers (running,
    then awaiting input before its last two), each later answer naming the id ``emit``
    returned for the one before: an emit is given its own event's id even when a state
    change is logged after it."""

    async def dispatch(self, action: Event) -> None:
        assert self._emit is not None
        self._state = AgentState.RUNNING
        first = await self._emit({"action": "message", "args": {"content": "first"}})
        self._state = AgentState.AWAITING_USER_INPUT
        second = await self._emit({"action": "message", "args": {"content": f"after {first}"}})
        await self._emit({"action": "message", "args": {"content": f"after {second}"}})


class TellingAgent(EchoAgent):
    """Answers a message with the names of its process's COORDINATOR_ variables ('none'),
    and logs a line holding a Redis URL's password and a bearer token first."""

    async def dispatch(self, action: Event) -> None:
        logging.getLogger("telling").warning(
            "using redis://:S3cretPw@db:6379/0 and Authorization: Bearer t0k3nvalue"
        )
        names = sorted(k for k in os.environ if k.startswith("COORDINATOR_"))
        if self._emit is not None:
            reply = {"content": ",".join(names) or "none"}
            await self._emit({"action": "message", "source": "agent", "args": reply})
