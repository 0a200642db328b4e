"""Read models for the REST layer, built on the manager's public API and key schema.

The per-user conversation index (``keys.user_convs``) is written by the manager when it
creates a conversation.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import RedisError

from .manager import ConversationManager
from .state import text

# A list request reads at most this many conversations (newest first).
MAX_LISTED = 1000


def _int(value: str) -> int | None:
    return int(value) if value.lstrip("-").isdigit() else None


def describe(sid: str, meta: dict[str, str], live: set[str]) -> dict[str, Any]:
    """The public view of one conversation record; ``live`` holds live incarnations."""
    inc = meta.get("inc", "")
    running = bool(inc) and inc in live
    return {
        "conversation_id": sid,
        "state": meta.get("state", ""),
        "running": running,
        "owner": meta.get("owner", "") if running else "",
        "created": _int(meta.get("created", "")),
        "last_active": _int(meta.get("last_active", "")),
        "events": _int(meta.get("seq", "")) or 0,
    }


async def list_conversations(manager: ConversationManager, user: str) -> list[dict[str, Any]]:
    """The user's conversations, newest first, with state and owning node."""
    raw = await manager.state.redis.zrevrange(manager.keys.user_convs(user), 0, MAX_LISTED - 1)
    sids = [text(s) for s in raw]
    if not sids:
        return []
    live = set((await manager.nodes()).values())
    # The records manager.conversation() returns, read in one round trip.
    rows = await manager.state.hgetall_many([manager.keys.conv(sid) for sid in sids])
    out = []
    for sid, meta in zip(sids, rows, strict=True):
        # The index only grows; a record that vanished or changed hands is skipped.
        if meta and meta.get("user") == user:
            out.append(describe(sid, meta, live))
    return out


async def conversation_view(manager: ConversationManager, sid: str) -> dict[str, Any]:
    """One conversation's public view ({} when unknown); ownership is checked by the caller."""
    meta = await manager.conversation(sid)
    if not meta:
        return {}
    live = set((await manager.nodes()).values())
    view = describe(sid, meta, live)
    view["user"] = meta.get("user", "")
    return view


async def cluster_view(manager: ConversationManager) -> dict[str, Any]:
    """Live nodes with their incarnations, running loops and connection counts."""
    nodes = await manager.nodes()
    names = sorted(nodes)
    async with manager.state.redis.pipeline(transaction=False) as pipe:
        for node in names:
            pipe.hkeys(manager.keys.node_owned(nodes[node]))
            pipe.hlen(manager.keys.node_conns(nodes[node]))
        rows = await pipe.execute()
    loops: dict[str, list[str]] = {}
    conns: dict[str, int] = {}
    for i, node in enumerate(names):
        loops[node] = sorted(text(s) for s in rows[2 * i])
        conns[node] = int(rows[2 * i + 1])
    return {"nodes": dict(sorted(nodes.items())), "loops": loops, "connections": conns}


async def redis_ok(manager: ConversationManager, limit: float = 2.0) -> tuple[bool, str]:
    """Whether Redis answers PING within ``limit`` seconds; the reason when not."""
    try:
        async with asyncio.timeout(limit):
            await manager.state.redis.ping()
    except TimeoutError:
        return False, f"redis did not answer PING within {limit}s"
    except (RedisError, OSError) as exc:
        return False, f"redis: {exc or type(exc).__name__}"
    return True, ""
