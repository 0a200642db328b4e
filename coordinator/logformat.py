"""The node's log: one line per record on stderr, as text or as JSON (``--log-format``;
the JSON lines are ``workers/logformat.py``'s, the agent workers' too). Records are
redacted before either format sees them (``redact.py``: the filter on the root
handler), so no token or password reaches the log in either."""

from __future__ import annotations

import logging

from workers import logformat

from . import redact

FORMATS = logformat.FORMATS


def configure(level: str, fmt: str, node: str) -> None:
    """Log at ``level`` in ``fmt`` (``FORMATS``) to stderr, redacted."""
    logformat.configure(level, fmt, "%(asctime)s %(levelname)s %(name)s: %(message)s", node)
    # Whatever reaches the log, from any library, leaves tokens and passwords out.
    redact.install_on_handlers(logging.getLogger())
