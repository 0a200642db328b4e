"""The event store in a directory: one append-only log file per conversation.

Layout under the store's directory::

    store-id                      the store's identity (random, written once)
    conversations/SID.log         the log: header, user, events and fences (framing.py)
    conversations/SID.idx         sparse index of the log (a cache, rebuilt when lost)
    conversations/SID.ckpt        the latest checkpoint (replaced whole by rename)
    users/u-USER/SID              one empty file per stored conversation of USER (quotas,
                                  listing: its time is when it was first stored;
                                  userindex.py)
    torn/SID.TIME                 bytes cut off a log's torn tail, kept for inspection

Conversation ids are ``[A-Za-z0-9_-]{1,128}`` and users ``[A-Za-z0-9_.@:+=-]{1,128}``
(checked before any path is built), so names are safe; users get a ``u-`` prefix so
that ``.`` and ``..`` stay names.

Durability (``fsync``): ``batch`` (the default) calls ``fdatasync`` on the log once per
append, before the call returns, and fsyncs a directory when it gains or loses a file:
an acknowledged append survives a machine crash. ``none`` leaves flushing to the OS: a
process crash loses nothing, a machine crash may lose the last appends (the log then
ends earlier, never torn: the next writer cuts a torn tail off). Index writes are not
synced: the index is rebuilt from the log.

Concurrency: file I/O runs in the store's own threads, never on the event loop, with
one exception: on a local file system (``mounts.py``), a lookup that finds no log (a new
conversation's start) is answered on the loop, its one ``stat`` and, under a quota, a
listing of at most ``QUICK_LISTING`` markers costing less than the trip to a thread and
back (which a storm of new conversations would pay per join). Writes
to one conversation are ordered by an asyncio lock in the process (so they do not hold
threads while they wait) and by an ``flock`` on its log across processes, so several
nodes on one machine can share the directory. Readers take the shared lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Literal, TypeVar

from ..errors import ConversationNotFound
from ..inputs import check_conversation_id, check_user_id
from . import filelog, mounts
from . import framing as fr
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
    plan_checkpoint,
)
from .errors import StoreError, StoreUnavailable
from .userindex import UserIndex

log = logging.getLogger(__name__)

FsyncPolicy = Literal["batch", "none"]
T = TypeVar("T")

STORE_ID_FILE = "store-id"
DEFAULT_THREADS = 4
# Conversations whose log state a process keeps (a few hundred bytes each): a hit saves
# re-reading the log's tail on the next append.
STATE_CACHE = 4096
# append_many: at least this many conversations per job on the store's threads (a hop to
# a thread and back cost more CPU than an append without its sync: 0.26 against 0.14 ms),
# and at most one job per thread.
PER_JOB = 16
# lookup: a conversation whose log does not exist is answered on the event loop when its
# user has at most this many markers (a listing that stops there); else on a thread.
QUICK_LISTING = 64
# The user a log records for a conversation of no user (the seed's user_id=None): no
# user id is spelt so (user ids are checked), and a log that records none is no
# conversation's yet.
NO_USER = "~"


def _absent(path: Path) -> bool:
    """Whether nothing is at ``path`` (another failure to look raises OSError)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    return False


def _holds(entry: os.DirEntry[str]) -> bool:
    """Whether a log file holds more than its header (it may be purged meanwhile)."""
    try:
        return entry.stat().st_size > fr.HEADER_SIZE
    except FileNotFoundError:
        return False


class _KeyedLocks:
    """An asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class FileEventStore(Opened):
    """The event store in the directory ``path`` (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "batch",
        threads: int = DEFAULT_THREADS,
        max_checkpoint_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES,
    ) -> None:
        if fsync not in ("batch", "none"):
            raise ValueError(f"fsync must be 'batch' or 'none', got {fsync!r}")
        self.path = Path(path)
        self.fsync: FsyncPolicy = fsync
        self._users = UserIndex(self.path, durable=fsync == "batch")
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._identity: str | None = None
        self._local = False  # on a local file system (mounts.py): set by open
        self._locks = _KeyedLocks()
        self._states: OrderedDict[str, filelog.LogState] = OrderedDict()
        self._states_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<FileEventStore {self.path} fsync={self.fsync}>"

    @property
    def _durable(self) -> bool:
        return self.fsync == "batch"

    # -- life cycle ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="eventstore")
        try:
            self._identity = await self._run(self._open_sync)
            self._local = await self._run(mounts.is_local, self.path)
        except BaseException:
            self._pool.shutdown(wait=False)
            self._pool = None
            raise

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)

    def _open_sync(self) -> str:
        for sub in ("", "conversations", "users", "torn"):
            (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        id_path = self.path / STORE_ID_FILE
        if not id_path.exists():
            # Written aside and linked in: link fails if another process got there first,
            # and nobody ever sees a half-written id.
            tmp = self.path / f".{STORE_ID_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
            tmp.write_text(secrets.token_hex(16) + "\n")
            if self._durable:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            try:
                os.link(tmp, id_path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            if self._durable:
                filelog.fsync_dir(self.path)
        identity = id_path.read_text().strip()
        if not identity:
            raise StoreError(f"{id_path} is empty: remove it to give the store a new identity")
        return identity

    # -- plumbing --------------------------------------------------------------------------

    def _threads_of_open_store(self) -> ThreadPoolExecutor:
        if self._pool is None:
            raise StoreError(f"{self!r} is not open")
        return self._pool

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        pool = self._threads_of_open_store()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except OSError as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: OSError) -> StoreUnavailable:
        reason = exc.strerror or str(exc)
        if exc.filename:
            reason += f" ({exc.filename})"
        return StoreUnavailable(str(self.path), reason)

    def _files(self, sid: str) -> filelog.ConversationFiles:
        return filelog.ConversationFiles.under(self.path, sid)

    def _cached(self, sid: str) -> filelog.LogState | None:
        with self._states_lock:
            return self._states.get(sid)

    def _remember(self, sid: str, state: filelog.LogState | None) -> None:
        with self._states_lock:
            if state is None:
                self._states.pop(sid, None)
                return
            self._states[sid] = state
            self._states.move_to_end(sid)
            while len(self._states) > STATE_CACHE:
                self._states.popitem(last=False)

    def _state_sync(self, sid: str) -> filelog.LogState:
        files = self._files(sid)
        with filelog.locked(files.log, exclusive=False, create=False) as fd:
            if fd is None:
                self._remember(sid, None)
                return filelog.LogState(b"", 0, 0, 0, 0, "", 0)
            state = filelog.load(files, fd, self._cached(sid), repair=False)
        self._remember(sid, state)
        return state

    # -- events --------------------------------------------------------------------------

    async def append(
        self, sid: str, epoch: int, events: Sequence[StoredEvent], *, user: str
    ) -> AppendResult:
        check_append(sid, epoch, events, user)
        batch = tuple(events)
        async with self._locks.hold(sid):
            return await self._run(self._append_sync, sid, epoch, batch, user)

    async def append_many(self, batches: Sequence[Batch]) -> list[AppendResult | Exception]:
        return await append_checked(batches, self._append_valid)

    async def _append_valid(self, batches: list[Batch]) -> dict[str, AppendResult | Exception]:
        jobs = min(self._threads, -(-len(batches) // PER_JOB))
        parts = [batches[i::jobs] for i in range(jobs)]
        async with AsyncExitStack() as held:
            for sid in sorted(b.sid for b in batches):  # one order: no deadlock with append
                await held.enter_async_context(self._locks.hold(sid))
            done = await asyncio.gather(*(self._run(self._append_each_sync, p) for p in parts))
        return {
            b.sid: r
            for part, rs in zip(parts, done, strict=True)
            for b, r in zip(part, rs, strict=True)
        }

    def _append_each_sync(self, batches: Sequence[Batch]) -> list[AppendResult | Exception]:
        out: list[AppendResult | Exception] = []
        for b in batches:
            try:
                out.append(self._append_sync(b.sid, b.epoch, b.events, b.user))
            except OSError as exc:
                out.append(self._unavailable(exc))
            except Exception as exc:  # this conversation's (another user's): not the rest
                out.append(exc)
        return out

    def _append_sync(
        self, sid: str, epoch: int, events: Sequence[StoredEvent], user: str
    ) -> AppendResult:
        files = self._files(sid)
        with filelog.locked(files.log, exclusive=True, create=True) as fd:
            assert fd is not None
            state = filelog.load(files, fd, self._cached(sid), repair=True)
            try:
                state, result = filelog.append(
                    files, fd, state, epoch, events, user or NO_USER, self._durable, self._index
                )
            except BaseException:
                self._remember(sid, None)  # the file may hold a partial write: re-read it
                raise
            if state.end == 0:  # refused before anything was written: leave no file
                files.log.unlink()
                self._remember(sid, None)
            else:
                self._remember(sid, state)
            return result

    async def read(
        self, sid: str, after: int = 0, limit: int = DEFAULT_READ_LIMIT, max_bytes: int = 0
    ) -> list[StoredEvent]:
        check_conversation_id(sid)
        check_read(after, limit, max_bytes)
        return await self._run(self._read_sync, sid, after, limit, max_bytes)

    def _read_sync(self, sid: str, after: int, limit: int, max_bytes: int) -> list[StoredEvent]:
        files = self._files(sid)
        with filelog.locked(files.log, exclusive=False, create=False) as fd:
            return [] if fd is None else filelog.read(files, fd, after, limit, max_bytes)

    async def conversation(self, sid: str) -> StoredConversation | None:
        check_conversation_id(sid)
        return await self._run(self._conversation_sync, sid)

    def _conversation_sync(self, sid: str) -> StoredConversation | None:
        state = self._state_sync(sid)
        if not state.user:
            return None
        if state.user == NO_USER:
            return StoredConversation(sid, "", state.epoch, state.last_id, state.size)
        created = self._users.created(sid, state.user)
        return StoredConversation(sid, state.user, state.epoch, state.last_id, state.size, created)

    def _index(self, sid: str, user: str) -> None:
        """A new conversation of ``user`` in the users' index (one of no user is in none)."""
        if user != NO_USER:
            self._users.add(sid, user)

    async def lookup(self, sid: str, user: str, *, quota: int = 0) -> Lookup:
        check_conversation_id(sid)
        if user:
            check_user_id(user)
        quick = self._lookup_quick(sid, user, quota)
        if quick is not None:
            return quick
        return await self._run(self._lookup_sync, sid, user, quota)

    def _lookup_quick(self, sid: str, user: str, quota: int) -> Lookup | None:
        """``lookup`` on the event loop when the store has no log of ``sid`` and the
        answer takes a few system calls (module docstring); None when it needs a thread."""
        self._threads_of_open_store()
        if not self._local:
            return None
        try:
            if not _absent(self._files(sid).log):
                return None  # it may hold the conversation: read on a thread
            self._remember(sid, None)
            if not (quota and user):
                return Lookup(None)
            # None: too many markers to list here, or each one's log may have to be read
            # (at the quota: UserIndex.count).
            listed = self._users.listed(user, min(QUICK_LISTING, quota - 1))
        except OSError as exc:
            raise self._unavailable(exc) from exc
        return None if listed is None else Lookup(None, listed)

    def _lookup_sync(self, sid: str, user: str, quota: int) -> Lookup:
        # One trip to the store's threads: a join's start pays for each (a thread's
        # wake-up and the event loop's), not for the few system calls in it.
        known = self._conversation_sync(sid)
        if known is not None or not (quota and user):
            return Lookup(known)
        return Lookup(None, self._users.count(user, quota))

    async def last_id(self, sid: str) -> int:
        check_conversation_id(sid)
        return (await self._run(self._state_sync, sid)).last_id

    async def last_ids(self, sids: Sequence[str]) -> list[int]:
        for sid in sids:
            check_conversation_id(sid)
        # In two trips to the store's threads at once (a conversation being appended to
        # holds its lock: the other trip's reads go on meanwhile), leaving the others to
        # the owners' appends and the replays.
        size = max(1, -(-len(sids) // 2))
        parts = [sids[i : i + size] for i in range(0, len(sids), size)]
        read = await asyncio.gather(*(self._run(self._last_ids_sync, part) for part in parts))
        return [last for part in read for last in part]

    def _last_ids_sync(self, sids: Sequence[str]) -> list[int]:
        return [self._state_sync(sid).last_id for sid in sids]

    async def size(self, sid: str) -> int:
        check_conversation_id(sid)
        return (await self._run(self._state_sync, sid)).size

    async def count_conversations(self, user: str | None = None) -> int:
        if user is None:  # a listing: for an operator, not for every request
            return await self._run(self._count_all_sync)
        return await self._run(self._users.count, check_user_id(user))

    def _count_all_sync(self) -> int:
        with os.scandir(self.path / "conversations") as entries:
            return sum(1 for entry in entries if entry.name.endswith(".log") and _holds(entry))

    async def list_conversations(self, user: str, limit: int) -> list[tuple[str, int]]:
        check_user_id(user)
        check_limit(limit)
        return await self._run(self._users.newest, user, limit)

    async def purge(self, sid: str) -> tuple[int, int]:
        check_conversation_id(sid)
        async with self._locks.hold(sid):
            return await self._run(self._purge_sync, sid)

    def _purge_sync(self, sid: str) -> tuple[int, int]:
        files = self._files(sid)
        with filelog.locked(files.log, exclusive=True, create=False) as fd:
            if fd is None:
                return 0, 0
            state = filelog.load(files, fd, self._cached(sid), repair=False)
            # The log goes last: until then the lock on it keeps every other writer out,
            # and a purge cut short by a crash is finished by running it again.
            files.index.unlink(missing_ok=True)
            files.checkpoint.unlink(missing_ok=True)
            for name in os.listdir(files.torn_dir):
                if name.rpartition(".")[0] == sid:
                    (files.torn_dir / name).unlink(missing_ok=True)
            if state.user and state.user != NO_USER:
                self._users.remove(sid, state.user)
            files.log.unlink()
            self._remember(sid, None)
            if self._durable:
                filelog.fsync_dir(files.log.parent)
            return state.last_id, state.size

    # -- checkpoints -------------------------------------------------------------------------

    async def save_checkpoint(
        self, sid: str, epoch: int, covers_id: int, data: bytes
    ) -> CheckpointStatus:
        check_checkpoint(sid, epoch, covers_id, data, self.max_checkpoint_bytes)
        async with self._locks.hold(sid):
            return await self._run(self._save_checkpoint_sync, sid, epoch, covers_id, data)

    def _save_checkpoint_sync(
        self, sid: str, epoch: int, covers_id: int, data: bytes
    ) -> CheckpointStatus:
        files = self._files(sid)
        with filelog.locked(files.log, exclusive=True, create=False) as fd:
            state = None if fd is None else filelog.load(files, fd, self._cached(sid), repair=True)
            if fd is None or state is None or not state.user:
                raise ConversationNotFound(sid)
            saved = filelog.read_checkpoint(files.checkpoint)
            head = None if saved is None else fr.checkpoint_header(saved)
            saved_covers = None if head is None else head[1]
            status = plan_checkpoint(state.epoch, saved_covers, epoch, covers_id)
            if status == "ok":
                state = filelog.raise_fence(files, fd, state, epoch, self._durable)
                self._remember(sid, state)
                contents = fr.checkpoint_file(epoch, covers_id, data)
                filelog.write_checkpoint(files.checkpoint, contents, self._durable)
            return status

    async def load_checkpoint(self, sid: str) -> tuple[int, bytes] | None:
        check_conversation_id(sid)
        raw = await self._run(filelog.read_checkpoint, self._files(sid).checkpoint)
        if raw is None:
            return None
        parsed = fr.parse_checkpoint(raw)
        if parsed is None:  # only after a machine crash with fsync "none"
            log.warning("checkpoint of %r in %s is damaged; ignoring it", sid, self.path)
        return parsed
