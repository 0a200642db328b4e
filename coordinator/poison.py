"""Why a dispatch in an agent worker failed, and the event that answers an action given up.

An action whose dispatch stalled or killed its worker ``max_dispatch_attempts`` times
(a poison action), or ran past ``agent_dispatch_timeout``, is not dispatched again: it is
answered with an ``error`` observation naming it and the reason, committed by the owner
like any agent event, so the loop goes on with the next action (``remoteagent.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers.channel import MEMORY
from workers.protocol import Event

if TYPE_CHECKING:
    from .agentworker import AgentWorker

# Reasons, as the error observation's ``extras.reason`` gives them.
STALLED = "stalled"
DIED = "worker died"
TIMEOUT = "timeout"
OUT_OF_MEMORY = MEMORY  # "memory"

_WHAT = {
    STALLED: "it stalled its agent's worker process",
    DIED: "its agent's worker process died",
    OUT_OF_MEMORY: "its agent ran out of memory",
}


class WorkerLost(Exception):
    """The worker holding an agent instance failed (``reason``); ``suspect``: a dispatch
    or start of this instance was running there and may be why."""

    def __init__(self, reason: str, suspect: bool, worker: AgentWorker) -> None:
        super().__init__(reason)
        self.reason = reason
        self.suspect = suspect
        self.worker = worker


def error_observation(action_id: int, reason: str, tries: int, timeout: float) -> Event:
    """The event that answers action ``action_id``, given up after ``tries`` dispatches
    for ``reason`` (OpenHands' observation shape)."""
    if reason == TIMEOUT:
        content = f"Action {action_id} was not completed: it ran longer than {timeout:g} s."
    else:
        content = (
            f"Action {action_id} was not processed: {_WHAT.get(reason, reason)}; "
            f"given up after {tries} attempt(s)."
        )
    return {
        "observation": "error",
        "content": content,
        "extras": {"action_id": action_id, "reason": reason},
        "source": "environment",
    }
