"""The durable event store behind the Redis log (DESIGN.md guarantee 11).

Redis keeps each conversation's hot window; the owner moves its events here in order,
in batches, fenced by its epoch. Two backends with one contract (``EventStore`` in
``base.py``): ``FileEventStore`` (a directory, one log file per conversation; the
default, for nodes on one machine) and ``PostgresEventStore`` (for several machines).
``open_store(url)`` picks one from the ``--event-store`` setting.
"""

from .base import (
    DEFAULT_MAX_CHECKPOINT_BYTES,
    AppendResult,
    AppendStatus,
    Batch,
    CheckpointStatus,
    EventStore,
    Lookup,
    StoredConversation,
    StoredEvent,
)
from .errors import (
    CheckpointTooLarge,
    StoreCorrupt,
    StoreError,
    StoreMismatch,
    StoreUnavailable,
)
from .factory import default_path, open_store, shown_url, store_from_url
from .filestore import FileEventStore, FsyncPolicy
from .postgres import PostgresEventStore
from .redact import redact_url

__all__ = [
    "DEFAULT_MAX_CHECKPOINT_BYTES",
    "AppendResult",
    "AppendStatus",
    "Batch",
    "CheckpointStatus",
    "CheckpointTooLarge",
    "EventStore",
    "FileEventStore",
    "FsyncPolicy",
    "Lookup",
    "PostgresEventStore",
    "StoreCorrupt",
    "StoreError",
    "StoreMismatch",
    "StoreUnavailable",
    "StoredConversation",
    "StoredEvent",
    "default_path",
    "open_store",
    "redact_url",
    "shown_url",
    "store_from_url",
]
