"""The durable event store behind the Redis log (DESIGN.md guarantee 11).

Redis keeps each conversation's hot window; the owner moves its events here in order,
in batches, fenced by its epoch. Two backends with one contract (``EventStore`` in
``base.py``): ``FileEventStore`` (a directory, one log file per conversation; the
default, for nodes on one machine) and ``PostgresEventStore`` (for several machines).
"""

from .base import (
    DEFAULT_MAX_CHECKPOINT_BYTES,
    AppendResult,
    AppendStatus,
    CheckpointStatus,
    EventStore,
    StoredConversation,
    StoredEvent,
)
from .errors import CheckpointTooLarge, StoreCorrupt, StoreError, StoreUnavailable
from .filestore import FileEventStore, FsyncPolicy
from .postgres import PostgresEventStore
from .redact import redact_url

__all__ = [
    "DEFAULT_MAX_CHECKPOINT_BYTES",
    "AppendResult",
    "AppendStatus",
    "CheckpointStatus",
    "CheckpointTooLarge",
    "EventStore",
    "FileEventStore",
    "FsyncPolicy",
    "PostgresEventStore",
    "StoreCorrupt",
    "StoreError",
    "StoreUnavailable",
    "StoredConversation",
    "StoredEvent",
    "redact_url",
]
