"""Calls from a loop into its agent's code, each bounded and its failures named.

The agent is the users' code: its start may never return (bounded by
``agent_start_timeout``), its close may raise, and it may raise what is not an
``Exception`` (``sys.exit``, a KeyboardInterrupt or CancelledError of its own), which the
node must not obey. The emit it is given holds its loop weakly: the loop holds the agent,
and a strong reference back made every stopped loop a reference cycle, freed only by the
cyclic GC's rare full collection.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable
from typing import Protocol

from workers.protocol import AgentLoop, EmitFn, Event, cancelled_here

from .errors import AgentFailed, Fenced
from .state import Lease

log = logging.getLogger("coordinator.runner")  # the loop's own lines


class Emitter(Protocol):
    """The loop an agent emits through (``runner.LoopRunner``)."""

    @property
    def lease(self) -> Lease: ...

    async def emit(self, event: Event) -> int: ...


def as_failure(exc: BaseException, sid: str) -> Exception:
    """``exc``, raised by the agent of ``sid``, as the agent error it is: an Exception as
    it is; any other (``sys.exit`` in an agent, a KeyboardInterrupt or CancelledError of
    its own) as an AgentFailed naming it, as a worker process reports it."""
    if isinstance(exc, Exception):
        return exc
    name = type(exc).__name__
    return AgentFailed(f"the agent of {sid} failed: {name}: {exc}", name)


def held_weakly(loop: Emitter) -> EmitFn:
    """``loop.emit``, for its agent to keep, holding the loop weakly. An emit after the
    loop is gone is refused as one after it stopped (Fenced)."""
    ref, lease = weakref.ref(loop), loop.lease

    def emit(event: Event) -> Awaitable[int]:
        alive = ref()
        return alive.emit(event) if alive is not None else _stopped(lease)

    return emit


async def _stopped(lease: Lease) -> int:
    raise Fenced(lease.sid, lease.epoch, -1)


async def start_agent(agent: AgentLoop, emit: EmitFn, sid: str, limit: float) -> None:
    """``agent.start(emit)``, cancelled past ``limit`` seconds (0: none; AgentFailed
    naming the bound): an agent whose start never returns would hold its conversation
    "starting", its joins waiting, and its user's cap slot, for good."""
    bound = asyncio.timeout(limit or None)
    try:
        async with bound:
            await agent.start(emit)
    except TimeoutError:
        if not bound.expired():
            raise  # the agent's own
        log.error("agent of %s did not start within %gs; cancelled", sid, limit)
        raise AgentFailed(
            f"the agent of {sid} did not start within {limit:g}s (agent_start_timeout)"
        ) from None
    except Exception:
        raise
    except BaseException as exc:  # SystemExit, KeyboardInterrupt: not the node's to obey
        if cancelled_here(exc):
            raise
        log.exception("agent of %s failed to start", sid)
        raise as_failure(exc, sid) from None


async def close_agent(agent: AgentLoop, sid: str) -> None:
    """``agent.aclose()``; what it raises is logged, not passed on."""
    try:
        await agent.aclose()
    except BaseException as exc:  # SystemExit, KeyboardInterrupt too: the agent's own
        if cancelled_here(exc):
            raise
        log.exception("agent of %s failed to close", sid)
