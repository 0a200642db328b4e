"""The Redis side of the event store: which store the cluster uses, how far the store
holds each conversation, and the hot window of its log (``archive.py`` moves the events).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from .core import StateCore, flat_rows, text


class ArchiveOps(StateCore):
    async def claim_store(self, identity: str, shown: str, node: str) -> tuple[str, str, str]:
        """Record ``identity`` as the cluster's event store unless one is recorded; returns
        the recorded ``(identity, store URL shown, node that recorded it)``."""
        recorded = await self.claim(
            self.keys.event_store(), {"identity": identity, "store": shown, "node": node}
        )
        return recorded[0], recorded[1], recorded[2]

    async def recorded_store(self) -> tuple[str, str, str] | None:
        """The cluster's event store as recorded (``claim_store``), or None if no node
        recorded one yet; read only."""
        found = await self.redis.hmget(self.keys.event_store(), "identity", "store", "node")
        if found[0] is None:
            return None
        return text(found[0]), text(found[1] or b""), text(found[2] or b"")

    async def unstored(
        self, sid: str, count: int, max_bytes: int
    ) -> tuple[int, list[tuple[int, bytes]]]:
        """How far the store holds ``sid`` (as recorded here), and the oldest logged
        events after that: at most ``count`` of them and none after those whose packed
        size reaches ``max_bytes`` (at least one: ``scripts.READ_AFTER``), packed as logged."""
        k = self.keys
        # Over the script lane, as the mark below: through redis-py the mover's calls
        # were a fifth of an action's CPU at saturation (BENCHMARKS.md, #17).
        r = await self._run("unstored", [k.conv(sid), k.events(sid)], [count, max_bytes], hot=True)
        return _unstored(r)

    async def mark_stored(
        self,
        sid: str,
        last_id: int,
        window_events: int,
        window_bytes: int,
        count: int,
        max_bytes: int,
    ) -> tuple[int, list[tuple[int, bytes]]]:
        """The store holds ``sid``'s events up to ``last_id``: record it and trim the
        log to its window; then what the store lacks, as ``unstored`` (``count`` events,
        ``max_bytes``) reads it."""
        k = self.keys
        r = await self._run(
            "mark_stored",
            [k.conv(sid), k.events(sid)],
            [last_id, window_events, window_bytes, count, max_bytes],
            hot=True,
        )
        return _unstored(r)

    async def rewind_stored(
        self, sid: str, held: int, seen: int, count: int, max_bytes: int
    ) -> tuple[int, list[tuple[int, bytes]]]:
        """The store holds ``sid``'s events only up to ``held``, below the ``seen`` mark
        (it lost its latest writes): record that, unless the mark moved meanwhile or a
        purge holds ``sid``; then what the store lacks, as ``unstored`` (``count`` events,
        ``max_bytes``) reads it (a mark at ``held``: rewound)."""
        k = self.keys
        r = await self._run(
            "rewind_stored",
            [k.conv(sid), k.events(sid), k.purging(sid)],
            [held, count, max_bytes, seen],
            hot=True,
        )
        return _unstored(r)

    async def conversations_held(self, batch: int) -> AsyncIterator[dict[str, int]]:
        """Every conversation Redis holds a record of, with how far the store holds it
        as recorded here (``stored``), ``batch`` or so at a time: SCAN (every master of a
        cluster), for an audit, not a hot path."""
        found: list[str] = []
        async for key in self.redis.scan_iter(match=self.keys.conv_pattern(), count=1000):
            sid = self.keys.sid_of_conv(text(key))
            if sid is not None:
                found.append(sid)
            if len(found) >= batch:
                yield await self._stored_marks(found)
                found = []
        if found:
            yield await self._stored_marks(found)

    async def audit_began(self) -> int:
        """Number a check of every conversation that begins now (``keys.store_audits``)."""
        return int(await self.redis.hincrby(self.keys.store_audits(), "began", 1))

    async def audit_done(self, number: int) -> None:
        """Check ``number`` ended (``done`` never goes back: ``scripts.AUDIT_DONE``)."""
        await self._run("audit_done", [self.keys.store_audits()], [number])

    async def store_server(self, server: str | None, owes: bool = False) -> tuple[int, bool]:
        """Tell the cluster the event store's server this node reaches (None: not known)
        and (``owes``) whether it found a reason for a check of every conversation since
        it last told (``scripts.STORE_SERVER``): the number a check must reach to settle
        what is owed (0: nothing owed), and whether this call found another server
        recorded."""
        key, flag = self.keys.store_audits(), "1" if owes else "0"
        owed, changed = await self._run("store_server", [key], [server or "", flag])
        return int(owed), bool(changed)

    async def audits(self) -> tuple[int, int]:
        """The number of the last check that began, and of the last that ended."""
        began, done = await self.redis.hmget(self.keys.store_audits(), "began", "done")
        return int(began or 0), int(done or 0)

    async def _stored_marks(self, sids: Sequence[str]) -> dict[str, int]:
        marks = await self._commands([("HGET", self.keys.conv(sid), "stored") for sid in sids])
        return {sid: int(m or 0) for sid, m in zip(sids, marks, strict=True)}

    async def note_unstored(self, sids: Iterable[str]) -> None:
        """``sids`` lose their owner while the store may lack events of theirs: any
        node's sweep moves them (``Archiver.sweep``). The oldest note of each stays."""
        noted = {sid: int(time.time() * 1000) for sid in sids}
        if noted:
            await self.redis.zadd(self.keys.unstored(), noted, nx=True)

    async def unstored_noted(self, count: int) -> list[str]:
        """The ``count`` conversations noted longest ago."""
        # ZRANGEBYSCORE, not ZRANGE: the commands deploy/redis-users.acl allows.
        noted = await self.redis.zrangebyscore(self.keys.unstored(), "-inf", "+inf", 0, count)
        return [text(sid) for sid in noted]

    async def settle_unstored(self, sids: Iterable[str]) -> None:
        """``sids`` need no sweep any more (the store holds them, or they are gone)."""
        if gone := list(sids):
            await self.redis.zrem(self.keys.unstored(), *gone)

    async def window_start(self, sid: str) -> int:
        """The id of the oldest event the Redis log still holds (0: the log is empty)."""
        rows = await self.redis.xrange(self.keys.events(sid), count=1)
        return int(text(rows[0][0]).split("-")[0]) if rows else 0


def _unstored(r: Any) -> tuple[int, list[tuple[int, bytes]]]:
    """An unstored reply: {stored, id, packed event, ...}."""
    return int(r[0]), flat_rows(r)
