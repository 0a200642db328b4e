"""One owned conversation's agent loop: in-order dispatch of inbox actions, fenced commits.

The runner learns about new actions from the conversation's channel (the node is
subscribed while it owns the loop). It tracks the highest contiguous event id it has seen;
a gap, a reconnect or a start re-reads the durable inbox, so no accepted action is
skipped. An action counts as processed once an event answering it, or its ack, is
committed together with the ``applied`` cursor: a successor resumes after that cursor.

Speculative dispatch (``speculation.py``): an action sent through this node while the
loop is idle may be dispatched before its accept answered, under the id it will get.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

from workers.protocol import AgentLoop, AgentState, Event, cancelled_here

from .actionqueue import ActionQueue
from .agentcalls import as_failure, close_agent, held_weakly, start_agent
from .archive import Archiver
from .backoff import Backoff
from .codec import agent_event, is_state_note, pack_agent_events, stamped_at, with_state_note
from .config import ManagerConfig
from .delivery import Delivery
from .errors import REDIS_TROUBLE, Fenced, SpeculationLost
from .idle import IdleTracker
from .metrics import NodeMetrics
from .poison import agent_failure
from .speculation import Speculation
from .state import Committed, Lease, RedisState
from .statenotes import StateNotes
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

STOP_WITHIN = 5.0  # seconds a cancelled loop task gets to finish


class LoopRunner:
    """Runs one owned conversation's agent: dispatches its inbox in order and commits
    what the agent emits, fenced by ``lease``. ``applied``: the last action processed;
    ``new_agent(n)``: the agent, resuming after action n (again after a lost speculation);
    ``speculative``: dispatch before the accept answered if the agent allows it;
    ``on_fenced``: told once when ownership is lost; ``archiver``: told what was logged."""

    def __init__(
        self,
        *,
        lease: Lease,
        applied: int,
        new_agent: Callable[[int], AgentLoop],
        speculative: bool,
        state: RedisState,
        config: ManagerConfig,
        lease_valid: Callable[[], bool],
        on_fenced: Callable[[LoopRunner], None],
        delivery: Delivery,
        activity: IdleTracker,
        metrics: NodeMetrics,
        archiver: Archiver,
        close_delay: float,
        max_running_time: float = 0.0,
    ) -> None:
        self.lease = lease
        # Its conversation's lifetimes (config.Lifetimes.effective): idle without
        # connections this long, it is closed; it is stopped at ``stop_at`` (0: never).
        self.close_delay = close_delay
        self.stop_at = time.time() + max_running_time if max_running_time else 0.0
        self._new_agent = new_agent
        self.agent = new_agent(applied)
        self._speculative = speculative and self.agent.speculative
        # The last accept was refused (the event store behind, the inbox full, Redis full
        # or away): the next is not dispatched before its accept answers, for it would
        # most likely be refused too, and each refuted speculation replaces the agent
        # (``Actions.accept``; at Redis' bound, every refused action replaced it).
        self.last_refused = False
        self._metrics = metrics
        self._state = state
        self._config = config
        self._lease_valid = lease_valid
        self._on_fenced = on_fenced
        self._delivery = delivery
        self._activity = activity
        self._archiver = archiver
        self._queue = ActionQueue(
            lease.sid, state, applied, max_action_bytes=config.max_action_bytes
        )
        self._cause = 0  # the action being dispatched (0: none)
        self._emits = 0  # writes answering it so far
        self._asked_at: float | None = None  # when it was accepted (Unix time)
        # Writes answering no action are numbered per runner: a retry is known (COMMIT).
        self._writer = uuid.uuid4().hex[:16]
        self._unprompted = 0
        self._notes = StateNotes(config.agent_state_events)
        self._idle = False  # waiting for work, nothing queued
        self._writes = 0  # commits in flight
        self._last_id = 0  # the last event id a commit of this runner wrote
        self._spec: Speculation | None = None
        self._owed: tuple[int, Event] | None = None  # a user event we deliver (take_user_event)
        self._task: asyncio.Task[None] | None = None
        self.fenced = False
        self.closed = False
        self.last_active = time.time()
        self.dispatched = 0

    @property
    def sid(self) -> str:
        return self.lease.sid

    @property
    def running(self) -> bool:
        return not (self.fenced or self.closed)

    async def start(self) -> None:
        await self._start_agent()
        self._task = asyncio.create_task(self._run(), name=f"loop:{self.sid}")
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("loop %s crashed", self.sid, exc_info=task.exception())

    def touch(self, at: float | None = None) -> None:
        """Record activity (now, or ``at``); the node flushes it to Redis in batches."""
        self.last_active = time.time() if at is None else at
        self._activity.touched(self.sid)

    # -- input -----------------------------------------------------------------------
    def observe(self, event_id: int, event: Event) -> bool:
        """An event of the conversation went by; True when it woke the loop from waiting
        for work (it dispatches next), False too when the loop is busy."""
        self.touch()
        self._archiver.logged(self.sid, note=is_state_note(event))
        return self._queue.observe(event_id, event) and self._idle

    def speculate(self, action: Event, token: str) -> Speculation | None:
        """Dispatch ``action``, about to be accepted by this node with ``token``, before
        its accept answers; None when its id cannot be predicted (the loop is busy or has
        not seen every event), the agent does not allow it, or the lease is in doubt.
        The caller must ``settle`` the result with the accept's outcome."""
        if not (
            self._speculative
            and self._idle
            and self._queue.quiet
            and self._spec is None
            and self._writes == 0
            and self.running
            and self._lease_valid()
            and not self.last_refused
        ):
            return None
        landed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        spec = Speculation(self._queue.predict(action), token, action, landed)
        self._spec = spec
        self._metrics.speculated()
        return spec

    def _speculated(self, n: int) -> Speculation | None:
        """The speculation of action ``n``, if it was dispatched before its accept."""
        return self._spec if self._spec is not None and self._spec.predicted == n else None

    def known_logged(self) -> int:
        """The highest event id known logged (not an action dispatched before its accept)."""
        spec = self._spec
        if spec is not None and not spec.confirmed:
            return min(self._queue.seen, spec.predicted - 1)
        return self._queue.seen

    def take_user_event(self, spec: Speculation, event_id: int) -> bool:
        """The accept of ``spec`` logged its action as ``event_id``. True: a commit is on
        its way (the answer, typically) and delivers the user event with its own when it
        returns (every commit pays what is owed); False: the caller delivers it now."""
        if not (
            spec is self._spec and event_id == spec.predicted and self._writes and self.running
        ):
            return False
        self._owed = (event_id, spec.event)
        return True

    async def _pay_owed(self) -> None:
        owed, self._owed = self._owed, None
        if owed is not None:
            await self._delivery.committed(self.sid, owed[0], [owed[1]])

    def poke(self) -> None:
        """Re-read the inbox (after a reconnect, when channel messages may be lost)."""
        self._queue.poke()

    async def _run(self) -> None:
        queue = self._queue
        backoff = Backoff(base=0.05, cap=1.0)  # between failed inbox reads
        if self._notes.enabled:  # the state its start left the agent in
            await self._note_state()
            if self._last_id == 1:  # the conversation's first event: no action before it
                queue.first_event()
        while self.running:
            self._idle = True
            await queue.wake.wait()
            self._idle = False
            queue.wake.clear()
            if not await queue.refresh(backoff):
                continue
            while self.running and (item := queue.next()) is not None:
                n, action = item
                spec = self._speculated(n)
                if spec is not None and spec.lost:  # known before the agent saw it
                    self._spec = None
                    self._forget_speculation(spec)
                    break
                await self._dispatch(n, action)
                if spec is not None:
                    await self._pay_owed()  # if no commit delivered it
                    self._spec = None
                    if not spec.confirmed and self.running:
                        self._forget_speculation(spec)
                        await self._replace_agent()
                        break
            if queue.reread:
                queue.wake.set()

    def _forget_speculation(self, spec: Speculation) -> None:
        """Not logged as predicted: drop what was queued after it; re-read the inbox."""
        log.info("loop %s: action %d was not logged as predicted", self.sid, spec.predicted)
        self._metrics.speculation_lost()
        self._queue.forget_from(spec.predicted)

    async def _replace_agent(self) -> None:
        """A fresh agent for one that may hold state from an action not (or not there) in
        the log: it starts from the log, as a successor's would."""
        old, self.agent = self.agent, self._new_agent(self._queue.applied)
        await close_agent(old, self.sid)
        try:
            await self._start_agent()
        except Exception:  # as a failed dispatch: logged, the conversation goes on
            log.exception("fresh agent of %s failed to start", self.sid)

    async def _start_agent(self) -> None:
        await start_agent(self.agent, held_weakly(self), self.sid, self._config.agent_start_timeout)

    async def _dispatch(self, n: int, action: Event) -> None:
        if not self._lease_valid():
            self._fence("node lease lapsed")
            return
        self._cause = n
        self._emits = 0
        self._asked_at = stamped_at(action)
        self.dispatched += 1
        self.touch()
        self._notes.arm(lambda: self._thinking(n), self._note_state)
        failure: Exception | None = None
        try:
            await self.agent.dispatch({**action, "id": n})
        except (Fenced, SpeculationLost):
            return
        except BaseException as exc:  # SystemExit, KeyboardInterrupt too: the agent's own
            if cancelled_here(exc):
                raise
            log.exception("agent of %s failed on action %d", self.sid, n)
            self._metrics.agent_failed()
            failure = as_failure(exc, self.sid)
        finally:
            self._cause = 0
            self._notes.disarm()
        await self._notes.settle()
        if failure is not None:  # visible to its clients; the loop goes on with the next
            with contextlib.suppress(Fenced, SpeculationLost):
                await self._commit(agent_failure(n, failure), cause=n, index=self._emits)
        # Marked processed if nothing answered it; the state the agent ended in logged.
        noted = self._notes.enabled and self._notes.change(self.agent.state)
        if self.running and (self._queue.applied < n or noted):
            # An agent in this process may have answered and returned in this very step:
            # its answer's frames, queued for this node's clients, are written when the
            # loop iteration ends. One step aside lets them go before this commit's work.
            await asyncio.sleep(0)
            with contextlib.suppress(Fenced, SpeculationLost):
                await self._commit([], cause=n, index=self._emits)

    def _thinking(self, n: int) -> bool:
        """Action ``n``, logged, is still being dispatched, unanswered, its agent running
        (``statenotes.py``)."""
        spec, running = (
            self._speculated(n),
            self._notes.change(self.agent.state) == AgentState.RUNNING,
        )
        logged = spec is None or spec.logged
        return self._cause == n and not self._emits and logged and running

    async def _note_state(self) -> None:
        """Log the agent's changed state as the runner's own write (answering no action)."""
        with contextlib.suppress(Fenced, SpeculationLost):
            await self._commit([], cause=0, index=self._next_unprompted())

    # -- output ----------------------------------------------------------------------
    async def emit(self, event: Event) -> int:
        """Append an agent event; raises Fenced once the conversation was taken over or
        its loop stops,
        SpeculationLost when the action it answers was not logged as predicted, and
        LimitExceeded when it is over ``max_agent_event_bytes`` (nothing written)."""
        cause = self._cause
        if cause:
            index = self._emits
            self._emits += 1
        else:
            index = self._next_unprompted()
        await self._notes.settle()
        last_id = await self._commit([agent_event(event)], cause=cause, index=index)
        if cause and index == 0 and self._asked_at is not None:
            # Its first answer: from the action's timestamp (set where it was accepted).
            self._metrics.observe_answer(max(0.0, time.time() - self._asked_at))
        return last_id

    async def emit_status(self, status: Event) -> None:
        """Append a status event as the owner (used when stopping the loop)."""
        if not self.fenced:
            await self._commit([status], cause=0, index=self._next_unprompted(), check_open=False)

    def _next_unprompted(self) -> int:
        self._unprompted += 1
        return self._unprompted

    async def _commit(
        self, events: list[Event], cause: int, index: int, check_open: bool = True
    ) -> int:
        """Commit as the owner; the id of the last of ``events`` (0 after a ``dup``). Retries
        through Redis trouble until the lease lapses (a retry after a lost reply is a
        ``dup``), and with ``--ack-replicas`` until replicas confirm the write, which is
        delivered only then; the agent's changed state is recorded and noted
        (``with_state_note``)."""
        changed = self._notes.change(self.agent.state)
        noted = changed if self._notes.enabled else ""
        events, after = with_state_note(events, noted)
        packed = pack_agent_events(events, self._config.max_agent_event_bytes)
        backoff = Backoff(base=0.05, cap=1.0)
        spec = self._speculated(cause)
        held: Committed | None = None  # made, not confirmed by replicas: not delivered
        while True:
            if self.fenced or not self._lease_valid():
                self._fence("node lease lapsed" if not self.fenced else "already fenced")
                raise Fenced(self.sid, self.lease.epoch, -1)
            if check_open and self.closed:
                # Stopping (still the owner): an agent's late write is refused, nothing
                # more; what it answered, not marked applied, waits for the next owner.
                raise Fenced(self.sid, self.lease.epoch, -1)
            accepted_as = spec.commit_token() if spec is not None else ""
            if accepted_as is None:
                raise SpeculationLost(self.sid, spec.predicted if spec else cause)
            settled = spec is not None and spec.landed.done()
            self._writes += 1
            try:
                r = await self._state.commit(
                    self.sid,
                    self.lease.inc,
                    self.lease.epoch,
                    packed,
                    cause=cause,
                    index=index,
                    state=changed,
                    publisher=self.lease.inc,
                    writer=self._writer,
                    accepted_as=accepted_as,
                    floor=self._delivery.floor(self.sid),
                    held=held,
                )
            except REDIS_TROUBLE as exc:
                why: str = str(exc) or type(exc).__name__
            else:
                why = r.unconfirmed
                if why:  # the same write again: a dup, confirmed when replicas catch up
                    self._metrics.not_replicated()
                    held = r if r.status == "ok" else held
            finally:
                self._writes -= 1
            if why:
                await self._pay_owed()  # the client need not wait for the retries
                delay = backoff.next()
                # Once a write, then at DEBUG: Redis full or away for minutes wrote a
                # line per conversation per retry (36 a second from 25 conversations).
                level = logging.WARNING if backoff.failures == 1 else logging.DEBUG
                log.log(level, "commit for %s failed (%s); retry in %.2fs", self.sid, why, delay)
                await asyncio.sleep(delay)
                continue
            if r.notice is not None:  # Redis had lost events: clients are told
                await self._delivery.committed(self.sid, r.notice[0], [r.notice[1]])
            if r.status != "unaccepted":
                break
            # Sent before its accept ran (or the accept went another way): the accept's
            # own answer decides. The caller of ``speculate`` always settles it.
            assert spec is not None
            if settled:  # it had logged the action as predicted, unconfirmed: Redis lost it
                raise SpeculationLost(self.sid, spec.predicted)
            await asyncio.shield(spec.landed)
        if spec is not None and accepted_as and r.status in ("ok", "dup"):
            spec.confirmed = True  # the script checked the token before anything
        if r.status not in ("ok", "dup"):
            self._fence(f"commit {r.status} (epoch {r.first_id})")
            raise Fenced(self.sid, self.lease.epoch, r.first_id)
        self._notes.recorded(changed)
        self._last_id = r.last_id
        self.touch()
        self._queue.mark_applied(cause)
        first_id = r.first_id if r.status == "ok" else 0  # after a "dup": unknown
        owed = self._owed
        if owed is not None and events and first_id == owed[0] + 1:
            # The user event the caller left to us, in one pass with what answers it.
            self._owed = None
            first_id, events = owed[0], [owed[1], *events]
        else:
            await self._pay_owed()
        if events:  # applied here at once; a pub/sub copy (if any) is dropped by id
            await self._delivery.committed(self.sid, first_id, events)
        return r.last_id - after if r.last_id else 0

    async def finish_backlog(self, within: float) -> bool:
        """Process every action accepted so far before the loop stops (an eviction must
        not strand what was acknowledged). True when the inbox was emptied in time."""
        return await self._queue.drain(lambda: self.running, within)

    # -- shutdown --------------------------------------------------------------------
    def _fence(self, why: str, quiet: bool = False) -> None:
        if self.fenced:
            return
        log.log(logging.DEBUG if quiet else logging.WARNING, "loop %s fenced (%s)", self.sid, why)
        self.fenced = True
        self._queue.wake.set()
        self._on_fenced(self)

    def fence(self, why: str, quiet: bool = False) -> None:
        """Stop now, synchronously, without writing: ownership is no longer ours."""
        self._fence(why, quiet)
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def aclose(self) -> None:
        """Stop dispatching and close the agent. Idempotent."""
        self.closed = True
        self._queue.wake.set()
        task, self._task = self._task, None
        mine = task is asyncio.current_task()
        if task is not None and not mine and await cancel_and_wait([task], within=STOP_WITHIN):
            log.error("loop %s did not stop within %ss of cancellation", self.sid, STOP_WITHIN)
        try:
            await self._pay_owed()  # it is logged: local clients get it even now
        except Exception:
            log.exception("delivery of %s's last user event failed", self.sid)
        await close_agent(self.agent, self.sid)

    @property
    def agent_state(self) -> AgentState:
        return AgentState.parse(self.agent.state)
