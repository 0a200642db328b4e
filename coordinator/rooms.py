"""python-socketio's client manager, with an index of each connection's rooms.

python-socketio finds the rooms a connection is in by scanning every room of the
namespace, and every connection has a room of its own, so each disconnect costs
O(connections): when thousands of clients leave at once (a load balancer restarts, a
network blip), the node spends seconds of CPU there (3,000 clients leaving a node
holding 6,000 took 13 s before this index, see BENCHMARKS.md). Here each connection's
rooms are kept beside python-socketio's own tables, so a disconnect costs O(its rooms).
"""

from __future__ import annotations

from typing import Any

import socketio

_Key = tuple[str, str]  # (namespace, socket.io sid)


class IndexedRoomsManager(socketio.AsyncManager):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        # A connection is in two rooms (the namespace's, None, and its own) and seldom
        # more: a tuple each (56 bytes) rather than a set (216).
        self._joined: dict[_Key, tuple[Any, ...]] = {}

    def basic_enter_room(
        self, sid: str, namespace: str, room: Any, eio_sid: str | None = None
    ) -> None:
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        key = (namespace, sid)
        joined = self._joined.get(key, ())
        if room not in joined:
            self._joined[key] = (*joined, room)

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        super().basic_leave_room(sid, namespace, room)
        key = (namespace, sid)
        joined = self._joined.get(key)
        if joined is not None and room in joined:
            rest = tuple(r for r in joined if r != room)
            if rest:
                self._joined[key] = rest
            else:
                del self._joined[key]

    def get_rooms(self, sid: str, namespace: str) -> list[Any]:
        """The rooms ``sid`` is in, besides the namespace's room of every client (None)."""
        return [room for room in self._joined.get((namespace, sid), ()) if room is not None]

    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        """What python-socketio's does, finding the rooms in the index."""
        for room in list(self._joined.get((namespace, sid), ())):
            self.basic_leave_room(sid, namespace, room)
        self.callbacks.pop(sid, None)
        for pending in (self.pending_connect, self.pending_disconnect):
            waiting = pending.get(namespace)
            if waiting is not None and sid in waiting:
                waiting.remove(sid)
                if not waiting:
                    del pending[namespace]
