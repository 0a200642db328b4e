"""Agent loop instances served over a channel, in a worker process
(``workers/process.py`` starts it; the node's end is ``coordinator/remoteagent.py``).

The node keeps ownership, fencing, ordering and delivery; an ``AgentHost`` only holds
agent instances, calls ``start``/``dispatch``/``aclose`` when told to, and turns each
``emit`` into an EMIT frame whose answer (the event id, or ``Fenced`` /
``SpeculationLost``) the agent gets as if the node were in its process.

A bad agent costs this process, never the node: a call that blocks stops this event
loop, and the node's watchdog, which no longer gets PONGs, kills the process and moves
its instances elsewhere; every task remembers the instance it works for (``LoopTask``),
so the stall reporter can say whose task held the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import os
from collections.abc import Coroutine, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from .channel import (
    CANCEL,
    CANCELLED,
    CLOSE,
    DISPATCH,
    DONE,
    EMIT,
    ERROR,
    FAILED,
    HELLO,
    INVALID,
    OPEN,
    PING,
    PONG,
    READ,
    REFUSE,
    REPLY,
    SAVE,
    STOP,
    ChannelError,
    FrameReader,
    MemoryFrame,
    describe,
    event_problem,
    frame,
    refusal,
    too_many_containers,
)
from .protocol import (
    AgentContext,
    AgentFactory,
    AgentLoop,
    Checkpoint,
    EmitFn,
    Event,
    cancelled_here,
    loop_must_stop,
)

log = logging.getLogger("workers.host")

CLOSE_WITHIN = 5.0  # seconds a cancelled dispatch gets before its agent is closed anyway
NO_MEMORY_EXIT = 12  # ENOMEM: the exit status when not even the out-of-memory frame goes

# What an agent asks its node for, as an error names it.
_ASKED = {EMIT: "an agent event", READ: "a history request", SAVE: "a checkpoint"}

# The agent instance a task works for; tasks an agent starts inherit it (contexts are
# copied into new tasks), so the stall reporter can name the instance behind any task.
CURRENT_LID: contextvars.ContextVar[int] = contextvars.ContextVar("lid", default=0)


T = TypeVar("T")


class LoopTask(asyncio.Task[T]):
    """A task that remembers the agent instance it was started for (``lid``; 0: none)."""

    lid = 0


def task_factory(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, T] | Generator[Any, None, T],
    context: contextvars.Context | None = None,
) -> LoopTask[T]:
    task = LoopTask(coro, loop=loop, context=context)
    task.lid = CURRENT_LID.get() if context is None else context.get(CURRENT_LID, 0)
    return task


def _state(agent: AgentLoop | None) -> str:
    try:
        return "" if agent is None else str(agent.state)
    except Exception:
        return ""


@dataclass(eq=False)
class Hosted:
    """One agent instance and its dispatch in progress."""

    lid: int
    sid: str
    agent: AgentLoop | None = None
    task: asyncio.Task[Any] | None = None
    closed: bool = False


class AgentHost(asyncio.Protocol):
    """The worker's end of the channel: one per process."""

    def __init__(
        self, factory: AgentFactory, speculative: bool, max_containers: int | None = None
    ) -> None:
        self._factory = factory
        self._speculative = speculative
        self._max_containers = max_containers  # in one event, as the node reads frames
        self._agents: dict[int, Hosted] = {}
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._next_rid = 0
        self._reader = FrameReader()
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._memory_frame = MemoryFrame()
        self.finished: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    # -- the channel -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._send([HELLO, os.getpid(), self._speculative])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_result(False)  # the node is gone: nothing to close for

    def _send(self, message: list[Any]) -> None:
        self._write(frame(message))

    def _write(self, data: bytes | bytearray) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except ChannelError as exc:
            log.error("bad frame from the node (%s); exiting", exc)
            assert self._transport is not None
            self._transport.abort()
            return
        for m in messages:
            kind = m[0]
            if kind == PING:
                self._send([PONG, m[1]])
            elif kind in (REPLY, REFUSE):
                fut = self._replies.pop(m[1], None)
                if fut is not None and not fut.done():
                    if kind == REPLY:
                        fut.set_result(m[2])
                    else:
                        fut.set_exception(refusal(m[2], m[3]))
            elif kind == DISPATCH:
                self._spawn(self._dispatch(m[1], m[2], m[3]), m[2])
            elif kind == OPEN:
                self._spawn(self._open(m[1], m[2], m[3:]), m[2])
            elif kind == CLOSE:
                self._spawn(self._close(m[1], m[2]), m[2])
            elif kind == CANCEL:
                hosted = self._agents.get(m[1])
                if hosted is not None and hosted.task is not None:
                    hosted.task.cancel()
            elif kind == STOP:
                self._spawn(self._stop(), 0)
            else:
                log.warning("unknown frame kind %r from the node", kind)

    def _spawn(self, coro: Coroutine[Any, Any, None], lid: int) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        if isinstance(task, LoopTask):
            task.lid = lid
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests from the node ------------------------------------------------------
    async def _open(self, rid: int, lid: int, args: list[Any]) -> None:
        CURRENT_LID.set(lid)
        sid, user, settings, after, saved = args
        hosted = Hosted(lid, sid)
        self._agents[lid] = hosted
        checkpoint = Checkpoint(*saved) if saved else None
        context = AgentContext(
            sid, user or None, settings or {}, after, checkpoint, ChannelMemory(self, hosted)
        )
        hosted.task = asyncio.current_task()  # a CLOSE meanwhile cancels the start
        answer: list[Any] | None = None
        try:
            answer = await self._started(rid, hosted, context)
        except MemoryError:
            pass  # answered below, once the traceback and what it holds are released
        finally:
            hosted.task = None
        self._answer(rid, hosted, answer)

    async def _started(self, rid: int, hosted: Hosted, context: AgentContext) -> list[Any]:
        """Make and start the instance; the answer to its OPEN (MemoryError: none)."""
        try:
            hosted.agent = self._factory(context)
            await hosted.agent.start(self._emitter(hosted))
        except MemoryError:
            raise
        except BaseException as exc:  # SystemExit, KeyboardInterrupt too: the agent's own
            self._agents.pop(hosted.lid, None)
            if cancelled_here(exc):
                return [FAILED, rid, hosted.lid, CANCELLED, "", ""]
            log.exception("agent of %s failed to start", hosted.sid)
            return [FAILED, rid, hosted.lid, *describe(exc), _state(hosted.agent)]
        return [DONE, rid, hosted.lid, _state(hosted.agent)]

    async def _dispatch(self, rid: int, lid: int, action: Event) -> None:
        CURRENT_LID.set(lid)
        hosted = self._agents.get(lid)
        if hosted is None or hosted.agent is None or hosted.closed:
            self._send([FAILED, rid, lid, ERROR, f"no agent instance {lid}", ""])
            return
        hosted.task = asyncio.current_task()
        answer: list[Any] | None = None
        try:
            answer = await self._dispatched(rid, hosted, hosted.agent, action)
        except MemoryError:
            pass  # answered below, once the traceback and what it holds are released
        finally:
            hosted.task = None
        self._answer(rid, hosted, answer)

    async def _dispatched(
        self, rid: int, hosted: Hosted, agent: AgentLoop, action: Event
    ) -> list[Any]:
        """Dispatch ``action``; the answer to its DISPATCH (MemoryError: none)."""
        try:
            await agent.dispatch(action)
        except MemoryError:
            raise
        except BaseException as exc:  # SystemExit, KeyboardInterrupt too: the agent's own
            if cancelled_here(exc):
                return [FAILED, rid, hosted.lid, CANCELLED, "", _state(agent)]
            if not loop_must_stop(exc):  # the node knows why
                log.exception("agent of %s failed on action %s", hosted.sid, action.get("id"))
            return [FAILED, rid, hosted.lid, *describe(exc), _state(agent)]
        return [DONE, rid, hosted.lid, _state(agent)]

    def _answer(self, rid: int, hosted: Hosted, answer: list[Any] | None) -> None:
        """Send the answer to a start or dispatch; ``None`` (or no memory left to pack
        it): the agent ran out of memory."""
        if answer is not None:
            try:
                self._send(answer)
                return
            except MemoryError:
                pass
        self._out_of_memory(rid, hosted)

    def _out_of_memory(self, rid: int, hosted: Hosted) -> None:
        # Drop the instance first: what it holds may be what filled the memory. The
        # node replaces this process anyway (its heap may be too fragmented to trust).
        self._agents.pop(hosted.lid, None)
        hosted.agent = None
        gc.collect()
        # The frame was built at start-up: the agent may still hold the memory (in a
        # global, a task of its own), and then packing a new one fails again.
        try:
            self._write(self._memory_frame.fill(rid, hosted.lid))
        except BaseException:
            # The node must hear of it: its watchdog would still get PONGs, so this
            # process ends, and the node counts the dispatch against the action.
            os._exit(NO_MEMORY_EXIT)
        with contextlib.suppress(MemoryError):
            log.error("agent of %s ran out of memory", hosted.sid)

    async def _close(self, rid: int, lid: int) -> None:
        hosted = self._agents.pop(lid, None)
        if hosted is None or hosted.agent is None:
            self._send([DONE, rid, lid, ""])
            return
        hosted.closed = True
        task = hosted.task
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=CLOSE_WITHIN)
        try:
            await hosted.agent.aclose()
        except BaseException as exc:  # SystemExit, KeyboardInterrupt too: the agent's own
            if cancelled_here(exc):
                raise
            log.exception("agent of %s failed to close", hosted.sid)
            self._send([FAILED, rid, lid, *describe(exc), ""])
        else:
            self._send([DONE, rid, lid, _state(hosted.agent)])

    async def _stop(self) -> None:
        """Close every agent (each bounded), then end the process."""
        closing = [self._close(0, lid) for lid in list(self._agents)]
        if closing:
            await asyncio.wait(
                [asyncio.ensure_future(c) for c in closing], timeout=CLOSE_WITHIN * 2
            )
        if not self.finished.done():
            self.finished.set_result(True)

    # -- what agents call ------------------------------------------------------------
    def _emitter(self, hosted: Hosted) -> EmitFn:
        async def emit(event: Event) -> int:
            if not isinstance(event, dict):
                raise TypeError(f"an event must be a dict, got {type(event).__name__}")
            if (problem := event_problem(event)) is not None:  # the node or a client cannot
                why = f"an agent event is not acceptable: {problem}; nothing was written"
                raise refusal(INVALID, why)
            return int(await self.ask(hosted, EMIT, event, _state(hosted.agent)))

        return emit

    async def ask(self, hosted: Hosted, request: int, *args: Any) -> Any:
        """A request of ``hosted``'s agent to the node (EMIT, READ, SAVE); its answer."""
        if hosted.closed or self._transport is None or self._transport.is_closing():
            raise refusal("Fenced", [hosted.sid, 0, -1])  # closed: the node stopped it
        self._next_rid += 1
        rid = self._next_rid
        try:
            data = frame([request, rid, hosted.lid, *args])
        except (TypeError, ValueError, OverflowError) as exc:  # text UTF-8 cannot hold, ...
            why = f"{_ASKED[request]} is not acceptable: it cannot be sent to the node ({exc})"
            raise refusal(INVALID, f"{why}; nothing was written") from None
        most = self._max_containers
        # What the node's reader takes (a map or an array is a byte at least: a frame no
        # longer than the bound needs no count, the usual one).
        big = most is not None and request == EMIT and len(data) > most
        if big and too_many_containers(args[0], most or 0):
            why = f"more than {most} maps and arrays (the node's max_agent_event_bytes)"
            raise refusal(INVALID, f"an agent event is not acceptable: {why}; nothing was written")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        self._transport.write(data)
        try:
            return await fut
        except Exception as exc:
            kind, detail = describe(exc)
            if kind == "Fenced" and not detail[0]:
                # Refused for an instance the node no longer knows (closed or moved).
                raise refusal(kind, [hosted.sid, *detail[1:]]) from None
            raise
        finally:
            self._replies.pop(rid, None)


@dataclass(frozen=True)
class ChannelMemory:
    """An agent's history and checkpoints in a worker: requests its node answers."""

    host: AgentHost
    hosted: Hosted

    async def read(self, after: int, limit: int) -> list[Event]:
        return list(await self.host.ask(self.hosted, READ, after, limit))

    async def save(self, covers: int, data: bytes) -> None:
        await self.host.ask(self.hosted, SAVE, covers, data)
