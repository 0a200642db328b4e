"""Secrets out of logs: tokens in query strings and headers, passwords in URLs (and
redis-py's kilobyte-long reprs of its clients, which carry their settings).

A client may put its token in the query string (``?token=``), which uvicorn writes into
its access log and its websocket log lines; a Redis URL may carry a password, which an
error message may quote. ``RedactingFilter`` rewrites every log record that passes a
handler or logger it is installed on; ``install`` puts it on the loggers that quote
client requests, and the CLI puts it on its own handler too, so nothing it prints keeps
a secret.
"""

from __future__ import annotations

import logging
import re
import traceback
from urllib.parse import unquote

_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*://", re.I)
_SECRET_IN_QUERY = re.compile(r"(?P<head>[?&]\w*password=)[^&\s]*", re.I)


def redact_url(text: str) -> str:
    """``text`` with the password of any URL in it (``scheme://user:PASSWORD@``, or a
    ``password=`` query parameter) replaced by ``***``: for logs and error messages.

    A URL's userinfo is everything from ``//`` to the last ``@`` on its line before the
    next URL: a password may hold ``@``, ``/``, ``#``, ``?`` or spaces, which a URL
    parser takes for the host, the path or the end of the URL. So an ``@`` further on
    the same line (an email address after the URL) hides what lies between: too much,
    never too little."""
    return _SECRET_IN_QUERY.sub(r"\g<head>***", _redact_userinfo(text))


def _redact_userinfo(text: str) -> str:
    schemes = list(_SCHEME.finditer(text))
    pieces: list[str] = []
    done = 0
    for i, scheme in enumerate(schemes):
        start = scheme.end()
        line_end = text.find("\n", start)
        end = len(text) if line_end < 0 else line_end
        if i + 1 < len(schemes):
            end = min(end, schemes[i + 1].start())
        at = text.rfind("@", start, end)
        user, colon, _ = text[start : max(at, start)].partition(":")
        if at < 0 or not colon or "/" in user or any(c.isspace() for c in user):
            continue  # no password, or that ":" is not a userinfo's
        pieces += [text[done:start], user, ":***"]
        done = at
    return "".join(pieces) + text[done:]


# Query parameters that carry credentials (the socket.io token, OAuth's access_token,
# and the usual spellings of keys and passwords).
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:token|access_token|id_token|auth|authorization|password|passwd"
    r"|secret|api_key|apikey|key|ssl_password)=)[^&;\s\"'#]*",
    re.I,
)
# A JWT anywhere (three base64url parts, the first a JSON header: "eyJ"), or what a log
# kept of one: websockets' debug lines cut a long frame to its start and end around
# "..." (the token's header and its signature's last characters).
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}(?:\.{1,3}[A-Za-z0-9_-]*)*")
# A token given as JSON (the socket.io CONNECT packet's auth), whatever it looks like.
_JSON_TOKEN = re.compile(r'(?P<head>"(?:token|access_token|password|secret)"\s*:\s*")[^"]*', re.I)
_BEARER = re.compile(r"(?P<head>\bBearer\s+)[^\s\"',;]+", re.I)


# redis-py's repr of a client (its pool's, its connection's settings: 1 KB each), as
# its Sentinel errors quote one per Sentinel asked: the address alone is kept.
_CLIENT_REPR = re.compile(
    r"<redis\.(?:asyncio\.)?client\.Redis\(<redis\.[\w.]*ConnectionPool\("
    r"<redis\.[\w.]*Connection\((?P<inner>.*?)\)>\)>\)>"
)


def _client_address(found: re.Match[str]) -> str:
    host = re.search(r"\bhost=([^,]+)", found["inner"])
    port = re.search(r"\bport=(\d+)", found["inner"])
    return f"<Redis {host[1]}:{port[1]}>" if host and port else "<Redis>"


def _redacted(text: str) -> str:
    text = _CLIENT_REPR.sub(_client_address, text)
    text = redact_url(text)
    text = _QUERY_SECRET.sub(r"\g<head>***", text)
    text = _BEARER.sub(r"\g<head>***", text)
    text = _JSON_TOKEN.sub(r"\g<head>***", text)
    return _JWT.sub("***", text)


def redact(text: str) -> str:
    """``text`` without credentials: each becomes ``***``. A credential hidden by
    percent-encoding (``?tok%65n=%65yJ...``, which a server decodes) is found in the text
    decoded (up to three times over), and the line is then given decoded."""
    clean = _redacted(text)
    decoded = clean
    for _ in range(3):
        if "%" not in decoded:
            break
        decoded = unquote(decoded)
        if (found := _redacted(decoded)) != decoded:
            return found
    return clean


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and its traceback) without credentials."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)))
            record.exc_text = record.exc_text.rstrip("\n")
        return True


# Loggers that write what clients sent (paths with query strings, packet data).
CLIENT_FACING = ("uvicorn.access", "uvicorn.error", "coordinator.engineio", "coordinator.socketio")

_FILTER = RedactingFilter()


def install(logger_names: tuple[str, ...] = CLIENT_FACING) -> None:
    """Put the filter on these loggers (once each)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def install_on_handlers(logger: logging.Logger) -> None:
    """Put the filter on every handler of ``logger``: whatever reaches them, from any
    logger, is redacted (the CLI's root handler)."""
    for handler in logger.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


class NoWebsocketAccessLines(logging.Filter):
    """uvicorn logs every websocket handshake ("WebSocket /path" [accepted]), and the
    websockets library it hands its error logger to logs "connection open", at INFO,
    whether or not the access log is on: a flood of connections would be a flood of
    lines. Installed when the access log is off."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if not isinstance(msg, str):
            return True
        return not (msg.startswith('%s - "WebSocket %s"') or msg in WEBSOCKETS_CHATTER)


WEBSOCKETS_CHATTER = frozenset({"connection open", "connection closed"})


WEBSOCKET_LINES = NoWebsocketAccessLines()
