"""The room-indexed socket.io client manager behaves like python-socketio's own.

The same random sequence of connects, room changes and disconnects is applied to
python-socketio's ``AsyncManager`` and to ``IndexedRoomsManager``; their tables and
answers must agree after every step.
"""

from __future__ import annotations

from typing import Any

import socketio
from hypothesis import given, settings
from hypothesis import strategies as st
from socketio.base_manager import BaseManager

from coordinator.rooms import IndexedRoomsManager

SIDS = [f"s{i}" for i in range(6)]
NAMESPACES = ["/", "/other"]
ROOMS = ["r1", "r2", "r3"]

op = st.one_of(
    st.tuples(st.just("connect"), st.sampled_from(SIDS), st.sampled_from(NAMESPACES)),
    st.tuples(
        st.just("enter"),
        st.sampled_from(SIDS),
        st.sampled_from(NAMESPACES),
        st.sampled_from(ROOMS),
    ),
    st.tuples(
        st.just("leave"),
        st.sampled_from(SIDS),
        st.sampled_from(NAMESPACES),
        st.sampled_from(ROOMS),
    ),
    st.tuples(st.just("close"), st.sampled_from(ROOMS), st.sampled_from(NAMESPACES)),
    st.tuples(st.just("disconnect"), st.sampled_from(SIDS), st.sampled_from(NAMESPACES)),
)


def _apply(manager: Any, step: tuple[Any, ...], connected: set[tuple[str, str]]) -> None:
    kind = step[0]
    if kind == "connect":
        _, sid, ns = step
        if (sid, ns) in connected:
            return
        # What pre_connect does, with a fixed socket.io sid; pending until connected
        # (half of them stay pending: a disconnect must clear that too).
        manager.basic_enter_room(sid, ns, None, eio_sid=f"e-{sid}-{ns}")
        manager.basic_enter_room(sid, ns, sid, eio_sid=f"e-{sid}-{ns}")
        manager.pending_connect.setdefault(ns, []).append(sid)
        if int(sid[1:]) % 2:
            BaseManager.connect(manager, sid, ns)  # the synchronous part of connect()
        manager.callbacks[sid] = {1: "cb"}
    elif kind == "enter":
        _, sid, ns, room = step
        if (sid, ns) in connected:
            manager.basic_enter_room(sid, ns, room)
    elif kind == "leave":
        _, sid, ns, room = step
        manager.basic_leave_room(sid, ns, room)
    elif kind == "close":
        _, room, ns = step
        manager.basic_close_room(room, ns)
    else:
        _, sid, ns = step
        if (sid, ns) in connected:
            manager.pre_disconnect(sid, ns)
            manager.basic_disconnect(sid, ns)


def _tables(manager: Any) -> dict[str, Any]:
    return {
        "rooms": {
            ns: {room: dict(members) for room, members in rooms.items()}
            for ns, rooms in manager.rooms.items()
        },
        "callbacks": dict(manager.callbacks),
        "pending_connect": {ns: list(v) for ns, v in manager.pending_connect.items()},
        "pending_disconnect": {ns: list(v) for ns, v in manager.pending_disconnect.items()},
        "get_rooms": {
            (sid, ns): sorted(manager.get_rooms(sid, ns)) for sid in SIDS for ns in NAMESPACES
        },
    }


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=40))
def test_indexed_rooms_manager_matches_python_socketio(steps: list[tuple[Any, ...]]) -> None:
    theirs, ours = socketio.AsyncManager(), IndexedRoomsManager()
    connected: set[tuple[str, str]] = set()
    for step in steps:
        _apply(theirs, step, connected)
        _apply(ours, step, connected)
        if step[0] == "connect":
            connected.add((step[1], step[2]))
        elif step[0] == "disconnect":
            connected.discard((step[1], step[2]))
        assert _tables(ours) == _tables(theirs), step
    for sid, ns in sorted(connected):
        ours.basic_disconnect(sid, ns)
    assert ours._joined == {}
