"""The event store's contract, its result types and the decisions every backend shares.

The store keeps the full history of each conversation behind the Redis hot window. The
owner of a conversation moves its events there in order, in batches, off the action's
acknowledgement path. Invariants, the same in every backend:

- **Contiguous ids.** A conversation's stored ids are exactly ``1..last_id``. A batch is
  contiguous and starts at most at ``last_id + 1``; a later start is a *gap* and is
  refused whole.
- **Idempotent.** Ids already stored are skipped, so a batch sent again after a lost
  reply (or a batch overlapping the stored tail) writes nothing twice. An id names one
  event (the Redis log assigns it), so a skipped event is not compared with the stored one.
- **Fenced.** The store remembers the highest epoch that wrote each conversation (its
  *fence*). A write with a lower epoch is *fenced* and changes nothing: a replaced
  owner's late batch cannot write. A write with a higher epoch raises the fence, even
  when all its events were already stored or the batch is empty (a new owner can fence
  its predecessor before it has anything to move).
- **Checkpoints** are fenced the same way, bounded in size, and never replaced by one
  that covers fewer events.

Nothing here does I/O: the backends (``filestore.py``, ``postgres.py``) call it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol, Self

from ..config import MAX_EVENT_BYTES
from ..errors import InvalidInput
from ..inputs import check_conversation_id, check_user_id
from .errors import CheckpointTooLarge, StoreError

AppendStatus = Literal["ok", "fenced", "gap"]
CheckpointStatus = Literal["ok", "fenced", "stale"]
StoredEvent = tuple[int, bytes]

# A checkpoint is agent state the owner saves to restart from; it is not meant to grow
# with the conversation (that is what the events are for).
DEFAULT_MAX_CHECKPOINT_BYTES = 1024 * 1024
DEFAULT_READ_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append did.

    ``status`` is ``ok`` (the batch is stored: ``written`` of its events were new),
    ``fenced`` (``epoch`` is the higher fence that refused it) or ``gap`` (the batch
    starts after ``last_id + 1``). ``last_id`` and ``epoch`` are the store's after the call.
    """

    status: AppendStatus
    last_id: int
    epoch: int
    written: int = 0


@dataclass(frozen=True, slots=True)
class Batch:
    """One conversation's part of ``append_many``: the arguments of an ``append``."""

    sid: str
    epoch: int
    events: tuple[StoredEvent, ...]
    user: str

    @property
    def opens(self) -> bool:
        """It may be the conversation's first: it starts at id 1, or is empty (a fence)."""
        return not self.events or self.events[0][0] == 1


@dataclass(frozen=True, slots=True)
class StoredConversation:
    """A conversation as the store knows it: its user (recorded by the first append),
    fence epoch, last stored id, the bytes of its stored events, and when the store
    first recorded it (ms since the epoch; 0 when it cannot say)."""

    sid: str
    user: str
    epoch: int
    last_id: int
    size: int
    created: int = 0


@dataclass(frozen=True, slots=True)
class Lookup:
    """What a start asks the store before creating a conversation in Redis (one call):
    ``known``, the conversation if the store holds it; else ``count``, the user's stored
    conversations (0 when no quota asked; under the quota possibly an upper bound)."""

    known: StoredConversation | None
    count: int = 0


class Opened:
    """What every backend shares around its connection: ``async with`` opens and closes
    it, and ``identity`` names the store once ``open`` has set ``_identity``."""

    _identity: str | None = None
    server_changes = 0
    server: str | None = None

    async def open(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def identity(self) -> str:
        if self._identity is None:
            raise StoreError(f"{self!r} is not open")
        return self._identity


class EventStore(Protocol):
    """The durable event log behind the Redis window; every backend implements this.

    ``open()`` before use (it creates what is missing: a directory, the tables) and
    ``aclose()`` after; both backends are also async context managers.
    """

    # How many times a new connection reached another server than the last one did (a
    # standby promoted, a restart): the store may have failed over. A file store's: 0.
    server_changes: int
    # The server the last new connection reached, as every node would name it (None: a
    # file store, or not known): the cluster keeps the last one seen, so that a node
    # started after a failover finds it too (storeaudit.py).
    server: str | None

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    def identity(self) -> str:
        """A random id made once for this store (the directory, the database): nodes
        that report the same identity share one store. Valid after ``open()``."""
        ...

    async def append(
        self, sid: str, epoch: int, events: Sequence[StoredEvent], *, user: str
    ) -> AppendResult:
        """Store ``events`` (``(id, packed msgpack)``, contiguous ids) for ``sid``,
        fenced by ``epoch`` and idempotent (see the module docstring). ``user`` is
        recorded on the conversation's first append; a different one later is refused."""
        ...

    async def append_many(self, batches: Sequence[Batch]) -> list[AppendResult | Exception]:
        """``append`` each batch (at most one per conversation), together: for each, in
        order, its result or what refused or failed it (one conversation's error does not
        stop the others). The owner's mover calls it once per gathering, so the cost
        per call (a hop to the store's threads, a round trip) is paid once for all."""
        ...

    async def last_id(self, sid: str) -> int:
        """The last stored id (0 when nothing is stored)."""
        ...

    async def last_ids(self, sids: Sequence[str]) -> list[int]:
        """``last_id`` of each of ``sids``, in one read where the backend can (the
        store audit reads every conversation Redis holds)."""
        ...

    async def read(
        self, sid: str, after: int = 0, limit: int = DEFAULT_READ_LIMIT, max_bytes: int = 0
    ) -> list[StoredEvent]:
        """Up to ``limit`` events with ids above ``after``, in id order; with
        ``max_bytes``, none after those whose data reach that size (at least one)."""
        ...

    async def size(self, sid: str) -> int:
        """Bytes of event data stored for ``sid`` (the packed events; for byte quotas)."""
        ...

    async def conversation(self, sid: str) -> StoredConversation | None:
        """What the store knows of ``sid``, or None if it has never been written."""
        ...

    async def lookup(self, sid: str, user: str, *, quota: int = 0) -> Lookup:
        """``sid`` as ``conversation()`` gives it and, when the store does not hold it and
        ``quota`` is set, how many conversations ``user`` has stored: in one call (a
        join's start makes it). A count under ``quota`` may be an upper bound (all the
        quota needs): the file store then counts markers without reading each log."""
        ...

    async def count_conversations(self, user: str | None = None) -> int:
        """Conversations stored for ``user`` (for per-user quotas), or in all when None."""
        ...

    async def list_conversations(self, user: str, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` of ``user``'s stored conversations, newest first, each with
        when the store first recorded it (ms since the epoch)."""
        ...

    async def purge(self, sid: str) -> tuple[int, int]:
        """Delete everything stored for ``sid`` (events, checkpoint, fence, user record);
        returns ``(events removed, bytes removed)``. The fence goes too: purge only a
        conversation no owner can still write (deleted, its owner fenced in Redis)."""
        ...

    async def save_checkpoint(
        self, sid: str, epoch: int, covers_id: int, data: bytes
    ) -> CheckpointStatus:
        """Save ``data`` as the state after event ``covers_id``, fenced by ``epoch``.

        ``fenced``: a higher epoch wrote the conversation; ``stale``: the saved
        checkpoint covers more events. Raises ``CheckpointTooLarge`` over the limit and
        ``ConversationNotFound`` when the conversation was never appended to."""
        ...

    async def load_checkpoint(self, sid: str) -> tuple[int, bytes] | None:
        """The saved checkpoint as ``(covers_id, data)``, or None."""
        ...


# -- decisions shared by the backends ----------------------------------------------------


def check_batches(batches: Sequence[Batch]) -> list[Exception | None]:
    """For each batch of an ``append_many``, why it is malformed (``check_append``), or
    None; raise InvalidInput if two batches name one conversation."""
    sids = [b.sid for b in batches]
    if len(set(sids)) != len(sids):
        raise InvalidInput("append_many takes at most one batch per conversation")
    out: list[Exception | None] = []
    for b in batches:
        try:
            check_append(b.sid, b.epoch, b.events, b.user)
        except InvalidInput as exc:
            out.append(exc)
        else:
            out.append(None)
    return out


async def append_checked(
    batches: Sequence[Batch],
    append: Callable[[list[Batch]], Awaitable[Mapping[str, AppendResult | Exception]]],
) -> list[AppendResult | Exception]:
    """Every backend's ``append_many``: each malformed batch refused alone
    (``check_batches``), the others given to ``append`` (its results by conversation),
    the outcomes in the batches' order."""
    checked = check_batches(batches)
    valid = [b for b, bad in zip(batches, checked, strict=True) if bad is None]
    done = await append(valid) if valid else {}
    return [
        bad if bad is not None else done[b.sid] for b, bad in zip(batches, checked, strict=True)
    ]


def check_append(sid: str, epoch: int, events: Sequence[StoredEvent], user: str) -> None:
    """Raise InvalidInput unless the arguments of an append are well formed (``user``
    '': a conversation of no user, as the seed's ``user_id=None`` makes)."""
    check_conversation_id(sid)
    if user:
        check_user_id(user)
    check_epoch(epoch)
    expected = None
    for item in events:
        if not isinstance(item, tuple) or len(item) != 2:
            raise InvalidInput("an event must be an (id, bytes) pair")
        event_id, data = item
        if isinstance(event_id, bool) or not isinstance(event_id, int) or event_id < 1:
            raise InvalidInput(f"event ids are integers from 1, got {event_id!r}")
        if expected is not None and event_id != expected:
            raise InvalidInput(
                f"a batch's ids must be contiguous: {event_id} follows {expected - 1}"
            )
        if not isinstance(data, bytes):
            raise InvalidInput(f"event {event_id}'s data must be bytes, got {type(data).__name__}")
        if len(data) > MAX_EVENT_BYTES:
            raise InvalidInput(
                f"event {event_id} is {len(data)} bytes; the limit is {MAX_EVENT_BYTES}"
            )
        expected = event_id + 1


def check_epoch(epoch: int) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise InvalidInput(f"an epoch is an integer >= 0, got {epoch!r}")


def check_read(after: int, limit: int, max_bytes: int) -> None:
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise InvalidInput(f"'after' is an event id >= 0, got {after!r}")
    check_limit(limit)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise InvalidInput(f"'max_bytes' is an integer >= 0 (0: no bound), got {max_bytes!r}")


def check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInput(f"'limit' is an integer >= 1, got {limit!r}")


def check_checkpoint(sid: str, epoch: int, covers_id: int, data: bytes, limit: int) -> None:
    check_conversation_id(sid)
    check_epoch(epoch)
    if isinstance(covers_id, bool) or not isinstance(covers_id, int) or covers_id < 0:
        raise InvalidInput(f"'covers_id' is an event id >= 0, got {covers_id!r}")
    if not isinstance(data, bytes):
        raise InvalidInput(f"checkpoint data must be bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise CheckpointTooLarge(sid, len(data), limit)


def check_user(sid: str, recorded: str, given: str) -> None:
    """A conversation's user never changes: a different one is a caller's bug."""
    if recorded != given:
        raise InvalidInput(f"conversation {sid!r} is stored for another user, not {given!r}")


def plan_append(fence: int, last_id: int, epoch: int, first_id: int) -> AppendStatus | int:
    """``fenced``, ``gap``, or how many leading events of the batch are already stored.

    ``first_id`` is the batch's first id (``last_id + 1`` for an empty batch).
    """
    if epoch < fence:
        return "fenced"
    if first_id > last_id + 1:
        return "gap"
    return max(0, last_id - first_id + 1)


def plan_checkpoint(
    fence: int, saved_covers: int | None, epoch: int, covers_id: int
) -> CheckpointStatus:
    if epoch < fence:
        return "fenced"
    if saved_covers is not None and covers_id < saved_covers:
        return "stale"
    return "ok"
