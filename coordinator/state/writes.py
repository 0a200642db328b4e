"""The two writes of every action: accept (the user's action) and commit (the owner's
events), with what a deployment asks of them.

- ``replicas`` (``--ack-replicas``): each write is followed by ``WAIT`` on the same
  connection, and counts only once that many replicas hold it (else the result says
  why, ``unconfirmed``, and the writer makes it again: see ``accept`` and ``commit``).
  The scripts leave publishing to the writer, which publishes once replicas hold the
  write, so no node delivers what a failover could still undo.
- ``floor``: the highest event id the writer knows was logged. A script that finds the
  conversation's ``seq`` below it refuses (``rewound``): Redis lost the newest events in
  a failover. The ids then continue after ``floor`` (``rewind``) with a notice telling
  clients which events were lost, and the write is made; an id a client saw is never
  given to another event. Every writer passes one (the node's is ``Delivery.floor``; 0
  only where nothing was seen): no default, so no new writer forgets it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .. import codec
from ..errors import NotReplicated
from .core import StateCore, accept_token, text
from .results import ACCEPT, COMMIT, Accepted, Committed, Notice, status

log = logging.getLogger(__name__)

UNBOUNDED = 1 << 50  # a byte bound that never binds


def published(event_id: int, packed: bytes) -> bytes:
    """A channel message ``[id, event]``, as the scripts build it."""
    return b"\x92" + codec.pack(event_id) + packed


class WriteOps(StateCore):
    async def _write(self, name: str, keys: list[str], args: list[Any]) -> tuple[list[Any], str]:
        """Run a hot script; with ``replicas``, also what kept it from counting ('' when
        enough replicas confirmed it)."""
        if not self.replicas:
            r: list[Any] = await self._run(name, keys, args, hot=True)
            return r, ""
        if self.lane is None:
            raise NotReplicated("acknowledged replication needs the script lane")
        r, acked = await self.lane.run_replicated(
            self._scripts[name], keys, args, self.replicas, self.replica_timeout_ms
        )
        if acked >= self.replicas or text(r[0]) not in ("ok", "dup"):
            return list(r), ""
        return list(r), (
            f"the write was made but only {acked} of {self.replicas} replica(s) "
            f"confirmed it within {self.replica_timeout_ms} ms"
        )

    async def _publish_late(self, sid: str, messages: list[bytes]) -> None:
        """Publish what a script left to the writer (replicas now hold it)."""
        channel = self.keys.conv_channel(sid)
        command = "SPUBLISH" if self.sharded else "PUBLISH"
        for message in messages:
            if self.lane is not None:
                self.lane.publish(command, channel, message)
            elif self.sharded:
                await self.redis.spublish(channel, message)
            else:
                await self.redis.publish(channel, message)

    async def rewind(self, sid: str, floor: int, found: int) -> Notice:
        """Continue ``sid``'s ids after ``floor`` (Redis lost ``found+1..floor``), logging
        a notice as the first new id; returns it (id 0: nothing was lost after all)."""
        notice = codec.events_lost_event(found + 1, floor)
        k = self.keys
        r = await self._run(
            "rewind",
            [k.conv(sid), k.events(sid)],
            [floor, codec.pack(notice), k.conv_channel(sid)],
        )
        if int(r[0]):
            log.error(
                "conversation %s: Redis lost events %d..%d (a failover?); ids go on from %d",
                sid,
                found + 1,
                floor,
                int(r[0]) + 1,
            )
        return int(r[0]), notice

    async def _write_rewinding(
        self, name: str, sid: str, keys: list[str], args: list[Any], floor: int
    ) -> tuple[list[Any], str, Notice | None]:
        """``_write``; a script that finds the log below ``floor`` (``rewound``) runs
        again once the ids go on after it (``rewind``). Also the loss notice logged then."""
        notice: Notice | None = None
        for _ in range(2):
            r, unconfirmed = await self._write(name, keys, args)
            if text(r[0]) != "rewound":
                break
            logged = await self.rewind(sid, floor, int(r[1]))
            notice = logged if logged[0] else None
        return r, unconfirmed, notice

    async def accept(
        self,
        sid: str,
        user: str,
        packed: bytes,
        window_events: int,
        inbox_max: int,
        publisher: str = "",
        token: str = "",
        *,
        floor: int,
        window_bytes: int = UNBOUNDED,
        max_bytes: int = 0,
    ) -> Accepted:
        """Log and enqueue a user action. With ``publisher`` (the writer's incarnation), the
        event is published only when another node listens: the writer applies it itself.

        An accept run again with the same ``token`` (a retry after a lost reply, or the
        client's own retry: see ``accept_token``) returns the first one's event id and
        writes nothing, as long as it is among the conversation's last 64 accepts.

        Refused (``behind``) while the events the event store does not hold yet reach
        ``window_events``, or would pass ``window_bytes`` with this one: Redis never
        trims what the store lacks, so this is what bounds the log when the store lags.
        Refused (``quota``) when the conversation's events would pass ``max_bytes``
        (0: no limit).

        With ``replicas``, an accept fewer replicas confirmed in time comes back with
        ``unconfirmed`` (why), published nowhere: it must not be acknowledged nor
        delivered; the client's retry (same token) confirms and publishes it."""
        k = self.keys
        keys = [k.conv(sid), k.events(sid), k.inbox(sid), k.accepted(sid), k.conv_conns(sid)]
        token = token or accept_token(None)
        defer = "1" if self.replicas else ""
        args = [user, packed, window_events, inbox_max, k.conv_channel(sid), token, publisher]
        args += [floor, defer, window_bytes, max_bytes]
        r, unconfirmed, notice = await self._write_rewinding("accept", sid, keys, args, floor)
        result = Accepted(
            status(text(r[0]), ACCEPT),
            int(r[1]),
            text(r[2]),
            text(r[3]),
            notice=notice,
            unconfirmed=unconfirmed,
        )
        if result.status == "behind":
            return replace(result, unstored_bytes=int(r[4]))
        if defer and result.status == "ok" and int(r[4]) and not unconfirmed:
            await self._publish_late(sid, [published(result.event_id, packed)])
        return result

    async def commit(
        self,
        sid: str,
        inc: str,
        epoch: int,
        packed_events: Sequence[bytes],
        *,
        cause: int = 0,
        index: int = 0,
        state: str = "",
        publisher: str = "",
        writer: str = "",
        accepted_as: str = "",
        floor: int,
        held: Committed | None = None,
    ) -> Committed:
        """Append events as the owner (fenced); ``publisher`` as in ``accept``.

        A retry after a lost reply is recognised (status ``dup``) by ``(cause, index)``
        for a write answering action ``cause``, else by ``(writer, index)``. With
        ``accepted_as`` (the accept token of action ``cause``, dispatched before its
        accept answered) the write goes through only if that accept logged the action
        as ``cause``: else status ``unaccepted`` and nothing is written.

        With ``replicas``, a write fewer replicas confirmed in time comes back with
        ``unconfirmed`` (why), published nowhere: the caller must not deliver it either
        (a failover could still undo it and give its ids to other events), and makes
        the same write again, passing that result as ``held``. The same write is then a
        ``dup`` (still in the log) and, once replicas confirm it, this returns ``held``'s
        ids and publishes them; a failover that lost it makes it anew."""
        k = self.keys
        keys = [k.conv(sid), k.events(sid), k.inbox(sid), k.conv_conns(sid), k.accepted(sid)]
        defer = "1" if self.replicas else ""
        args = [inc, epoch, k.conv_channel(sid), cause, index, state, publisher]
        args += [writer, accepted_as, floor, defer, *packed_events]
        r, unconfirmed, notice = await self._write_rewinding("commit", sid, keys, args, floor)
        result = Committed(
            status(text(r[0]), COMMIT),
            int(r[1]),
            int(r[2]),
            int(r[3]),
            notice=notice,
            others=bool(int(r[4])),
            unconfirmed=unconfirmed,
        )
        if unconfirmed:
            return result
        if result.status == "dup" and held is not None:
            notice = notice or held.notice
            result = replace(held, now_ms=result.now_ms, notice=notice, unconfirmed="")
        if defer and result.status == "ok" and result.others:
            ids = range(result.first_id, result.last_id + 1)
            await self._publish_late(
                sid, [published(i, p) for i, p in zip(ids, packed_events, strict=True)]
            )
        return result
