"""The cluster's status as the browser pages see it: typed rows, their JSON, and each
node's advertisement of its public URL. No I/O (``directory.py`` reads the rows).

A node advertises the URL clients reach it at (``serve --public-url``, by default
``http://HOST:PORT``) so a page connected to one node can move to another when its node
goes away. A node is *live* while its lease is; a node whose lease is gone is shown as
*lost* while it is still registered (not reaped yet) or its last advertisement is less
than ``LOST_SHOWN`` seconds old, and forgotten after that.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

LOST_SHOWN = 120.0  # seconds a lost node stays on the dashboard after its last word


@dataclass(frozen=True)
class Advertisement:
    """What a node tells the cluster about itself; ``at`` is wall-clock seconds."""

    node_id: str
    url: str
    node_ttl: float
    at: float

    def encode(self) -> str:
        return json.dumps(
            {"url": self.url, "node_ttl": self.node_ttl, "at": round(self.at, 3)},
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, node_id: str, raw: str) -> Advertisement | None:
        """The advertisement stored for ``node_id``; None when it is not one."""
        try:
            value = json.loads(raw)
            url, ttl, at = value["url"], float(value["node_ttl"]), float(value["at"])
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(url, str) or not math.isfinite(ttl) or not math.isfinite(at):
            return None
        return cls(node_id, url, ttl, at)


@dataclass(frozen=True)
class NodeStatus:
    """One node: live, or lost (its lease is gone) but not forgotten yet."""

    node_id: str
    incarnation: str  # '' when lost and reaped
    url: str  # '' when it never advertised one
    live: bool
    lease_left: float | None  # seconds; None when lost
    lease_age: float | None  # seconds since its last renewal (node_ttl - lease_left)
    loops: tuple[str, ...]  # conversations whose loop it runs
    connections: int
    last_seen: float | None  # wall-clock seconds of its last advertisement

    def view(self, *, loops: tuple[str, ...] | None = None, connections: int | None = None) -> Any:
        """The JSON row, with ``loops``/``connections`` narrowed when given."""
        row = asdict(self)
        row["status"] = "live" if self.live else "lost"
        row["loops"] = list(self.loops if loops is None else loops)
        row["loop_count"] = len(row["loops"])
        if connections is not None:
            row["connections"] = connections
        return row


@dataclass(frozen=True)
class ConversationStatus:
    """One conversation's record, its inbox depth and where it is watched from."""

    conversation_id: str
    user: str
    state: str  # the agent state the loop last recorded ("loading" until it started)
    running: bool
    owner: str  # the node running its loop; '' when none runs it
    epoch: int
    events: int  # the last event id
    applied: int  # the last action the loop processed
    inbox: int  # actions accepted and not processed yet
    connections: dict[str, int]  # node id -> connections watching it there
    created: int | None  # milliseconds
    last_active: int | None  # milliseconds

    def view(self, *, with_user: bool) -> Any:
        row = asdict(self)
        if not with_user:
            del row["user"]
        return row
