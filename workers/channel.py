"""The channel between a node and one of its agent worker processes: frames and kinds.

One Unix socket pair per worker, both directions on it. A frame is a 4-byte big-endian
length, then one msgpack array whose first element is the kind (never pickle: a worker
runs agent code, and nothing it sends may execute in the node). Both sides read frames
in their protocol's ``data_received``: no task per message, futures keyed by request id.

node -> worker                              worker -> node
  OPEN     rid lid sid user settings          HELLO    pid speculative
           resumed-after checkpoint           FATAL    message (the agent did not load)
  DISPATCH rid lid action                     EMIT     rid lid event state
  CLOSE    rid lid                            READ     rid lid after limit (history)
  CANCEL   lid (its dispatch)                 SAVE     rid lid covers data (checkpoint)
  PING     seq                                DONE     rid lid state
  REPLY    rid answer (to EMIT, READ, SAVE)   FAILED   rid lid kind detail state
  REFUSE   rid kind detail (to the same)      PONG     seq
  STOP

``rid`` numbers requests on the side that sends them (node requests: OPEN, DISPATCH,
CLOSE; worker requests: EMIT, READ, SAVE). OPEN's ``checkpoint`` is ``[covers, data]``
or nil; REPLY's answer is the event id (EMIT), a page of events (READ) or nil (SAVE).
``lid`` names one agent instance: the node never reuses one, so a late frame of a
replaced instance cannot reach its successor. FAILED and
REFUSE carry ``kind`` ``Fenced`` or ``SpeculationLost`` with that exception's arguments
as ``detail`` (each side raises the exception of that name), ``InvalidInput`` with its
message (an event refused), ``memory`` (the agent ran out of memory), ``cancelled``, or
``error`` with a message. PONG is answered from the
worker's event loop, so a loop that stopped turning stops answering (the node's
watchdog). A thread in the worker writes STALLED frames (``lid`` of the task that holds
the loop, 0 when unknown) to a second, one-way pipe: the only frame not from the loop.
"""

from __future__ import annotations

import importlib
import struct
import sys
from typing import Any

import msgpack

from .protocol import ERRORS

# node -> worker
OPEN, DISPATCH, CLOSE, CANCEL, PING, REPLY, REFUSE, STOP = range(1, 9)
# worker -> node
HELLO, FATAL, EMIT, DONE, FAILED, PONG, STALLED, READ, SAVE = range(10, 19)

# FAILED / REFUSE kinds besides the two exception names.
ERROR, MEMORY, CANCELLED = "error", "memory", "cancelled"
INVALID = "InvalidInput"  # an event or a request the other side refused, as that exception

MAX_FRAME = 64 * 1024 * 1024  # far above any event (the node bounds actions at 64 KiB)
_HEADER = 4


class ChannelError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def frame(message: list[Any]) -> bytes:
    """``message`` as one frame (raises TypeError/ValueError if msgpack cannot encode it)."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ValueError(f"a {len(body)}-byte frame is over the channel's {MAX_FRAME} bytes")
    return len(body).to_bytes(_HEADER, "big") + body


_NESTING = 512  # msgpack packs no deeper (ValueError): a walk need not go further
_CONTAINERS = (dict, list, tuple)
# What JSON has (bool is an int), and bytes: socket.io sends them to clients as binary,
# REST as {"base64": ...}.
_SCALARS = (str, int, float, bytes, type(None))
# Values with nothing to check, by type (a subclass of one, msgpack's too, is checked).
_PLAIN = frozenset((bool, float, bytes, type(None)))
_MIN_INT, _MAX_INT = -(2**63), 2**64 - 1  # msgpack's integers
_SHOWN = 120  # characters of a path an error names


def event_problem(event: dict[str, Any]) -> str | None:
    """Why the node could not take ``event`` (an agent's) from a frame, or None, naming
    what and where: a map key that is not a string (msgpack carries a tuple key as an
    array, which cannot be a key when it is read, and the node would have to drop the
    whole channel), a value JSON does not have (a set, a datetime: msgpack refuses them)
    but bytes, an integer msgpack cannot carry.
    The node checks the rest of an event's shape itself. Once per emit: about 1 us for an
    OpenHands event; only a problem found pays for its path."""
    found = _problem(event, 0)
    if found is None:
        return None
    path, why = found
    where = "".join(
        f"[{step}]" if type(step) is int else f".{step}" if step.isidentifier() else f"[{step!r}]"
        for step in reversed(path)
    ).lstrip(".")
    if len(where) > _SHOWN:
        where = where[: _SHOWN - 1] + "\u2026"
    return f"{why} ({'at ' + where if where else 'at the top level'})"


def too_many_containers(value: Any, most: int) -> bool:
    """Whether ``value`` holds more than ``most`` maps and arrays (itself included): what
    the node's reader of a frame takes (``FrameReader``), checked before sending."""
    stack = [value]
    left = most
    while stack:
        container = stack.pop()
        if not isinstance(container, _CONTAINERS):
            continue
        left -= 1
        if left < 0:
            return True
        stack.extend(container.values() if isinstance(container, dict) else container)
    return False


def _problem(value: Any, depth: int) -> tuple[list[Any], str] | None:
    """What ``value`` (a container) holds that ``event_problem`` refuses, and the steps
    to it, innermost first (appended to on the way out: built only when found)."""
    if depth > _NESTING:
        return [], f"nesting deeper than {_NESTING} levels, which msgpack refuses"
    if isinstance(value, dict):
        for key, child in value.items():
            if type(key) is not str:
                return [], (
                    "a key that is not a string, which JSON does not have: "
                    f"a {type(key).__name__} key"
                )
            kind = type(child)
            if kind is str or kind in _PLAIN or (kind is int and _MIN_INT <= child <= _MAX_INT):
                continue  # most of them
            if isinstance(child, _CONTAINERS):
                if (found := _problem(child, depth + 1)) is not None:
                    found[0].append(key)
                    return found
            elif (why := _scalar_problem(child)) is not None:
                return [key], why
        return None
    for child in value:
        kind = type(child)
        if kind is str or kind in _PLAIN or (kind is int and _MIN_INT <= child <= _MAX_INT):
            continue
        if isinstance(child, _CONTAINERS):
            found = _problem(child, depth + 1)
        elif (why := _scalar_problem(child)) is None:
            continue
        else:
            found = [], why
        if found is not None:
            found[0].append(next(i for i, c in enumerate(value) if c is child))
            return found
    return None


def _scalar_problem(value: Any) -> str | None:
    if not isinstance(value, _SCALARS):
        return f"a value of type {type(value).__name__}, which JSON does not have"
    if isinstance(value, int) and not _MIN_INT <= value <= _MAX_INT:
        return "an integer beyond 64 bits, which msgpack cannot carry"
    return None


class MemoryFrame:
    """The FAILED frame that says an agent ran out of memory, built before it is needed:
    packing a frame when memory has run out can fail like anything else that allocates.
    ``fill`` writes a request's and an instance's numbers into it in place."""

    _NUMBER = struct.Struct(">Q")  # msgpack's uint64 body: room for any rid or lid

    def __init__(self) -> None:
        wide = (1 << 64) - 1  # packed as uint64 (0xcf and 8 bytes), whatever is filled in
        self._buf = bytearray(frame([FAILED, wide, wide, MEMORY, "out of memory", ""]))
        self._rid = self._buf.index(b"\xcf") + 1
        self._lid = self._buf.index(b"\xcf", self._rid) + 1

    def fill(self, rid: int, lid: int) -> bytearray:
        """The frame for request ``rid`` of instance ``lid`` (the same buffer each time)."""
        self._NUMBER.pack_into(self._buf, self._rid, rid)
        self._NUMBER.pack_into(self._buf, self._lid, lid)
        return self._buf


class FrameReader:
    """Reassembles frames from a byte stream. ``max_containers``: how many maps and
    arrays one frame may hold (None: any), as the node reads a worker's: an empty map is
    one byte on the channel and 64 in memory, and a frame of them decoded in one call
    (4 MiB: 350 MB of the node's memory, its loop held half a second)."""

    def __init__(self, max_containers: int | None = None) -> None:
        self._buf = bytearray()
        self._max_containers = max_containers

    def feed(self, data: bytes) -> list[list[Any]]:
        """The complete messages ``data`` finishes, in order; raises ChannelError."""
        buf = self._buf
        buf += data
        out: list[list[Any]] = []
        start, end = 0, len(buf)
        while end - start >= _HEADER:
            size = int.from_bytes(buf[start : start + _HEADER], "big")
            if size > MAX_FRAME:
                raise ChannelError(f"frame of {size} bytes announced (limit {MAX_FRAME})")
            stop = start + _HEADER + size
            if stop > end:
                break
            with memoryview(buf) as view:
                message = self._decode(view[start + _HEADER : stop])
            if not isinstance(message, list) or not message or type(message[0]) is not int:
                raise ChannelError("a frame must be a non-empty array starting with its kind")
            out.append(message)
            start = stop
        if start:
            del buf[:start]
        return out

    def _decode(self, body: memoryview) -> Any:
        hooks: dict[str, Any] = {}
        # Each map or array takes a byte at least: a frame no longer than the bound holds
        # no more (the usual case, decoded without a call per container).
        if (most := self._max_containers) is not None and len(body) > most:
            left = most

            def counted(container: Any) -> Any:
                nonlocal left
                left -= 1
                if left < 0:
                    raise _TooMany(f"a frame of more than {most} maps and arrays")
                return container

            hooks = {"list_hook": counted, "object_hook": counted}
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=False, **hooks)
        except _TooMany as exc:
            raise ChannelError(str(exc)) from None
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # TypeError: a map key msgpack cannot hash (an array)
            raise ChannelError(f"undecodable frame: {exc}") from None


class _TooMany(Exception):
    """A frame holds more containers than its reader takes."""


def refusal(kind: str, detail: Any) -> Exception:
    """The exception a FAILED or REFUSE frame stands for, as the other side raised it."""
    errors = importlib.import_module(ERRORS)
    if kind == "Fenced":
        return errors.Fenced(str(detail[0]), int(detail[1]), int(detail[2]))  # type: ignore[no-any-return]
    if kind == "SpeculationLost":
        return errors.SpeculationLost(str(detail[0]), int(detail[1]))  # type: ignore[no-any-return]
    if kind == INVALID:
        return errors.InvalidInput(str(detail))  # type: ignore[no-any-return]
    return errors.CoordinatorError(str(detail))  # type: ignore[no-any-return]


def describe(exc: BaseException) -> tuple[str, Any]:
    """``(kind, detail)`` for a FAILED or REFUSE frame."""
    errors = sys.modules.get(ERRORS)  # not imported yet: it cannot be one of them
    if errors is not None and isinstance(exc, errors.Fenced):
        return "Fenced", [exc.sid, exc.epoch, exc.current]
    if errors is not None and isinstance(exc, errors.SpeculationLost):
        return "SpeculationLost", [exc.sid, exc.predicted]
    if errors is not None and isinstance(exc, errors.InvalidInput):
        return INVALID, str(exc)
    return ERROR, f"{type(exc).__name__}: {exc}"
