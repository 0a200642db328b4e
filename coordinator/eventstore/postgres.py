"""The event store in PostgreSQL (asyncpg), for nodes on several machines.

An append (``append_many``: the batches of several conversations, as the owner's mover
sends them) is one transaction of at most four statements whatever the number of
conversations: create the rows of new conversations, lock every row ``FOR UPDATE`` in
conversation id order (each step in one order for every writer, so that two nodes'
movers cannot deadlock), decide fenced / gap / how many events are already stored from
each row alone (``base.plan_append``), insert all new events with one statement (arrays
through ``unnest``; ``ON CONFLICT DO NOTHING`` as a second guard, the rows it inserted
counted per conversation), and move each row's fence, last id and byte count with one
more. Appends to one conversation queue on its row; a conversation found with events
past its last id fails alone (the others are appended again without it).

Errors: a database that cannot be reached or refuses us raises ``StoreUnavailable``,
whose message names the server by its redacted URL and never carries the password. A
call that loses its connection is tried once more on a fresh one (every call but
``purge`` is idempotent), so a restarted server costs a caller nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from ..errors import ConfigError, ConversationNotFound, CoordinatorError, InvalidInput
from ..inputs import check_conversation_id, check_user_id
from ..ratelimit import LogThrottle, Rate
from . import pgschema
from .base import (
    DEFAULT_MAX_CHECKPOINT_BYTES,
    DEFAULT_READ_LIMIT,
    AppendResult,
    Batch,
    CheckpointStatus,
    Lookup,
    Opened,
    StoredConversation,
    StoredEvent,
    append_checked,
    check_append,
    check_checkpoint,
    check_limit,
    check_read,
    check_user,
    plan_append,
    plan_checkpoint,
)
from .errors import StoreCorrupt, StoreError, StoreUnavailable
from .redact import redact_url, scrub, url_secrets

MAX_BIGINT = 2**63 - 1  # a read without a bound in bytes

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors meaning "the database is not there for us", as opposed to a bug in a query.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08: connection lost or refused
    asyncpg.OperatorInterventionError,  # class 57: shutting down, starting up
    asyncpg.InsufficientResourcesError,  # class 53: disk full, too many connections
    asyncpg.InvalidAuthorizationSpecificationError,  # class 28: login refused
    asyncpg.InvalidCatalogNameError,  # no such database
    asyncpg.InterfaceError,  # connection closed under us, pool closing
    # What asyncpg raises when the server ends a session in the middle of a transaction
    # (seen at COMMIT during a fast shutdown: "cannot switch to state 15").
    asyncpg.InternalClientError,
)
# A connection that broke under a call: worth one more try on a new one.
_LOST = (
    ConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class PostgresEventStore(Opened):
    """The event store in the PostgreSQL database at ``dsn`` (see the module docstring)."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "coordinator",
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
        max_checkpoint_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES,
    ) -> None:
        self._dsn = dsn
        self.where = redact_url(dsn)
        self.schema = schema
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self._secrets = url_secrets(dsn)
        self._sql = pgschema.Statements.for_schema(schema)
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: Any = None
        self._retries = LogThrottle(log, Rate(0.2, 3.0))
        self._identity: str | None = None
        self._server_unknown = False  # not readable (said once)

    def __repr__(self) -> str:
        return f"<PostgresEventStore {self.where} schema={self.schema}>"

    # -- life cycle ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        # No floor (min_size 0): while the server is down an idle pool does not retry
        # connecting in the background. The first connection is the migration's.
        self._pool = pool = asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_size,
            timeout=self._connect_timeout,
            command_timeout=self._command_timeout,
            server_settings={"application_name": "coordinator-eventstore"},
            init=self._connected,
        )
        try:
            await pool
            self._identity = await self._call(lambda conn: pgschema.migrate(conn, self.schema))
        except BaseException as exc:
            self._pool = None
            pool.terminate()
            if isinstance(exc, ValueError | OverflowError | asyncpg.PostgresError) and not (
                isinstance(exc, CoordinatorError)
            ):
                # A DSN asyncpg cannot use (ClientConfigurationError, a port past 65535),
                # or one the server refuses for good: an unknown setting in its options, a
                # role without the rights the schema needs (the unavailable ones, a
                # refused login among them, came out of ``_call`` as StoreUnavailable).
                raise ConfigError(f"event store {self.where}: {self._describe(exc)}") from None
            raise

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # -- plumbing --------------------------------------------------------------------------

    async def _connected(self, conn: Any) -> None:
        """Each new connection: the server it reached, known by its start (not its
        address: one server is reached by several names or interfaces, and every such
        change would owe the whole cluster a check). Another than the last one (a
        standby promoted, a restart: the pool reconnects without a word) counts in
        ``server_changes`` (``storeaudit.py``)."""
        if self._server_unknown:
            return
        try:
            # (A timestamptz, which asyncpg reads in UTC whatever the session's TimeZone:
            # every node names the server alike.)
            started = str(await conn.fetchval("SELECT pg_postmaster_start_time()"))
        except asyncpg.PostgresError as exc:  # a role these functions are revoked from
            self._server_unknown = True
            log.warning(
                "event store %s: cannot tell which server a connection reached (%s): a "
                "failover's lost writes are found only when a conversation moved shows them",
                self.where,
                self._describe(exc),
            )
            return
        if self.server is not None and started != self.server:
            self.server_changes += 1
        self.server = started

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError) and not str(exc):  # said nothing of its own
            limits = f"{self._connect_timeout:g}s to connect, {self._command_timeout:g}s a query"
            return f"no answer in time ({limits})"
        text = str(exc) or type(exc).__name__
        return scrub(f"{type(exc).__name__}: {text}", self._secrets)

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(self.where, self._describe(exc))

    async def _call(self, fn: Callable[[Any], Awaitable[T]], *, idempotent: bool = True) -> T:
        """``fn(connection)`` on a pooled connection; a lost connection is retried once."""
        pool = self._pool
        if pool is None:
            raise StoreError(f"{self!r} is not open")
        for attempt in (1, 2):
            try:
                async with pool.acquire(timeout=self._connect_timeout) as conn:
                    try:
                        return await fn(conn)
                    except UNAVAILABLE:
                        # Never back to the pool in an unknown state. One the pool took
                        # back already refuses (InterfaceError), which would hide why.
                        with contextlib.suppress(asyncpg.InterfaceError):
                            conn.terminate()
                        raise
            except UNAVAILABLE as exc:
                if isinstance(exc, ValueError):  # ClientConfigurationError: see open()
                    raise
                refused = isinstance(exc, ConnectionRefusedError)  # down: again is no use
                if attempt == 1 and idempotent and isinstance(exc, _LOST) and not refused:
                    # Each call of a store that went away comes here (the mover's, each
                    # restart's, each replay's): a line for each filled the log at INFO.
                    self._retries.info(
                        "event store %s: connection lost (%s); retrying",
                        self.where,
                        self._describe(exc),
                    )
                    await pool.expire_connections()
                    continue
                raise self._unavailable(exc) from None
        raise AssertionError("unreachable")

    # -- events --------------------------------------------------------------------------

    async def append(
        self, sid: str, epoch: int, events: Sequence[StoredEvent], *, user: str
    ) -> AppendResult:
        check_append(sid, epoch, events, user)
        (result,) = await self.append_many([Batch(sid, epoch, tuple(events), user)])
        if isinstance(result, Exception):
            raise result
        return result

    async def append_many(self, batches: Sequence[Batch]) -> list[AppendResult | Exception]:
        return await append_checked(
            batches, lambda valid: self._call(lambda conn: self._append_many(conn, valid))
        )

    async def _append_many(
        self, conn: Any, batches: Sequence[Batch]
    ) -> dict[str, AppendResult | Exception]:
        """One transaction and four statements at most, however many conversations: a
        transaction each cost the mover four round trips per conversation."""
        sql = self._sql
        by_sid = {b.sid: b for b in batches}
        sids = sorted(by_sid)
        out: dict[str, AppendResult | Exception] = {}
        recorded_ids: dict[str, int] = {}  # each conversation's last id before this
        try:
            async with conn.transaction():
                # New conversations first (a first batch starts at 1, or is empty: a
                # fence), then every row locked: each step in one order for every
                # writer. Creating after locking took the new rows out of that order,
                # and two nodes' movers deadlocked (test_eventstore.py, under load).
                new_ones = [by_sid[sid] for sid in sids if by_sid[sid].opens]
                if new_ones:
                    await conn.execute(
                        sql.create_many,
                        [b.sid for b in new_ones],
                        [b.user for b in new_ones],
                        [b.epoch for b in new_ones],
                    )
                rows = {r["conversation_id"]: r for r in await conn.fetch(sql.lock_many, sids)}
                for sid in sids:
                    if sid not in rows:  # a gap, or purged since it was created above
                        out[sid] = (
                            StoreError(f"conversation {sid!r} was deleted meanwhile")
                            if by_sid[sid].opens
                            else AppendResult("gap", 0, 0)
                        )
                ev_sid: list[str] = []
                ev_id: list[int] = []
                ev_epoch: list[int] = []
                ev_data: list[bytes] = []
                to_sid: list[str] = []
                to_epoch: list[int] = []
                to_last: list[int] = []
                to_bytes: list[int] = []
                for sid in sids:
                    if sid in out:
                        continue
                    b, row = by_sid[sid], rows[sid]
                    try:
                        check_user(sid, row["user_id"], b.user)
                    except InvalidInput as exc:
                        out[sid] = exc
                        continue
                    fence, last_id = int(row["epoch"]), int(row["last_id"])
                    first = b.events[0][0] if b.events else last_id + 1
                    plan = plan_append(fence, last_id, b.epoch, first)
                    if isinstance(plan, str):
                        out[sid] = AppendResult(plan, last_id, fence)
                        continue
                    new = b.events[plan:]
                    ev_sid += [sid] * len(new)
                    ev_id += [i for i, _ in new]
                    ev_epoch += [b.epoch] * len(new)
                    ev_data += [d for _, d in new]
                    recorded = last_id
                    if new or b.epoch > fence:
                        fence, last_id = max(fence, b.epoch), new[-1][0] if new else last_id
                        to_sid.append(sid)
                        to_epoch.append(fence)
                        to_last.append(last_id)
                        to_bytes.append(sum(len(d) for _, d in new))
                    recorded_ids[sid] = recorded
                    out[sid] = AppendResult("ok", last_id, fence, len(new))
                if ev_sid:
                    rows_in = await conn.fetch(sql.insert_events, ev_sid, ev_id, ev_epoch, ev_data)
                    inserted = Counter(r[0] for r in rows_in)
                    corrupt = {sid for sid, n in Counter(ev_sid).items() if inserted[sid] != n}
                    if corrupt:
                        raise _Corrupt({sid: recorded_ids[sid] for sid in corrupt})
                if to_sid:
                    await conn.execute(sql.update_many, to_sid, to_epoch, to_last, to_bytes)
        except _Corrupt as exc:  # rolled back: the others again, without them
            rest = [b for b in batches if b.sid not in exc.last_ids]
            out = await self._append_many(conn, rest) if rest else {}
            for sid, last_id in exc.last_ids.items():
                out[sid] = StoreCorrupt(
                    f"conversation {sid!r} has events after its recorded last id {last_id}"
                )
        return out

    async def read(
        self, sid: str, after: int = 0, limit: int = DEFAULT_READ_LIMIT, max_bytes: int = 0
    ) -> list[StoredEvent]:
        check_conversation_id(sid)
        check_read(after, limit, max_bytes)
        bound = max_bytes or MAX_BIGINT
        rows = await self._call(lambda conn: conn.fetch(self._sql.read, sid, after, limit, bound))
        return [(int(row["id"]), bytes(row["data"])) for row in rows]

    async def conversation(self, sid: str) -> StoredConversation | None:
        check_conversation_id(sid)
        row = await self._call(lambda conn: conn.fetchrow(self._sql.conversation, sid))
        if row is None:
            return None
        return _stored(sid, row)

    async def last_id(self, sid: str) -> int:
        found = await self.conversation(sid)
        return 0 if found is None else found.last_id

    async def last_ids(self, sids: Sequence[str]) -> list[int]:
        for sid in sids:
            check_conversation_id(sid)
        wanted = list(sids)
        rows = await self._call(lambda conn: conn.fetch(self._sql.last_ids, wanted))
        found = {str(row["conversation_id"]): int(row["last_id"]) for row in rows}
        return [found.get(sid, 0) for sid in sids]

    async def size(self, sid: str) -> int:
        found = await self.conversation(sid)
        return 0 if found is None else found.size

    async def lookup(self, sid: str, user: str, *, quota: int = 0) -> Lookup:
        check_conversation_id(sid)
        if user:
            check_user_id(user)
        asked = quota if user else 0
        row = await self._call(lambda conn: conn.fetchrow(self._sql.lookup, sid, user, asked))
        if row["user_id"] is None:
            return Lookup(None, int(row["counted"]))
        return Lookup(_stored(sid, row))

    async def count_conversations(self, user: str | None = None) -> int:
        if user is None:
            count = await self._call(lambda conn: conn.fetchval(self._sql.count_all))
        else:
            check_user_id(user)
            count = await self._call(lambda conn: conn.fetchval(self._sql.count_user, user))
        return int(count)

    async def list_conversations(self, user: str, limit: int) -> list[tuple[str, int]]:
        check_user_id(user)
        check_limit(limit)
        rows = await self._call(lambda conn: conn.fetch(self._sql.list_user, user, limit))
        return [(row["conversation_id"], int(row["created"])) for row in rows]

    async def purge(self, sid: str) -> tuple[int, int]:
        check_conversation_id(sid)
        return await self._call(lambda conn: self._purge(conn, sid), idempotent=False)

    async def _purge(self, conn: Any, sid: str) -> tuple[int, int]:
        async with conn.transaction():
            # Deleting the row first takes its lock: appends in flight finish before.
            nbytes = await conn.fetchval(self._sql.delete_conversation, sid)
            status = await conn.execute(self._sql.delete_events, sid)
            await conn.execute(self._sql.delete_checkpoint, sid)
        return int(status.rsplit(" ", 1)[-1]), int(nbytes or 0)

    # -- checkpoints -------------------------------------------------------------------------

    async def save_checkpoint(
        self, sid: str, epoch: int, covers_id: int, data: bytes
    ) -> CheckpointStatus:
        check_checkpoint(sid, epoch, covers_id, data, self.max_checkpoint_bytes)
        return await self._call(
            lambda conn: self._save_checkpoint(conn, sid, epoch, covers_id, data)
        )

    async def _save_checkpoint(
        self, conn: Any, sid: str, epoch: int, covers_id: int, data: bytes
    ) -> CheckpointStatus:
        sql = self._sql
        async with conn.transaction():
            row = await conn.fetchrow(sql.lock, sid)
            if row is None:
                raise ConversationNotFound(sid)
            fence = int(row["epoch"])
            saved = await conn.fetchval(sql.saved_covers, sid)
            status = plan_checkpoint(fence, saved, epoch, covers_id)
            if status == "ok":
                if epoch > fence:
                    await conn.execute(sql.raise_fence, sid, epoch)
                await conn.execute(sql.save_checkpoint, sid, epoch, covers_id, data)
            return status

    async def load_checkpoint(self, sid: str) -> tuple[int, bytes] | None:
        check_conversation_id(sid)
        row = await self._call(lambda conn: conn.fetchrow(self._sql.load_checkpoint, sid))
        return None if row is None else (int(row["covers_id"]), bytes(row["data"]))


class _Corrupt(Exception):
    """Conversations whose table holds events past their recorded last id (sid -> it)."""

    def __init__(self, last_ids: dict[str, int]) -> None:
        super().__init__(", ".join(sorted(last_ids)))
        self.last_ids = last_ids


def _stored(sid: str, row: Any) -> StoredConversation:
    """A conversation's row (``conversation``, ``lookup``) as the store's answer."""
    return StoredConversation(
        sid,
        str(row["user_id"]),
        int(row["epoch"]),
        int(row["last_id"]),
        int(row["bytes"]),
        int(row["created"]),
    )
