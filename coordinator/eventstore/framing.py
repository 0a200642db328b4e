"""The file store's on-disk formats: log records, index entries, checkpoint files.

A conversation's log is a header (``MAGIC`` and 8 random bytes naming this file, so a
cached view of a purged and re-created file is never taken for the new one, even if the
inode number is reused) followed by records. A record is

    u32 body length | u32 CRC-32 of (length bytes + body) | body

and a body starts with its kind: ``USER`` (the conversation's user, always the first
record), ``EVENT`` (u64 id, u64 writer's epoch, the packed event) or ``FENCE`` (u64
epoch: an append or checkpoint raised the fence without logging an event). Epochs never
go down along a log, so the fence is the epoch of its last record. The CRC covers the
length, so a tail of zeros (a size extended before its data reached the disk) or a torn
length never reads as a record. All integers are little-endian.

The index holds one fixed-size entry for every ``INDEX_EVERY``-th event (ids 1,
1 + INDEX_EVERY, ...): entry ``k`` is at byte ``k * ENTRY_SIZE`` and names id
``k * INDEX_EVERY + 1``, its record's offset and the event bytes before it, so a read
finds its start with one ``pread`` and skips at most ``INDEX_EVERY - 1`` records. The
index is a cache of the log: it is checked against the log before use and rebuilt
from it when missing or behind.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from ..config import MAX_EVENT_BYTES

MAGIC = b"CEVLOG1\n"
HEADER_SIZE = len(MAGIC) + 8
CHECKPOINT_MAGIC = b"CEVCKP1\n"

USER = 1
EVENT = 2
FENCE = 3

INDEX_EVERY = 64

_HEAD = struct.Struct("<II")
_EVENT = struct.Struct("<BQQ")
_FENCE = struct.Struct("<BQ")
_ENTRY = struct.Struct("<QQQ")
ENTRY_SIZE = _ENTRY.size + 4
_CHECKPOINT = struct.Struct("<QQQI")
_MAX_BODY = MAX_EVENT_BYTES + _EVENT.size
# Bytes read at a time when scanning a log.
READ_CHUNK = 256 * 1024


def new_header() -> bytes:
    return MAGIC + os.urandom(HEADER_SIZE - len(MAGIC))


def _frame(body: bytes) -> bytes:
    length = struct.pack("<I", len(body))
    return length + struct.pack("<I", zlib.crc32(body, zlib.crc32(length))) + body


def user_record(user: str) -> bytes:
    return _frame(bytes([USER]) + user.encode())


def event_record(event_id: int, epoch: int, data: bytes) -> bytes:
    return _frame(_EVENT.pack(EVENT, event_id, epoch) + data)


def fence_record(epoch: int) -> bytes:
    return _frame(_FENCE.pack(FENCE, epoch))


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    offset: int
    end: int
    event_id: int = 0
    epoch: int = 0
    data: bytes = b""


def _decode(body: memoryview, offset: int, end: int) -> Record | None:
    kind = body[0]
    if kind == EVENT and len(body) >= _EVENT.size:
        _, event_id, epoch = _EVENT.unpack_from(body)
        return Record(EVENT, offset, end, event_id, epoch, bytes(body[_EVENT.size :]))
    if kind == FENCE and len(body) == _FENCE.size:
        return Record(FENCE, offset, end, epoch=_FENCE.unpack_from(body)[1])
    if kind == USER:
        return Record(USER, offset, end, data=bytes(body[1:]))
    return None


class RecordReader:
    """Reads records from ``fd`` starting at ``offset``, in chunks, with ``pread``.

    ``next()`` returns None at the first byte that does not start a whole, valid record;
    then ``pos`` is that byte's offset (the end of the valid log) and ``torn`` says
    whether any bytes follow it (a torn or corrupt tail) or the file simply ended.
    """

    def __init__(self, fd: int, offset: int, chunk: int = READ_CHUNK) -> None:
        self.fd = fd
        self.pos = offset
        self.torn = False
        self._chunk = chunk
        self._buf = b""
        self._buf_at = offset

    def _have(self, n: int) -> memoryview | None:
        """The ``n`` bytes at ``pos``, reading more of the file if needed."""
        start = self.pos - self._buf_at
        if start + n > len(self._buf):
            more = os.pread(self.fd, max(self._chunk, n), self.pos)
            self._buf, self._buf_at, start = more, self.pos, 0
            if len(more) < n:
                self.torn = len(more) > 0
                return None
        return memoryview(self._buf)[start : start + n]

    def next(self) -> Record | None:
        head = self._have(_HEAD.size)
        if head is None:
            return None
        length, crc = _HEAD.unpack(head)
        if length == 0 or length > _MAX_BODY:
            self.torn = True
            return None
        whole = self._have(_HEAD.size + length)
        if whole is None:
            return None
        body = whole[_HEAD.size :]
        record = None
        if zlib.crc32(body, zlib.crc32(whole[:4])) == crc:
            record = _decode(body, self.pos, self.pos + _HEAD.size + length)
        if record is None:
            self.torn = True
            return None
        self.pos = record.end
        return record


def read_record(fd: int, offset: int) -> Record | None:
    """The valid record at ``offset``, or None."""
    return RecordReader(fd, offset, chunk=4096).next()


# -- index -------------------------------------------------------------------------------


def index_slot(event_id: int) -> int | None:
    """The index entry number of ``event_id``, if it has one."""
    return (event_id - 1) // INDEX_EVERY if (event_id - 1) % INDEX_EVERY == 0 else None


def entries_for(last_id: int) -> int:
    """How many index entries a log with ids ``1..last_id`` has."""
    return (last_id + INDEX_EVERY - 1) // INDEX_EVERY


def index_entry(event_id: int, offset: int, bytes_before: int) -> bytes:
    packed = _ENTRY.pack(event_id, offset, bytes_before)
    return packed + struct.pack("<I", zlib.crc32(packed))


def parse_index_entry(raw: bytes, slot: int) -> tuple[int, int] | None:
    """``(offset, bytes_before)`` of entry ``slot`` if ``raw`` is that entry, intact."""
    if len(raw) != ENTRY_SIZE or zlib.crc32(raw[: _ENTRY.size]) != int.from_bytes(
        raw[_ENTRY.size :], "little"
    ):
        return None
    event_id, offset, bytes_before = _ENTRY.unpack_from(raw)
    if event_id != slot * INDEX_EVERY + 1:
        return None
    return offset, bytes_before


# -- checkpoints -------------------------------------------------------------------------


def checkpoint_file(epoch: int, covers_id: int, data: bytes) -> bytes:
    head = _CHECKPOINT.pack(epoch, covers_id, len(data), zlib.crc32(data))
    return CHECKPOINT_MAGIC + head + data


def checkpoint_header(raw: bytes) -> tuple[int, int, int, int] | None:
    """``(epoch, covers_id, length, crc)`` from a checkpoint file's first bytes."""
    size = len(CHECKPOINT_MAGIC) + _CHECKPOINT.size
    if len(raw) < size or not raw.startswith(CHECKPOINT_MAGIC):
        return None
    epoch, covers, length, crc = _CHECKPOINT.unpack_from(raw, len(CHECKPOINT_MAGIC))
    return epoch, covers, length, crc


def parse_checkpoint(raw: bytes) -> tuple[int, bytes] | None:
    """``(covers_id, data)`` of an intact checkpoint file's contents, else None."""
    head = checkpoint_header(raw)
    if head is None:
        return None
    _, covers, length, crc = head
    data = raw[len(CHECKPOINT_MAGIC) + _CHECKPOINT.size :]
    if len(data) != length or zlib.crc32(data) != crc:
        return None
    return covers, data
