"""One chaos scenario from start to verdict.

``async with Scenario(name, workdir) as s``: starts the cluster, connects the clients,
starts the observer and the load, and warms up. The test then calls ``fault(victim)``
right before injecting its fault, waits for recovery, lets the load run on, and calls
``finish()``: stop the load, let every client catch up, check the invariants, measure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from redis.exceptions import RedisError

from coordinator.codec import NODE_DRAINING, NODE_LOST, TOO_MANY_CONVERSATIONS, notice_code
from tests.chaos.checks import (
    SESSION_RESULTS,
    Logged,
    ScenarioResult,
    Verdict,
    check,
    first_reply_after,
    read_log,
    read_logs,
    record,
    unanswered,
)
from tests.chaos.cluster import ChaosCluster, now
from tests.chaos.observer import Observer
from tests.chaos.workload import USERS, Session, Workload
from tests.helpers import wait_until

WARMUP = 2.0  # seconds of load before the fault
WARM_REPLIES = 3  # echoes every steady conversation has before the fault
RECOVERY_WITHIN = 30.0
SETTLE_WITHIN = 20.0


async def holds(predicate: Callable[[], Awaitable[bool]], within: float, what: str) -> bool:
    """``wait_until`` that answers False at the deadline instead of raising. The check's
    own Redis reads may meet a connection Redis closed when it restarted: not yet."""

    async def check() -> bool:
        try:
            return await predicate()
        except RedisError:
            return False

    try:
        await wait_until(check, timeout=within, interval=0.1, what=what)
    except AssertionError:
        return False
    return True


class Scenario:
    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.cluster = ChaosCluster(workdir)
        self.workload = Workload(self.cluster)
        self.observer = Observer(self.cluster, self.workload.user_of)
        self.fault_at = 0.0
        self.victim: int | None = None
        self.victim_inc = ""
        self.owned: list[str] = []  # the victim's conversations at the fault
        self.details: dict[str, Any] = {}

    async def __aenter__(self) -> Scenario:
        try:
            await self.cluster.start(USERS)
            await self.workload.connect()
            self.observer.start()
            self.workload.start()
            await asyncio.sleep(WARMUP)  # load runs for this long
            await wait_until(
                self._warm, timeout=RECOVERY_WITHIN, interval=0.1, what="echoes in every conv"
            )
        except BaseException:
            await self._close(failed=True)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close(failed=exc is not None)

    async def _close(self, failed: bool) -> None:
        try:
            await self.workload.aclose()
            await self.observer.aclose()
        finally:
            if failed:
                print(f"----- {self.name}: node logs -----\n{self.cluster.log_tails()}")
            await self.cluster.aclose()

    async def _warm(self) -> bool:
        for sid in self.workload.steady_sids:
            log_ = await read_log(self.cluster.direct, self.cluster.keys, sid)
            if sum(e.source == "agent" for e in log_) < WARM_REPLIES:
                return False
        return True

    # -- the fault -------------------------------------------------------------------
    async def fault(self, victim: int | None) -> float:
        """Mark the fault's instant (call right before injecting it); returns it."""
        self.victim = victim
        if victim is not None:
            self.victim_inc = await self.cluster.incarnation(victim)
            await wait_until(
                lambda: self.observer.owners and self.observer.owners[-1].at > now() - 0.2,
                timeout=5,
                what="a fresh ownership sample",
            )
            self.owned = self.observer.owned_by(self.victim_inc, now())
            busy = [sid for sid in self.workload.steady_sids if sid in self.owned]
            assert busy, f"node {victim} owns none of the busy conversations: {self.owned}"
        self.fault_at = now()
        return self.fault_at

    @property
    def affected(self) -> list[str]:
        """Steady conversations the fault hit: the victim's, or all without a victim."""
        if self.victim is None:
            return self.workload.steady_sids
        return [sid for sid in self.workload.steady_sids if sid in self.owned]

    async def served(self, since: float | None = None) -> bool:
        """Whether every affected conversation answered an action since the fault (or
        ``since``; not yet, when Redis does not answer this check: it may have just
        restarted)."""
        for sid in self.affected:
            try:
                recent = await read_log(self.cluster.direct, self.cluster.keys, sid, last=20)
            except RedisError:
                return False
            if first_reply_after(recent, self.fault_at if since is None else since) is None:
                return False
        return True

    async def wait_served(
        self, within: float = RECOVERY_WITHIN, since: float | None = None
    ) -> None:
        await wait_until(
            lambda: self.served(since),
            timeout=within,
            interval=0.1,
            what="every affected conversation answers",
        )

    def elapsed(self) -> float:
        return now() - self.fault_at

    async def wait_for(
        self, predicate: Callable[[], Awaitable[bool] | bool], within: float, what: str
    ) -> float:
        """Wait for a recovery condition; returns the seconds since the fault."""
        await wait_until(predicate, timeout=within, interval=0.05, what=what)
        return now() - self.fault_at

    # -- the verdict -----------------------------------------------------------------
    async def finish(self, *, detect_s: float | None = None) -> ScenarioResult:
        """Stop the load, let everyone catch up, check every invariant, measure."""
        w, c = self.workload, self.cluster
        await w.stop()
        done = await holds(self._all_answered, SETTLE_WITHIN, "every logged action answered")
        self.details["settled"] = done
        await holds(self._caught_up, SETTLE_WITHIN, "every client caught up")
        await self.observer.aclose()
        # The verdict first: a fresh reader's join may restart a conversation and so
        # answer an action that was stuck.
        logs = await read_logs(c.direct, c.keys, w.sids)
        verdict = check(logs, w, self.observer)
        stuck = [sid for sid in w.sids if unanswered({sid: logs[sid]})]
        verdict.other += [await self._left_as(sid) for sid in stuck]
        verdict.gaps += await self._replay_check(logs)
        return self._result(logs, verdict, detect_s)

    async def _left_as(self, sid: str) -> str:
        """What Redis holds of a conversation left with an unanswered action (to tell
        which step of a restart it never got past)."""
        r, k, user = self.cluster.direct, self.cluster.keys, self.workload.user_of[sid]
        meta = {key.decode(): v.decode() for key, v in (await r.hgetall(k.conv(sid))).items()}
        shown = {f: meta.get(f) for f in ("owner", "inc", "epoch", "state", "seq", "applied")}
        slots = await r.hgetall(k.user_loops(user))
        claims = await r.zrange(k.user_claims(user), 0, -1)
        live = await r.hgetall(k.registry())
        return (
            f"{sid} left as {shown}, inbox {await r.xlen(k.inbox(sid))}, "
            f"{user}'s slots {slots}, claims {claims}, nodes {live}"
        )

    async def _all_answered(self) -> bool:
        logs = await read_logs(self.cluster.direct, self.cluster.keys, self.workload.sids)
        return not unanswered(logs)

    async def _caught_up(self) -> bool:
        ends = {}
        for sid in self.workload.sids:
            ends[sid] = int(await self.cluster.direct.xlen(self.cluster.keys.events(sid)))
        # Connected or not: a rotating client's conversation evicted over its user's cap
        # disconnects it (as the seed does) once it has had the notice, its last event.
        return all(cl.last_id >= ends[cl.sid] for cl in self.workload.clients)

    async def _replay_check(self, logs: dict[str, list[Logged]]) -> list[str]:
        """A fresh client per conversation replays it from latest_event_id=0."""
        c = self.cluster
        problems = []
        live = [i for i in range(c.size) if c.usable(i)]
        for n, sid in enumerate(self.workload.sids):
            logged = logs[sid]
            reader = Session(f"replay-{sid}")
            node = live[n % len(live)]
            want_n = len(logged)
            try:
                await reader.connect(c.url(node), sid, c.tokens[self.workload.user_of[sid]], 0)
                await reader.wait_for(_has(reader, want_n), f"{want_n} events")
                got = [(e["id"], e.get("source"), _content(e)) for e in reader.events]
                want = [(e.id, e.source, e.content) for e in logged]
                if got[: len(want)] != want:
                    problems.append(f"replay of {sid} from node {node} differs from the log")
            except AssertionError as exc:
                problems.append(f"replay of {sid} from node {node}: {exc}")
            finally:
                await reader.close()
        return problems

    def _result(
        self, logs: dict[str, list[Logged]], verdict: Verdict, detect_s: float | None
    ) -> ScenarioResult:
        w, t0 = self.workload, self.fault_at
        problems = verdict.problems()
        if detect_s is None and self.owned:
            released = [self.observer.released_at(sid, self.victim_inc, t0) for sid in self.owned]
            if None in released:
                problems.append(f"not all of {self.owned} were released by {self.victim_inc}")
            else:
                detect_s = max(r for r in released if r is not None) - t0
        firsts = {sid: first_reply_after(logs[sid], t0) for sid in self.affected}
        served_s = None
        if None in firsts.values():
            problems.append(f"no answer since the fault in {firsts}")
        else:
            served_s = max(t for t in firsts.values() if t is not None) - t0
        statuses = {
            status: sum(notice_code(e.event) == status for log_ in logs.values() for e in log_)
            for status in (NODE_LOST, NODE_DRAINING, TOO_MANY_CONVERSATIONS)
        }
        acked = [a for cl in w.clients for a in cl.acked]
        self.details.update(
            victim_owned=self.owned,
            served_per_conversation={
                sid: None if t is None else round(t - t0, 3) for sid, t in firsts.items()
            },
            reconnects=sum(len(cl.reconnects) for cl in w.clients),
            unacked=sum(len(cl.unacked) for cl in w.clients),
            acks_after_fault=sum(a.at > t0 for a in acked),
            observer_rounds=len(self.observer.rounds),
            status_events=statuses,
        )
        result = ScenarioResult(
            scenario=self.name,
            passed=not problems,
            detect_s=None if detect_s is None else round(detect_s, 3),
            served_again_s=None if served_s is None else round(served_s, 3),
            actions_acked=len(acked),
            actions_lost=len(verdict.lost),
            duplicates=len(verdict.duplicates),
            affected=self.affected,
            details=self.details,
            problems=problems,
        )
        record(result)
        SESSION_RESULTS.append(result)
        print(result.row())
        return result


def _has(session: Session, n: int) -> Callable[[], bool]:
    return lambda: len(session.events) >= n


def _content(event: dict[str, Any]) -> str | None:
    args = event.get("args")
    return str(args.get("content")) if isinstance(args, dict) else None
