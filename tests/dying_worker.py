"""An agent whose worker process ends right after it said HELLO (every worker of it):
what a node does with workers that fail as soon as they start."""

from __future__ import annotations

import os
from typing import Any

from workers import host
from workers.echo import EchoAgent

_made = host.AgentHost.connection_made


def _hello_then_exit(self: host.AgentHost, transport: Any) -> None:
    _made(self, transport)
    os._exit(3)


host.AgentHost.connection_made = _hello_then_exit  # type: ignore[method-assign]


class DyingAgent(EchoAgent):
    pass
