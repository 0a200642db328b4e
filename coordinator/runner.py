"""One owned conversation's agent loop: in-order dispatch of inbox actions, fenced commits.

The runner learns about new actions from the conversation's channel (the node is
subscribed while it owns the loop). It tracks the highest contiguous event id it has seen;
a gap, a reconnect or a start re-reads the durable inbox, so no accepted action is
skipped. An action counts as processed once an event answering it, or its ack, is
committed together with the ``applied`` cursor: a successor resumes after that cursor.

Speculative dispatch: an action sent through the node that runs the loop, while the loop
is idle and has seen every event of the conversation, can only be logged as the next
event id, unless another node's action or a failure gets in first. If the agent allows
it (``speculative = True``), the runner dispatches it at once under that predicted id,
while its accept is still on the way to Redis, and the agent's commits carry the
accept's token: the commit script writes them only if that accept logged the action as
predicted. So the action and its answer travel to Redis together (one round trip, not
two), and nothing reaches the log or a client unless the prediction held. When it did
not, the answers are dropped and the loop gets a fresh agent, which sees the actions in
log order, as a successor would after a failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from workers.protocol import AgentLoop, AgentState, Event

from .backoff import Backoff
from .codec import agent_event, pack
from .config import ManagerConfig
from .errors import Fenced, SpeculationLost
from .state import RedisState
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

STOP_WITHIN = 5.0  # seconds a cancelled loop task gets to finish


@dataclass(frozen=True, slots=True)
class Lease:
    """What a runner needs to write as the owner."""

    sid: str
    user: str
    inc: str
    epoch: int


@dataclass(eq=False, slots=True)
class Speculation:
    """An action dispatched before its accept answered, under the id it should get."""

    predicted: int
    token: str  # its accept's token
    event: Event  # the user event
    # The id its accept logged it under, 0 if the accept was refused or failed.
    landed: asyncio.Future[int]
    confirmed: bool = False  # Redis logged it as predicted

    def settle(self, event_id: int) -> None:
        """The accept answered (``event_id``) or failed (0)."""
        if not self.landed.done():
            self.landed.set_result(event_id)

    @property
    def lost(self) -> bool:
        return self.landed.done() and self.landed.result() != self.predicted


@dataclass(slots=True)
class SpeculationStats:
    """A node's speculative dispatches and those whose prediction failed."""

    dispatched: int = 0
    lost: int = 0


class LoopRunner:
    def __init__(
        self,
        lease: Lease,
        applied: int,
        new_agent: Callable[[], AgentLoop],
        state: RedisState,
        config: ManagerConfig,
        lease_valid: Callable[[], bool],
        on_fenced: Callable[[LoopRunner], None],
        on_committed: Callable[[str, int, list[Event]], Awaitable[None]],
        on_touch: Callable[[str], None],
        stats: SpeculationStats | None = None,
    ) -> None:
        self.lease = lease
        self._new_agent = new_agent
        self.agent = new_agent()
        self._speculative = config.speculative_dispatch and bool(
            getattr(self.agent, "speculative", False)
        )
        self._stats = stats or SpeculationStats()
        self._state = state
        self._config = config
        self._lease_valid = lease_valid
        self._on_fenced = on_fenced
        self._on_committed = on_committed
        self._on_touch = on_touch
        self._applied = applied  # highest action id committed as processed
        self._seen = 0  # highest event id such that every action <= it is queued
        self._pending: dict[int, Event] = {}
        self._reread = True
        self._wake = asyncio.Event()
        self._wake.set()
        self._progress = asyncio.Event()
        self._cause = 0  # the action being dispatched (0: none)
        self._emits = 0  # writes answering it so far
        # Writes answering no action (the agent's own, status events) are numbered per
        # runner, so a retry after a lost reply is recognised as one (scripts.COMMIT).
        self._writer = uuid.uuid4().hex[:16]
        self._unprompted = 0
        self._last_state = ""
        self._idle = False  # waiting for work, nothing queued
        self._writes = 0  # commits in flight
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
        await self.agent.start(self.emit)
        self._task = asyncio.create_task(self._run(), name=f"loop:{self.sid}")
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("loop %s crashed", self.sid, exc_info=task.exception())

    def touch(self, at: float | None = None) -> None:
        """Record activity (now, or ``at``); the node flushes it to Redis in batches."""
        self.last_active = time.time() if at is None else at
        self._on_touch(self.sid)

    # -- input -----------------------------------------------------------------------
    def observe(self, event_id: int, event: Event) -> bool:
        """An event of the conversation went by; True when it woke the loop."""
        self.touch()
        if event_id <= self._seen:
            return False
        if event_id == self._seen + 1:
            self._seen = event_id
            if event.get("source") != "user" or event_id <= self._applied:
                return False
            self._pending[event_id] = event
        else:
            self._reread = True
        self._wake.set()
        return True

    def speculate(self, action: Event, token: str) -> Speculation | None:
        """Dispatch ``action``, about to be accepted by this node with ``token``, before
        its accept answers; None when its id cannot be predicted (the loop is busy or has
        not seen every event), the agent does not allow it, or the lease is in doubt.
        The caller must ``settle`` the result with the accept's outcome."""
        if not (
            self._speculative
            and self._idle
            and not self._wake.is_set()
            and not self._reread
            and not self._pending
            and self._spec is None
            and self._writes == 0
            and self.running
            and self._lease_valid()
        ):
            return None
        landed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        spec = Speculation(self._seen + 1, token, action, landed)
        self._spec = spec
        self._seen = spec.predicted
        self._pending[spec.predicted] = action
        self._wake.set()
        self._stats.dispatched += 1
        return spec

    def take_user_event(self, spec: Speculation, event_id: int) -> bool:
        """The accept of ``spec`` logged its action as ``event_id``. If a commit is on its
        way now (the agent's answer, typically), the runner delivers the user event when it
        returns, together with its events (one pass through to the clients), and the
        caller can acknowledge at once: True. False: the caller delivers it now."""
        # Every commit pays what is owed when it returns, whatever it answers.
        if not (
            spec is self._spec and event_id == spec.predicted and self._writes and self.running
        ):
            return False
        self._owed = (event_id, spec.event)
        return True

    async def _pay_owed(self) -> None:
        owed, self._owed = self._owed, None
        if owed is not None:
            await self._on_committed(self.sid, owed[0], [owed[1]])

    def poke(self) -> None:
        """Re-read the inbox (after a reconnect, when channel messages may be lost)."""
        self._reread = True
        self._wake.set()

    async def _read_inbox(self) -> None:
        seq, rows = await self._state.inbox_snapshot(self.sid, self._applied, count=500)
        for n, action in rows:
            if n > self._applied:
                self._pending[n] = action
        if len(rows) < 500:
            self._seen = max(self._seen, seq)
            self._reread = False
        else:
            self._seen = max(self._seen, max(self._pending))

    async def _run(self) -> None:
        backoff = Backoff(base=0.05, cap=1.0)
        while self.running:
            self._idle = True
            await self._wake.wait()
            self._idle = False
            self._wake.clear()
            try:
                if self._reread:
                    await self._read_inbox()
                backoff.reset()
            except (RedisError, OSError) as exc:
                # Redis trouble: the actions stay in the durable inbox; read again later.
                delay = backoff.next()
                log.warning("inbox read for %s failed (%s); retry in %.2fs", self.sid, exc, delay)
                await asyncio.sleep(delay)
                self._wake.set()
                continue
            while self._pending and self.running:
                n = min(self._pending)
                action = self._pending.pop(n)
                if n <= self._applied:
                    continue
                spec = self._spec if self._spec is not None and self._spec.predicted == n else None
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
            if self._reread:
                self._wake.set()

    def _forget_speculation(self, spec: Speculation) -> None:
        """The speculative action was not logged as predicted: drop what was queued after
        the prediction and re-read the inbox, which holds the actions in log order."""
        log.info("loop %s: action %d was not logged as predicted", self.sid, spec.predicted)
        self._stats.lost += 1
        self._pending.clear()
        self._seen = min(self._seen, spec.predicted - 1)
        self._reread = True
        self._wake.set()

    async def _replace_agent(self) -> None:
        """A fresh agent for one that may hold state from an action not (or not there) in
        the log: it starts from the log, as a successor's would."""
        old, self.agent = self.agent, self._new_agent()
        try:
            await old.aclose()
        except Exception:
            log.exception("agent of %s failed to close", self.sid)
        try:
            await self.agent.start(self.emit)
        except Exception:
            # As when its dispatch fails: logged, and the actions are still marked done,
            # so the conversation does not stall behind a broken agent.
            log.exception("fresh agent of %s failed to start", self.sid)

    async def _dispatch(self, n: int, action: Event) -> None:
        if not self._lease_valid():
            self._fence("node lease lapsed")
            return
        self._cause = n
        self._emits = 0
        self.dispatched += 1
        self.touch()
        try:
            await self.agent.dispatch({**action, "id": n})
        except (Fenced, SpeculationLost):
            return
        except Exception:
            log.exception("agent of %s failed on action %d", self.sid, n)
        finally:
            self._cause = 0
        if self._applied < n and self.running:
            with contextlib.suppress(Fenced, SpeculationLost):
                await self._commit([], cause=n, index=self._emits)

    # -- output ----------------------------------------------------------------------
    async def emit(self, event: Event) -> int:
        """Append an agent event; raises Fenced once the conversation was taken over, and
        SpeculationLost when the action it answers was not logged as predicted."""
        if self._cause:
            index = self._emits
            self._emits += 1
        else:
            index = self._next_unprompted()
        return await self._commit([agent_event(event)], cause=self._cause, index=index)

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
        """Commit as the owner. Retries through Redis trouble until it succeeds or the
        lease lapses; a retry after a lost reply is recognised (``dup``), not repeated."""
        packed = [pack(e) for e in events]
        backoff = Backoff(base=0.05, cap=1.0)
        spec = self._spec if self._spec is not None and self._spec.predicted == cause else None
        while True:
            if self.fenced or (check_open and self.closed) or not self._lease_valid():
                self._fence("node lease lapsed" if not self.fenced else "already fenced")
                raise Fenced(self.sid, self.lease.epoch, -1)
            accepted_as = ""
            if spec is not None and not spec.confirmed:
                if spec.lost:
                    raise SpeculationLost(self.sid, spec.predicted)
                if spec.landed.done():
                    spec.confirmed = True
                else:
                    accepted_as = spec.token
            state = str(self.agent.state)
            changed = state if state != self._last_state else ""
            self._writes += 1
            try:
                r = await self._state.commit(
                    self.sid,
                    self.lease.inc,
                    self.lease.epoch,
                    packed,
                    maxlen=self._config.event_log_maxlen,
                    cause=cause,
                    index=index,
                    state=changed,
                    publisher=self.lease.inc,
                    writer=self._writer,
                    accepted_as=accepted_as,
                )
            except (RedisError, OSError) as exc:
                await self._pay_owed()  # the client need not wait for the retries
                delay = backoff.next()
                log.warning("commit for %s failed (%s); retry in %.2fs", self.sid, exc, delay)
                await asyncio.sleep(delay)
                continue
            finally:
                self._writes -= 1
            if r.status != "unaccepted":
                break
            # Sent before its accept ran (or the accept went another way): the accept's
            # own answer decides. The caller of ``speculate`` always settles it.
            assert spec is not None
            await asyncio.shield(spec.landed)
        if spec is not None and accepted_as and r.status in ("ok", "dup"):
            spec.confirmed = True  # the script checked the token before anything
        if r.status not in ("ok", "dup"):
            self._fence(f"commit {r.status} (epoch {r.first_id})")
            raise Fenced(self.sid, self.lease.epoch, r.first_id)
        self._last_state = state
        self.touch()
        if cause > self._applied:
            self._applied = cause
            self._progress.set()
        first_id = r.first_id if r.status == "ok" else 0  # after a "dup": unknown
        owed = self._owed
        if owed is not None and events and first_id == owed[0] + 1:
            # The user event the caller left to us, in one pass with what answers it.
            self._owed = None
            first_id, events = owed[0], [owed[1], *events]
        else:
            await self._pay_owed()
        if events:
            # Apply locally at once (a pub/sub copy, sent only if another node listens,
            # is dropped by id).
            await self._on_committed(self.sid, first_id, events)
        return r.last_id

    async def finish_backlog(self, within: float) -> bool:
        """Process every action accepted so far before the loop stops (an eviction must
        not strand what was acknowledged). True when the inbox was emptied in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.running:
            _, rows = await self._state.inbox_snapshot(
                self.sid, self._applied, count=self._config.inbox_max
            )
            waiting = [n for n, _ in rows if n > self._applied]
            if not waiting:
                return True
            for n, action in rows:
                self._pending.setdefault(n, action)
            self._wake.set()
            target = max(waiting)
            while self._applied < target and self.running:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    log.warning("loop %s stops with actions after %d unprocessed", self.sid, target)
                    return False
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._progress.wait()
        return False

    # -- shutdown --------------------------------------------------------------------
    def _fence(self, why: str, quiet: bool = False) -> None:
        if self.fenced:
            return
        log.log(logging.DEBUG if quiet else logging.WARNING, "loop %s fenced (%s)", self.sid, why)
        self.fenced = True
        self._wake.set()
        self._on_fenced(self)

    def fence(self, why: str, quiet: bool = False) -> None:
        """Stop now, synchronously, without writing: ownership is no longer ours."""
        self._fence(why, quiet)
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def aclose(self) -> None:
        """Stop dispatching and close the agent. Idempotent."""
        self.closed = True
        self._wake.set()
        task, self._task = self._task, None
        mine = task is asyncio.current_task()
        if task is not None and not mine and await cancel_and_wait([task], within=STOP_WITHIN):
            log.error("loop %s did not stop within %ss of cancellation", self.sid, STOP_WITHIN)
        try:
            await self._pay_owed()  # it is logged: local clients get it even now
        except Exception:
            log.exception("delivery of %s's last user event failed", self.sid)
        try:
            await self.agent.aclose()
        except Exception:
            log.exception("agent of %s failed to close", self.sid)

    @property
    def agent_state(self) -> AgentState:
        try:
            return AgentState(self.agent.state)
        except ValueError:
            return AgentState.ERROR
