"""An agent loop whose instance lives in a worker process: the node's stand-in for it.

``RemoteAgent`` is what the runner holds as its agent (it implements
``workers.protocol.AgentLoop``), so the runner, ordering, fencing and speculative
dispatch are the same in both isolation modes. Each call becomes a request on the
worker's channel; the agent's ``emit`` calls come back as EMIT frames and are served in
the task that waits for the request (the runner's: no task per action), through the
runner's own ``emit``, whose answer (an event id, or ``Fenced``/``SpeculationLost``)
goes back to the agent.

When its worker fails, an instance starts again from the log in another worker, as after
a failover. A dispatch that was running there is a suspect (the one the stall reporter
named; every one running when a worker died): its failure is counted in Redis
(``state/attempts.py``) and it goes again with the other suspects, apart from the pool,
in a worker process started for them (``AgentPool.probation``; one that fails there
with others is not counted: they split until it runs alone), until it has failed
``max_dispatch_attempts`` times in all, on any node; then the action is answered with an
``error`` observation and the loop goes on. Either way the instance then starts again
in the pool, from the log. A fresh
instance reads the count before its first dispatch. A dispatch that only shared the
worker goes again elsewhere at once, as the same attempt; one that had answered already
is not run again (an action counts as processed once its first answer is committed).
A dispatch over ``agent_dispatch_timeout`` is cancelled and answered with an error too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from workers.channel import (
    CANCEL,
    CANCELLED,
    CLOSE,
    DISPATCH,
    DONE,
    EMIT,
    ERROR,
    OPEN,
    READ,
    REFUSE,
    REPLY,
    SAVE,
    describe,
    refusal,
)
from workers.protocol import AgentContext, AgentState, EmitFn, Event

from .agentworker import AgentWorker, Ward, WorkerLost
from .errors import REDIS_TROUBLE, AgentFailed, Fenced, SpeculationLost
from .memory import LoopMemory
from .poison import DIED, OUT_OF_MEMORY, TIMEOUT, error_observation

if TYPE_CHECKING:
    from .agentpool import AgentPool

log = logging.getLogger(__name__)

HOLD_CHECK = 0.1  # seconds between looks at whether a dispatch's worker is held up
UNANSWERED = 0.2  # seconds a heartbeat may wait before its worker counts as held up
PROBE_AHEAD = 0.5  # seconds before a dispatch's deadline its worker is sent a heartbeat


class RemoteAgent:
    """One conversation's agent instance in a worker of ``pool`` (see the module
    docstring). Made by ``AgentPool.new_agent``; the runner drives it."""

    def __init__(self, pool: AgentPool, context: AgentContext) -> None:
        self.speculative = pool.speculative
        self._pool = pool
        self._context = context
        self._emit: EmitFn | None = None
        self._worker: AgentWorker | None = None
        self._lid = 0
        self._state = AgentState.LOADING
        self._dispatching = False
        self._answered = False  # an event answering the dispatch in progress was committed
        self._heard = False  # the worker reported a state during this dispatch
        # Frames for the request in flight (``_rid``, of kind ``_calling``), in order, or
        # what ends it (WorkerLost, the instance closed).
        self._box: deque[list[Any] | Exception] = deque()
        self._wake: asyncio.Future[None] | None = None
        self._rid = self._calling = 0
        self._binding: asyncio.Task[Any] | None = None
        self._fresh = True  # the next dispatch reads how often its action failed before
        self._done = context.resumed_after  # the last action an instance was given
        self._closed = False

    @property
    def sid(self) -> str:
        return self._context.conversation_id

    @property
    def state(self) -> AgentState:
        # Between the frames that report it, a dispatch in progress is RUNNING.
        if self._dispatching and not self._heard:
            return AgentState.RUNNING
        return self._state

    @property
    def worker(self) -> AgentWorker | None:
        """The worker holding the instance now (None between two)."""
        return self._worker

    @property
    def in_flight(self) -> bool:
        """A start or dispatch of this instance is running in its worker."""
        return self._rid != 0 and self._calling in (OPEN, DISPATCH)

    # -- AgentLoop -------------------------------------------------------------------
    async def start(self, emit: EmitFn) -> None:
        self._emit = emit
        await self._bind()

    async def dispatch(self, action: Event) -> None:
        n = int(action.get("id") or 0)
        self._dispatching = True
        self._answered = False
        failures = 0  # dispatches of this action that failed their worker, on any node
        ward: Ward | None = None  # the last attempt failed its worker: it goes again there
        why = ""  # and why
        try:
            if self._fresh:  # a fresh instance: the action may have failed before
                self._fresh = False
                failures, why = await self._failures(n)
                if failures >= self._pool.max_attempts:
                    await self._give_up(n, why or DIED, failures)
                    return
            while True:
                try:
                    if ward is None:
                        await self._attempt(await self._bound(), action)
                    elif not await self._on_probation(n, action, why, failures, ward):
                        return  # given up: no instance to try it again
                except WorkerLost as lost:
                    if self._answered:  # processed once answered, as after a failover
                        log.warning(
                            "conversation %s: the worker running action %d %s after the "
                            "action was answered; it is not run again",
                            self.sid,
                            n,
                            lost.reason,
                        )
                        self._state = AgentState.AWAITING_USER_INPUT
                        self._moved_back(n)
                    else:
                        if lost.ward is None:
                            # It only shared the worker (or its probation worker failed
                            # before it ran there): the same attempt, where it was to run.
                            continue
                        ward, why = lost.ward, lost.reason
                        if lost.blamed:
                            failures = await self._count_failure(n, why, failures)
                            if failures >= self._pool.max_attempts:
                                await self._give_up(n, why, failures)
                                return
                        continue
                except TimeoutError:
                    self._drop()  # it may still run: a fresh instance takes the next one
                    await self._give_up(n, TIMEOUT, 1)
                    return
                if failures:  # it went through after all
                    with contextlib.suppress(*REDIS_TROUBLE):
                        await self._pool.state.forget_attempts(self.sid, n)
                return
        finally:
            self._done = max(self._done, n)
            self._dispatching = False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        binding = self._binding
        if binding is not None and not binding.done():
            binding.cancel()
            await asyncio.wait({binding})
        worker = self._worker
        if worker is not None and not worker.failed:
            if self._rid:  # a request still runs (a start, or a task that did not stop)
                worker.request(CLOSE, self._lid, ())
                # Its answer can no longer reach this instance (unbound below): its
                # caller hears the close now instead of waiting forever.
                self._push(AgentFailed(f"the agent of {self.sid} was closed"))
            else:
                with contextlib.suppress(WorkerLost, AgentFailed, Fenced, SpeculationLost):
                    await self._call(CLOSE, ())
        self._unbind()

    # -- the parts of a dispatch -----------------------------------------------------
    async def _failures(self, n: int) -> tuple[int, str]:
        """How often action ``n`` failed its worker before; Redis trouble is no reason
        not to dispatch it (0)."""
        try:
            return await self._pool.state.failed_dispatches(self.sid, n)
        except REDIS_TROUBLE as exc:
            log.warning("reading failed dispatches of %s/%d: %s", self.sid, n, exc)
            return 0, ""

    async def _count_failure(self, n: int, why: str, known: int) -> int:
        """Count a failed dispatch of ``n`` in Redis (on trouble, here: ``known`` + 1)."""
        try:
            return max(await self._pool.state.dispatch_failed(self.sid, n, why), known + 1)
        except REDIS_TROUBLE as exc:
            log.warning("counting a failed dispatch of %s/%d: %s", self.sid, n, exc)
            return known + 1

    async def _attempt(self, worker: AgentWorker, action: Event) -> None:
        self._heard = False
        limit = self._pool.dispatch_timeout
        async with asyncio.timeout(limit or None) as bound:
            own = _OwnTime(worker, self._lid, bound, limit) if limit else None
            try:
                await self._call(DISPATCH, (action,), worker)
            finally:
                if own is not None:
                    own.cancel()

    async def _on_probation(
        self, n: int, action: Event, why: str, failures: int, ward: Ward
    ) -> bool:
        """Suspect action ``n`` again, in a fresh instance in ``ward``'s probation worker
        (its failures so far: ``failures``, the last for ``why``); False if no worker could
        start for it or no instance there (the action is then given up). Either way the
        instance then starts again in the pool, from the log. WorkerLost when that
        worker fails too (its start's failure is the action's)."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                worker = await stack.enter_async_context(self._pool.probation(ward))
                await self._bind(worker)
            except AgentFailed as exc:
                if self._closed or self._pool.closed:
                    raise  # stopping: the action is the next owner's, not given up
                log.error("%s", exc)
                await self._give_up(n, why, failures)
                return False
            try:
                await self._attempt(worker, action)
            finally:
                if self._worker is worker:
                    self._drop()
        self._moved_back(n)
        return True

    def _moved_back(self, n: int) -> None:
        """After a probation or an action ``n`` given up: a fresh instance in the pool
        now (resuming after ``n``), not at the next action, if the last one is gone."""
        self._done = max(self._done, n)
        if self._worker is None and not (self._closed or self._pool.closed):
            self._binding = self._pool.tasks.spawn(self._rebind(), f"rebind:{self.sid}")

    async def _give_up(self, n: int, reason: str, tries: int) -> None:
        """Answer action ``n`` with an error observation as the owner (the runner's
        emit: fenced, and marking the action applied), without dispatching it again."""
        event = error_observation(n, reason, tries, self._pool.dispatch_timeout)
        if reason == TIMEOUT:
            self._pool.timeouts += 1
        else:
            self._pool.poisoned += 1
        log.error("conversation %s: %s", self.sid, event["content"])
        self._dispatching = False
        self._state = AgentState.AWAITING_USER_INPUT
        assert self._emit is not None
        await self._emit(event)
        self._moved_back(n)

    # -- binding to a worker ---------------------------------------------------------
    async def _bound(self) -> AgentWorker:
        binding = self._binding
        if binding is not None and not binding.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(binding)
        if self._worker is None or self._worker.failed:
            await self._bind()
        return self._attached()

    def _attached(self) -> AgentWorker:
        if self._worker is None:
            raise AgentFailed(f"the agent of {self.sid} has no worker")
        return self._worker

    async def _bind(self, on: AgentWorker | None = None) -> None:
        """A fresh instance, started, in a worker of the pool (or in ``on``)."""
        while True:
            if self._closed:
                raise AgentFailed(f"the agent of {self.sid} is closed")
            worker = on or await self._pool.place()
            self._unbind()
            self._lid = self._pool.next_lid()
            self._worker = worker
            worker.loops[self._lid] = self
            worker.hosted += 1
            try:
                await self._call(OPEN, self._opening())
                return
            except WorkerLost as lost:
                if on is not None:
                    raise  # its own worker failed: as a failed dispatch of its action
                if lost.suspect:
                    raise AgentFailed(
                        f"the agent of {self.sid} failed to start: {lost.reason}"
                    ) from None
            except BaseException:
                self._drop()  # a start cut short (cancelled) may have left an instance
                raise

    def _opening(self) -> tuple[Any, ...]:
        """OPEN's: resume after the last action dispatched, from the newest checkpoint."""
        ctx, memory = self._context, self._context.memory
        saved = memory.latest if isinstance(memory, LoopMemory) else ctx.checkpoint
        ckpt = None if saved is None else [saved.covers, saved.data]
        return (ctx.conversation_id, ctx.user_id or "", dict(ctx.settings), self._done, ckpt)

    async def _rebind(self) -> None:
        try:
            await self._bind()
        except AgentFailed as exc:
            log.warning("%s; it starts again with its next action", exc)

    def _unbind(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None and worker.loops.get(self._lid) is self:
            del worker.loops[self._lid]

    def _drop(self) -> None:
        """Give the instance up without waiting for it (it may not answer)."""
        worker = self._worker
        if worker is not None:
            worker.request(CLOSE, self._lid, ())
        self._unbind()

    def worker_lost(self, worker: AgentWorker, lost: WorkerLost) -> None:
        """``worker`` failed (the pool tells every instance it held)."""
        if self._worker is not worker:
            return
        self._unbind()
        if self._rid:
            self._push(lost)
        elif not (self._dispatching or self._closed or self._pool.closed):
            # Idle: a fresh instance elsewhere now, as after a failover.
            self._binding = self._pool.tasks.spawn(self._rebind(), f"rebind:{self.sid}")

    # -- the channel -----------------------------------------------------------------
    def received(self, worker: AgentWorker, message: list[Any]) -> None:
        """A frame for this instance (from ``AgentWorker.data_received``)."""
        if message[0] == EMIT and not self._rid:
            # Not during a request (from a task of the agent's own): a task serves it.
            self._pool.tasks.spawn(self._serve_emit(worker, message), f"emit:{self.sid}")
            return
        if message[0] in (READ, SAVE):  # in any order with the rest: a task serves it
            self._pool.tasks.spawn(self._serve_memory(worker, message), f"memory:{self.sid}")
            return
        self._push(message)

    def _push(self, item: list[Any] | Exception) -> None:
        self._box.append(item)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _next(self) -> list[Any] | Exception:
        while not self._box:
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None
        return self._box.popleft()

    async def _call(
        self, kind: int, args: tuple[Any, ...], worker: AgentWorker | None = None
    ) -> None:
        """Send a request and serve the agent's EMITs until it is answered."""
        worker = worker or self._attached()
        if worker is not self._worker or worker.failed:
            raise WorkerLost(worker.failed or DIED, worker)
        self._box.clear()
        self._rid = rid = worker.request(kind, self._lid, args)
        self._calling = kind
        try:
            while True:
                m = await self._next()
                if isinstance(m, Exception):  # WorkerLost, or the instance closed
                    raise m
                if m[0] == EMIT:
                    await self._serve_emit(worker, m)
                    continue
                if m[1] != rid:
                    continue  # the answer to a request given up on
                if m[-1]:
                    self._state = AgentState.parse(m[-1])
                    self._heard = True
                if m[0] == DONE:
                    return
                if m[3] == OUT_OF_MEMORY:
                    # The instance is gone and the worker's heap is not to be trusted: the
                    # worker is replaced, with this request as the suspect (WorkerLost next).
                    self._pool.lost(worker, OUT_OF_MEMORY, culprit=self._lid)
                    continue
                raise self._failure(m[3], m[4])
        except asyncio.CancelledError:
            if kind == DISPATCH and not worker.failed:
                worker.send([CANCEL, self._lid])
            raise
        finally:
            self._rid = self._calling = 0
            while self._box:  # EMITs of the agent's own tasks, after the answer
                m = self._box.popleft()
                if not isinstance(m, Exception) and m[0] == EMIT:
                    self._pool.tasks.spawn(self._serve_emit(worker, m), f"emit:{self.sid}")

    def _failure(self, kind: str, detail: Any) -> Exception:
        if kind == CANCELLED:
            return AgentFailed(f"the agent of {self.sid} was cancelled")
        if kind == ERROR:
            what = str(detail).split(":", 1)[0]  # "ValueError: ..." (workers.channel.describe)
            return AgentFailed(f"the agent of {self.sid} failed: {detail}", what)
        return refusal(kind, detail)  # Fenced, SpeculationLost: as the agent raised them

    async def _serve_emit(self, worker: AgentWorker, m: list[Any]) -> None:
        """One ``emit`` of the agent, through the runner's; the answer goes back."""
        _, rid, _, event, state = m
        if state:
            self._state = AgentState.parse(state)
            self._heard = True
        assert self._emit is not None
        try:
            event_id = await self._emit(event)
        except Exception as exc:  # Fenced, SpeculationLost; anything else, named
            if not isinstance(exc, Fenced | SpeculationLost):
                log.warning("emit of %s's agent failed: %r", self.sid, exc)
            answer = [REFUSE, rid, *describe(exc)]
        else:
            answer = [REPLY, rid, event_id]
            self._answered = self._answered or self._dispatching
        # After the frames the emit queued for this node's clients (written when this
        # loop iteration ends): the clients' answer first, the agent's go-ahead next.
        asyncio.get_running_loop().call_soon(worker.send, answer)

    async def _serve_memory(self, worker: AgentWorker, m: list[Any]) -> None:
        """A history page (READ) or a checkpoint (SAVE) for the agent, from the node."""
        kind, rid, _, first, second = m
        memory, answer = self._context.memory, None
        try:
            assert memory is not None, "contexts made by a node have a memory"
            if kind == READ:
                answer = await memory.read(first, second)
            else:
                await memory.save(first, second)
        except Exception as exc:  # Fenced, too large, the store's trouble: the agent's
            worker.send([REFUSE, rid, *describe(exc)])
        else:
            worker.send([REPLY, rid, answer])


class _OwnTime:
    """Keeps a dispatch's ``bound`` (``agent_dispatch_timeout``, ``limit`` seconds) on
    the dispatch's own time: while its worker's event loop is held by another instance
    (that agent's blocking call) or by no one known (a heartbeat unanswered), the
    deadline moves on with the wait, and a stuck worker is the watchdog's to replace.
    Before, an action that merely shared the worker was cancelled and answered as one
    that "ran longer than" the limit."""

    def __init__(self, worker: AgentWorker, lid: int, bound: asyncio.Timeout, limit: float):
        self._worker, self._lid, self._bound = worker, lid, bound
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._deadline = self._last + limit
        self._handle = self._loop.call_later(HOLD_CHECK, self._tick)

    def _tick(self) -> None:
        now, worker = self._loop.time(), self._worker
        unanswered = worker.ping_sent is not None and now - worker.ping_sent > UNANSWERED
        if worker.blocked_lid not in (0, self._lid) or (
            unanswered and worker.blocked_lid != self._lid
        ):
            self._deadline += now - self._last
            self._bound.reschedule(self._deadline)
        elif worker.ping_sent is None and self._deadline - now < PROBE_AHEAD and worker.usable:
            worker.ping(now)  # whether its loop is free is known before the deadline
        self._last = now
        self._handle = self._loop.call_later(HOLD_CHECK, self._tick)

    def cancel(self) -> None:
        self._handle.cancel()
