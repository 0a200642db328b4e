"""One conversation's files in the file store, operated on synchronously (in a worker
thread) while holding the conversation's ``fcntl`` lock.

Invariant: under the exclusive lock the log file ends with a whole, valid record. The
first holder to find anything else after the last valid record (a write torn by a crash)
copies those bytes aside (``torn/``) and truncates them; a holder of the shared lock
(a reader) only stops there. Locks are ``flock`` locks on the log file itself; a lock
taken on a file that was unlinked meanwhile (a purge) is dropped and taken again on the
new file, so every holder works on the file the path names.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from . import framing as fr
from .base import AppendResult, StoredEvent, check_user, plan_append
from .errors import StoreCorrupt

log = logging.getLogger(__name__)

FILE_MODE = 0o600


@dataclass(frozen=True, slots=True)
class LogState:
    """What the log holds, up to ``end`` (the end of its last valid record)."""

    header: bytes  # the file's first bytes, naming it (see framing.py)
    end: int
    last_id: int
    epoch: int
    size: int
    user: str
    indexed: int  # index entries known good (entries 0 .. indexed - 1)


@dataclass(frozen=True, slots=True)
class ConversationFiles:
    sid: str
    log: Path
    index: Path
    checkpoint: Path
    torn_dir: Path

    @classmethod
    def under(cls, root: Path, sid: str) -> ConversationFiles:
        conversations = root / "conversations"
        return cls(
            sid,
            conversations / f"{sid}.log",
            conversations / f"{sid}.idx",
            conversations / f"{sid}.ckpt",
            root / "torn",
        )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path, *, exclusive: bool, create: bool) -> Iterator[int | None]:
    """The log file's descriptor, ``flock``-ed; None if it does not exist and not
    ``create`` (FileNotFoundError with ``create``: its directory is gone). Exclusive
    holders may write: with ``O_APPEND``, at the end."""
    flags = (os.O_RDWR | os.O_APPEND) if exclusive else os.O_RDONLY
    if create:
        flags |= os.O_CREAT
    while True:
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, FILE_MODE)
        except FileNotFoundError:
            if create:
                raise
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield fd
                return
        finally:
            os.close(fd)  # also releases the lock


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _index_complete(index: Path, state: LogState) -> bool:
    """Whether the index file still holds exactly the entries ``state`` counts."""
    try:
        entries = os.stat(index).st_size
    except FileNotFoundError:
        entries = 0
    return state.indexed == fr.entries_for(state.last_id) and entries == (
        state.indexed * fr.ENTRY_SIZE
    )


def _index_start(fd: int, index: Path, size: int, repair: bool) -> tuple[int, int, int, int]:
    """Where a scan may start, from the last index entry that matches the log:
    ``(offset, last id before it, bytes before it, good entries)``."""
    try:
        idx = os.open(index, os.O_RDWR if repair else os.O_RDONLY)
    except FileNotFoundError:
        return 0, 0, 0, 0
    try:
        slots = os.fstat(idx).st_size // fr.ENTRY_SIZE
        for slot in range(slots - 1, -1, -1):
            entry = fr.parse_index_entry(os.pread(idx, fr.ENTRY_SIZE, slot * fr.ENTRY_SIZE), slot)
            if entry is None or entry[0] >= size:
                continue
            record = fr.read_record(fd, entry[0])
            event_id = slot * fr.INDEX_EVERY + 1
            if record is not None and record.kind == fr.EVENT and record.event_id == event_id:
                if repair and os.fstat(idx).st_size != (slot + 1) * fr.ENTRY_SIZE:
                    os.ftruncate(idx, (slot + 1) * fr.ENTRY_SIZE)
                return entry[0], event_id - 1, entry[1], slot + 1
        if repair:
            os.ftruncate(idx, 0)
        return 0, 0, 0, 0
    finally:
        os.close(idx)


def stored_for(log: Path, user: str) -> bool:
    """Whether ``log`` holds a conversation of ``user``: its first record (the user) is
    whole and names them (a marker can outlive a purge cut short by a crash, and the
    conversation id can be used again by someone else)."""
    try:
        fd = os.open(log, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return os.pread(fd, len(fr.MAGIC), 0) == fr.MAGIC and _read_user(fd) == user
    finally:
        os.close(fd)


def _read_user(fd: int) -> str | None:
    record = fr.read_record(fd, fr.HEADER_SIZE)
    if record is None or record.kind != fr.USER:
        return None
    return record.data.decode()


def load(files: ConversationFiles, fd: int, cached: LogState | None, *, repair: bool) -> LogState:
    """The log's state, scanning only what ``cached`` (or the index) does not cover.

    With ``repair`` (exclusive lock held) a torn tail is cut off and missing index
    entries are written."""
    size = os.fstat(fd).st_size
    if size < fr.HEADER_SIZE:  # empty, or its creation was torn
        if repair and size:
            _cut_tail(files, fd, 0, size)
        return LogState(b"", 0, 0, 0, 0, "", 0)
    header = os.pread(fd, fr.HEADER_SIZE, 0)
    if not header.startswith(fr.MAGIC):
        raise StoreCorrupt(f"{files.log} is not an event log of this format")
    if (
        cached is not None
        and cached.header == header
        and cached.end <= size
        and (not repair or _index_complete(files.index, cached))
    ):
        if cached.end == size:
            return cached
        return _scan(files, fd, cached, size, repair)
    user = _read_user(fd)
    if user is None:  # the first write was torn: nothing was stored
        if repair and size > fr.HEADER_SIZE:
            _cut_tail(files, fd, fr.HEADER_SIZE, size)
        return LogState(header, fr.HEADER_SIZE, 0, 0, 0, "", 0)
    offset, last_id, nbytes, indexed = _index_start(fd, files.index, size, repair)
    state = LogState(header, offset or fr.HEADER_SIZE, last_id, 0, nbytes, user, indexed)
    return _scan(files, fd, state, size, repair)


def _scan(files: ConversationFiles, fd: int, state: LogState, size: int, repair: bool) -> LogState:
    reader = fr.RecordReader(fd, state.end)
    last_id, epoch, nbytes, indexed = state.last_id, state.epoch, state.size, state.indexed
    entries: list[bytes] = []
    while (record := reader.next()) is not None:
        epoch = max(epoch, record.epoch)
        if record.kind != fr.EVENT:
            continue
        if record.event_id != last_id + 1:
            raise StoreCorrupt(f"{files.log}: id {record.event_id} follows {last_id}")
        slot = fr.index_slot(record.event_id)
        if slot is not None and slot >= indexed:
            entries.append(fr.index_entry(record.event_id, record.offset, nbytes))
        last_id = record.event_id
        nbytes += len(record.data)
    if reader.torn and repair:
        _cut_tail(files, fd, reader.pos, size)
    if repair and entries:
        _write_index(files.index, indexed, entries)
        indexed += len(entries)
    return LogState(state.header, reader.pos, last_id, epoch, nbytes, state.user, indexed)


def _cut_tail(files: ConversationFiles, fd: int, end: int, size: int) -> None:
    """Move the bytes after the valid log aside, then truncate them away."""
    tail = os.pread(fd, size - end, end)
    files.torn_dir.mkdir(mode=0o700, exist_ok=True)
    aside = files.torn_dir / f"{files.sid}.{time.time_ns()}"
    aside.write_bytes(tail)
    os.ftruncate(fd, end)
    os.fsync(fd)
    log.warning(
        "event log %s: %d bytes after offset %d are not a whole record (a write torn by a "
        "crash or a full disk); cut off, copy kept in %s",
        files.log,
        len(tail),
        end,
        aside,
    )


def _write_index(index: Path, first_slot: int, entries: Sequence[bytes]) -> None:
    fd = os.open(index, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.pwrite(fd, b"".join(entries), first_slot * fr.ENTRY_SIZE)
    finally:
        os.close(fd)


def append(
    files: ConversationFiles,
    fd: int,
    state: LogState,
    epoch: int,
    events: Sequence[StoredEvent],
    user: str,
    durable: bool,
    on_create: Callable[[str, str], None],
) -> tuple[LogState, AppendResult]:
    """Append under the exclusive lock; ``state`` is the loaded (repaired) state.
    ``on_create(sid, user)`` runs before the first record of a new conversation."""
    if state.user:
        check_user(files.sid, state.user, user)
    first = events[0][0] if events else state.last_id + 1
    plan = plan_append(state.epoch, state.last_id, epoch, first)
    if isinstance(plan, str):
        return state, AppendResult(plan, state.last_id, state.epoch)
    new = events[plan:]
    parts: list[bytes] = []
    header = state.header or fr.new_header()
    if state.end == 0:
        parts.append(header)
    if not state.user:
        parts.append(fr.user_record(user))
    offset = state.end + sum(map(len, parts))
    nbytes = state.size
    entries: list[bytes] = []
    for event_id, data in new:
        record = fr.event_record(event_id, epoch, data)
        if fr.index_slot(event_id) is not None:
            entries.append(fr.index_entry(event_id, offset, nbytes))
        parts.append(record)
        offset += len(record)
        nbytes += len(data)
    if not new and epoch > state.epoch:
        parts.append(fr.fence_record(epoch))
        offset += len(parts[-1])
    if not parts:
        return state, AppendResult("ok", state.last_id, state.epoch)
    if not state.user:
        on_create(files.sid, user)
    _write_all(fd, b"".join(parts))
    if durable:
        os.fdatasync(fd)
        if state.end == 0:
            fsync_dir(files.log.parent)
    if entries:  # after the log is durable: an entry never names a lost record
        _write_index(files.index, state.indexed, entries)
    last_id = new[-1][0] if new else state.last_id
    after = replace(
        state,
        header=header,
        end=offset,
        last_id=last_id,
        epoch=max(epoch, state.epoch),
        size=nbytes,
        user=user,
        indexed=state.indexed + len(entries),
    )
    return after, AppendResult("ok", last_id, after.epoch, len(new))


def raise_fence(
    files: ConversationFiles, fd: int, state: LogState, epoch: int, durable: bool
) -> LogState:
    """Record ``epoch`` as the fence (a checkpoint's writer had a higher one)."""
    if epoch <= state.epoch:
        return state
    record = fr.fence_record(epoch)
    _write_all(fd, record)
    if durable:
        os.fdatasync(fd)
    return replace(state, end=state.end + len(record), epoch=epoch)


def read(
    files: ConversationFiles, fd: int, after: int, limit: int, max_bytes: int = 0
) -> list[StoredEvent]:
    """Events with ids above ``after``, at most ``limit`` and (``max_bytes`` > 0) none
    after those whose data reach ``max_bytes``, under the shared lock."""
    size = os.fstat(fd).st_size
    if size <= fr.HEADER_SIZE:
        return []
    start = _read_start(fd, files.index, after, size)
    reader = fr.RecordReader(fd, start)
    out: list[StoredEvent] = []
    left = max_bytes or -1
    while len(out) < limit and left != 0 and (record := reader.next()) is not None:
        if record.kind == fr.EVENT and record.event_id > after:
            out.append((record.event_id, record.data))
            if left > 0:
                left = max(0, left - len(record.data))
    return out


def _read_start(fd: int, index: Path, after: int, size: int) -> int:
    """Offset of the indexed record at or before id ``after + 1`` (else the first)."""
    try:
        idx = os.open(index, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return fr.HEADER_SIZE
    try:
        slot = min(after // fr.INDEX_EVERY, os.fstat(idx).st_size // fr.ENTRY_SIZE - 1)
        for k in range(slot, -1, -1):
            entry = fr.parse_index_entry(os.pread(idx, fr.ENTRY_SIZE, k * fr.ENTRY_SIZE), k)
            if entry is None or entry[0] >= size:
                continue
            record = fr.read_record(fd, entry[0])
            if record is not None and record.event_id == k * fr.INDEX_EVERY + 1:
                return entry[0]
        return fr.HEADER_SIZE
    finally:
        os.close(idx)


def read_checkpoint(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write_checkpoint(path: Path, contents: bytes, durable: bool) -> None:
    """Replace the checkpoint file whole: a temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.time_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        _write_all(fd, contents)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)
