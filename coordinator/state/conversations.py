"""Conversation records, ownership, and reading the event log and the inbox."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from workers.protocol import Event

from .core import SizeHint, StateCore, entries, text
from .results import ATTACH, OWNERSHIP, AttachStatus, Ownership, status


def _seconds(value: object) -> float | None:
    raw = text(value)
    return float(raw) if raw else None


class ConversationOps(StateCore):
    # -- ownership -------------------------------------------------------------------
    async def acquire(
        self,
        sid: str,
        node: str,
        inc: str,
        user: str,
        *,
        create: bool,
        dead_inc: str = "",
        stored: tuple[int, int, int, int] = (0, 0, 0, 0),
        close_delay: float | None = None,
        max_running_time: float | None = None,
        latest: int | None = None,
    ) -> Ownership:
        """Take ownership of ``sid`` for ``inc`` (bumping the fencing epoch), creating the
        conversation for ``user`` when ``create`` (with the lifetimes given, if any);
        ``dead_inc`` may be replaced. ``stored``: the event store's ``(last id, fence
        epoch, bytes, created ms)`` of the conversation being created (its ids and epochs
        go on above them; it keeps its creation time); ``latest``: the last event id a
        joining client saw (past the last event: 'ahead', nothing created or taken)."""
        r = await self._run(
            "acquire",
            [*self.conversation_keys(sid), self.keys.purging(sid)],
            [
                node,
                inc,
                user,
                dead_inc,
                "1" if create else "0",
                *stored[:3],
                "" if close_delay is None else repr(close_delay),
                "" if max_running_time is None else repr(max_running_time),
                "" if latest is None else latest,
                stored[3],
            ],
            hot=True,
        )
        return Ownership(
            status(text(r[0]), OWNERSHIP),
            int(r[1]),
            text(r[2]),
            text(r[3]),
            text(r[4]),
            int(r[5]),
            _seconds(r[6]),
            _seconds(r[7]),
        )

    async def mark_purging(self, sid: str, within: float, why: str = "1") -> str:
        """No node takes ``sid`` (ACQUIRE: 'purging') until ``unmark_purging``, or for
        ``within`` seconds (0: for good) should the purging node die first; nor stores
        it again (``REWIND_STORED``). The mark says ``why``; what it said before ('' for
        none)."""
        px = max(1, int(within * 1000)) if within else None
        before = await self.redis.set(self.keys.purging(sid), why, px=px, get=True)
        return text(before) if before is not None else ""

    async def unmark_purging(self, sid: str) -> None:
        await self.redis.delete(self.keys.purging(sid))

    async def purging(self, sids: Sequence[str]) -> set[str]:
        """Those of ``sids`` a purge holds (``mark_purging``): one round trip, none for
        no sid."""
        if not sids:
            return set()
        found = await self._commands([("EXISTS", self.keys.purging(sid)) for sid in sids])
        return {sid for sid, n in zip(sids, found, strict=True) if int(n)}

    async def purge(self, sid: str, user: str) -> int:
        """Delete ``sid``'s Redis state (its keys, its place in ``user``'s index); how many
        keys went. An owner still running it is fenced by its missing record."""
        k = self.keys
        deleted, _ = await asyncio.gather(
            self.redis.delete(*self.conversation_keys(sid), k.attempts(sid)),
            self.redis.zrem(k.user_convs(user), sid),
        )
        return int(deleted)

    async def release(
        self, sid: str, inc: str, epoch: int | None, state: str, retention_ms: int = 0
    ) -> int:
        """Give up ownership if ``inc`` (at ``epoch``; None: any) still holds it: 0 when
        it does not. With ``retention_ms``, a conversation the event store holds all of,
        with no action waiting and no connection, retires: its Redis state expires after
        that long, and 2 says it holds events (the store lists it: ``Directory``)."""
        keys = self.conversation_keys(sid) if retention_ms else [self.keys.conv(sid)]
        r = await self._run(
            "release", keys, [inc, "" if epoch is None else epoch, state, retention_ms], hot=True
        )
        return int(r)

    async def attach(self, sid: str, user: str, delta: int) -> tuple[AttachStatus, int]:
        """Change the attach refcount; ``user`` '' skips the ownership check."""
        r = await self._run("attach", [self.keys.conv(sid)], [delta, user])
        return status(text(r[0]), ATTACH), int(r[1])

    async def refs(self, sid: str) -> int:
        """The attach refcount, cluster-wide."""
        return int(await self.redis.hget(self.keys.conv(sid), "refs") or 0)

    # -- the log -------------------------------------------------------------------
    async def events_after(
        self, sid: str, after: int, upto: int | None = None, count: int = 1000
    ) -> list[tuple[int, Event]]:
        """Logged events with ``after < id <= upto`` (oldest first)."""
        end = "+" if upto is None else f"{upto}-0"
        rows = await self.redis.xrange(
            self.keys.events(sid), min=f"({after}-0", max=end, count=count
        )
        return entries(rows)

    async def events_after_sized(
        self,
        sid: str,
        after: int,
        count: int,
        max_bytes: int,
        *,
        shown: bool = True,
        hint: SizeHint | None = None,
    ) -> tuple[list[tuple[int, Event]], int, int | None]:
        """Events with ids above ``after`` (oldest first): at most ``count`` of them and
        none after those whose packed size reaches ``max_bytes`` (at least one), their
        packed size, and the conversation's last event id (None without a record), read
        together (``_page``; ``hint``: what this reader learnt by its last read).
        ``shown``: for clients, so with ``replicas`` only what they hold (``_barrier``);
        an agent reads what its loop answers, unconfirmed or not."""
        barrier = self._barrier(sid) if shown else []
        commands, read = self._page(sid, after, count, max_bytes, hint)
        replies = await self._commands([*commands, *barrier])
        seq, rows, size = read(self._check_barrier(sid, replies) if barrier else replies)
        return rows, size, seq

    async def inbox_snapshot(
        self, sid: str, after: int, count: int = 500
    ) -> tuple[int, list[tuple[int, Event]]]:
        """The conversation's last event id and its inbox after ``after``: every action up
        to that id is among the rows (the id is read first, and only the owner's commits
        trim the inbox), unless ``count`` cut them short. With ``replicas``, only what
        replicas hold (``_barrier``: else UnreplicatedRead): an owner that counted an id a
        failover then undid would take the action later logged under it for one it had."""
        k = self.keys
        barrier = self._barrier(sid)
        replies = await self._commands(
            [
                ("HGET", k.conv(sid), "seq"),
                ("XRANGE", k.inbox(sid), f"({after}-0", "+", "COUNT", count),
                *barrier,
            ]
        )
        seq, rows = self._check_barrier(sid, replies) if barrier else replies
        return int(seq or 0), entries(rows)

    async def inbox_last(self, sid: str, after: int) -> int:
        """The id of the newest action waiting in the inbox after ``after`` (0: none),
        reading one action's payload at most: what an evicted loop's drain waits for
        (its queue holds the actions themselves; a read of all of them is up to
        ``inbox_max`` actions in one reply). With ``replicas``, only what replicas hold
        (``_barrier``: else UnreplicatedRead), as ``inbox_snapshot``."""
        barrier = self._barrier(sid)
        replies = await self._commands(
            [("XREVRANGE", self.keys.inbox(sid), "+", f"({after}-0", "COUNT", 1), *barrier]
        )
        (rows,) = self._check_barrier(sid, replies) if barrier else replies
        return int(text(rows[0][0]).split("-")[0]) if rows else 0

    async def inbox_lengths(self, sids: Sequence[str]) -> list[int]:
        """How many accepted actions wait unprocessed, per conversation (one round trip)."""
        if not sids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.xlen(self.keys.inbox(sid))
            return [int(n) for n in await pipe.execute()]

    # -- records ---------------------------------------------------------------------
    async def meta(self, sid: str) -> dict[str, str]:
        """The conversation's record ({} when unknown)."""
        raw = await self.redis.hgetall(self.keys.conv(sid))
        return {text(k): text(v) for k, v in raw.items()}

    async def records(self, sids: Sequence[str]) -> list[dict[str, str]]:
        """The records of ``sids`` ({} for unknown ones), in one round trip."""
        return await self._hgetall_many([self.keys.conv(sid) for sid in sids])

    async def users_of(self, sids: Sequence[str]) -> dict[str, str]:
        """sid -> its user ('' when unknown), in one round trip."""
        if not sids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hget(self.keys.conv(sid), "user")
            users = await pipe.execute()
        return {sid: text(u) for sid, u in zip(sids, users, strict=True)}

    async def user_conversations(self, user: str, limit: int) -> list[str]:
        """The user's conversations, newest first (the index written at creation)."""
        raw = await self.redis.zrevrange(self.keys.user_convs(user), 0, limit - 1)
        return [text(s) for s in raw]
