"""What the state layer's operations return: small frozen records with typed statuses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

from redis.exceptions import ResponseError

from workers.protocol import Event

# A notice logged when Redis was found to have lost events: (its id, the event).
Notice = tuple[int, Event]

OwnershipStatus = Literal[
    "created", "ok", "mine", "owned", "forbidden", "missing", "purging", "ahead"
]
AcceptStatus = Literal["ok", "missing", "forbidden", "full", "rewound", "behind", "quota"]
CommitStatus = Literal["ok", "dup", "fenced", "unaccepted", "missing", "rewound"]
AdmitStatus = Literal["go", "wait", "evicted", "rejected", "connections"]
AttachStatus = Literal["ok", "missing", "forbidden"]

OWNERSHIP: tuple[OwnershipStatus, ...] = get_args(OwnershipStatus)
ACCEPT: tuple[AcceptStatus, ...] = get_args(AcceptStatus)
COMMIT: tuple[CommitStatus, ...] = get_args(CommitStatus)
ADMIT: tuple[AdmitStatus, ...] = get_args(AdmitStatus)
ATTACH: tuple[AttachStatus, ...] = get_args(AttachStatus)

S = TypeVar("S", bound=str)


def status(value: str, allowed: tuple[S, ...]) -> S:
    """``value`` as one of the ``allowed`` statuses; a script that answers anything else
    is a bug (or another version's script), reported as a Redis error."""
    for known in allowed:
        if value == known:
            return known
    raise ResponseError(f"unexpected script status {value!r}")


@dataclass(frozen=True, slots=True)
class Lease:
    """A conversation owned by one incarnation at one fencing epoch: what a loop needs
    to write as the owner, and what stopping it releases."""

    sid: str
    user: str
    inc: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Ownership:
    """The outcome of ``acquire``: ``created``/``ok`` (ours now, at ``epoch``), ``mine``
    (already ours), ``owned`` (``inc`` holds it), ``forbidden``, ``missing``."""

    status: OwnershipStatus
    epoch: int
    owner: str
    inc: str
    user: str
    applied: int  # the highest action id the log records as processed
    # What the conversation asked for at creation (None: the node's default).
    close_delay: float | None = None
    max_running_time: float | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    """The outcome of ``accept``: the action's event id, and who owned the conversation.
    ``behind``: ``event_id`` is how many events the event store lacks, ``unstored_bytes``
    their size; ``quota``: ``event_id`` is the bytes of the conversation's events."""

    status: AcceptStatus
    event_id: int
    owner: str
    inc: str
    notice: Notice | None = None  # logged before this write (see state/writes.py)
    unstored_bytes: int = 0
    unconfirmed: str = ""  # why fewer replicas than asked confirmed it in time


@dataclass(frozen=True, slots=True)
class Committed:
    """The outcome of ``commit``: ids ``first_id..last_id`` written (``ok``), a retry of a
    write already made (``dup``), or refused (``fenced``: ``first_id`` is the epoch)."""

    status: CommitStatus
    first_id: int
    last_id: int
    now_ms: int
    notice: Notice | None = None  # logged before this write (see state/writes.py)
    others: bool = False  # another node listens to the conversation
    unconfirmed: str = ""  # why fewer replicas than asked confirmed it in time


@dataclass(frozen=True, slots=True)
class Admitted:
    """The outcome of ``admit``: ``go`` (slot held), ``wait``, ``evicted`` or
    ``rejected``; the ``(sid, incarnation)`` of loops that must stop to make room; the
    user's claims (``claims``) and organisation (``org``, '' if none)."""

    status: AdmitStatus
    evicted: list[tuple[str, str]]
    claims: int = 0
    org: str = ""


@dataclass(frozen=True, slots=True)
class OrgPlace:
    """The outcome of ``org_admit``: whether the place is held, how many are taken, and
    (when not held) every ``(sid, holder)`` entry, to find the stale ones."""

    held: bool
    taken: int
    entries: list[tuple[str, str]]
