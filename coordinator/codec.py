"""Wire formats: msgpack everywhere (never pickle), plus event and envelope shapes."""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Any

import msgpack

from workers.protocol import Event

from .errors import InvalidInput

Action = tuple[Event, bytes]  # a validated user action and its packed form

TOO_MANY_CONVERSATIONS = "AGENT_ERROR$TOO_MANY_CONVERSATIONS"
NODE_LOST = "STATUS$NODE_LOST"
CONVERSATION_CLOSED = "STATUS$CONVERSATION_CLOSED"
NODE_DRAINING = "STATUS$NODE_DRAINING"
EVENTS_LOST = "STATUS$EVENTS_LOST"


# What a packed value from Redis or another node may be: far above any event a node
# writes (actions are at most max_action_bytes), a bound on what a bad publisher can make
# a node decode. Nesting is bounded by msgpack's own unpacker (1,024 levels, StackError).
MAX_PACKED_BYTES = 64 * 1024 * 1024


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    """A msgpack value; ValueError (never a RecursionError or MemoryError) if it is
    malformed, nested too deeply or larger than MAX_PACKED_BYTES."""
    if len(data) > MAX_PACKED_BYTES:
        raise ValueError(f"a packed value of {len(data)} bytes (at most {MAX_PACKED_BYTES})")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise ValueError(f"malformed msgpack: {type(exc).__name__} {exc}") from None


# How deep and how large a client's action may be, and no NaN or Infinity (which JSON
# does not have, but Python's json module reads).
MAX_DEPTH = 32
MAX_ITEMS = 20_000


def shape_problem(value: Any, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> str | None:
    """Why ``value`` (decoded JSON or msgpack) is unacceptable, or None. Iterative: no
    input can make it recurse."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    items = 0
    while stack:
        item, depth = stack.pop()
        items += 1
        if items > max_items:
            return f"too many values (more than {max_items})"
        if isinstance(item, float):
            if not math.isfinite(item):
                return "a number is NaN or Infinity, which JSON does not allow"
        elif isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                return f"nested too deeply (more than {max_depth} levels)"
            if isinstance(item, dict):
                items += len(item)  # the keys
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
    return None


def decode_published(data: bytes) -> tuple[int, Event]:
    """Decode a conversation channel message ``[id, event]``."""
    value = unpack(data)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], int)
        or not isinstance(value[1], dict)
    ):
        raise ValueError("malformed event message")
    return value[0], value[1]


def with_id(event_id: int, event: Event) -> Event:
    out = dict(event)
    out["id"] = event_id
    return out


_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def now_iso() -> str:
    """UTC now as ISO 8601 with microseconds, e.g. ``2026-12-01T07:53:24.605626+00:00``.

    Two per action: the date and time part is formatted once a second."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{int((now - second) * 1_000_000):06d}+00:00"


def stamped_at(event: dict[str, Any]) -> float | None:
    """The Unix time of an event's ISO 8601 ``timestamp`` (None: absent or unparsable,
    or without a UTC offset, as an agent may write its own)."""
    stamp = event.get("timestamp")
    if type(stamp) is not str:
        return None
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return None if moment.tzinfo is None else moment.timestamp()


# An action may carry a client-chosen id: sent again with the same id (a retry after a
# lost acknowledgement), it is acknowledged with the first one's event id, not logged again.
CLIENT_ACTION_ID = "client_action_id"
MAX_CLIENT_ACTION_ID = 64


# Fields of an event only the server writes. A client's ``id``, ``source`` and
# ``timestamp`` are replaced (OpenHands clients may send them); one that sends a status
# or an observation is refused: it would look like the server's own status events (a
# forged STATUS$NODE_LOST makes watching nodes restart the loop) or an agent's output.
SERVER_SET = ("id", "source", "timestamp")
RESERVED = ("status", "status_update", "observation")


def user_action(action: object, max_bytes: int) -> Action:
    """Validate a client action and return it as a user event and its packed form."""
    if not isinstance(action, dict):
        raise InvalidInput(f"an action must be an object, got {type(action).__name__}")
    for field_name in RESERVED:
        if field_name in action:
            raise InvalidInput(f"'{field_name}' is reserved for the server's events; remove it")
    problem = shape_problem(action)
    if problem is not None:
        raise InvalidInput(f"the action is not acceptable: {problem}")
    name = action.get("action")
    if not isinstance(name, str) or not name:
        raise InvalidInput("an action needs a non-empty string 'action' field")
    args = action.get("args", {})
    if not isinstance(args, dict):
        raise InvalidInput("an action's 'args' must be an object")
    key = action.get(CLIENT_ACTION_ID)
    if key is not None and not (
        isinstance(key, str) and 0 < len(key) <= MAX_CLIENT_ACTION_ID and key.isprintable()
    ):
        raise InvalidInput(
            f"'{CLIENT_ACTION_ID}' must be a printable string of 1 to "
            f"{MAX_CLIENT_ACTION_ID} characters"
        )
    event: Event = {k: v for k, v in action.items() if k not in SERVER_SET}
    event["args"] = args
    event["source"] = "user"
    event["timestamp"] = now_iso()
    try:
        packed = pack(event)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"the action cannot be encoded: {exc}") from None
    if len(packed) > max_bytes:
        raise InvalidInput(f"the action is {len(packed)} bytes; the limit is {max_bytes}")
    return event, packed


def agent_event(event: Event) -> Event:
    """An agent's event as logged: no id (the log assigns it), source and timestamp set."""
    out = dict(event)
    out.pop("id", None)
    out.setdefault("source", "agent")
    out.setdefault("timestamp", now_iso())
    return out


def status_event(status: str, message: str, agent_state: str | None = None) -> Event:
    """A status update in OpenHands' shape; ``status`` carries its message id."""
    event: Event = {
        "source": "environment",
        "status_update": True,
        "type": "error" if status.startswith("AGENT_ERROR") else "info",
        "status": status,
        "message": message,
        "timestamp": now_iso(),
    }
    if agent_state is not None:
        event["agent_state"] = agent_state
    return event


def evicted_event() -> Event:
    return status_event(
        TOO_MANY_CONVERSATIONS,
        "Too many conversations are running for this user; the least recently used was stopped.",
        "stopped",
    )


def closed_event() -> Event:
    return status_event(CONVERSATION_CLOSED, "The conversation was closed.", "stopped")


def lost_event() -> Event:
    return status_event(
        NODE_LOST,
        "The node running this conversation was lost; it restarts on the next action.",
        "stopped",
    )


def moving_event() -> Event:
    return status_event(
        NODE_DRAINING,
        "The node running this conversation is shutting down; it moves to another node.",
        "stopped",
    )


def events_lost_event(first: int, last: int) -> Event:
    """Redis lost events ``first..last`` (a failover to a replica that lacked them)."""
    lost = f"event {first}" if first == last else f"events {first} to {last}"
    return status_event(
        EVENTS_LOST,
        f"Redis lost {lost} of this conversation in a failover; they cannot be replayed.",
    )


def owner_gone(event: Event) -> bool:
    """Whether ``event`` says the conversation's loop stopped with its node (lost or
    drained): nodes whose clients watch it restart it."""
    return event.get("source") == "environment" and event.get("status") in (
        NODE_LOST,
        NODE_DRAINING,
    )


def envelope(method: str, origin: str, payload: dict[str, Any]) -> bytes:
    """A node-to-node command: method, origin node id and payload."""
    return pack({"m": method, "o": origin, "p": payload})


def open_envelope(data: bytes) -> tuple[str, str, dict[str, Any]]:
    value = unpack(data)
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("m"), str)
        or not isinstance(value.get("o"), str)
        or not isinstance(value.get("p"), dict)
    ):
        raise ValueError("malformed command envelope")
    return value["m"], value["o"], value["p"]
