"""JSON answers of the node's HTTP endpoints (REST, the browser pages' data): bytes come
as ``{"base64": ...}``, every answer carries ``COMMON_HEADERS``, and one whose JSON passes
``ANSWER_CHUNK`` is written a piece at a time (chunked) as the client takes it, so the
node never holds it whole (a page of events full of control characters is six times its
packed size in JSON); ``protocols.py`` resets a connection whose answer stops moving.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from starlette.responses import Response, StreamingResponse

COMMON_HEADERS = {
    "access-control-allow-headers": "authorization, content-type",
    "cache-control": "no-store",
}
# An answer whose JSON is longer is written in pieces of about this many bytes, each
# write waiting while the client does not read (uvicorn's flow control): the node holds
# one piece of it (and the transport's buffer), not all of it. Shorter ones go whole,
# with a content-length.
ANSWER_CHUNK = 64 * 1024
# Levels of objects and arrays an answer's JSON is split at: a page's events, a listing's
# conversations, a node's loops are encoded one at a time.
ANSWER_DEPTH = 3


def _binary(value: object) -> dict[str, str]:
    """Bytes (a client may attach them to an action: socket.io carries them as binary,
    the log keeps them) come as ``{"base64": "..."}``."""
    if isinstance(value, bytes | bytearray):
        return {"base64": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not JSON")


_encode = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_binary
).encode


class WrittenOnce(list[Any]):
    """A list an answer lets go of as it writes it, each member once encoded (a page's
    events: a client reading slowly, or not at all, holds what it has not read yet)."""


def json_pieces(value: Any, depth: int = ANSWER_DEPTH) -> Iterator[str]:
    """``value``'s JSON in pieces that join to exactly what one ``json.dumps`` with the
    answers' options writes: arrays and string-keyed objects are split ``depth`` levels
    down, each member below encoded whole (by the C encoder)."""
    if depth > 0 and isinstance(value, list | tuple):
        yield "["
        for i in range(len(value)):
            item = value[i]
            if isinstance(value, WrittenOnce):
                value[i] = None  # the answer holds only what it has not written yet
            if i:
                yield ","
            yield from json_pieces(item, depth - 1)
        yield "]"
    elif depth > 0 and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            yield f"{',' if i else ''}{_encode(key)}:"
            yield from json_pieces(item, depth - 1)
        yield "}"
    else:
        yield _encode(value)


class _JSONAnswer(Response):
    """A JSON answer written whole (it is shorter than ANSWER_CHUNK)."""

    media_type = "application/json"


class _StreamedAnswer(StreamingResponse):
    """A JSON answer written a piece at a time (chunked: its length is not known before
    it is encoded). Starlette stops it when the client goes away (a disconnect, or the
    node dropping a client that does not read)."""

    media_type = "application/json"


async def _written(head: list[str], rest: Iterator[str]) -> AsyncIterator[bytes]:
    """The answer's bytes, about ANSWER_CHUNK at a time (a larger piece, such as one big
    event, is cut to that size once encoded); the event loop runs others between two."""
    size = sum(map(len, head))
    done = False
    while head or not done:
        if size < ANSWER_CHUNK and not done:
            piece = next(rest, None)
            if piece is None:
                done = True
            else:
                head.append(piece)
                size += len(piece)
            continue
        data = "".join(head).encode()
        head.clear()
        size = 0
        for at in range(0, len(data), ANSWER_CHUNK):
            yield data[at : at + ANSWER_CHUNK]
            await asyncio.sleep(0)
        del data


def json_response(status: int, value: Any, headers: Mapping[str, str] | None = None) -> Response:
    """``value`` as the JSON answer: whole when short (an encoding error is the handler's,
    a 500), else its first ANSWER_CHUNK now and the rest as it is written (``value`` must
    not change meanwhile; every handler's is its own)."""
    all_headers = {**COMMON_HEADERS, **(headers or {})}
    pieces = json_pieces(value)
    head: list[str] = []
    size = 0
    for piece in pieces:
        head.append(piece)
        size += len(piece)
        if size >= ANSWER_CHUNK:
            return _StreamedAnswer(_written(head, pieces), status, all_headers)
    return _JSONAnswer("".join(head).encode(), status, all_headers)
