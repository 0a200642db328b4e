"""Running loops: the per-user cap, each incarnation's index of the loops it runs and
their idleness, and the bookkeeping of starting and stopping one.

A loop's records span three hash tags: the conversation (``{c:}``: owner and epoch), its
user (``{u:}``: the cap slot) and its node (``{n:}``: the owned and idle indexes). No
script may touch two tags (Redis Cluster), so a start or stop is one call here that
sends its per-tag parts together, each part atomic and idempotent on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .conversations import ConversationOps
from .core import text
from .results import ADMIT, Admitted, Lease, OrgPlace, status


def org_holder(lease: Lease) -> str:
    """What an organisation's place records of the start holding it (user, incarnation,
    epoch: tabs, which no id may contain)."""
    return f"{lease.user}\t{lease.inc}\t{lease.epoch}"


def org_holder_user(holder: str) -> str:
    return holder.split("\t", 1)[0]


# A user's conversation index keeps the newest this many (what a listing reads): it stays
# bounded however many a user creates; the event store keeps them all.
USER_INDEX_MAX = 1000


class LoopOps(ConversationOps):
    # -- the cap ---------------------------------------------------------------------
    async def admit(
        self,
        user: str,
        sid: str,
        inc: str,
        cap: int,
        *,
        retry: bool,
        score_ms: int = 0,
        reject: bool = False,
        org: str = "",
        connections: int = 0,
    ) -> Admitted:
        """Claim one of ``user``'s ``cap`` slots for ``sid`` (see scripts.ADMIT);
        ``reject``: a full cap refuses a new claim instead of evicting; ``org``: record
        it as the user's organisation; ``connections``: the connection cap of the user
        whose joining connection asked for the start (0: none)."""
        k = self.keys
        r = await self._run(
            "admit",
            [k.user_claims(user), k.user_loops(user), k.user_org(user), k.user_conns(user)],
            [
                sid,
                inc,
                cap,
                "retry" if retry else "new",
                score_ms,
                "reject" if reject else "evict",
                org,
                connections,
            ],
            hot=True,
        )
        pairs = [text(x) for x in r[3:]]
        evicted = list(zip(pairs[0::2], pairs[1::2], strict=True))
        return Admitted(status(text(r[0]), ADMIT), evicted, int(r[1]), text(r[2]))

    async def org_admit(self, org: str, sid: str, holder: str, cap: int) -> OrgPlace:
        """Take one of ``org``'s ``cap`` places for ``sid`` (see scripts.ORG_ADMIT)."""
        r = await self._run("org_admit", [self.keys.org_loops(org)], [sid, holder, cap])
        pairs = [text(x) for x in r[2:]]
        return OrgPlace(bool(r[0]), int(r[1]), list(zip(pairs[0::2], pairs[1::2], strict=True)))

    async def org_prune(self, org: str, entries: Sequence[tuple[str, str]]) -> int:
        """Drop ``org``'s places (``(sid, holder)``) whose loop no longer holds a slot of
        its user (stopped, evicted, released by a reaper); the number dropped."""
        held = await asyncio.gather(
            *(self.redis.hexists(self.keys.user_loops(org_holder_user(h)), s) for s, h in entries)
        )
        stale = [
            part
            for (sid, h), slot in zip(entries, held, strict=True)
            if not slot
            for part in (sid, h)
        ]
        if not stale:
            return 0
        return int(await self._run("org_prune", [self.keys.org_loops(org)], stale))

    async def release_slot(self, user: str, sid: str, inc: str) -> bool:
        """Free ``sid``'s cap slot held by ``inc`` (or drop a claim that never ran)."""
        k = self.keys
        r = await self._run(
            "release_slot", [k.user_claims(user), k.user_loops(user)], [sid, inc], hot=True
        )
        return bool(r)

    async def user_loops(self, user: str) -> dict[str, str]:
        """sid -> ``live:INC`` / ``stopping:INC`` for the user's loops that may run."""
        raw = await self.redis.hgetall(self.keys.user_loops(user))
        return {text(k): text(v) for k, v in raw.items()}

    # -- starting and stopping -------------------------------------------------------
    async def record_start(self, lease: Lease, *, created: bool, idle_for: float) -> None:
        """A loop is starting under ``lease``: list it under its incarnation at once (if
        the node dies while starting, the reaper releases it with the rest) and in the
        idle index (closable ``idle_for`` s from now), and in its user's index (a
        conversation that retired left it: ``unlist``; one taken back during its
        retention, before the store lists it, is listed again)."""
        k = self.keys
        now_ms = int(time.time() * 1000)
        commands: list[tuple[Any, ...]] = [
            ("HSET", k.node_owned(lease.inc), lease.sid, lease.user),
            ("ZADD", k.node_idle(lease.inc), now_ms + int(idle_for * 1000), lease.sid),
        ]
        if lease.user:
            index = k.user_convs(lease.user)
            commands.append(("ZADD", index, "NX", now_ms, lease.sid))
            commands.append(("ZREMRANGEBYRANK", index, 0, -USER_INDEX_MAX - 1))
        await self._commands(commands)

    async def release_loop(self, lease: Lease, final_state: str, retention_ms: int = 0) -> None:
        """Stop being the owner: cap slot, ownership (recording ``final_state``, retiring
        the conversation after ``retention_ms``: ``release``) and the incarnation's
        indexes, sent together. Each part is idempotent and checks it still belongs to
        ``lease``, so a retry or a late call changes nothing of a successor's. A retiring
        conversation leaves its user's index too: the event store lists it (if it comes
        back meanwhile, the store still does), so nothing of it stays in Redis."""
        results = await asyncio.gather(
            self.release_slot(lease.user, lease.sid, lease.inc),
            self.release(lease.sid, lease.inc, lease.epoch, final_state, retention_ms),
            self.forget_loop(lease),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if results[1] == 2:
            await self.unlist([(lease.sid, lease.user)])

    async def retire(self, sid: str, user: str, state: str, retention_ms: int) -> None:
        """Let an unowned conversation the store holds all of leave Redis after
        ``retention_ms``, as a release by its owner would have (``release_loop``); nothing
        when a node took it meanwhile."""
        if await self.release(sid, "", None, state, retention_ms) == 2:
            await self.unlist([(sid, user)])

    async def forget_loop(self, lease: Lease) -> None:
        """Drop ``lease``'s loop from its incarnation's indexes only (after it was fenced:
        ownership and the slot are no longer ours to release)."""
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hdel(k.node_owned(lease.inc), lease.sid)
            pipe.zrem(k.node_idle(lease.inc), lease.sid)
            await pipe.execute()

    async def release_lost(self, sid: str, user: str, inc: str) -> bool:
        """Free what the dead incarnation ``inc`` held of ``sid``: ownership (True when it
        still held it) and the cap slot."""
        released = await self.release(sid, inc, None, "stopped")
        await self.release_slot(user, sid, inc)
        return released > 0

    # -- idleness --------------------------------------------------------------------
    async def flush_activity(
        self,
        inc: str,
        last_active_ms: Mapping[str, int],
        users: Mapping[str, str],
        closable_ms: Mapping[str, int],
    ) -> None:
        """Record when loops may close if idle on (sid -> ms: last active + their
        close_delay) in ``inc``'s idle index and, for recency of eviction, last-active
        times in the users' claims (``users``: sid -> user). One round trip."""
        if not last_active_ms:
            return
        k = self.keys
        by_user: dict[str, dict[str, int]] = {}
        for sid, ms in last_active_ms.items():
            by_user.setdefault(users[sid], {})[sid] = ms
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(k.node_idle(inc), dict(closable_ms))
            for user, scores in by_user.items():
                pipe.zadd(k.user_claims(user), scores, xx=True, gt=True)
            await pipe.execute()

    async def idle_since(self, inc: str, threshold_ms: int) -> list[str]:
        """``inc``'s loops closable (idle past their close_delay) at ``threshold_ms``
        (O(expired))."""
        raw = await self.redis.zrangebyscore(self.keys.node_idle(inc), "-inf", threshold_ms)
        return [text(s) for s in raw]

    async def connection_counts(self, sids: Sequence[str]) -> list[int]:
        """Connections on any node, per conversation (one round trip)."""
        if not sids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hlen(self.keys.conv_conns(sid))
            return [int(n) for n in await pipe.execute()]
