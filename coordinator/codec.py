"""Wire formats: msgpack everywhere (never pickle), plus event and envelope shapes."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import msgpack

from workers.protocol import AgentState, Event

from .errors import InvalidInput, LimitExceeded
from .inputs import MAX_DEPTH, shape_problem

Action = tuple[Event, bytes]  # a validated user action and its packed form

USER_SOURCE = "user"  # a client's action; the loop dispatches every event of this source
TOO_MANY_CONVERSATIONS = "AGENT_ERROR$TOO_MANY_CONVERSATIONS"
NODE_LOST = "STATUS$NODE_LOST"
CONVERSATION_CLOSED = "STATUS$CONVERSATION_CLOSED"
NODE_DRAINING = "STATUS$NODE_DRAINING"
EVENTS_LOST = "STATUS$EVENTS_LOST"
RUNNING_TIME_EXCEEDED = "STATUS$RUNNING_TIME_EXCEEDED"
# Status updates only (never logged): a connection ends as its token expires, or as
# its user's tokens are revoked.
TOKEN_EXPIRED = "STATUS$TOKEN_EXPIRED"
TOKEN_REVOKED = "STATUS$TOKEN_REVOKED"


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


# Fields of an event only the server writes. A client's ``id``, ``source``,
# ``timestamp`` and ``message`` are replaced (OpenHands clients may send them); one that
# sends a status or an observation is refused: it would look like the server's own
# notices (a forged STATUS$NODE_LOST makes watching nodes restart the loop) or an
# agent's output.
SERVER_SET = ("id", "source", "timestamp", "message")
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
    event["message"] = summary(event)
    try:
        packed = pack(event)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"the action cannot be encoded: {exc}") from None
    if len(packed) > max_bytes:
        raise InvalidInput(f"the action is {len(packed)} bytes; the limit is {max_bytes}")
    return event, packed


# The message a logged event carries (OpenHands' web client keeps only events with one):
# at most this many characters of its content.
MESSAGE_CHARS = 200


def summary(event: Event) -> str:
    """A short human-readable ``message`` for ``event``, as OpenHands writes one: a
    message's own text, an observation's content, else what kind of event it is."""
    args = event.get("args")
    if isinstance(args, dict) and isinstance(args.get("content"), str):
        text: str = args["content"]
    elif isinstance(event.get("content"), str) and event["content"]:
        text = event["content"]
    else:
        text = str(event.get("action") or event.get("observation") or "event")
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "\u2026"


# How deep an agent's event may nest: twice a client's action (msgpack gives up at 512).
AGENT_DEPTH = 2 * MAX_DEPTH


def pack_agent_events(events: list[Event], limit: int) -> list[bytes]:
    """``events`` packed as logged; nothing to write when one is not what every client
    reads (InvalidInput: NaN, which JSON has not and OpenHands' web client cannot parse,
    an integer past 64 bits, nesting past ``AGENT_DEPTH``; its values are bounded by its
    bytes) or is over ``limit`` bytes (LimitExceeded, ``max_agent_event_bytes``)."""
    for event in events:
        if (problem := shape_problem(event, AGENT_DEPTH, limit)) is not None:
            raise InvalidInput(f"an agent event is not acceptable: {problem}; nothing was written")
    try:
        packed = [pack(e) for e in events]
    except (TypeError, ValueError) as exc:  # text UTF-8 cannot hold (a lone surrogate)
        why = f"an agent event is not acceptable: it cannot be packed ({exc})"
        raise InvalidInput(f"{why}; nothing was written") from None
    if (largest := max(map(len, packed), default=0)) > limit:
        raise LimitExceeded(
            "agent event bytes",
            f"an event of {largest} bytes is over the limit of {limit} bytes for one "
            "agent event; nothing was written",
        )
    return packed


def agent_event(event: Event) -> Event:
    """An agent's event as logged: no id (the log assigns it), source and timestamp set,
    and OpenHands' fields an agent may leave out (``message``; ``args`` of an action,
    ``content`` and ``extras`` of an observation). InvalidInput if it claims to come
    from the user: only a client's action does, and the loop dispatches what does."""
    if event.get("source") == USER_SOURCE:
        raise InvalidInput(
            "an agent event is not acceptable: its source is 'user', which only a "
            "client's action has (an agent's is 'agent' or 'environment'); nothing was written"
        )
    out = dict(event)
    out.pop("id", None)
    out.setdefault("source", "agent")
    out.setdefault("timestamp", now_iso())
    if "observation" in out:
        out.setdefault("content", "")
        out.setdefault("extras", {})
    else:
        out.setdefault("args", {})
    if not isinstance(out.get("message"), str):
        out["message"] = summary(out)
    return out


# Agent state changes are logged as OpenHands' ``agent_state_changed`` observations; the
# coordinator's own (a loop stopped, evicted, moved, lost) name why in ``extras.reason``,
# one of these codes, and go out live with a transient status update of the same code.
AGENT_STATE_CHANGED = "agent_state_changed"
NOTICE_CODES = (
    TOO_MANY_CONVERSATIONS,
    NODE_LOST,
    CONVERSATION_CLOSED,
    NODE_DRAINING,
    EVENTS_LOST,
    RUNNING_TIME_EXCEEDED,
)
# The notices after which a conversation's connections are closed, on every node (as
# the seed's ``_close_session`` disconnects them).
CLOSING = (TOO_MANY_CONVERSATIONS, CONVERSATION_CLOSED, RUNNING_TIME_EXCEEDED)


def state_changed(agent_state: str, reason: str = "", message: str = "") -> Event:
    """An ``agent_state_changed`` observation (logged: replay restores the state)."""
    return {
        "source": "environment",
        "observation": AGENT_STATE_CHANGED,
        "content": "",
        "extras": {"agent_state": agent_state, "reason": reason},
        "message": message or f"The agent is now {agent_state}.",
        "timestamp": now_iso(),
    }


def with_state_note(events: list[Event], changed: str) -> tuple[list[Event], int]:
    """``events`` with an ``agent_state_changed`` observation for the agent's state
    ``changed`` to (unless '' or they carry one of the coordinator's own), before them
    when the agent starts running, after them otherwise, as OpenHands logs them; and how
    many events follow the last of ``events`` (0 or 1)."""
    if not changed or any(e.get("observation") == AGENT_STATE_CHANGED for e in events):
        return events, 0
    note = state_changed(changed)
    if changed == AgentState.RUNNING:
        return [note, *events], 0
    return [*events, note], 1


def status_update(code: str, message: str) -> Event:
    """A transient status update in OpenHands' shape: sent, never logged, no event id
    (``id`` is the message code)."""
    return {
        "status_update": True,
        "type": "error" if code.startswith("AGENT_ERROR") else "info",
        "id": code,
        "message": message,
    }


def notice_code(event: Event) -> str:
    """The notice code of a logged coordinator event ('' if it is none): the reason of a
    state change or the ``error_id`` of an error observation."""
    if event.get("source") != "environment":
        return ""
    extras = event.get("extras")
    if not isinstance(extras, dict):
        return ""
    kind = event.get("observation")
    code = extras.get("reason") if kind == AGENT_STATE_CHANGED else extras.get("error_id")
    return code if code in NOTICE_CODES else ""


def is_state_note(event: Event) -> bool:
    """A state change the runner logged for its agent (not a coordinator's notice)."""
    return (
        event.get("source") == "environment"
        and event.get("observation") == AGENT_STATE_CHANGED
        and not notice_code(event)
    )


def notice_update(event: Event) -> Event | None:
    """The status update a logged notice goes out with when delivered live, or None."""
    code = notice_code(event)
    return status_update(code, str(event.get("message", ""))) if code else None


def evicted_event() -> Event:
    return state_changed(
        "stopped",
        TOO_MANY_CONVERSATIONS,
        "Too many conversations are running for this user; the least recently used was stopped.",
    )


def closed_event() -> Event:
    return state_changed("stopped", CONVERSATION_CLOSED, "The conversation was closed.")


def overdue_event() -> Event:
    return state_changed(
        "stopped",
        RUNNING_TIME_EXCEEDED,
        "The conversation ran for its maximum running time and was closed.",
    )


def lost_event() -> Event:
    return state_changed(
        "stopped",
        NODE_LOST,
        "The node running this conversation was lost; it restarts on the next action.",
    )


def moving_event(node_id: str) -> Event:
    """The notice of draining node ``node_id``, which stops the loop here to let it go."""
    event = state_changed(
        "stopped",
        NODE_DRAINING,
        "The node running this conversation is shutting down; it moves to another node.",
    )
    event["extras"]["node_id"] = node_id
    return event


def moving_from(event: Event) -> str:
    """The draining node a moving notice names ('' if none: an older node's notice)."""
    node_id = event.get("extras", {}).get("node_id")
    return node_id if type(node_id) is str else ""


def events_lost_event(first: int, last: int) -> Event:
    """Events ``first..last`` are lost (Redis' failover to a replica that lacked them, or
    the event store's, of events the Redis log no longer held): an ``error`` observation,
    logged under the next id (stored in the first lost one's place, by the store's)."""
    lost = f"Event {first} was" if first == last else f"Events {first} to {last} were"
    text = f"{lost} lost in a failover; they cannot be replayed."
    return {
        "source": "environment",
        "observation": "error",
        "content": text,
        "extras": {"error_id": EVENTS_LOST, "first": first, "last": last},
        "message": text,
        "timestamp": now_iso(),
    }


def null_observation() -> Event:
    """OpenHands' null observation (its client shows nothing for it): what stands for
    each lost id after the first, which carries the notice (``events_lost_event``)."""
    return {
        "source": "environment",
        "observation": "null",
        "content": "",
        "extras": {},
        "message": "",
        "timestamp": now_iso(),
    }


def owner_gone(event: Event) -> bool:
    """Whether ``event`` says the conversation's loop stopped with its node (lost or
    drained): nodes whose clients watch it restart it."""
    return notice_code(event) in (NODE_LOST, NODE_DRAINING)


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
