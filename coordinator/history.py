"""A conversation's whole history, in id order: the event store below the Redis window,
the window above it (live events come after, through ``delivery.py`` and ``catchup.py``).

Redis trims only what the store holds (``archive.py``), and keeps the newest event (its
log is empty only when the conversation came back from the store: ``loops.py``), so a
read of the log that starts after the id asked for, or finds nothing below the
conversation's last id, means the ids between were trimmed: they are read from the
store. Ids neither holds were lost by Redis in a
failover (its clients were told, ``scripts.REWIND``) and are skipped.
"""

from __future__ import annotations

from workers.protocol import Event

from .codec import unpack
from .eventstore import EventStore, StoreCorrupt
from .state import RedisState, SizeHint

Rows = list[tuple[int, Event]]
MAX_ID = 2**62  # above any event id


class History:
    """Reads a conversation's events after any id, from the store or the Redis log."""

    def __init__(self, state: RedisState, store: EventStore) -> None:
        self._state = state
        self._store = store

    async def after(
        self,
        sid: str,
        after: int,
        count: int,
        max_bytes: int,
        *,
        shown: bool = True,
        hint: SizeHint | None = None,
    ) -> tuple[Rows, bool]:
        """Events with ids above ``after`` (oldest first), gap-free where either Redis or
        the store has them: at most ``count`` of them, and none after those whose packed
        size reaches ``max_bytes`` (at least one), so that a reader holds about a page
        however large its events; and whether more may follow (a full page). ``shown``:
        for clients (with ``--ack-replicas``, only what replicas hold; else an agent's
        read). ``hint``: what the reader learnt of the log by its last read (a replay
        keeps one: ``state.SizeHint``)."""
        rows, size, last = await self._state.events_after_sized(
            sid, after, count, max_bytes, shown=shown, hint=hint
        )
        return await self.below_window(sid, after, count, max_bytes, rows, size, last)

    async def _check_held(
        self, sid: str, after: int, stored: list[tuple[int, bytes]], start: int
    ) -> None:
        """StoreCorrupt when the store's read after ``after`` skips ids it holds by
        Redis's record (``stored``) below the window's ``start``: it keeps every id from
        the first (a notice for those Redis lost), so a hole is damage (files removed, a
        backup restored), not ids to skip silently. Ids past that record were lost by
        Redis before the store had them (their clients were told): those are skipped."""
        expected = after + 1
        for i, _ in stored:
            if i != expected:
                break
            expected += 1
        else:
            meta = await self._state.meta(sid)
            held = min(int(meta.get("stored") or 0), start - 1) if meta else expected - 1
            if expected > held:
                return
        raise StoreCorrupt(
            f"the event store lacks event {expected} of conversation {sid!r}, which it "
            "stored: was it damaged, or restored from an older backup?"
        )

    async def below_window(
        self,
        sid: str,
        after: int,
        count: int,
        max_bytes: int,
        rows: Rows,
        size: int,
        last: int | None,
    ) -> tuple[Rows, bool]:
        """``rows`` (with ``size``): a read of the Redis log after ``after``, of a
        conversation whose last id is ``last`` (None: it has no record in Redis, which
        let it go after it stopped: ``--redis-retention``; 0: it has logged nothing, in
        Redis or in the store, so a new conversation's first join never asks the store).
        When the log starts later (or holds nothing, as when the conversation came back
        from the store), the page starts with what the store holds below it (``count``
        events and ``max_bytes`` at most, as ``after``); and whether more may follow."""
        full = bool(rows) and last is not None and rows[-1][0] < last
        start = rows[0][0] if rows else MAX_ID if last is None else last + 1
        if start <= after + 1:
            return rows, full
        trimmed = start - 1 - after
        stored = await self._store.read(sid, after, min(count, trimmed), max_bytes)
        got = sum(len(data) for _, data in stored)
        cut = got >= max_bytes  # the store stopped at the bound: it may have more
        if (len(stored) < min(count, trimmed) and not cut) or (
            stored and stored[-1][0] != after + len(stored)
        ):
            await self._check_held(sid, after, stored, start)
        page = [(i, unpack(data)) for i, data in stored]
        if len(stored) == count < trimmed or (stored and got + size >= max_bytes):
            return page, True  # the store has more below the window, or the page is full
        # The store's page reaches the window (ids it lacks too were lost by Redis).
        both = page + rows
        return both[:count], full or len(both) > count
