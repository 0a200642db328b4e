"""engine.io's request environ, made from an ASGI scope without a class per request.

engine.io's ASGI driver builds the WSGI-style environ it works from (``translate_request``)
with a class defined inside the function, for the body it reads: a new class for every
HTTP request and every websocket connection, 11 objects in a reference cycle each (a
class always is one), and 23-34 us of CPU against 9 for this one on the development
machine. A websocket's environ lives as long as its
connection, so those objects reach the cyclic GC's oldest generation and stay after the
connection closed until a full collection, which a node runs rarely
(``cli.FULL_COLLECTION_AFTER``). ``translate_request`` here makes the same environ with
one class for all (``sioserver.PingTrackingServer`` installs it).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class RequestBody:
    """``wsgi.input``: the request's body, read from the ASGI receive on the first read
    (engine.io reads a polling POST's payload through it)."""

    __slots__ = ("_event", "_left", "_receive")

    def __init__(self, event: MutableMapping[str, Any], receive: Receive) -> None:
        self._event = event
        self._receive = receive
        self._left: bytes | None = None  # None: not read yet

    async def read(self, length: int | None = None) -> bytes | None:
        """Up to ``length`` bytes of the body (all that is left: None); None for a
        websocket, which has none (as engine.io's)."""
        if self._event["type"] != "http.request":
            return None
        if self._left is None:
            self._left = await self._body(length)
        if length is None:
            out, self._left = self._left, b""
        else:
            out, self._left = self._left[:length], self._left[length:]
        return out

    async def _body(self, length: int | None) -> bytes:
        event = self._event
        body = event.get("body") or b""
        while event.get("more_body"):
            event = await self._receive()
            if event["type"] != "http.request":
                break  # the client went away
            if length is None or len(body) < length:  # the rest is read, not kept
                body += event.get("body") or b""
        return body


async def translate_request(
    scope: MutableMapping[str, Any], receive: Receive, send: Send
) -> dict[str, Any]:
    """The environ engine.io serves a request or websocket from ({} for any other ASGI
    event): its method, path and query, its headers as ``HTTP_*`` (``CONTENT_TYPE`` and
    ``CONTENT_LENGTH`` apart; one given twice joined with a comma; one that is not UTF-8
    left out), the body, and the ASGI scope, receive and send."""
    event = await receive()
    if event["type"] not in ("http.request", "websocket.connect"):
        return {}
    path = scope["path"]
    query = ""
    with_query = path
    if scope.get("query_string"):
        try:
            query = scope["query_string"].decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            with_query = f"{path}?{query}"
    environ: dict[str, Any] = {
        "wsgi.input": RequestBody(event, receive),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.async": True,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "SERVER_SOFTWARE": "asgi",
        "REQUEST_METHOD": scope.get("method", "GET"),
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "RAW_URI": with_query,
        "SCRIPT_NAME": "",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "0",
        "SERVER_NAME": "asgi",
        "SERVER_PORT": "0",
        "asgi.receive": receive,
        "asgi.send": send,
        "asgi.scope": scope,
    }
    for raw_name, raw_value in scope["headers"]:
        try:
            name, value = raw_name.upper().decode("utf-8"), raw_value.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if name in ("CONTENT-TYPE", "CONTENT-LENGTH"):
            environ[name.replace("-", "_")] = value
            continue
        key = "HTTP_" + name.replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    environ["wsgi.url_scheme"] = environ.get("HTTP_X_FORWARDED_PROTO", "http")
    return environ
