"""What a client (or a caller of the Python API) may give: ids, query parameters,
settings, and the shape of any decoded JSON or msgpack value. Each check raises
InvalidInput naming what is wrong and quotes the input cut short (``shown``)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import InvalidInput

# How deep and how large a client's action may be, and no NaN or Infinity (which JSON
# does not have, but Python's json module reads).
MAX_DEPTH = 32
MAX_ITEMS = 20_000
# JSON has integers of any size; msgpack (how events are kept and carried) 64 bits.
MIN_INT, MAX_INT = -(2**63), 2**64 - 1


def shape_problem(value: Any, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> str | None:
    """Why ``value`` (decoded JSON or msgpack) is unacceptable, or None. Iterative: no
    input can make it recurse."""
    if not isinstance(value, dict | list | tuple):
        return _scalar_problem(value)
    stack: list[tuple[dict[Any, Any] | list[Any] | tuple[Any, ...], int]] = [(value, 1)]
    items = 1
    while stack:
        container, depth = stack.pop()
        if depth >= max_depth:
            return f"nested too deeply (more than {max_depth} levels)"
        if isinstance(container, dict):
            if any(type(key) is not str for key in container):
                return "a key that is not a string, which JSON does not have"
            children: Iterable[Any] = container.values()
            items += 2 * len(container)  # keys and values
        else:
            children = container
            items += len(container)
        if items > max_items:
            return f"too many values (more than {max_items})"
        for child in children:
            if type(child) is str:  # most of them: nothing to check
                continue
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1))
            elif (problem := _scalar_problem(child)) is not None:
                return problem
    return None


# Scalars every client reads: JSON's, and bytes (socket.io sends them as binary, REST as
# {"base64": ...}).
_CARRIED = (str, bytes, type(None))


def _scalar_problem(value: Any) -> str | None:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "a number is NaN or Infinity, which JSON does not allow"
    elif isinstance(value, int):
        if not MIN_INT <= value <= MAX_INT:
            return "an integer beyond 64 bits, which msgpack cannot carry"
    elif not isinstance(value, _CARRIED):  # a set, a datetime (an agent's), an ExtType
        return f"a value of type {type(value).__name__}, which JSON does not have"
    return None


ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Users are often e-mail addresses; braces and whitespace stay out so hash tags hold.
_USER_RE = re.compile(r"[A-Za-z0-9_.@:+=-]{1,128}")


MAX_EVENT_ID = 2**63 - 1  # event ids are Redis stream ids' first part (and int64 elsewhere)
_INT_TEXT = re.compile(r"-?[0-9]{1,20}")


def shown(value: object, limit: int = 60) -> str:
    """``value``'s repr for an error message, cut at ``limit`` characters: a client's
    input is quoted, never repeated whole."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def given_once(name: str, values: Sequence[str]) -> str | None:
    """A query parameter's one value (None when absent); InvalidInput when it is given
    more than once: which one counts is not for a proxy, a log reader and a node to each
    decide (socket.io's and REST's query strings alike)."""
    if len(values) > 1:
        raise InvalidInput(f"{name} is given {len(values)} times; give it once")
    return values[0] if values else None


def parse_int(name: str, raw: str, low: int, high: int) -> int:
    """An integer given as text (a query parameter): ASCII digits with an optional minus
    (not ``+5``, ``1_0`` or other scripts' digits, which ``int`` reads), within
    ``low..high``; else InvalidInput."""
    if not _INT_TEXT.fullmatch(raw):
        raise InvalidInput(f"{name} must be an integer, got {shown(raw)}")
    return check_int(name, int(raw), low, high)


def check_int(name: str, value: object, low: int, high: int) -> int:
    """``value`` if it is an integer (not a bool) within ``low..high``; else InvalidInput."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer, got {shown(value)}")
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be from {low} to {high}, got {value}")
    return value


def _matching(kind: str, value: object, pattern: re.Pattern[str]) -> str:
    """``value`` if it is a string ``pattern`` matches whole, else InvalidInput naming
    ``kind`` and the characters the pattern allows."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        allowed = pattern.pattern.removesuffix("{1,128}")
        raise InvalidInput(f"invalid {kind} {shown(value)}: expected 1-128 characters of {allowed}")
    return value


def check_conversation_id(sid: object) -> str:
    """Return ``sid`` if it is a valid conversation id, else raise InvalidInput."""
    return _matching("conversation id", sid, ID_RE)


def check_connection_id(cid: object) -> str:
    return _matching("connection id", cid, ID_RE)


def check_user_id(user: object) -> str:
    return _matching("user id", user, _USER_RE)


MAX_SETTINGS_BYTES = 16 * 1024  # an agent's settings, as compact JSON


def check_settings(value: object) -> dict[str, Any]:
    """Agent settings from a client: a JSON object of at most ``MAX_SETTINGS_BYTES`` as
    compact JSON in UTF-8, shaped as an action may be (``inputs.shape_problem``: what an
    agent worker's msgpack carries); None is ``{}``; else InvalidInput."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput("settings must be a JSON object")
    problem = shape_problem(value)
    if problem is not None:
        raise InvalidInput(f"settings must be plain JSON: {problem}")
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        size = len(text.encode())
    except UnicodeEncodeError:  # JSON's \ud800 escapes decode to what UTF-8 cannot hold
        raise InvalidInput("settings must be plain JSON: text that is not UTF-8") from None
    except (TypeError, ValueError) as exc:  # a value JSON has not (a set, a date)
        raise InvalidInput(f"settings must be plain JSON: {exc}") from None
    if size > MAX_SETTINGS_BYTES:
        raise InvalidInput(f"settings must be at most {MAX_SETTINGS_BYTES} bytes of JSON")
    return value


def parse_settings(text: str | None) -> dict[str, Any]:
    """Agent settings given as JSON text (a query parameter); see ``check_settings``."""
    if text is None or text == "":
        return {}
    if len(text) > MAX_SETTINGS_BYTES:
        raise InvalidInput(f"settings must be at most {MAX_SETTINGS_BYTES} bytes of JSON")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"settings are not valid JSON: {exc}") from None
    return check_settings(value)
