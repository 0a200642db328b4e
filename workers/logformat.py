"""Log records as JSON lines (``--log-format json``), for a node and its agent workers.

One object per line: ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``,
``node``, ``worker`` (an agent worker's pid; absent in the node's own log),
``message`` and, when the record carries one, ``exc`` (the traceback, in one string).
Either format is redacted first (``coordinator/redact.py``, which needs nothing but the
standard library): an agent's own lines lose tokens and passwords as the node's do.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from coordinator import redact

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def __init__(self, node: str, worker: int | None = None) -> None:
        super().__init__()
        self.node = node
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        moment = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "time": f"{moment}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "node": self.node,
        }
        if self.worker is not None:
            line["worker"] = self.worker
        line["message"] = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str, fmt: str, text: str, node: str, worker: int | None = None) -> None:
    """Log at ``level`` to stderr in ``fmt`` (``FORMATS``; ``text`` is the text format),
    redacted."""
    logging.basicConfig(level=level.upper(), format=text)
    if fmt == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter(node, worker))
    # Whatever reaches the log, from any library or agent, leaves credentials out.
    redact.install_on_handlers(logging.getLogger())


def current_format() -> str:
    """The format this process logs in (what its agent workers are told to use)."""
    root = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, JsonFormatter) for h in root) else "text"
