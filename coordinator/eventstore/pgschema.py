"""The PostgreSQL store's tables, their migrations and its SQL, in one place.

Every table lives in one schema (``coordinator`` by default)::

    meta(key, value)                     'schema_version', 'store_id'
    conversations(conversation_id PK,    one row per stored conversation: its user, the
      user_id, epoch, last_id, bytes,    fence epoch, the last stored id and the bytes of
      created_at)                        its events; appends lock it FOR UPDATE
    events(conversation_id, id, epoch,   the events, PK (conversation_id, id)
      data)
    checkpoints(conversation_id PK,      the latest checkpoint
      epoch, covers_id, data)

Migrations run at start, under a transaction-scoped advisory lock, so nodes starting
together apply each one once; a node whose code is older than the database refuses to
start instead of writing a schema it does not know.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..errors import ConfigError
from .errors import StoreCorrupt

SCHEMA_VERSION = 1
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# A conversation's created_at as ms since the epoch (StoredConversation.created).
CREATED_MS = "(extract(epoch FROM created_at) * 1000)::bigint"

# (version, DDL); ``{s}`` is the quoted schema name. Append, never edit.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE {s}.conversations (
            conversation_id text PRIMARY KEY,
            user_id text NOT NULL,
            epoch bigint NOT NULL,
            last_id bigint NOT NULL DEFAULT 0,
            bytes bigint NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX conversations_user_id ON {s}.conversations (user_id);
        CREATE TABLE {s}.events (
            conversation_id text NOT NULL,
            id bigint NOT NULL,
            epoch bigint NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (conversation_id, id)
        );
        CREATE TABLE {s}.checkpoints (
            conversation_id text PRIMARY KEY,
            epoch bigint NOT NULL,
            covers_id bigint NOT NULL,
            data bytea NOT NULL
        );
        """,
    ),
)


def quote_schema(name: str) -> str:
    if not _IDENT.fullmatch(name):
        raise ConfigError(f"event store schema must match [a-z_][a-z0-9_]{{0,62}}, got {name!r}")
    return f'"{name}"'


@dataclass(frozen=True, slots=True)
class Statements:
    """The store's SQL for one schema."""

    conversation: str
    last_ids: str
    lookup: str
    lock: str
    lock_many: str
    create_many: str
    insert_events: str
    update_many: str
    read: str
    count_user: str
    count_all: str
    list_user: str
    delete_conversation: str
    delete_events: str
    delete_checkpoint: str
    raise_fence: str
    saved_covers: str
    save_checkpoint: str
    load_checkpoint: str

    @classmethod
    def for_schema(cls, schema: str) -> Statements:
        s = quote_schema(schema)
        return cls(
            conversation="SELECT user_id, epoch, last_id, bytes, "
            f"{CREATED_MS} AS created FROM {s}.conversations WHERE conversation_id = $1",
            last_ids=f"SELECT conversation_id, last_id FROM {s}.conversations "
            "WHERE conversation_id = ANY($1::text[])",
            # The conversation, or (when $3, a quota, is set) its user's count: one trip.
            lookup="SELECT c.user_id, c.epoch, c.last_id, c.bytes, "
            f"{CREATED_MS.replace('created_at', 'c.created_at')} AS created, "
            f"CASE WHEN c.user_id IS NULL AND $3::int > 0 THEN (SELECT count(*) FROM "
            f"{s}.conversations WHERE user_id = $2::text) ELSE 0 END AS counted "
            f"FROM (SELECT 1) AS one LEFT JOIN {s}.conversations c ON c.conversation_id = $1",
            lock=f"SELECT user_id, epoch, last_id FROM {s}.conversations "
            "WHERE conversation_id = $1 FOR UPDATE",
            # Appends (append_many): every conversation of a batch locked in one order,
            # so that two nodes' batches cannot deadlock; then one statement each for
            # the new conversations, the events and the conversations' totals.
            lock_many=f"SELECT conversation_id, user_id, epoch, last_id FROM {s}.conversations "
            "WHERE conversation_id = ANY($1::text[]) ORDER BY conversation_id FOR UPDATE",
            create_many=f"INSERT INTO {s}.conversations (conversation_id, user_id, epoch) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) ON CONFLICT DO NOTHING",
            insert_events=f"INSERT INTO {s}.events (conversation_id, id, epoch, data) "
            "SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[]) "
            "ON CONFLICT DO NOTHING RETURNING conversation_id",
            update_many=f"UPDATE {s}.conversations AS c SET epoch = u.epoch, "
            "last_id = u.last_id, bytes = c.bytes + u.bytes FROM unnest($1::text[], "
            "$2::bigint[], $3::bigint[], $4::bigint[]) AS u(id, epoch, last_id, bytes) "
            "WHERE c.conversation_id = u.id",
            # The data of the events before each, summed: none after those reaching $4.
            read="SELECT id, data FROM (SELECT id, data, sum(octet_length(data)) OVER "
            f"(ORDER BY id) - octet_length(data) AS before FROM {s}.events "
            "WHERE conversation_id = $1 AND id > $2 ORDER BY id LIMIT $3) AS page "
            "WHERE before < $4 ORDER BY id",
            count_user=f"SELECT count(*) FROM {s}.conversations WHERE user_id = $1",
            count_all=f"SELECT count(*) FROM {s}.conversations",
            list_user=f"SELECT conversation_id, {CREATED_MS} AS created "
            f"FROM {s}.conversations WHERE user_id = $1 "
            "ORDER BY created_at DESC, conversation_id LIMIT $2",
            delete_conversation=f"DELETE FROM {s}.conversations WHERE conversation_id = $1 "
            "RETURNING bytes",
            delete_events=f"DELETE FROM {s}.events WHERE conversation_id = $1",
            delete_checkpoint=f"DELETE FROM {s}.checkpoints WHERE conversation_id = $1",
            raise_fence=f"UPDATE {s}.conversations SET epoch = $2 WHERE conversation_id = $1",
            saved_covers=f"SELECT covers_id FROM {s}.checkpoints WHERE conversation_id = $1",
            save_checkpoint=f"INSERT INTO {s}.checkpoints (conversation_id, epoch, covers_id, "
            "data) VALUES ($1, $2, $3, $4) ON CONFLICT (conversation_id) DO UPDATE SET "
            "epoch = excluded.epoch, covers_id = excluded.covers_id, data = excluded.data",
            load_checkpoint=f"SELECT covers_id, data FROM {s}.checkpoints "
            "WHERE conversation_id = $1",
        )


def _lock_key(schema: str) -> int:
    digest = hashlib.sha256(f"coordinator.eventstore:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def _read_version(conn: Any, s: str) -> tuple[int, str | None]:
    rows = await conn.fetch(
        f"SELECT key, value FROM {s}.meta WHERE key IN ('schema_version', 'store_id')"
    )
    values = {row["key"]: row["value"] for row in rows}
    return int(values.get("schema_version", 0)), values.get("store_id")


async def migrate(conn: Any, schema: str) -> str:
    """Bring the schema up to date; returns the store's identity (made on first run)."""
    s = quote_schema(schema)
    try:
        version, identity = await _read_version(conn, s)
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        version, identity = 0, None
    if version == SCHEMA_VERSION and identity:
        return identity  # the usual start: no lock, no DDL
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(schema))
        await conn.execute(
            f"CREATE SCHEMA IF NOT EXISTS {s}; "
            f"CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL)"
        )
        version, identity = await _read_version(conn, s)
        if version > SCHEMA_VERSION:
            raise StoreCorrupt(
                f"the event store's schema is version {version}; this code knows up to "
                f"{SCHEMA_VERSION}: upgrade the coordinator"
            )
        for number, ddl in MIGRATIONS:
            if number > version:
                await conn.execute(ddl.format(s=s))
        await conn.execute(
            f"INSERT INTO {s}.meta (key, value) VALUES ('schema_version', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            str(SCHEMA_VERSION),
        )
        await conn.execute(
            f"INSERT INTO {s}.meta (key, value) VALUES ('store_id', $1) ON CONFLICT DO NOTHING",
            secrets.token_hex(16),
        )
        _, identity = await _read_version(conn, s)
    assert identity is not None
    return identity
