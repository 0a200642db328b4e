"""Handles from ``attach_to_conversation`` held on this node.

Each conversation's handle is counted locally (the cluster-wide refcount is in Redis).
The last detach schedules the release ``close_delay`` later; attaching again before then
reuses the same handle, as the seed reuses a detached conversation.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from .errors import InvalidInput


@dataclass
class ConversationHandle:
    """What ``attach_to_conversation`` hands out; released ``close_delay`` after detach."""

    sid: str
    user: str
    released: bool = False
    released_at: float | None = None


class AttachedHandles:
    def __init__(self, close_delay: float) -> None:
        self._close_delay = close_delay
        self._attached: dict[str, tuple[ConversationHandle, int]] = {}
        self._detached: dict[str, tuple[ConversationHandle, asyncio.TimerHandle]] = {}

    def attach(self, sid: str, user: str) -> ConversationHandle:
        if sid in self._attached:
            handle, n = self._attached[sid]
            self._attached[sid] = (handle, n + 1)
            return handle
        if sid in self._detached:
            handle, timer = self._detached.pop(sid)
            timer.cancel()
        else:
            handle = ConversationHandle(sid, user)
        self._attached[sid] = (handle, 1)
        return handle

    def check(self, handle: object) -> ConversationHandle:
        """The handle, if this node handed it out and it is attached; else InvalidInput."""
        if not isinstance(handle, ConversationHandle):
            raise InvalidInput("detach_from_conversation takes the handle attach returned")
        entry = self._attached.get(handle.sid)
        if entry is None or entry[0] is not handle:
            raise InvalidInput(f"conversation handle {handle.sid!r} is not attached on this node")
        return handle

    def detach(self, handle: ConversationHandle) -> None:
        handle, n = self._attached[self.check(handle).sid]
        if n > 1:
            self._attached[handle.sid] = (handle, n - 1)
            return
        del self._attached[handle.sid]
        timer = asyncio.get_running_loop().call_later(self._close_delay, self._expire, handle.sid)
        self._detached[handle.sid] = (handle, timer)

    def _expire(self, sid: str) -> None:
        entry = self._detached.pop(sid, None)
        if entry is not None:
            _release(entry[0])

    def release_all(self) -> dict[str, int]:
        """At shutdown: release every handle now; how many attaches each conversation
        still had here (the node gives them back to the cluster-wide count)."""
        for handle, timer in self._detached.values():
            timer.cancel()
            _release(handle)
        self._detached.clear()
        held = {sid: n for sid, (_, n) in self._attached.items()}
        for handle, _ in self._attached.values():
            _release(handle)
        self._attached.clear()
        return held


def _release(handle: ConversationHandle) -> None:
    handle.released = True
    handle.released_at = time.monotonic()
