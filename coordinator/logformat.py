"""The node's log: one line per record on stderr, as text or as JSON (``--log-format``;
the JSON lines are ``workers/logformat.py``'s, the agent workers' too). Records are
redacted before either format sees them (``redact.py``: the filter on the root
handler, in the node and in its workers), so no token or password reaches the log."""

from __future__ import annotations

from workers import logformat

FORMATS = logformat.FORMATS


def configure(level: str, fmt: str, node: str) -> None:
    """Log at ``level`` in ``fmt`` (``FORMATS``) to stderr, redacted."""
    logformat.configure(level, fmt, "%(asctime)s %(levelname)s %(name)s: %(message)s", node)
