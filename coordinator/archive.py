"""The event store behind the Redis log: one store per cluster, fed by the owners.

Every node of a cluster must read and write the same store (a conversation moves
between nodes; its history must not stay behind on one machine). Each node records the
identity of its store in Redis when it starts; the first one recorded is the cluster's,
and a node whose store is another refuses to start (``check_cluster_store``).

``Archiver``: the owner of a conversation moves its events from the Redis log to the
store, off the action's acknowledgement path (a background task of the node, woken when
its loops see events). Invariants:

- **In order, nothing skipped.** A batch is the oldest events the store lacks, as Redis
  records it (``stored`` in the conversation's record); the store refuses a batch that
  would leave a gap. Ids Redis never logged (lost in a failover, ``scripts.REWIND``) are
  stored as a notice saying so, so the store's ids stay contiguous.
- **Fenced and idempotent.** A batch is written with the owner's epoch: once a successor
  wrote, a replaced owner's late batch changes nothing (before that, it writes what the
  successor would: ids name events, assigned by the one Redis log). A batch sent again (a lost
  reply, an owner killed between the write and its record in Redis) writes nothing twice.
- **Nothing trimmed before it is stored.** Only once the store holds an event may Redis
  trim it (``scripts.MARK_STORED``): the log keeps its newest events, within
  ``log_window_events`` and ``log_window_bytes``. While the store is unreachable the
  events wait in Redis, actions are refused once they fill the window
  (``scripts.ACCEPT``: ``behind``), and the mover retries with backoff.
- **A store that lost writes is filled again.** One holding a conversation only up to an
  id below what it acknowledged (a failover to a replica that lagged, a restore from an
  older backup) is recorded as holding that much (``scripts.REWIND_STORED``), said at
  ERROR, and what follows is stored again from the log, where the log still holds it,
  and as lost where the log trimmed it already; the conversation is not held back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar, cast

from redis.exceptions import RedisClusterException, RedisError

from . import codec
from .backoff import Backoff
from .config import ManagerConfig
from .eventstore import AppendResult, Batch, EventStore, StoreError, StoreMismatch
from .state import Lease, RedisState
from .storeaudit import StoreAudit
from .tasks import TaskSet

if TYPE_CHECKING:
    from .runner import LoopRunner

log = logging.getLogger(__name__)
T = TypeVar("T")

# A batch: at most this many events and about this many bytes (at least one event).
# Its read shares the script lane with every action's accept and commit, which wait
# behind it while it transfers; a quarter of a MiB made four syncs of what one did, and
# a writer of 60 KB actions outran the mover (test_guards.py: "the event store is behind").
BATCH_EVENTS = 500
BATCH_BYTES = 1 << 20
# Seconds one append may take: a store that hangs (a stalled disk or network) is an
# unreachable one, retried later, not a mover stuck for good.
APPEND_TIMEOUT = 30.0
# Seconds the mover lets events gather once woken: a batch per action would cost every
# action two more Redis calls and a store write (a sync) on the node's event loop; on
# the shared test machine that doubled the ack's p50 (measured in-process then; see
# bench/store.py for the round trip with the mover on and idle).
GATHER_FOR = 0.05
SWEEP_BATCH = 100  # conversations one sweep looks at (``Archiver.sweep``)


async def check_cluster_store(
    state: RedisState, store: EventStore, config: ManagerConfig, shown: str
) -> None:
    """Record ``store`` (shown as ``shown``) as the cluster's, or raise StoreMismatch
    when the cluster already uses another one."""
    identity = store.identity()
    recorded, where, node = await state.claim_store(identity, shown, config.node_id)
    if recorded != identity:
        raise store_mismatch(state, config, shown, identity, (recorded, where, node))


def store_mismatch(
    state: RedisState,
    config: ManagerConfig,
    shown: str,
    identity: str,
    recorded: tuple[str, str, str],
) -> StoreMismatch:
    """A node's event store ``shown`` (``identity``) is not the one the cluster recorded
    (``state.recorded_store``): what to do about it."""
    recorded_identity, where, node = recorded
    return StoreMismatch(
        f"this node's event store {shown} (identity {identity}) is not the cluster's: "
        f"the nodes sharing this Redis (key prefix {config.key_prefix!r}) use {where} "
        f"(identity {recorded_identity}, first recorded by node {node}). Every node of a cluster "
        "must read and write one store, or conversations lose their history when they "
        f"move between nodes. Fix: start this node with --event-store {where} (the same "
        "directory, on a volume every node mounts, or the same PostgreSQL database; "
        "nodes on several machines need postgresql://...); or, for a separate cluster, "
        "another --key-prefix or Redis and a store of its own (two clusters sharing a "
        "store would see each other's conversations). If the cluster really moved to a "
        "new store, "
        f"delete the Redis key {state.keys.event_store()} once every node uses it."
    )


class Archiver:
    """Moves the events of the conversations this node owns (``runners``: the node's
    table of loops, read only) to ``store`` (see the module docstring)."""

    def __init__(
        self,
        *,
        state: RedisState,
        store: EventStore,
        config: ManagerConfig,
        runners: Mapping[str, LoopRunner],
        where: str,
        tasks: TaskSet,
    ) -> None:
        self._state = state
        # A store found holding less than it acknowledged: said, and every conversation
        # checked (``storeaudit.py``).
        self.audit = StoreAudit(
            state=state,
            store=store,
            node=config.node_id,
            where=where,
            tasks=tasks,
            owned=lambda sid: (runner := runners.get(sid)) is not None and runner.running,
            wake=self.logged,
        )
        self._store = store
        self._config = config
        self._runners = runners
        self._where = where
        self._pending: set[str] = set()  # logged events not moved yet
        self._notes: set[str] = set()  # a fresh loop's state notes: moved later
        self._spoken: set[str] = set()  # loops here that logged more than notes
        self._moving: set[str] = set()  # being moved now
        # Failing to move, each tried again after its own backoff (one timer at a time):
        # one the store refuses for good (or slowly) holds back no other conversation.
        self._failing: dict[str, Backoff] = {}
        self._retrying: set[str] = set()
        self._wake = asyncio.Event()
        self.trouble = ""  # why the last attempt failed ('' once one works again)
        self.append_timeout = APPEND_TIMEOUT

    @property
    def idle(self) -> bool:
        """Nothing logged here waits to be moved, and nothing is being moved."""
        return not (self._pending or self._moving or self._failing or self._wake.is_set())

    def logged(self, sid: str, *, note: bool = False) -> None:
        """Events of ``sid`` (owned here) were logged: move them soon. But while a loop
        has logged nothing but its agent's state ``note``s (a start's), they wait for its
        first other event or its stop (``flush``): a store write (for a new conversation
        a new file and its syncs) in every join and every restart after a failover would
        double what a reconnect storm costs, for a note. One that Redis loses meanwhile
        is told as lost, as any event the store lacked."""
        if note and sid not in self._spoken:
            if sid not in self._pending:
                self._notes.add(sid)
            return
        self._spoken.add(sid)
        self._notes.discard(sid)
        if sid in self._failing:
            return  # moved at its retry, not at each event: a store that is down is not
            # asked at the rate actions come
        self._pending.add(sid)
        self._wake.set()

    async def run(self) -> None:
        """The node's background task: move what ``logged`` named, retrying each
        conversation that failed after its own backoff (its events wait in Redis)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            await asyncio.sleep(GATHER_FOR)
            self._wake.clear()
            pending, self._pending = self._pending, set()
            leases = self._running(pending)
            self._moving = {lease.sid for lease in leases}
            try:
                done = await self.move_all(leases)
            finally:
                self._moving = set()
            for lease, moved in zip(leases, done, strict=True):
                sid = lease.sid
                if not self._went(sid, moved) and sid not in self._retrying:
                    backoff = self._failing.setdefault(sid, Backoff(base=0.1, cap=5.0))
                    self._retrying.add(sid)
                    loop.call_later(backoff.next(), self._again, sid)

    def _again(self, sid: str) -> None:
        self._retrying.discard(sid)
        if sid in self._failing:  # not forgotten meanwhile
            self._pending.add(sid)
            self._wake.set()

    def _running(self, sids: Iterable[str]) -> list[Lease]:
        """The leases of those of ``sids`` whose loop runs here. (A function of its own:
        a comprehension's walrus bound ``runner`` in ``run``, which then kept the last
        stopped runner, its agent and its memory alive until the next move.)"""
        leases = []
        for sid in sids:
            runner = self._runners.get(sid)
            if runner is not None and runner.running:
                leases.append(runner.lease)
        return leases

    async def flush(self, lease: Lease, within: float) -> bool:
        """Move what the store lacks of the events this loop saw before it stops (so a
        stopped conversation's window holds nothing unstored); False when it could not
        in ``within`` seconds (its next owner moves the rest)."""
        sid = lease.sid
        waiting = (self._pending, self._moving, self._notes, self._failing)
        if not any(sid in them for them in waiting):
            return True  # nothing to move: no Redis call (idle sweeps close many loops)
        try:
            async with asyncio.timeout(within):
                (moved,) = await self.move_all([lease])
        except TimeoutError:
            log.warning("moving %s's events to the event store timed out", sid)
            return False
        if ok := self._went(sid, moved):
            self._pending.discard(sid)
            self._notes.discard(sid)
        return ok

    def _went(self, sid: str, moved: int | Exception) -> bool:
        """Whether a move of ``sid`` went through; a failure is logged once until one
        works again (the events wait in Redis meanwhile)."""
        if isinstance(moved, RedisError | RedisClusterException):
            return False  # Redis' trouble, not the store's (/healthz says it apart)
        if isinstance(moved, Exception):
            if not self.trouble:
                # An unavailable store's error names it already (its URL is long).
                where = "" if self._where in str(moved) else f"event store {self._where}: "
                log.error("%scannot store %s's events (%s); retrying", where, sid, moved)
            self.trouble = f"cannot store events: {moved}"
            return False
        self._failing.pop(sid, None)
        if self.trouble and not self._failing:  # once none fails, not at each that works
            log.warning("event store %s: storing events again", self._where)
            self.trouble = ""
        return True

    async def move(self, lease: Lease) -> int:
        """Move ``lease.sid``'s events the store lacks until it holds all of them or a
        successor fenced this owner; returns the last id stored."""
        (moved,) = await self.move_all([lease])
        if isinstance(moved, Exception):
            raise moved
        return moved

    async def move_all(self, leases: Sequence[Lease]) -> list[int | Exception]:
        """``move`` for each lease, all together: per round one pipelined read of what
        the store lacks, one store call for all of them, one pipelined mark that reads
        the next batch (each conversation a batch at a time: under a flood, what came
        meanwhile goes at once). For each lease, the last id stored or what failed."""
        cfg = self._config
        out: dict[str, int | Exception] = {}
        reads = await _each(
            self._state.unstored(lease.sid, BATCH_EVENTS, BATCH_BYTES) for lease in leases
        )
        todo = list(zip(leases, reads, strict=True))
        rewound: set[str] = set()  # found holding less than it acknowledged, this call
        while todo:
            batches: list[tuple[Lease, Batch]] = []
            for lease, read in todo:
                if isinstance(read, Exception):
                    out[lease.sid] = read
                    continue
                stored, rows = read
                if not rows:
                    out[lease.sid] = stored
                    continue
                if rows[0][0] > stored + 1:
                    rows = lost_ids(stored + 1, rows[0][0] - 1)
                else:  # up to ids Redis lost, if any: the next batch stores them as a notice
                    rows = rows[: next_gap(rows)]
                batch = Batch(lease.sid, lease.epoch, tuple(rows), lease.user)
                batches.append((lease, batch))
            marks: list[tuple[Lease, int]] = []
            gaps: list[tuple[Lease, int, int]] = []
            for (lease, batch), r in zip(batches, await self._append(batches), strict=True):
                if isinstance(r, Exception):
                    out[lease.sid] = r
                elif r.status == "fenced":
                    log.info("%s: a newer owner (epoch %d) stores its events", lease.sid, r.epoch)
                    out[lease.sid] = r.last_id
                elif r.status == "gap":
                    gaps.append((lease, r.last_id, batch.events[0][0] - 1))
                else:
                    marks.append((lease, r.last_id))
            try:
                purging = await self._state.purging([lease.sid for lease, _, _ in gaps])
            except (RedisError, RedisClusterException) as exc:  # tried again, as any such move
                out.update((lease.sid, exc) for lease, _, _ in gaps)
                gaps = []
            rewinds: list[tuple[Lease, int, int]] = []
            for lease, held, recorded in gaps:
                if lease.sid in purging:  # its store emptied first: nothing to store
                    log.debug("%s: not stored, it is being purged", lease.sid)
                    out[lease.sid] = recorded
                elif lease.sid in rewound:  # lost again at once: not a lag, a store in trouble
                    out[lease.sid] = StoreError(
                        f"the store holds {lease.sid!r} up to event {held} but acknowledged "
                        f"up to {recorded}, twice in a row"
                    )
                else:
                    rewound.add(lease.sid)
                    rewinds.append((lease, held, recorded))
            reads = await _each(
                self._state.mark_stored(
                    lease.sid,
                    last_id,
                    cfg.log_window_events,
                    cfg.log_window_bytes,
                    BATCH_EVENTS,
                    BATCH_BYTES,
                )
                for lease, last_id in marks
            )
            todo = [(lease, read) for (lease, _), read in zip(marks, reads, strict=True)]
            reads = await _each(
                self._state.rewind_stored(lease.sid, held, recorded, BATCH_EVENTS, BATCH_BYTES)
                for lease, held, recorded in rewinds
            )
            for (lease, held, recorded), read in zip(rewinds, reads, strict=True):
                if not isinstance(read, Exception) and read[0] == held:  # rewound
                    self.audit.lost(lease.sid, held, recorded)
                todo.append((lease, read))
        return [out[lease.sid] for lease in leases]

    async def _append(self, batches: list[tuple[Lease, Batch]]) -> list[AppendResult | Exception]:
        if not batches:
            return []
        try:
            async with asyncio.timeout(self.append_timeout):
                return await self._store.append_many([batch for _, batch in batches])
        except TimeoutError:
            failed: Exception = StoreError(f"an append took over {self.append_timeout:g}s")
        except Exception as exc:  # the store as a whole (closed, unreachable)
            failed = exc
        return [failed] * len(batches)

    async def sweep(self) -> None:
        """Move the events the store lacks of conversations left without an owner (their
        loop stopped while the store was unreachable, or their node died: noted in Redis,
        ``note_unstored``), then let them leave Redis after the retention, as their
        owner would have. A conversation a loop runs for is its owner's to move (this
        node's: woken here). Any node sweeps; two at once store nothing twice (a batch is
        idempotent, and fenced by the last owner's epoch: a new owner's batches win)."""
        await self.audit.watch()
        sids = await self._state.unstored_noted(SWEEP_BATCH)
        if not sids:
            return
        gone: list[str] = []
        done: list[tuple[str, dict[str, str]]] = []  # the store holds all of them
        orphans: list[tuple[Lease, dict[str, str]]] = []
        for sid, meta in zip(sids, await self._state.records(sids), strict=True):
            if not meta:
                gone.append(sid)
            elif int(meta.get("stored") or 0) >= int(meta.get("seq") or 0):
                done.append((sid, meta))
            elif meta.get("inc"):
                if (runner := self._runners.get(sid)) is not None and runner.running:
                    # Its loop runs here: moved by this node's mover from now on, and
                    # noted again should it stop before the store has it all. (Another
                    # node's entry stays for that node's sweep: its loop may be stopping,
                    # about to leave the conversation unowned.)
                    self.logged(sid)
                    gone.append(sid)
            else:
                lease = Lease(sid, meta.get("user", ""), "", int(meta.get("epoch") or 0))
                orphans.append((lease, meta))
        moved = await self.move_all([lease for lease, _ in orphans])
        done += [
            (lease.sid, meta)
            for (lease, meta), result in zip(orphans, moved, strict=True)
            if self._went(lease.sid, result)  # else tried again next sweep
        ]
        retention_ms = self._config.retention_ms
        retired = await _each(
            self._state.retire(
                sid, meta.get("user", ""), meta.get("state") or "stopped", retention_ms
            )
            for sid, meta in done
        )
        gone += [sid for (sid, _), r in zip(done, retired, strict=True) if r is None]
        await self._state.settle_unstored(gone)

    def forget(self, sid: str) -> None:
        """The loop of ``sid`` stopped here."""
        self._pending.discard(sid)
        if self._failing.pop(sid, None) is not None and not self._failing:
            self.trouble = ""  # what failed is another node's to move now
        self._notes.discard(sid)
        self._spoken.discard(sid)


def next_gap(rows: list[tuple[int, bytes]]) -> int:
    """The index of the first row whose id does not follow the one before (or the count)."""
    for i in range(1, len(rows)):
        if rows[i][0] != rows[i - 1][0] + 1:
            return i
    return len(rows)


def lost_ids(first: int, last: int) -> list[tuple[int, bytes]]:
    """What the store keeps for ids lost (Redis never logged them, or the store lost them
    after the log trimmed them; at most a batch of them): the notice, then a null
    observation for each other id (a replay shows the loss once)."""
    notice = codec.pack(codec.events_lost_event(first, last))
    nothing = codec.pack(codec.null_observation())
    last = min(last, first + BATCH_EVENTS - 1)
    return [(first, notice)] + [(i, nothing) for i in range(first + 1, last + 1)]


async def _each(calls: Iterable[Awaitable[T]]) -> list[T | Exception]:
    """Await ``calls`` together (over the lane: one write for all): each one's result or
    what it raised."""
    done = await asyncio.gather(*calls, return_exceptions=True)
    for r in done:
        if isinstance(r, BaseException) and not isinstance(r, Exception):
            raise r  # cancelled
    return cast("list[T | Exception]", done)
