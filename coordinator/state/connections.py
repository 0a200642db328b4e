"""Connections in Redis: which connection watches which conversation, from which node.

Each connection is listed three times, so any node can answer each query with one read:
under its conversation (cid -> incarnation), its user (cid -> sid) and its node's
incarnation (cid -> sid).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from workers.protocol import Event

from .core import SizeHint, StateCore, text

Conn = tuple[str, str, str]  # (connection id, sid, user)
Command = tuple[Any, ...]


class ConnectionOps(StateCore):
    async def add_connections(self, conns: Sequence[Conn], inc: str) -> None:
        """Register ``(cid, sid, user)`` connections held by ``inc``."""
        k = self.keys

        def commands(cid: str, sid: str, user: str) -> list[Command]:
            return [
                ("HSET", k.conv_conns(sid), cid, inc),
                ("HSET", k.user_conns(user), cid, sid),
                ("HSET", k.node_conns(inc), cid, sid),
            ]

        await self._per_connection(conns, commands)

    async def join_and_read(
        self,
        cid: str,
        sid: str,
        user: str,
        inc: str,
        after: int,
        count: int,
        max_bytes: int,
        hint: SizeHint | None = None,
    ) -> tuple[int | None, list[tuple[int, Event]], int, int]:
        """Register connection ``cid`` of ``inc`` and read its first page of the log
        (``count`` events and about ``max_bytes`` at most: ``_page``, with ``hint``): the
        conversation's last id (None without a record), the events after ``after``, their
        packed size, and how many connections the user holds now on all nodes (this one
        included). One round trip: the registration is made before the read (same
        connection, or on a cluster the conversation's shard, in order), so an event
        logged after the read is published to this node.

        The count makes the per-user connection cap exact without a lock: a join that
        finds more than the cap is refused and unregistered, so every connection kept was
        within the cap when it was counted with all those kept before it (a race near the
        cap refuses both racers, never admits both)."""
        k = self.keys
        commands, read = self._page(sid, after, count, max_bytes, hint)
        replies = await self._commands(
            [
                ("HSET", k.conv_conns(sid), cid, inc),
                ("HSET", k.node_conns(inc), cid, sid),
                ("HSET", k.user_conns(user), cid, sid),
                ("HLEN", k.user_conns(user)),
                *commands,
                *self._barrier(sid),
            ]
        )
        replies = self._check_barrier(sid, replies)
        seq, rows, size = read(replies[4:])
        return seq, rows, size, int(replies[3])

    async def remove_connections(
        self, conns: Sequence[Conn], inc: str, retention_ms: int = 0
    ) -> None:
        """Forget ``(cid, sid, user)`` connections of ``inc`` (idempotent). With
        ``retention_ms``, a conversation no node runs whose last connection this was
        retires as its owner's release would have retired it, had the connection been
        gone then (a drain hands loops off before it says goodbye to its clients; a
        stopped conversation whose client never came back stayed in Redis for good)."""
        k = self.keys
        release = self._scripts["release"].sha

        def commands(cid: str, sid: str, user: str) -> list[Command]:
            forget: list[Command] = [
                ("HDEL", k.conv_conns(sid), cid),
                ("HDEL", k.user_conns(user), cid),
                ("HDEL", k.node_conns(inc), cid),
            ]
            if not retention_ms:
                return forget
            keys = self.conversation_keys(sid)  # RELEASE of no owner (''), state kept ('')
            return [*forget, ("EVALSHA", release, len(keys), *keys, "", "", "", retention_ms)]

        replies = await self._per_connection(conns, commands)
        if retention_ms:
            retired = [(sid, user) for (_, sid, user), r in zip(conns, replies, strict=True)
                       if int(r[-1]) == 2]  # fmt: skip
            await self.unlist(retired)

    async def _per_connection(
        self, conns: Sequence[Conn], commands: Callable[[str, str, str], list[Command]]
    ) -> list[list[Any]]:
        """Each connection's commands (idempotent), one round trip per 500 connections;
        each connection's replies."""
        out: list[list[Any]] = []
        for start in range(0, len(conns), 500):
            each = [commands(cid, sid, user) for cid, sid, user in conns[start : start + 500]]
            replies = await self._commands([c for mine in each for c in mine])
            at = 0
            for mine in each:
                out.append(replies[at : at + len(mine)])
                at += len(mine)
        return out

    async def node_connections(self, inc: str) -> dict[str, str]:
        """cid -> sid of the connections ``inc`` holds (or held, if it died)."""
        raw = await self.redis.hgetall(self.keys.node_conns(inc))
        return {text(k): text(v) for k, v in raw.items()}

    async def drop_node_connections(self, inc: str) -> None:
        """Forget ``inc``'s connection index (its entries were moved or removed)."""
        await self.redis.delete(self.keys.node_conns(inc))

    # -- cluster-wide queries --------------------------------------------------------
    async def connections_of(self, sids: Sequence[str]) -> dict[str, str]:
        """cid -> sid for the connections of ``sids``, on every node."""
        rows = await self._hgetall_many([self.keys.conv_conns(s) for s in sids])
        return {cid: sid for sid, row in zip(sids, rows, strict=True) for cid in row}

    async def connections_of_user(self, user: str) -> dict[str, str]:
        """cid -> sid for the user's connections, on every node."""
        raw = await self.redis.hgetall(self.keys.user_conns(user))
        return {text(k): text(v) for k, v in raw.items()}

    async def connections_of_nodes(self, incs: Sequence[str]) -> dict[str, str]:
        """cid -> sid for the connections the incarnations ``incs`` hold."""
        out: dict[str, str] = {}
        for row in await self._hgetall_many([self.keys.node_conns(i) for i in incs]):
            out.update(row)
        return out
