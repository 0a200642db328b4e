"""This node's client connections, each with its cursor: the last event id it was sent.

A live event that follows the cursor is sent at once; one that leaves a gap (a
connection joining mid-stream, a pub/sub message lost during a reconnect, or one a step
behind: another node's action, whose message is read after this node's own reply to a
later one) switches the connection to catch-up: the missing events get a few loop steps
to arrive (``GAP_STEPS``), then it reads the log after the cursor, drains the live events
buffered meanwhile (``BUFFERED`` at most; the rest it reads from the log again), and only
then goes live again. So each connection sees every logged event once, in order.

A coordinator notice among them (``codec.notice_update``: a loop evicted, closed, moved,
lost; events lost) that is news to a connection (stamped after its join began, not a
replay of older history) goes out followed by its transient status update; a closing
one (``codec.CLOSING``) then ends the conversation's connections: forgotten here,
released by ``on_closed`` (set by ``Sessions``) and disconnected, on every node that
delivers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from workers.protocol import Event

from .backoff import Backoff
from .codec import CLOSING, notice_code, notice_update, pack, stamped_at, with_id
from .errors import (
    REDIS_AWAY,
    REDIS_TRANSIENT,
    REDIS_TROUBLE,
    CoordinatorError,
    NotReplicated,
    beyond_last_event,
    redis_full,
    redis_refused,
)
from .eventstore.errors import StoreUnavailable
from .history import History
from .ratelimit import LogThrottle, Rate
from .state import SizeHint
from .tasks import TaskSet

log = logging.getLogger(__name__)

# What a replay retries: Redis or the store unreachable, a read replicas do not hold yet.
RETRIED_READS: tuple[type[Exception], ...] = (*REDIS_TRANSIENT, NotReplicated)

PAGE = 500
# A join's first read: (cursor, count, bytes, hint) -> the log's last id, the events after
# cursor (as ``History.after`` bounds them) and their packed size.
FirstRead = Callable[
    [int, int, int, SizeHint], Awaitable[tuple[int | None, list[tuple[int, Event]], int]]
]
# A replay reads the log a page at a time; pages hold at most PAGE events and about
# REPLAY_PAGE_BYTES (at least one: bounded where they are read, ``scripts.READ``), so a
# client replaying big events, or reading slowly, holds about that much.
REPLAY_PAGE_BYTES = 256 * 1024
# Events a replay sends before it lets the event loop run other work.
YIELD_EVERY = 64
# Loop steps an event that came after a gap waits for the events missing before them
# (``_fill_or_catch_up``) before the log is read.
GAP_STEPS = 4
# Live events a connection in catch-up keeps for after its replay (BUFFERED of them and
# BUFFERED_BYTES, packed, at most); past that, they are dropped and the replay reads them
# from the log: a client that stops reading mid-replay (dropped after app.STALLED) keeps
# no more of a busy conversation's events alive, however large they are.
BUFFERED = 64
BUFFERED_BYTES = 1024 * 1024


class CatchUpFailed(CoordinatorError):
    """A connection could not be caught up from the log (Redis refused the read, or was
    unreachable for longer than the caller may wait)."""


class EventSink(Protocol):
    """Where a node delivers a conversation's events to its local connections."""

    async def deliver(self, connection_id: str, event: Event) -> None: ...

    async def disconnect(self, connection_id: str) -> None:
        """Close the client's connection (after telling it why)."""


class NullSink:
    """A sink for nodes without clients (tools, tests): events go nowhere."""

    async def deliver(self, connection_id: str, event: Event) -> None:
        return None

    async def disconnect(self, connection_id: str) -> None:
        return None


@dataclass(slots=True)
class Connection:
    cid: str
    sid: str
    user: str
    cursor: int
    replaying: bool = True
    # The cursor is known to be an id of the log (the client's latest_event_id was
    # checked against it, or the cursor only moved over logged events since).
    verified: bool = False
    buffer: list[tuple[int, Event]] = field(default_factory=list)
    # Events may be missing that ``buffer`` does not show (left out of it when full, or
    # lost in a pub/sub reconnect during the replay): the log is read again before live.
    stale: bool = False
    # When its join began (Unix time): notices stamped since are news to it (status
    # update, closing), older ones a replay.
    joined_at: float = 0.0
    held: int = 0  # packed bytes of the events buffered since the buffer was last empty

    def hold(self, event_id: int, event: Event, size: int) -> None:
        """Keep a live event of ``size`` packed bytes for after the replay (up to
        ``BUFFERED`` and ``BUFFERED_BYTES``; the rest is read from the log)."""
        if len(self.buffer) < BUFFERED and self.held + size <= BUFFERED_BYTES:
            self.buffer.append((event_id, event))
            self.held += size
        else:
            self.stale = True


class LocalConnections:
    """This node's connections by id and by conversation, each with its cursor; reads
    the conversation's history (the event store, then the Redis log) through ``history``
    and writes to clients through ``sink``."""

    def __init__(self, history: History, sink: EventSink, tasks: TaskSet) -> None:
        self._history = history
        self.sink = sink
        self._tasks = tasks
        self._by_id: dict[str, Connection] = {}
        # Each conversation's connections on this node: seldom more than a few, so a
        # tuple (56 bytes for one) rather than a set (216).
        self._rooms: dict[str, tuple[Connection, ...]] = {}
        self._last_sent: tuple[int, Event, Event] | None = None  # (id, event, with id)
        # Catch-ups of live connections (a gap, a pub/sub reconnect): reads of the log.
        self.catch_ups = 0
        # What releases a connection a closing notice ended (``Sessions.release``).
        self.on_closed: Callable[[Connection], Awaitable[None]] | None = None
        # A sink whose deliver raises (an embedder's bug) fails on every event of every
        # connection: a traceback each would fill the disk.
        self._failing = LogThrottle(log, Rate(0.2, 5.0))

    def __contains__(self, cid: object) -> bool:
        return cid in self._by_id

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, cid: str) -> Connection | None:
        return self._by_id.get(cid)

    def room(self, sid: str) -> tuple[Connection, ...]:
        """The conversation's connections on this node now: a snapshot to iterate across
        awaits (a room is replaced, never changed in place), no copy per event."""
        return self._rooms.get(sid, ())

    def add(self, cid: str, sid: str, user: str, cursor: int, joined_at: float) -> Connection:
        """Register a connection in catch-up mode: live events are buffered until
        ``catch_up`` has sent what the log holds after ``cursor``."""
        conn = Connection(cid, sid, user, max(0, cursor), joined_at=joined_at)
        old = self._by_id.get(cid)
        if old is not None:
            self.forget(old)
        self._by_id[cid] = conn
        self._rooms[sid] = (*self._rooms.get(sid, ()), conn)
        return conn

    def forget(self, conn: Connection) -> None:
        if self._by_id.get(conn.cid) is conn:
            del self._by_id[conn.cid]
        room = tuple(c for c in self._rooms.get(conn.sid, ()) if c is not conn)
        if room:
            self._rooms[conn.sid] = room
        else:
            self._rooms.pop(conn.sid, None)

    async def offer(self, sid: str, event_id: int, event: Event) -> None:
        """A live event of ``sid`` arrived: send it to (or buffer it for) the room."""
        size = -1  # packed, measured once for the connections that buffer it
        for conn in self.room(sid):
            if conn.replaying:
                size = len(pack(event)) if size < 0 else size
                conn.hold(event_id, event, size)
            elif event_id == conn.cursor + 1:
                conn.cursor = event_id
                await self._send(conn, event_id, event)
            elif event_id > conn.cursor:
                conn.replaying = True
                size = len(pack(event)) if size < 0 else size
                conn.hold(event_id, event, size)
                self._tasks.spawn(self._fill_or_catch_up(conn), f"catch-up:{conn.cid}")

    def catch_up_all(self) -> None:
        """After a pub/sub reconnect: messages may have been lost, read the logs."""
        for conn in self:
            self._read_again(conn)

    def catch_up_room(self, sid: str) -> None:
        """Events of ``sid`` were logged but not offered: its connections read the log."""
        for conn in self.room(sid):
            self._read_again(conn)

    def _read_again(self, conn: Connection) -> None:
        if conn.replaying:  # the replay under way reads the log once more before live
            conn.stale = True
        else:
            conn.replaying = True
            self._tasks.spawn(self._catch_up_or_drop(conn), f"catch-up:{conn.cid}")

    async def _fill_or_catch_up(self, conn: Connection) -> None:
        """An event came after a gap. The events missing are often a step or two behind
        it (the pub/sub message of another node's action, read after this node's own
        reply to a later one): given ``GAP_STEPS`` loop steps to arrive, they go out from
        the buffer; only a gap still open then is read from the log."""
        for _ in range(GAP_STEPS):
            await asyncio.sleep(0)
            if conn.cid not in self._by_id:
                return
            if conn.stale:
                break
            if await self._went_live(conn):
                return
        await self._catch_up_or_drop(conn)

    async def _catch_up_or_drop(self, conn: Connection) -> None:
        """A catch-up in the background: one that cannot succeed ends the connection
        (its client reconnects and catches up then) instead of retrying forever."""
        self.catch_ups += 1
        try:
            await self.catch_up(conn)
        except CatchUpFailed as exc:
            log.warning("connection %s dropped: %s", conn.cid, exc)
            with contextlib.suppress(Exception):
                await self.sink.disconnect(conn.cid)

    async def catch_up(
        self, conn: Connection, *, within: float | None = None, joining: FirstRead | None = None
    ) -> None:
        """Send what the log holds after the cursor, then the buffered live events.

        Retries while Redis is unreachable (for at most ``within`` s, if given); raises
        CatchUpFailed when Redis refuses the read or the time is up. ``joining``: the
        cursor is the client's ``latest_event_id``, and the first page comes from this
        call (``Sessions`` registers the connection with it), with the log's last id: a
        cursor beyond it is refused (InvalidInput)."""
        conn.replaying = True
        conn.stale = False  # what the read below finds covers it
        backoff = Backoff(base=0.05, cap=2.0)
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        count, most, hint = PAGE, REPLAY_PAGE_BYTES, SizeHint()
        while conn.cid in self._by_id:
            try:
                if joining is not None:
                    last, rows, size = await joining(conn.cursor, count, most, hint)
                    if conn.cursor > (last or 0):
                        raise beyond_last_event(conn.cursor, last or 0, conn.sid)
                    joining = None
                    conn.verified = True
                    rows, more = await self._history.below_window(
                        conn.sid, conn.cursor, count, most, rows, size, last
                    )
                else:
                    rows, more = await self._history.after(
                        conn.sid, conn.cursor, count, most, hint=hint
                    )
            # The store's StoreUnavailable too (an OSError); a read no replica holds yet
            # (--ack-replicas): none of it is shown until one does; a refusal of the
            # moment (LOADING while a restarted Redis reads its AOF, a failover's READONLY).
            except (*RETRIED_READS, *REDIS_TROUBLE) as exc:
                if not isinstance(exc, RETRIED_READS) and (redis_refused(exc) or redis_full(exc)):
                    raise CatchUpFailed(f"Redis refused to read the log of {conn.sid!r}") from exc
                delay = backoff.next()
                if deadline is not None and loop.time() + delay > deadline:
                    raise CatchUpFailed(
                        f"cannot read the log of {conn.sid!r}: {_told(exc)}"
                    ) from None
                level = logging.WARNING if backoff.failures == 1 else logging.DEBUG  # once
                log.log(level, "replay for %s failed (%s); retry in %.2fs", conn.cid, exc, delay)
                await asyncio.sleep(delay)
                continue
            for i, (event_id, event) in enumerate(rows, 1):
                if event_id > conn.cursor:
                    await self._room(conn)
                    conn.cursor = event_id
                    await self._send(conn, event_id, event)
                if i % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a long replay does not hold up the node
            if more:
                continue
            if await self._went_live(conn):
                return
            conn.stale = False  # the log is read again: what it held is covered

    async def _went_live(self, conn: Connection) -> bool:
        """Send the buffered events; live again (True) unless a gap is left or events may
        be missing that the buffer does not show (``stale``): then the log is read."""
        if await self._drain_buffer(conn) or conn.stale:
            return False
        # No await between the empty buffer and going live: nothing slips by.
        conn.replaying = False
        return True

    async def _drain_buffer(self, conn: Connection) -> bool:
        """Send buffered events in order; True when a gap is left (the log must be
        read)."""
        while conn.buffer:
            batch, conn.buffer, conn.held = sorted(conn.buffer, key=lambda x: x[0]), [], 0
            for i, (event_id, event) in enumerate(batch):
                if event_id <= conn.cursor:
                    continue
                if event_id != conn.cursor + 1:
                    conn.buffer = batch[i:] + conn.buffer
                    return True
                conn.cursor = event_id
                await self._send(conn, event_id, event)
        return False

    async def _room(self, conn: Connection) -> None:
        """A replay goes at the pace its client reads, if the sink can tell (a sink may
        have ``async room(connection_id) -> bool``: it returns when the connection can
        take more, True, or False when it is gone: closed by its client, or dropped for
        not reading). A replay to a connection that is gone ends (CatchUpFailed): before,
        it went on, each event waiting for a client that had left (a join of a long
        history held its memory, and its place under the user's connection cap, for as
        long as the rest of the history took at STALLED seconds an event)."""
        room = getattr(self.sink, "room", None)
        if room is not None and await room(conn.cid) is False:
            raise CatchUpFailed(f"connection {conn.cid} closed while catching up")

    async def _send(self, conn: Connection, event_id: int, event: Event) -> None:
        # A live event goes to every connection of its room in turn: they get the same
        # object, so a sink may encode it once for all of them (app.SocketSink does).
        last = self._last_sent
        if last is not None and last[0] == event_id and last[1] is event:
            sent = last[2]
        else:
            sent = with_id(event_id, event)
            self._last_sent = (event_id, event, sent)
        try:
            await self.sink.deliver(conn.cid, sent)
        except Exception:
            self._failing.emit(logging.ERROR, "delivery to %s failed", conn.cid, exc_info=True)
        if "observation" in event and notice_code(event):
            await self._notice(conn, event)

    async def _notice(self, conn: Connection, event: Event) -> None:
        """After a notice that is news to the connection: its status update; after a
        closing one, the end."""
        update = notice_update(event)
        if update is None or (stamped_at(event) or 0.0) < conn.joined_at:
            return
        with contextlib.suppress(Exception):
            await self.sink.deliver(conn.cid, update)
        if notice_code(event) in CLOSING and self._by_id.get(conn.cid) is conn:
            self.forget(conn)
            self._tasks.spawn(self._close(conn), f"close:{conn.cid}")

    async def _close(self, conn: Connection) -> None:
        if self.on_closed is not None:
            await self.on_closed(conn)
        with contextlib.suppress(Exception):
            await self.sink.disconnect(conn.cid)


def _told(exc: Exception) -> str:
    """Why a read failed, as its client is told: where Redis or the store runs, and
    what their drivers said, are for the server's log (the replay's warning)."""
    if isinstance(exc, StoreUnavailable):  # an OSError too: first
        return StoreUnavailable.PUBLIC
    if isinstance(exc, REDIS_TROUBLE):
        return REDIS_AWAY
    return str(exc)
