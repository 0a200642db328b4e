"""The node's agent worker processes (``agent_isolation`` ``process``): starting them,
placing agent instances, the watchdog, and replacing a worker that stalls or dies.

The runner stays in the node (ownership, fencing, ordering and delivery do not move);
a worker (``workers/host.py``) only runs agent instances, behind a ``RemoteAgent`` each.
The watchdog PINGs every worker that has been quiet for a fifth of
``agent_stall_timeout``; one whose event loop leaves a PING unanswered for
``agent_stall_timeout`` is stuck: it is killed (SIGKILL) like one that died, a fresh
process takes its slot, and each instance it held starts again in another worker, from
the log (``RemoteAgent.worker_lost``). The node's own event loop never waits on a
worker, so its lease, sockets and other conversations do not notice.

Placement: the usable worker holding the fewest instances. The suspect dispatches of a
failed worker (the one a stall named, or every one running where a worker died) go
again together, in a worker process started for them and stopped after them (a
``Ward``'s probation worker), so that innocent suspects do not wait for each other and
a poison action that strikes again hurts no other conversation. A probation worker that
dies with several running splits them in two halves, each in a worker of its own
again, until the one to blame runs alone: only then does a death count against its
action (``_judge``). Up to ``PROBATION_PER_WORKER`` x ``agent_workers`` such processes
at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator

from workers import heap, logformat
from workers.protocol import AgentContext

from . import cpus
from .agentworker import AgentWorker, Ward, WorkerLost
from .backoff import Backoff
from .config import ENV_PREFIX, ManagerConfig
from .errors import AgentFailed, ConfigError
from .metrics import NodeMetrics
from .poison import DIED, STALLED
from .remoteagent import RemoteAgent
from .state import RedisState
from .tasks import TaskSet

log = logging.getLogger(__name__)

STOP_WITHIN = 3.0  # seconds a worker gets to exit on STOP before it is killed
# A worker that fails within this many seconds of its start, running no action or start
# of an agent, is replaced after a backoff that grows with each such failure in its slot:
# one that died at once was restarted at once, six interpreters a second for good.
STEADY_AFTER = 10.0
# Probation worker processes at a time, per pool worker: halving a failed worker's k
# suspects until one to blame is alone keeps at most 1 + log2(k) of them running at once.
PROBATION_PER_WORKER = 4


class AgentPool:
    """``agent_workers`` worker processes running ``config.agent``; ``new_agent`` is the
    node's agent factory. Use ``await start()``, then ``aclose()`` (or ``halt()``)."""

    def __init__(self, *, config: ManagerConfig, state: RedisState, metrics: NodeMetrics) -> None:
        self.state = state
        self.max_attempts = config.max_dispatch_attempts
        self.dispatch_timeout = config.agent_dispatch_timeout
        self.speculative = False
        self.closed = False
        self.tasks = TaskSet(log)
        self.workers: list[AgentWorker] = []
        # Worker processes running suspect dispatches again (``probation``).
        self.probationers: set[AgentWorker] = set()
        self._probation_slots = asyncio.Semaphore(
            PROBATION_PER_WORKER * max(1, config.agent_workers)
        )
        self.restarts = self.stalls = self.poisoned = self.timeouts = 0
        self._config = config
        self.placement = cpus.plan(config.agent_cpus)  # ConfigError: not on this machine
        self._unpinned: frozenset[int] | None = None  # the loop's CPUs before start pinned it
        self._next_lid = 0
        self._slot_backoff: dict[int, Backoff] = {}  # slots whose workers fail young
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._register(metrics)

    def _register(self, metrics: NodeMetrics) -> None:
        metrics.gauge_from(
            "coordinator_agent_workers",
            "Agent worker processes up and answering (one whose heartbeat has waited "
            "over a fifth of agent_stall_timeout, its loop held, is not).",
            self._answering,
        )
        metrics.gauges_from(
            "coordinator_agent_worker_loops",
            "Agent instances each worker process holds, by its slot in the pool.",
            "worker",
            lambda: {str(w.slot): len(w.loops) for w in self.workers},
        )
        metrics.gauge_from(
            "coordinator_agent_probation_workers",
            "Agent worker processes running suspect actions again, apart from the pool.",
            lambda: len(self.probationers),
        )
        counters = (
            ("worker_restarts", "Agent worker processes started in place of one that failed."),
            ("worker_stalls", "Agent worker processes killed because their loop stopped."),
            ("poison_actions", "Actions answered with an error after they stalled or killed "
             "their worker max_dispatch_attempts times."),
            ("dispatch_timeouts", "Actions cancelled and answered with an error after "
             "agent_dispatch_timeout."),
        )  # fmt: skip
        reads = (
            lambda: self.restarts,
            lambda: self.stalls,
            lambda: self.poisoned,
            lambda: self.timeouts,
        )
        for (name, doc), read in zip(counters, reads, strict=True):
            metrics.counter_from(f"coordinator_agent_{name}", doc, read)

    # -- life ------------------------------------------------------------------------
    @property
    def _max_containers(self) -> int:
        """Maps and arrays in one frame of a worker: one agent event at most, whose values
        its bytes bound (codec's ``pack_agent_events``), and a few of the frame's own."""
        return self._config.max_agent_event_bytes + 64

    def _worker(self, slot: int) -> AgentWorker:
        """A worker for ``slot`` of the pool (-1: a probation worker), not started."""
        return AgentWorker(slot, self._on_lost, self._max_containers)

    def _spawn_args(self) -> tuple[list[str], dict[str, str]]:
        cfg = self._config
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        args = [
            *("--agent", cfg.agent, "--log-level", str(level)),
            *("--log-format", logformat.current_format(), "--node", cfg.node_id),
            *("--stall-after", str(cfg.agent_stall_timeout / 2)),
            *("--memory-limit", str(cfg.agent_memory_limit)),
            *("--max-containers", str(cfg.max_agent_event_bytes)),
            *("--trim-every", str(heap.TRIM_EVERY)),
        ]
        if self.placement is not None:
            args += ["--cpus", ",".join(map(str, sorted(self.placement.workers)))]
        # Not the node's own settings: agents are users' code, and those may hold the
        # token secret, the Redis and event store passwords (COORDINATOR_*).
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        # The agent is imported as the node would import it.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        if cfg.agent_memory_limit:
            # glibc reserves 64 MB of address space per thread arena otherwise.
            env.setdefault("MALLOC_ARENA_MAX", "2")
        return args, env

    async def _spawn(self, worker: AgentWorker) -> None:
        args, env = self._spawn_args()
        await worker.spawn(args, env, self._config.start_timeout)

    async def start(self) -> None:
        """Start every worker; ConfigError if the agent class does not load."""
        if self.placement is not None:
            try:
                self._unpinned = cpus.pin_thread(self.placement.node)
            except OSError as exc:  # the CPUs it may use changed since the plan
                raise ConfigError(f"agent_cpus: {self.placement.describe()}: {exc}") from None
            log.info("%s", self.placement.describe())
        self.workers = [self._worker(slot) for slot in range(self._size)]
        results = await asyncio.gather(
            *(self._spawn(w) for w in self.workers), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.aclose()
            raise failures[0]
        self.speculative = self.workers[0].speculative
        self.tasks.spawn(self._watch(), "agent-watchdog")
        log.info("%d agent worker processes running %s", self._size, self._config.agent)

    @property
    def _size(self) -> int:
        return self._config.agent_workers

    async def aclose(self) -> None:
        """Stop the watchdog and every worker (each closes the instances it still holds)."""
        self.closed = True
        self._notify()
        workers = (*self.workers, *self.probationers)  # retiring ones leave the set
        await self.tasks.aclose()
        await asyncio.gather(*(w.stop(STOP_WITHIN) for w in workers), return_exceptions=True)
        self._unpin()

    async def halt(self) -> None:
        """Kill every worker at once, as a kill -9 of the node would (on EOF)."""
        self.closed = True
        for worker in (*self.workers, *self.probationers):
            worker.kill()
        await self.tasks.aclose()
        self._unpin()

    def _unpin(self) -> None:
        """The event loop's thread back on the CPUs it had before ``start``."""
        if self._unpinned is not None:
            cpus.pin_thread(self._unpinned)
            self._unpinned = None

    def _answering(self) -> int:
        """Workers up whose loop answered its last heartbeat, or has had a fifth of the
        stall timeout to (the watchdog's period); before, a worker held by a blocking
        agent was counted until it was killed."""
        now = time.monotonic()  # the event loop's clock (ping_sent), read from any thread
        patience = self._config.agent_stall_timeout / 5
        return sum(
            w.usable and (w.ping_sent is None or now - w.ping_sent <= patience)
            for w in self.workers
        )

    # -- instances -------------------------------------------------------------------
    def new_agent(self, context: AgentContext) -> RemoteAgent:
        """The node's agent factory: an instance of ``config.agent`` in a worker."""
        return RemoteAgent(self, context)

    def next_lid(self) -> int:
        self._next_lid += 1
        return self._next_lid

    async def place(self) -> AgentWorker:
        """The usable worker holding the fewest instances. Waits for one to come up;
        AgentFailed after ``start_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.start_timeout
        while not self.closed:
            usable = [w for w in self.workers if w.usable]
            if usable:
                return min(usable, key=lambda w: len(w.loops))
            now = loop.time()
            if now >= deadline:
                raise AgentFailed(f"no agent worker ready within {self._config.start_timeout}s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - now):
                    await asyncio.shield(self._changed)
        raise AgentFailed("the node's agent workers are stopped")

    @contextlib.asynccontextmanager
    async def probation(self, ward: Ward) -> AsyncIterator[AgentWorker]:
        """``ward``'s probation worker process: started by the first suspect to enter
        (again by the next, once it failed), stopped once the last has left. AgentFailed
        once the pool is stopped, or when none started within ``start_timeout``."""
        async with ward.lock:
            worker = ward.worker
            if worker is None or worker.failed:
                if ward.unstartable is not None:  # its others need not wait as long again
                    raise ward.unstartable
                await self._probation_slots.acquire()
                try:
                    worker = await self._probationer()
                except BaseException as exc:
                    self._probation_slots.release()
                    if isinstance(exc, AgentFailed):
                        ward.unstartable = exc
                    raise
                ward.worker = worker
            ward.users[worker] = ward.users.get(worker, 0) + 1
        try:
            yield worker
        finally:
            ward.users[worker] -= 1
            if not ward.users[worker]:  # not waited for: its instances are dropped
                del ward.users[worker]
                if ward.worker is worker:
                    ward.worker = None
                self.tasks.spawn(self._retire(worker), "probation-worker")

    async def _probationer(self) -> AgentWorker:
        """A started probation worker; one that does not start is tried again after a
        backoff (not the suspect's fault), for ``start_timeout`` at most (AgentFailed)."""
        backoff = Backoff(base=0.5, cap=10.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.start_timeout
        while not self.closed:
            worker = self._worker(-1)
            self.probationers.add(worker)
            try:
                await self._spawn(worker)
                return worker
            except BaseException as exc:
                worker.kill()
                worker.close_channel()
                self.probationers.discard(worker)
                if not isinstance(exc, AgentFailed | ConfigError | OSError):
                    raise
                delay = backoff.next()
                if loop.time() + delay >= deadline:
                    raise AgentFailed(
                        f"no probation worker started within {self._config.start_timeout}s ({exc})"
                    ) from None
                log.error("a probation worker did not start (%s); again in %.1fs", exc, delay)
            await asyncio.sleep(delay)
        raise AgentFailed("the node's agent workers are stopped")

    async def _retire(self, worker: AgentWorker) -> None:
        """Stop probation worker ``worker`` (what it still holds closed with it)."""
        worker.failed = worker.failed or "retired"  # its end is not a failure to handle
        try:
            await worker.stop(STOP_WITHIN)
        except BaseException:  # cancelled (the pool closing): not left running
            worker.kill()
            raise
        finally:
            self.probationers.discard(worker)
            self._probation_slots.release()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    # -- failures --------------------------------------------------------------------
    def _on_lost(self, worker: AgentWorker) -> None:
        self.lost(worker, DIED)

    def lost(self, worker: AgentWorker, reason: str, culprit: int = 0) -> None:
        """``worker`` failed (``culprit``: the instance known to be why, 0 if unknown):
        it is killed and replaced; each instance it held starts again elsewhere."""
        if worker.failed or not worker.ready:
            return  # already handled, or a start that failed (its spawn raises)
        worker.failed = reason
        worker.kill()
        if reason == STALLED and not self.closed:
            self.stalls += 1
        if worker in self.probationers:
            log.error(
                "agent probation worker (pid %d, %d suspect(s) running, %d held in all) %s",
                worker.pid,
                sum(agent.in_flight for agent in worker.loops.values()),
                worker.hosted,
                reason,
            )
        elif not self.closed:
            backoff = self._slot_backoff.setdefault(worker.slot, Backoff(base=0.5, cap=30.0))
            # Failed young and running nothing of an agent's (an action that killed it
            # is counted as a poison's strike instead): the process itself fails.
            young = asyncio.get_running_loop().time() - worker.up_since < STEADY_AFTER and not any(
                agent.in_flight for agent in worker.loops.values()
            )
            if not young:
                backoff.reset()
            delay = backoff.next() if young else 0.0
            log.error(
                "agent worker %d (pid %d, %d loops) %s; replacing it%s",
                worker.slot,
                worker.pid,
                len(worker.loops),
                reason,
                f" in {delay:.1f}s (it failed within {STEADY_AFTER:g}s of its start)"
                if delay
                else "",
            )
            successor = self._worker(worker.slot)
            self.workers[worker.slot] = successor
            self.tasks.spawn(self._replace(successor, delay), f"agent-worker:{worker.slot}")
        judged = self._judge(worker, culprit)
        for lid, agent in list(worker.loops.items()):
            ward, blamed = judged.get(lid, (None, False))
            agent.worker_lost(worker, WorkerLost(reason, worker, ward, blamed))
        worker.loops.clear()
        worker.close_channel()
        self._notify()

    def _judge(self, worker: AgentWorker, culprit: int) -> dict[int, tuple[Ward, bool]]:
        """The suspects among the instances failed ``worker`` held: the ward each goes
        again in, and whether the failure counts against its action.

        A pool worker: a culprit named (a stall's task, a request out of memory) alone,
        counted, the others only shared the worker; none named, every one running there
        together, each counted (the one to blame is among them). A probation worker
        (whose instances are all suspects already): a failure counts only against the
        one instance that process ever held; where it held others, what one of them left
        behind (a thread holding the interpreter's lock, its memory) may be why, even of
        a stall that named a task: those running there go again uncounted, a culprit
        named apart from the rest, none named in two halves, until one runs alone."""
        running = [lid for lid, agent in worker.loops.items() if agent.in_flight]
        if worker not in self.probationers:
            together = Ward()
            return {lid: (together, True) for lid in ([culprit] if culprit else running)}
        counted = worker.hosted == 1
        if culprit:
            groups = [[culprit], [lid for lid in running if lid != culprit]]
        else:
            half = len(running) // 2
            groups = [running[:half], running[half:]]
        judged: dict[int, tuple[Ward, bool]] = {}
        for group in groups:
            ward = Ward()
            judged.update((lid, (ward, counted)) for lid in group)
        return judged

    async def _replace(self, worker: AgentWorker, delay: float) -> None:
        await asyncio.sleep(delay)
        backoff = Backoff(base=0.5, cap=10.0)
        while True:
            try:
                await self._spawn(worker)
            except (AgentFailed, ConfigError, OSError) as exc:
                delay = backoff.next()
                log.error(
                    "agent worker %d did not start (%s); again in %.1fs", worker.slot, exc, delay
                )
                worker.kill()
                worker.close_channel()
                await asyncio.sleep(delay)
                fresh = self._worker(worker.slot)
                self.workers[worker.slot] = worker = fresh
                continue
            self.restarts += 1
            self._notify()
            return

    async def _watch(self) -> None:
        """PING quiet workers; one that leaves a PING unanswered too long is stuck."""
        stall = self._config.agent_stall_timeout
        every = max(0.05, stall / 5)
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            lag, last = now - last - every, now
            for worker in (*self.workers, *self.probationers):
                if not worker.usable:
                    continue
                if worker.ping_sent is None:
                    if now - worker.last_pong >= every:
                        worker.ping(now)
                elif lag > every:
                    worker.ping_sent += lag  # this loop was late, not the worker's
                elif now - worker.ping_sent > stall:
                    self.lost(worker, STALLED, culprit=worker.blocked_lid)
