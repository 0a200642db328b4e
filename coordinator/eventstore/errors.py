"""Errors of the event store, under the coordinator's one root (``CoordinatorError``).

Malformed calls (a bad conversation id, ids that are not contiguous) raise the
coordinator's ``InvalidInput``; a bad ``--event-store`` URL raises ``ConfigError``.
"""

from __future__ import annotations

from ..errors import CoordinatorError, InvalidInput


class StoreError(CoordinatorError):
    """Root of the errors the event store raises on purpose."""


class StoreUnavailable(StoreError, ConnectionError):
    """The store cannot be reached or written (database down, refused login, disk full).

    ``where`` is the store's location with any password removed; nothing was changed
    unless the call was an append whose reply was lost (appends are idempotent: retry)."""

    # What a client is told: the store's address (host, port, role, database) and the
    # driver's words are for the server's log.
    PUBLIC = "the event store is unavailable right now; try again later"

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"event store {where} is unavailable: {reason}")
        self.where = where


class StoreMismatch(StoreError):
    """This node's event store is not the one the cluster's nodes recorded in Redis."""


class StoreCorrupt(StoreError):
    """The store's data is not what this code wrote (foreign file, unknown format)."""


class CheckpointTooLarge(StoreError, InvalidInput):
    """A checkpoint is over the store's size limit; nothing was saved."""

    def __init__(self, sid: str, size: int, limit: int) -> None:
        super().__init__(f"checkpoint of {sid!r} is {size} bytes; the limit is {limit}")
        self.sid = sid
        self.size = size
        self.limit = limit
