"""A node's joined socket.io connections, by the identity of their token, each ended
when its token expires.

A token is checked when its connection joins; a connection could live on for days
after it expired (the token of a user who was logged out or lost their access, for
instance). So a connection ends at its token's ``exp``: its client gets a status update
``STATUS$TOKEN_EXPIRED`` and is disconnected (a server disconnect, which socket.io
clients do not retry on their own: the application reconnects with a fresh token).
Actions sent after ``exp`` and before that are refused.

One task watches for the earliest ``exp`` (no timer per connection) and scans the
connections at most once every ``SCAN_EVERY`` seconds (a connection ends up to that
late). A join still replaying history at ``exp`` (it was allowed when it began) ends
once its replay is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable

from .auth import Identity
from .tasks import TaskSet

SCAN_EVERY = 0.25  # seconds at least between two scans for expired tokens


class Joined:
    """``end(connections)`` tells those connections their token expired and disconnects
    them (their ``pop`` follows); it runs in ``tasks``."""

    def __init__(self, end: Callable[[list[str]], Awaitable[None]], tasks: TaskSet) -> None:
        self._who: dict[str, Identity] = {}  # shared with the token cache: no copy each
        self._end = end
        self._tasks = tasks
        self._due = math.inf  # the earliest expiry the watcher waits for
        self._sooner = asyncio.Event()  # a connection expiring before that joined
        self._watcher: asyncio.Task[None] | None = None

    def add(self, connection_id: str, who: Identity) -> None:
        self._who[connection_id] = who
        if who.expires < self._due:
            self._due = who.expires
            self._sooner.set()
            if self._watcher is None or self._watcher.done():
                self._watcher = self._tasks.spawn(self._watch(), "token expiry")

    def pop(self, connection_id: str) -> Identity | None:
        return self._who.pop(connection_id, None)

    def get(self, connection_id: str) -> Identity | None:
        return self._who.get(connection_id)

    def user(self, connection_id: str) -> str | None:
        who = self._who.get(connection_id)
        return who.user if who is not None else None

    def __len__(self) -> int:
        return len(self._who)

    def items(self) -> list[tuple[str, Identity]]:
        """Each joined connection with its token's identity (a copy)."""
        return list(self._who.items())

    async def _watch(self) -> None:
        while True:
            self._sooner.clear()
            wait = self._due - time.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if math.isinf(wait) else wait):
                        await self._sooner.wait()
                continue
            now = time.time()
            expired = [cid for cid, who in self._who.items() if who.expires <= now]
            self._due = min(
                (w.expires for w in self._who.values() if w.expires > now), default=math.inf
            )
            if expired:
                await self._end(expired)
            await asyncio.sleep(SCAN_EVERY)
